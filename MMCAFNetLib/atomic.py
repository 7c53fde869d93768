"""Writing files so that a kill or a full disk never leaves a half-written one.

Everything the library writes goes to a temporary file in the target's folder first and is moved
over the target with ``os.replace`` only once complete; on failure the temporary file is removed
and any earlier file at the target is left as it was. A set of files (one case's results) is
published as a folder: built complete beside the destination, then swapped in with one rename
(:func:`publish_folder`).

- Permissions follow the umask, as a plain ``open`` would (``mkstemp``/``mkdtemp`` create 0600 and
  0700, which would hide results from colleagues sharing a folder).
- Temporary names carry the writing process's id (``.<name>.<pid>.<random><suffix>``), so the
  leftovers of a killed writer can be told from those of a live one and removed
  (:func:`remove_stale`).
- A write that fails for lack of space (or a file-size limit) raises ``OSError`` (errno ENOSPC or
  EFBIG), whatever library did the writing, so the command line reports it as a runtime failure
  (exit status 1), not as bad input.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

#: errno values that mean "the disk (or the allowed file size) is full".
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def current_umask() -> int:
    """The process umask, read without changing it where the system allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plain ``open``/``mkdir`` would have given it (0666/0777 minus umask)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def temp_prefix(name: str) -> str:
    """Prefix of this process's temporary names for target ``name``."""
    return f".{name}.{os.getpid()}."


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+(?P<suffix>\.[A-Za-z0-9.]+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True
    return True


def remove_stale(folder: str | os.PathLike, name: Optional[str] = None) -> list[str]:
    """Remove temporary files and folders left in ``folder`` by writers that were killed.

    Only names of the form ``.<target>.<pid>.<random><suffix>`` whose process no longer runs are
    removed (``name`` limits it to one target). Returns the names removed.
    """
    folder = Path(folder)
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or (name is not None and match.group("name") != name):
            continue
        if _pid_alive(int(match.group("pid"))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


def raise_if_no_space(exc: BaseException, path: str | os.PathLike, target: str | os.PathLike | None = None) -> None:
    """Re-raise a failed write of ``path`` (a temporary file for ``target``) as ``OSError(ENOSPC)``
    when the disk is (nearly) full.

    For writers that hide the errno (SimpleITK, torch.save raise RuntimeError): the file system is
    asked how much space is left; under 1 MiB (or a file-size limit reached) counts as full.
    """
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        raise exc
    text = str(exc).lower()
    full = any(s in text for s in ("no space", "file too large", "disk quota", "enospc", "efbig")) or bool(
        re.search(r"\d+ requested and \d+ written", text)  # numpy's short write
    )
    if not full:
        try:
            full = shutil.disk_usage(Path(path).parent).free < (1 << 20)
        except OSError:
            full = False
    if not full:
        try:
            import resource

            soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
            full = soft != resource.RLIM_INFINITY and os.path.exists(path) and os.path.getsize(path) >= soft
        except (ImportError, OSError, ValueError):
            full = False
    if full:
        name = Path(target if target is not None else path)
        raise OSError(errno.ENOSPC, f"no space left on the device to write {name}") from exc


@contextmanager
def atomic_output(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; replace ``path`` with it when the block succeeds.

    Temporary files that killed writers left for the same target are removed first.
    """
    path = Path(path)
    remove_stale(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # writers that hide a full disk behind another error
        raise_if_no_space(exc, tmp, path)
        raise
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful replace


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str, newline: Optional[str] = None) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8", newline=newline) as fh:
        fh.write(text)


# ---------------------------------------------------------------------------------------------
# folders: build beside, then swap in


def make_staging_folder(destination: str | os.PathLike, suffix: str = ".partial") -> Path:
    """An empty folder beside ``destination`` (same file system) to build its new content in.

    Leftovers of killed earlier runs for the same destination are removed first.
    """
    destination = Path(destination)
    parent = destination.parent if str(destination.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    recover_interrupted_publish(destination)
    remove_stale(parent, destination.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(destination.name), suffix=suffix, dir=parent))
    follow_umask(tmp, directory=True)
    return tmp


def recover_interrupted_publish(destination: str | os.PathLike) -> bool:
    """Put the previous set back when a publish was killed between its two renames (systems without
    an atomic exchange): the destination is missing and a dead writer's ``.old`` folder holds it."""
    destination = Path(destination)
    if destination.exists():
        return False
    parent = destination.parent if str(destination.parent) else Path(".")
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return False
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if (match and match.group("name") == destination.name and match.group("suffix") == ".old"
                and entry.is_dir(follow_symlinks=False) and not _pid_alive(int(match.group("pid")))):
            os.replace(entry.path, destination)
            return True
    return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where not available."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def publish_folder(staged: str | os.PathLike, destination: str | os.PathLike,
                   managed: Iterable[str] = ()) -> Path:
    """Make the complete folder ``staged`` become ``destination`` as one set.

    A new (or empty) destination is one rename. An existing one is swapped with the staged folder
    in one step where the system allows (Linux), else by two renames in a row; either way a reader
    sees the old set or the new set, never a mix, and a kill in between leaves the old set under a
    temporary name that the next run removes. Entries of the old folder whose names are not in
    ``managed`` (files the user put there, other runs' sub-folders) are carried over to the new one.
    """
    staged, destination = Path(staged), Path(destination)
    managed = set(managed)
    if destination.is_dir() and not any(destination.iterdir()):
        destination.rmdir()
    if not destination.exists():
        os.replace(staged, destination)
        return destination
    for entry in os.scandir(destination):
        if entry.name in managed or (staged / entry.name).exists():
            continue
        if entry.is_file(follow_symlinks=False):
            try:
                os.link(entry.path, staged / entry.name)
            except OSError:
                shutil.copy2(entry.path, staged / entry.name)
    old = destination.parent / f"{temp_prefix(destination.name)}{uuid.uuid4().hex[:8]}.old"
    if _exchange(staged, destination):
        os.replace(staged, old)  # the staged name now holds the old set
    else:
        os.replace(destination, old)
        try:
            os.replace(staged, destination)
        except BaseException:  # put the earlier set back (after a kill, the next run does: recover_...)
            os.replace(old, destination)
            raise
    for entry in os.scandir(old):  # folders not ours (e.g. other cases of a batch) move over
        if entry.name not in managed and entry.is_dir(follow_symlinks=False) and not (destination / entry.name).exists():
            os.replace(entry.path, destination / entry.name)
    shutil.rmtree(old, ignore_errors=True)
    return destination


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS


__all__ = [
    "NO_SPACE_ERRNOS", "atomic_output", "current_umask", "follow_umask", "is_no_space", "make_staging_folder",
    "publish_folder", "raise_if_no_space", "remove_stale", "temp_prefix", "write_bytes_atomic", "write_text_atomic",
]
