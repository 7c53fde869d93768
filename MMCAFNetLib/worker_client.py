"""Slicer's side of the classification worker process (see :mod:`MMCAFNetLib.worker`).

Everything here is called from one thread (Slicer's main thread) and never blocks for long: a job
is handed over as files, events are read from a file that the worker appends to (a regular file
never blocks a read, on every platform, and needs no reader thread, which PythonQt would starve),
and a dead worker is noticed in the next poll. The worker runs in its own process group so that
Cancel and shutdown end it with everything it started (Slicer's ``PythonSlicer`` is a launcher that
starts the real Python as its child).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from MMCAFNetLib import job_files
from MMCAFNetLib.volume import Volume
from MMCAFNetLib.worker import EVENTS_FILE, JOBS_DIR, QUIT_FILE

#: Environment variable naming the Python that runs the worker (overrides the search below).
WORKER_PYTHON_ENV = "MMCAFNET_WORKER_PYTHON"
LOG_FILE = "worker.log"
#: Seconds a worker is given to stop by itself (quit, or a cancelled job) before it is killed.
STOP_GRACE_S = 3.0



class WorkerError(RuntimeError):
    """The worker process could not be started, or stopped while it held a job."""


def _inside_slicer() -> Optional[Any]:
    """Slicer's application object when running inside the Slicer application, else None."""
    slicer = sys.modules.get("slicer")
    app = getattr(slicer, "app", None)
    return app if isinstance(getattr(app, "slicerHome", None), str) else None


def worker_python() -> str:
    """The Python that runs the worker: Slicer's ``PythonSlicer`` inside Slicer (found on PATH, as
    Slicer's own launcher sets it, else in ``<Slicer home>/bin``), ``sys.executable`` elsewhere
    (inside Slicer that is the Slicer application itself, which must not be started again)."""
    if os.environ.get(WORKER_PYTHON_ENV):
        return os.environ[WORKER_PYTHON_ENV]
    app = _inside_slicer()
    if app is None:
        return sys.executable
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    found = shutil.which("PythonSlicer") or shutil.which(name)
    if found:
        return found
    candidate = Path(app.slicerHome) / "bin" / name
    if candidate.is_file():
        return str(candidate)
    raise WorkerError(
        f"Slicer's Python launcher ({name}) was found neither on PATH nor in {candidate.parent}; "
        f"set {WORKER_PYTHON_ENV} to its path"
    )


