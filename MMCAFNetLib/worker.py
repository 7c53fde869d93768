"""The classification worker: a long-lived Python process that keeps the model loaded.

Why a process: inside Slicer, PythonQt runs without thread support, so the main thread holds the GIL
while it idles in the Qt event loop and a Python worker thread is starved (500x slower, measured by
emulation). A process also gives a hard Cancel and keeps a CUDA fault or an out-of-memory kill away
from Slicer. Started by :class:`MMCAFNetLib.worker_client.WorkerProcess` (Slicer's ``PythonSlicer``,
or ``sys.executable`` outside Slicer), it talks through files in the session folder it is given:

- it polls ``jobs/<id>/request.json`` (see :mod:`MMCAFNetLib.job_files`) and handles one job at a
  time: a classification, or only loading a model ahead of the first one;
- it appends one JSON object per line to ``events.jsonl``: ``ready``, ``loading``, ``progress``,
  ``message``, then one of ``done``, ``cancelled`` or ``error`` per job;
- a ``cancel`` file in a job's folder stops that job at the next window;
- it exits when ``quit`` appears, when the session folder goes, or when its parent (Slicer) is gone,
  and then removes the session folder itself, since nobody else will.

Predictors are cached by (checkpoint file, its modification time and size, device), so a second
job with the same model does not reload it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Optional

EVENTS_FILE = "events.jsonl"
QUIT_FILE = "quit"
JOBS_DIR = "jobs"
#: Seconds between looks for a new job (a look is one directory listing).
POLL_S = 0.02
#: Seconds between checks that the parent process is still alive.
PARENT_CHECK_S = 0.5
#: Predictors kept loaded (each holds its model's weights).
MODEL_CACHE_SIZE = 2

PredictorLoader = Callable[[str, str], Any]


def default_loader(path: str, device: str) -> Any:
    from MMCAFNetLib.inference import Predictor

    return Predictor.load(path, device=device)


def is_cuda_out_of_memory(exc: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError (or the RuntimeError older torch raises)."""
    return type(exc).__name__ == "OutOfMemoryError" or (
        isinstance(exc, RuntimeError) and "CUDA out of memory" in str(exc)
    )


def on_cuda(predictor: Any) -> bool:
    return "cuda" in str(getattr(predictor, "device", ""))


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (without signalling it: os.kill on Windows would end it)."""
    if pid <= 0:
        return True
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x00100000 | 0x1000, False, pid)  # SYNCHRONIZE | QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102  # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_callable(spec: str) -> PredictorLoader:
    """``"package.module:function"`` -> the function (a loader other than the Predictor, for tests)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"a loader is given as 'module:function', got {spec!r}")
    return getattr(importlib.import_module(module_name), name)


class CancelFlag:
    """The ``cancel`` argument of ``Predictor.classify``: set once the job's cancel file exists, or
    once the parent process is gone (nobody is left to read the result)."""

    def __init__(self, path: Path, parent_pid: int = 0) -> None:
        self._path = path
        self._parent_pid = parent_pid

    def is_set(self) -> bool:
        return self._path.exists() or not process_alive(self._parent_pid)


