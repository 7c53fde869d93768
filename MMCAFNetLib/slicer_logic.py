"""Qt-free classification logic behind the Slicer module: a job API over the worker process.

The classification runs in a separate process (:mod:`MMCAFNetLib.worker`) that keeps the model
loaded: inside Slicer a Python thread would be starved (PythonQt holds the GIL while the main thread
idles in the Qt event loop). Everything here runs on the caller's thread (Slicer's main thread,
driven by a QTimer in the widget) and never blocks for long: :meth:`ClassificationLogic.start` reads
the inputs from the scene and hands them over as files; :meth:`ClassificationJob.poll` reads the
worker's progress and, once it is done, its result files, and writes the scene. A cancelled or
failed job writes nothing; a finished one replaces the CT's earlier outputs in one step (see
``scene.write_outputs``).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from MMCAFNetLib import job_files, scene
from MMCAFNetLib.results import Classification
from MMCAFNetLib.worker_client import STOP_GRACE_S, WorkerError, WorkerProcess, describe_exit, wait_for

HEATMAP_METHODS = ("model", "attention", "gradcam", "gradcam++", "none")
DEVICES = ("auto", "cuda", "cpu")
UNKNOWN = "unknown"


class JobBusyError(RuntimeError):
    """A classification is already running; only one runs at a time (one model, one GPU)."""


class WorkerInputError(ValueError):
    """The worker refused the inputs (the CT, the lesion, the record or the model file)."""


@dataclass
class ClassificationOptions:
    """What the form chooses besides the inputs. ``model_path`` None means the bundled demo model."""

    model_path: Optional[str] = None
    device: str = "auto"
    heatmap: str = "model"  # "model" (the checkpoint's recommended method) | "attention" | "gradcam" | "gradcam++" | "none"
    threshold: float = 0.5
    show: bool = True

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.heatmap not in HEATMAP_METHODS:
            raise ValueError(f"heatmap method must be one of {HEATMAP_METHODS}, got {self.heatmap!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"heatmap threshold must be within 0..1, got {self.threshold}")


class ClassificationJob:
    """One classification in flight in the worker process. Poll it from the main thread."""

    def __init__(self, logic: ClassificationLogic, worker: WorkerProcess, ct_node: Any, options: ClassificationOptions) -> None:
        self._logic = logic
        self._worker = worker
        self.ct_node = ct_node
        self.options = options
        self.id = ""
        self._done_steps, self._total_steps = 0, 0
        self._outcome: Optional[str] = None  # "done" | "cancelled" | "error" once the worker is through
        self._cancel_deadline: Optional[float] = None
        self._finished = False
        self.status = "Starting the worker" if not worker.alive else "Queued"
        self.result: Optional[Classification] = None
        self.outputs: Optional[scene.SceneOutputs] = None
        self.error: Optional[BaseException] = None
        self.messages: list[str] = []
        self.started = time.perf_counter()
        self.elapsed = 0.0

    # -- state --------------------------------------------------------------------------------------
    @property
    def progress(self) -> float:
        """Fraction 0..1 of windows done (1.0 once the result is in)."""
        if self._outcome == "done" and not self.cancelled:
            return 1.0
        return self._done_steps / self._total_steps if self._total_steps else 0.0

    @property
    def percent(self) -> int:
        return round(100 * self.progress)

    @property
    def cancelled(self) -> bool:
        return self._cancel_deadline is not None

    @property
    def running(self) -> bool:
        return not self._finished

    @property
    def done(self) -> bool:
        """True once the job is over: outputs written, or cancelled, or failed."""
        return self._finished

    def cancel(self) -> None:
        """Ask the worker to stop at the next window; it is killed if it has not stopped after a
        short grace. Nothing will be written to the scene."""
        if self._finished or self.cancelled:
            return
        self._cancel_deadline = time.monotonic() + STOP_GRACE_S
        self._worker.cancel(self.id)
        self.status = "Cancelling"

    # -- main thread ----------------------------------------------------------------------------------
    def _pump(self) -> bool:
        """Read the worker's events; True once the worker is through with this job."""
        if self._outcome is not None:
            return True
        self._take_events()
        if self._outcome is None and not self._worker.alive:
            self._take_events()  # what it wrote just before it ended
            if self._outcome is None:
                self._outcome = "cancelled" if self.cancelled else "error"
                if not self.cancelled:
                    self.error = WorkerError(
                        f"the classification worker stopped while classifying: {describe_exit(self._worker.exit_code)}. "
                        "The next Apply starts a fresh one; if memory ran out, choose the CPU or close other programs."
                        + (f"\nIts last output:\n{tail}" if (tail := self._worker.log_tail()) else "")
                    )
        if self._outcome is None and self.cancelled and time.monotonic() > self._cancel_deadline:
            self._worker.kill()  # it did not stop by itself: a hard cancel
            self._outcome = "cancelled"
        return self._outcome is not None

    def _take_events(self) -> None:
        for event in self._worker.read_events():
            if event.get("job") == self.id:
                self._on_event(event)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "progress":
            self._done_steps, self._total_steps = int(event["done"]), int(event["total"])
            if self._total_steps and not self.cancelled:
                self.status = f"Classifying: window {self._done_steps} of {self._total_steps}"
        elif kind == "loading" and not self.cancelled:
            self.status = "Loading the model"
        elif kind == "message":
            self.messages.append(str(event.get("text", "")))
        elif kind in ("done", "cancelled"):
            self._outcome = kind
        elif kind == "error":
            self._outcome = "error"
            message = str(event.get("message", "unknown error"))
            if event.get("kind") == "input":
                self.error = WorkerInputError(message)
            else:
                self.error = WorkerError(f"{event.get('type', 'Error')}: {message}\n{event.get('traceback', '')}".strip())

    def poll(self) -> bool:
        """Main thread: when the worker is through, write the outputs (unless cancelled). True when done."""
        if self._finished:
            return True
        if not self._pump():
            return False
        try:
            if self._outcome == "done" and not self.cancelled:
                try:
                    self.result = job_files.read_result(self._worker.job_folder(self.id))
                    self.outputs = scene.write_outputs(self.ct_node, self.result, show=self.options.show)
                except Exception as exc:  # the scene is as it was (write_outputs is all-or-nothing)
                    self.error = exc
        finally:
            self._worker.remove_job(self.id)
            self._finished = True
            self.elapsed = time.perf_counter() - self.started
            self.status = "Cancelled" if self.cancelled else ("Failed" if self.error is not None else "Done")
            self._logic._job_over(self)
        return True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Block until the worker is through with the job (the scene is written by poll/finish)."""
        return wait_for(self._pump, timeout)

    def finish(self, timeout: Optional[float] = None) -> Optional[scene.SceneOutputs]:
        """Main thread: wait for the worker, write the outputs, re-raise its error. None if cancelled."""
        if not self.wait(timeout):
            raise TimeoutError(f"classification still running after {timeout} s")
        self.poll()
        if self.error is not None:
            raise self.error
        return self.outputs


class ClassificationLogic:
    """Owns the worker process, starts one job at a time, and runs batches from the console.

    ``worker`` is built on first use; pass one to choose its Python or (tests) its predictor loader.
    """

    def __init__(self, worker: Optional[WorkerProcess] = None) -> None:
        self.worker = worker or WorkerProcess()
        self._job: Optional[ClassificationJob] = None
        self._start_lock = threading.Lock()

    # -- models ---------------------------------------------------------------------------------
    @staticmethod
    def resolve_model_path(model_path: Optional[str]) -> str:
        if model_path:
            return str(Path(model_path).resolve())
        from MMCAFNetLib.resources import demo_checkpoint_path

        return str(demo_checkpoint_path())

    def warm_up(self, model_path: Optional[str] = None, device: str = "auto") -> None:
        """Start the worker and load the model now, so that the first Apply does not wait for it."""
        if not self.busy:
            self.worker.preload({"model_path": self.resolve_model_path(model_path), "device": device})

    def clear_cache(self) -> None:
        """Stop the worker, which frees every model it holds (the next job starts a fresh one)."""
        if self._job is not None and not self._job.done:
            self._job.cancel()
        self.worker.close()

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
        """Main thread: read the inputs from the scene and hand them to the worker process.

        ``lesion`` is a markups point / ROI / segmentation node, or already plain data (point,
        box, mask Volume), or None. Raises JobBusyError while another job runs.
        """
        with self._start_lock:  # two starts at once (console scripts): one runs, the other is refused
            if self.busy:
                raise JobBusyError(
                    "a classification is already running; wait for it or press Cancel before starting another"
                )
            options = options or ClassificationOptions()
            volume = scene.volume_from_node(ct_node)
            if lesion is not None and hasattr(lesion, "IsA"):
                lesion = scene.lesion_from_node(lesion, ct_node)
            job = ClassificationJob(self, self.worker, ct_node, options)
            request = {
                "model_path": self.resolve_model_path(options.model_path), "device": options.device,
                "heatmap": options.heatmap, "threshold": float(options.threshold),
            }
            job.id = self.worker.submit(volume, clean_record(record or {}), lesion, request)
            self._job = job
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
        """Blocking run (console, batch scripts, tests): start, wait, write. Returns (result, output nodes)."""
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


# ----------------------------------------------------------------------------------------------
# Result folders written by the command line (a server's batch) loaded for review
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedResult:
    """One result folder in the scene: its CT node, the output nodes and the Classification."""

    folder: Path
    ct_node: Any
    outputs: scene.SceneOutputs
    result: Classification


def load_results(folder: Any, ct_node: Any = None, show: bool = True) -> Any:
    """Load a result folder of ``mmcafnet predict`` / ``demo`` into ``slicer.mrmlScene``, styled as a
    live run (table, heatmap as foreground with Inferno, labelmap, segmentation, under the CT's study).

    ``ct_node`` None: the CT named in prediction.json (or the folder's ct.nrrd) is loaded, or found
    if an earlier call loaded it. A batch folder (summary.csv, one sub-folder per case) loads every
    case with its own CT and returns a list; one case folder returns a :class:`LoadedResult`.
    Loading again replaces the CT's earlier outputs, as a re-run does.
    """
    import slicer

    from MMCAFNetLib.inference import result_folder as rf

    folder = Path(folder)
    if folder.is_dir() and rf.is_batch_folder(folder):
        if ct_node is not None:
            raise scene.SceneError(
                f"{folder} is a batch folder: each case has its own CT, so none can be given; "
                "leave the CT out, or load one case folder onto it"
            )
        cases = rf.case_folders(folder)
        if not cases:
            raise rf.ResultFolderError(f"{folder} holds a summary.csv but no case folder with a prediction.json")
        return [load_results(case, show=show and n == len(cases) - 1) for n, case in enumerate(cases)]
    read = rf.read_result_folder(folder)
    created = None
    if ct_node is None:
        if read.ct_path is None:
            raise rf.ResultFolderError(
                f"the CT of {folder} is not found (prediction.json names {read.prediction.get('input')!r}); "
                "load the CT into the scene and pass it as ct_node (in the module: select it as the input volume)"
            )
        before = {n.GetID() for n in scene.ct_volume_nodes(slicer.mrmlScene)}
        ct_node = scene.load_ct(slicer.mrmlScene, read.ct_path)
        created = ct_node if ct_node.GetID() not in before else None
    try:
        scene.check_result_fits(ct_node, read.result, folder)
        outputs = scene.write_outputs(ct_node, read.result, show=show)
    except BaseException:
        if created is not None:
            slicer.mrmlScene.RemoveNode(created)
        raise
    outputs.table.SetAttribute("MMCAFNet.ResultFolder", str(folder.resolve()))
    return LoadedResult(folder, ct_node, outputs, read.result)


def loaded_summary(loaded: Any) -> str:
    """The panel's line after loading: the class of one case, or how many cases a batch held."""
    if isinstance(loaded, list):
        return f"Loaded {len(loaded)} result folder(s) with their CTs."
    return f"Loaded {loaded.folder.name}: {result_summary(loaded.result)}"


def result_summary(result: Classification) -> str:
    """One line for the GUI: class, probability, the heatmap's peaks marked, and a warning for demo
    models."""
    line = f"{result.predicted_label} ({result.predicted_class}): {100 * result.probability:.1f}%"
    count = len(result.candidates)
    if count:
        line += f"; heatmap peaks marked 1-{count}" if count > 1 else "; heatmap peak marked 1"
    if result.model.get("demo"):
        line += "  -  DEMO MODEL trained on synthetic data: not a diagnosis"
    return line