class WorkerProcess:
    """One long-lived worker process and its private session folder (created 0700 by mkdtemp)."""

    def __init__(self, python: Optional[str] = None, loader: str = "", env: Optional[dict[str, str]] = None) -> None:
        self._python = python
        self._loader = loader
        self._env = dict(env or {})
        self.session: Optional[Path] = None
        self._process: Optional[subprocess.Popen] = None
        self._log: Any = None
        self._events: Any = None
        self._pending = ""
        self._sequence = 0
        self.starts = 0  # how many processes this object started (a dead worker is replaced)

    # -- life -----------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def exit_code(self) -> Optional[int]:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    def ensure_started(self) -> None:
        """Start the worker unless it runs; a worker that died is cleaned up and replaced."""
        if self.alive:
            return
        self.kill()
        session = Path(tempfile.mkdtemp(prefix="mmcafnet-worker-"))
        (session / JOBS_DIR).mkdir()
        (session / EVENTS_FILE).touch()
        # The worker runs as a script by its path (no interpreter options, which a launcher such as
        # PythonSlicer might take for its own), and imports this very MMCAFNetLib (installed next to
        # the Slicer module, where PythonSlicer's own path does not look).
        script = str(Path(__file__).resolve().with_name("worker.py"))
        command = [self._python or worker_python(), script, str(session), "--parent-pid", str(os.getpid())]
        if self._loader:
            command += ["--loader", self._loader]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self._env}
        log = open(session / LOG_FILE, "wb")  # noqa: SIM115 (the worker writes it for its whole life)
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
        else:
            kwargs["start_new_session"] = True
        try:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(session), **kwargs
            )
        except OSError as exc:
            log.close()
            shutil.rmtree(session, ignore_errors=True)
            raise WorkerError(f"the classification worker could not be started with {command[0]}: {exc}") from None
        self.session, self._log = session, log
        self._events = open(session / EVENTS_FILE, encoding="utf-8")  # noqa: SIM115
        self._pending = ""
        self.starts += 1
        atexit.register(self.close)

    def close(self, timeout: float = STOP_GRACE_S) -> None:
        """Ask the worker to quit, kill it if it does not, and remove the session folder."""
        if self.alive and self.session is not None:
            with contextlib.suppress(OSError):
                (self.session / QUIT_FILE).touch()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout)  # type: ignore[union-attr]
        self.kill()

    def kill(self) -> None:
        """End the worker and everything it started at once, and remove the session folder."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            _kill_tree(process)
        for handle in (self._events, self._log):
            if handle is not None:
                handle.close()
        self._events = self._log = None
        if self.session is not None:
            shutil.rmtree(self.session, ignore_errors=True)
            self.session = None
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)

    # -- jobs -----------------------------------------------------------------------------------
    def submit(self, volume: Volume, record: dict[str, Any], lesion: Any, options: dict[str, Any]) -> str:
        """Hand one job to the worker (starting it if needed); returns the job's id."""
        folder = self._new_job_folder()
        try:
            job_files.write_request(folder, volume, record, lesion, options)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder.name

    def preload(self, options: dict[str, Any]) -> str:
        """Start the worker and have it load the model in ``options`` now, ahead of the first job."""
        folder = self._new_job_folder()
        job_files.write_load_request(folder, options)
        return folder.name

    def _new_job_folder(self) -> Path:
        self.ensure_started()
        assert self.session is not None
        self._sequence += 1
        folder = self.session / JOBS_DIR / f"{self._sequence:06d}"
        folder.mkdir()
        return folder

    def job_folder(self, job: str) -> Path:
        if self.session is None:
            raise WorkerError("the classification worker is not running")
        return self.session / JOBS_DIR / job

    def cancel(self, job: str) -> None:
        """Ask the worker to stop ``job`` at its next window."""
        if self.session is not None:
            with contextlib.suppress(OSError):
                (self.session / JOBS_DIR / job / job_files.CANCEL_FILE).touch()

    def remove_job(self, job: str) -> None:
        if self.session is not None:
            shutil.rmtree(self.session / JOBS_DIR / job, ignore_errors=True)

    def read_events(self) -> list[dict[str, Any]]:
        """The events the worker wrote since the last call (never blocks)."""
        if self._events is None:
            return []
        self._pending += self._events.read()
        *lines, self._pending = self._pending.split("\n")
        events = []
        for line in lines:
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def log_tail(self, lines: int = 12) -> str:
        """The end of what the worker printed (its traceback when it failed to start)."""
        if self.session is None or not (self.session / LOG_FILE).exists():
            return ""
        text = (self.session / LOG_FILE).read_bytes()[-8000:].decode("utf-8", "replace")
        return "\n".join(text.strip().splitlines()[-lines:])


def _kill_tree(process: subprocess.Popen) -> None:
    if os.name == "nt":
        subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], capture_output=True, check=False)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def describe_exit(code: Optional[int]) -> str:
    """A reader's words for a worker's exit status."""
    if code is None:
        return "it stopped answering"
    if code < 0:
        name = signal.Signals(-code).name if -code in {s.value for s in signal.Signals} else str(-code)
        if -code == getattr(signal, "SIGKILL", 9):
            return f"it was killed ({name}; often the system running out of memory)"
        return f"it crashed ({name})"
    return f"it exited with status {code}"


def wait_for(predicate: Any, timeout: Optional[float], interval: float = 0.02) -> bool:
    """Call ``predicate`` until it is true or ``timeout`` seconds pass (None: no limit)."""
    end = None if timeout is None else time.monotonic() + timeout
    while not predicate():
        if end is not None and time.monotonic() >= end:
            return False
        time.sleep(interval)
    return True