class Worker:
    """The request loop and the predictor cache of one worker process."""

    def __init__(self, session: Path, parent_pid: int = 0, loader: PredictorLoader = default_loader) -> None:
        self.session = Path(session)
        self.parent_pid = int(parent_pid)
        self.loader = loader
        self._predictors: OrderedDict[tuple, Any] = OrderedDict()
        self._handled: set[str] = set()
        self._events = open(self.session / EVENTS_FILE, "a", encoding="utf-8")  # noqa: SIM115 (open for the worker's life)

    # -- events ---------------------------------------------------------------------------------
    def emit(self, event: str, **data: Any) -> None:
        from MMCAFNetLib.strict_json import dumps as strict_dumps  # no NaN in an event line

        self._events.write(strict_dumps({"event": event, "time": time.time(), **data}, default=str) + "\n")
        self._events.flush()

    # -- loop -----------------------------------------------------------------------------------
    def should_stop(self) -> bool:
        return (self.session / QUIT_FILE).exists() or not (self.session / JOBS_DIR).is_dir()

    def next_job(self) -> Optional[Path]:
        try:
            names = sorted(
                entry.name for entry in os.scandir(self.session / JOBS_DIR)
                if entry.is_dir() and entry.name not in self._handled
            )
        except OSError:
            return None
        for name in names:
            folder = self.session / JOBS_DIR / name
            if (folder / "request.json").exists():
                return folder
        return None

    def run(self) -> int:
        import platform

        self.emit("ready", pid=os.getpid(), python=platform.python_version())
        last_parent_check = time.monotonic()
        while not self.should_stop():
            if time.monotonic() - last_parent_check > PARENT_CHECK_S:
                if not process_alive(self.parent_pid):
                    self._events.close()  # Slicer is gone, and nobody else will remove our files
                    shutil.rmtree(self.session, ignore_errors=True)
                    return 0
                last_parent_check = time.monotonic()
            folder = self.next_job()
            if folder is None:
                time.sleep(POLL_S)
                continue
            self._handled.add(folder.name)
            self.handle(folder)
        return 0

    # -- one job --------------------------------------------------------------------------------
    def handle(self, folder: Path) -> None:
        from MMCAFNetLib.job_files import read_inputs, read_request, write_result
        from MMCAFNetLib.results import Cancelled

        job = folder.name
        try:
            inputs = read_inputs(folder)
            if inputs.get("load_only"):
                options = dict(inputs.get("options") or {})
                shutil.rmtree(folder, ignore_errors=True)  # nobody reads a result from it
                self.predictor(job, str(options["model_path"]), str(options.get("device", "auto")))
            else:
                volume, record, lesion, options = read_request(folder, inputs)
                result = self.classify(job, folder, volume, record, lesion, options)
                write_result(folder, result)
        except Cancelled:
            self.emit("cancelled", job=job)
        except MemoryError as exc:
            self.emit("error", job=job, kind="memory", type=type(exc).__name__,
                      message=f"not enough memory to classify this CT ({exc})", traceback=traceback.format_exc())
        except Exception as exc:
            kind = "input" if isinstance(exc, ValueError) else "internal"
            self.emit("error", job=job, kind=kind, type=type(exc).__name__, message=str(exc),
                      traceback=traceback.format_exc())
        else:
            self.emit("done", job=job)

    def classify(self, job: str, folder: Path, volume: Any, record: dict, lesion: Any, options: dict) -> Any:
        from MMCAFNetLib.job_files import CANCEL_FILE

        path, device = str(options["model_path"]), str(options.get("device", "auto"))
        heatmap = options.get("heatmap", "model")
        cancel = CancelFlag(folder / CANCEL_FILE, self.parent_pid)

        def run(predictor: Any) -> Any:
            return predictor.classify(
                volume, record, lesion=lesion, heatmap=None if heatmap in (None, "none") else heatmap,
                threshold=float(options.get("threshold", 0.5)), cancel=cancel,
                progress=lambda done, total: self.emit("progress", job=job, done=int(done), total=int(total)),
            )

        predictor = self.predictor(job, path, device)
        try:
            return run(predictor)
        except Exception as exc:
            if not (is_cuda_out_of_memory(exc) and on_cuda(predictor)):
                raise
        self.release_cuda()
        self.emit("message", job=job, text="The GPU ran out of memory; classifying on the CPU instead (slower).")
        self.emit("progress", job=job, done=0, total=0)
        return run(self.predictor(job, path, "cpu"))

    # -- models ---------------------------------------------------------------------------------
    def predictor(self, job: str, path: str, device: str) -> Any:
        """The cached predictor for this checkpoint file as it is now, on ``device``."""
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise ValueError(f"the model file {path} cannot be read ({exc.strerror}); choose another model") from None
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, device)
        if key in self._predictors:
            self._predictors.move_to_end(key)
            return self._predictors[key]
        for old in [k for k in self._predictors if k[0] == key[0] and k[3] == device]:
            del self._predictors[old]  # the file changed: its old model goes
        self.emit("loading", job=job, model=path, device=device)
        predictor = self.loader(path, device)
        self._predictors[key] = predictor
        while len(self._predictors) > MODEL_CACHE_SIZE:
            self._predictors.popitem(last=False)
        return predictor

    def release_cuda(self) -> None:
        for key in [k for k, p in self._predictors.items() if on_cuda(p)]:
            del self._predictors[key]
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="MMCAFNetLib.worker", description=__doc__.splitlines()[0])
    parser.add_argument("session", help="the private session folder shared with the caller")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    parser.add_argument("--loader", default="", help="module:function building a predictor (tests)")
    args = parser.parse_args(argv)
    loader = load_callable(args.loader) if args.loader else default_loader
    return Worker(Path(args.session), args.parent_pid, loader).run()


if __name__ == "__main__":
    # Started as a script (what Slicer's PythonSlicer launcher passes on most plainly): import the
    # library from the folder that holds this package, not from the package folder itself.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != Path(here)]
    sys.path.insert(0, str(Path(here).parent))
    sys.exit(main())
