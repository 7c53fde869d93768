"""Qt-free classification logic behind the Slicer module: a job API over a cached Predictor.

The Predictor runs on a worker thread (the GUI stays responsive); MRML is touched only by the
thread that calls :meth:`ClassificationJob.poll` / :meth:`ClassificationJob.finish` (Slicer's main
thread, driven by a QTimer in the widget). Reading the inputs happens in :meth:`ClassificationLogic.start`,
also on the caller's thread. A cancelled or failed job writes nothing; a finished one replaces the
CT's earlier outputs in one step (see ``scene.write_outputs``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from MMCAFNetLib import scene
from MMCAFNetLib.results import Cancelled, Classification

HEATMAP_METHODS = ("attention", "gradcam", "none")
DEVICES = ("auto", "cuda", "cpu")
UNKNOWN = "unknown"

PredictorLoader = Callable[[str, str], Any]


class JobBusyError(RuntimeError):
    """A classification is already running; only one runs at a time (one model, one GPU)."""


@dataclass
class ClassificationOptions:
    """What the form chooses besides the inputs. ``model_path`` None means the bundled demo model."""

    model_path: Optional[str] = None
    device: str = "auto"
    heatmap: str = "attention"  # "attention" | "gradcam" | "none"
    threshold: float = 0.5
    show: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.heatmap not in HEATMAP_METHODS:
            raise ValueError(f"heatmap method must be one of {HEATMAP_METHODS}, got {self.heatmap!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"heatmap threshold must be within 0..1, got {self.threshold}")


def default_loader(path: str, device: str) -> Any:
    from MMCAFNetLib.inference import Predictor

    return Predictor.load(path, device=device)


def is_cuda_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or the RuntimeError older torch raises) without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )


def _on_cuda(predictor: Any) -> bool:
    return "cuda" in str(getattr(predictor, "device", ""))


class ClassificationJob:
    """One classification in flight. Poll it from the main thread; read ``progress`` anywhere."""

    def __init__(
        self,
        logic: ClassificationLogic,
        ct_node: Any,
        volume: Any,
        record: dict[str, Any],
        lesion: Any,
        options: ClassificationOptions,
    ) -> None:
        self._logic = logic
        self.ct_node = ct_node
        self._volume = volume
        self._record = dict(record)
        self._lesion = lesion
        self.options = options
        self._cancel = threading.Event()
        self._worker_done = threading.Event()
        self._lock = threading.Lock()
        self._done_steps, self._total_steps = 0, 0
        self._finished = False
        self.result: Optional[Classification] = None
        self.outputs: Optional[scene.SceneOutputs] = None
        self.error: Optional[BaseException] = None
        self.messages: list[str] = []
        self.started = time.perf_counter()
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, name="MMCAFNet classification", daemon=True)

    # -- state, safe from any thread --------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Fraction 0..1 of windows done (1.0 once the result is in)."""
        with self._lock:
            if self._worker_done.is_set() and self.error is None and not self.cancelled:
                return 1.0
            return self._done_steps / self._total_steps if self._total_steps else 0.0

    @property
    def percent(self) -> int:
        return round(100 * self.progress)

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return not self._finished

    @property
    def done(self) -> bool:
        """True once the job is over: outputs written, or cancelled, or failed."""
        return self._finished

    def cancel(self) -> None:
        """Ask the worker to stop at the next window; nothing will be written to the scene."""
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the worker thread ends (it does not write the scene)."""
        return self._worker_done.wait(timeout)

    # -- main thread --------------------------------------------------------------------------------
    def poll(self) -> bool:
        """Main thread: when the worker is over, write the outputs (unless cancelled). True when done."""
        if self._finished:
            return True
        if not self._worker_done.is_set():
            return False
        try:
            if self.error is None and not self.cancelled and self.result is not None:
                try:
                    self.outputs = scene.write_outputs(self.ct_node, self.result, show=self.options.show)
                except Exception as exc:  # the scene is as it was (write_outputs is all-or-nothing)
                    self.error = exc
        finally:
            self._finished = True
            self.elapsed = time.perf_counter() - self.started
            self._logic._job_over(self)
        return True

    def finish(self, timeout: Optional[float] = None) -> Optional[scene.SceneOutputs]:
        """Main thread: wait for the worker, write the outputs, re-raise its error. None if cancelled."""
        if not self.wait(timeout):
            raise TimeoutError(f"classification still running after {timeout} s")
        self.poll()
        if self.error is not None:
            raise self.error
        return self.outputs

    # -- worker -------------------------------------------------------------------------------------
    def _start(self) -> None:
        self._thread.start()

    def _progress(self, done: int, total: int) -> None:
        with self._lock:
            self._done_steps, self._total_steps = int(done), int(total)

    def _run(self) -> None:
        try:
            predictor = self._logic.predictor(self.options.model_path, self.options.device)
            try:
                self.result = self._classify(predictor)
            except Exception as exc:
                if not (is_cuda_out_of_memory(exc) and _on_cuda(predictor)):
                    raise
                self._logic._release_cuda()
                self.messages.append("The GPU ran out of memory; classifying on the CPU instead (slower).")
                cpu = self._logic.predictor(self.options.model_path, "cpu")
                self._progress(0, self._total_steps)
                self.result = self._classify(cpu)
        except Cancelled:
            self._cancel.set()
        except BaseException as exc:
            self.error = exc
        finally:
            if self.cancelled:
                self.result = None
            self._worker_done.set()

    def _classify(self, predictor: Any) -> Classification:
        method = None if self.options.heatmap == "none" else self.options.heatmap
        return predictor.classify(
            self._volume,
            self._record,
            lesion=self._lesion,
            heatmap=method,
            threshold=float(self.options.threshold),
            progress=self._progress,
            cancel=self._cancel,
        )


class ClassificationLogic:
    """Loads and caches predictors, starts one job at a time, and runs batches from the console."""

    def __init__(self, loader: Optional[PredictorLoader] = None) -> None:
        self._loader = loader or default_loader
        self._predictors: dict[tuple[str, str], Any] = {}
        self._cache_lock = threading.Lock()
        self._job: Optional[ClassificationJob] = None
        self._start_lock = threading.Lock()

    # -- models ---------------------------------------------------------------------------------
    @staticmethod
    def resolve_model_path(model_path: Optional[str]) -> str:
        if model_path:
            return str(Path(model_path))
        from MMCAFNetLib.resources import demo_checkpoint_path

        return str(demo_checkpoint_path())

    def predictor(self, model_path: Optional[str] = None, device: str = "auto") -> Any:
        """The cached predictor for (model, device); loaded on first use (any thread)."""
        key = (self.resolve_model_path(model_path), device)
        with self._cache_lock:
            if key not in self._predictors:
                self._predictors[key] = self._loader(*key)
            return self._predictors[key]

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._predictors.clear()
        self._release_cuda()

    def _release_cuda(self) -> None:
        with self._cache_lock:
            for key in [k for k, p in self._predictors.items() if _on_cuda(p)]:
                del self._predictors[key]
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    # -- jobs -----------------------------------------------------------------------------------
    @property
    def job(self) -> Optional[ClassificationJob]:
        return self._job

    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.done

    def start(
        self,
        ct_node: Any,
        record: Optional[dict[str, Any]] = None,
        lesion: Any = None,
        options: Optional[ClassificationOptions] = None,
    ) -> ClassificationJob:
        """Main thread: read the inputs from the scene and start classifying on a worker thread.

        ``lesion`` is a markups point / ROI / segmentation node, or already plain data (point,
        box, mask Volume), or None. Raises JobBusyError while another job runs.
        """
        with self._start_lock:  # two starts at once (threads, console scripts): one runs, the other is refused
            if self.busy:
                raise JobBusyError(
                    "a classification is already running; wait for it or press Cancel before starting another"
                )
            options = options or ClassificationOptions()
            volume = scene.volume_from_node(ct_node)
            if lesion is not None and hasattr(lesion, "IsA"):
                lesion = scene.lesion_from_node(lesion, ct_node)
            job = ClassificationJob(self, ct_node, volume, clean_record(record or {}), lesion, options)
            self._job = job
            job._start()
        return job

    def _job_over(self, job: ClassificationJob) -> None:
        if self._job is job:
            self._job = None

    def classify(
        self,
        ct_node: Any,
        record: Optional[dict[str, Any]] = None,
        lesion: Any = None,
        options: Optional[ClassificationOptions] = None,
    ) -> tuple[Optional[Classification], Optional[scene.SceneOutputs]]:
        """Blocking run (console, tests): start, wait, write. Returns (result, output nodes)."""
        job = self.start(ct_node, record, lesion, options)
        outputs = job.finish()
        return job.result, outputs

    def classify_volume_nodes(
        self,
        volume_nodes: Optional[Iterable[Any]] = None,
        record_for: Callable[[Any], dict] = lambda node: {},
        lesion_for: Callable[[Any], Any] = lambda node: None,
        options: Optional[ClassificationOptions] = None,
    ) -> dict[str, Any]:
        """Batch from the Python console: classify every CT (default: all in the scene).

        Returns, by node ID, the output nodes or the exception that stopped that CT (the others
        still run).
        """
        if volume_nodes is None:
            import slicer

            volume_nodes = scene.ct_volume_nodes(slicer.mrmlScene)
        options = options or ClassificationOptions(show=False)
        written: dict[str, Any] = {}
        for node in list(volume_nodes):
            try:
                written[node.GetID()] = self.classify(node, record_for(node), lesion_for(node), options)[1]
            except Exception as exc:
                written[node.GetID()] = exc
        return written


# ----------------------------------------------------------------------------------------------
# The clinical form, as plain data (the widget turns these into combo boxes and spin boxes)
# ----------------------------------------------------------------------------------------------


@dataclass
class FormField:
    name: str
    label: str
    kind: str  # binary | categorical | ordinal | continuous
    choices: list[tuple[str, str]] = field(default_factory=list)  # (value, display) with "unknown" first
    unit: str = ""
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    tooltip: str = ""


def form_schema(entry: Any, models_dir: Any = None) -> Any:
    """The clinical schema the form asks for: the model's own, as it was trained.

    A checkpoint may carry other fields (or other values) than the default schema, and the
    Predictor encodes the record with the checkpoint's schema; a form built from anything else
    would silently leave its fields unknown. Read from the user model's sidecar, else from the
    local checkpoint file (``weights_only``); for a catalog model not downloaded yet, the default
    schema's fields the catalog names. ``entry`` None: the default schema.
    """
    from MMCAFNetLib import ehr, model_catalog

    if entry is None:
        return ehr.default_schema()
    if entry.schema_spec:
        return ehr.ClinicalSchema.from_dict(entry.schema_spec)
    try:
        path = model_catalog.model_path(entry, models_dir)
    except (FileNotFoundError, model_catalog.CatalogError):
        path = None
    if path is not None:
        spec = _checkpoint_schema(path)
        if spec:
            return ehr.ClinicalSchema.from_dict(spec)
    default = ehr.default_schema()
    return default.select([n for n in entry.schema if n in default.field_names]) if entry.schema else default


_SCHEMA_BY_FILE: dict[tuple[str, int, int], Optional[dict]] = {}


def _checkpoint_schema(path: Path) -> Optional[dict]:
    """The schema dict stored in a checkpoint, remembered per (file, size, mtime)."""
    from MMCAFNetLib.model_catalog import checkpoint_facts

    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SCHEMA_BY_FILE:
        _SCHEMA_BY_FILE[key] = checkpoint_facts(Path(path))["schema_spec"]
    return _SCHEMA_BY_FILE[key]


def form_fields(schema: Any) -> list[FormField]:
    """The form for a model's clinical schema: every field can be left "unknown"."""
    fields = []
    for f in schema.fields:
        if f.kind == "continuous":
            low, high = f.plausible_range
            fields.append(
                FormField(f.name, f.label, f.kind, [(UNKNOWN, "unknown")], f.unit, float(low), float(high), f.description)
            )
        else:
            labels = list(f.value_labels) or list(f.values)
            choices = [(UNKNOWN, "unknown"), *zip(f.values, labels)]
            fields.append(FormField(f.name, f.label, f.kind, choices, f.unit, tooltip=f.description))
    return fields


def clean_record(record: dict[str, Any]) -> dict[str, Any]:
    """Form values -> a record for the schema: "unknown", "" and NaN become None (imputed)."""
    cleaned: dict[str, Any] = {}
    for name, value in record.items():
        missing = value is None or (isinstance(value, str) and value.strip().lower() in ("", UNKNOWN))
        missing = missing or (isinstance(value, float) and bool(np.isnan(value)))
        cleaned[name] = None if missing else value
    return cleaned


def result_summary(result: Classification) -> str:
    """One line for the GUI: class, probability, and a warning for demo models."""
    line = f"{result.predicted_label} ({result.predicted_class}): {100 * result.probability:.1f}%"
    if result.model.get("demo"):
        line += "  -  DEMO MODEL trained on synthetic data: not a diagnosis"
    return line
