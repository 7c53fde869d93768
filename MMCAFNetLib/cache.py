"""The preprocessed cache: each CT series prepared once, kept as a memory-mapped array.

Why: reading and resampling a DICOM series costs seconds, and every training run (each fold, each
stage of the paper recipe) and every evaluation would read every series again. ``mmcafnet
preprocess`` (or the first training run) prepares each series with the run's preset
(``windows.prepare_volume``) and stores it as ``arrays/<key>.npy`` (int16 HU by default,
or float16) with a sidecar ``arrays/<key>.json``; ``manifest.json`` indexes every entry and
records the storage type, which a cache opened without naming one (a training run) keeps using.

The key is a fingerprint of the source files (relative names, sizes, modification times), the
series UID, the preset and the storage format: touching a source file or changing the preset
gives a new key, so a stale entry is never used. Every lookup checks that the array file has the
size its header and sidecar promise; ``verify="full"`` also checks a CRC-32 of the data. An entry
that fails is rebuilt. All files are written to a temporary name and moved into place, so an
interrupted run leaves no half-written entry and several processes may fill one cache.

Training and evaluation (``train.data.build_dataset``) take each patient's prepared CT from here
when the run names a cache folder (``cache_dir``), and cut their lesion windows from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.atomic import atomic_output, write_bytes_atomic
from MMCAFNetLib.preset import Preset, get_preset
from MMCAFNetLib.strict_json import dumps as strict_dumps
from MMCAFNetLib.volume import Volume

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
_DTYPES = {"int16": np.int16, "float16": np.float16}


class CacheError(ValueError):
    """A cache entry cannot be used (corrupt, truncated, unreadable)."""


def _atomic_write_json(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (strict_dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def source_files(source: str | os.PathLike) -> list[Path]:
    """The files a series is read from: the files of a folder (not recursive), or the file itself
    (with the .raw/.img/.zraw data file of a MetaImage header)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise FileNotFoundError(f"{path} holds no files; pass a DICOM series folder or an image file")
        return files
    if path.is_file():
        files = [path]
        if path.suffix.lower() == ".mhd":
            files += [p for p in (path.with_suffix(s) for s in (".raw", ".zraw", ".img")) if p.is_file()]
        return files
    raise FileNotFoundError(f"no such CT series or image: {path}")


def source_fingerprint(source: str | os.PathLike) -> str:
    """sha256 over (name, size, mtime) of the source files: changes when any file changes."""
    h = hashlib.sha256()
    base = Path(source)
    for f in source_files(source):
        st = f.stat()
        name = f.name if base.is_dir() else str(f.resolve())
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _crc32_file(path: Path, offset: int) -> int:
    crc = 0
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            block = fh.read(1 << 22)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


class PreprocessCache:
    """A folder of prepared series. ``ensure(source, preset)`` returns the prepared Volume (array
    memory-mapped, read-only), building it on first use. ``stats`` counts hits, builds, rebuilds."""

    def __init__(self, root: str | os.PathLike, dtype: Optional[str] = None) -> None:
        self.root = Path(root)
        if dtype is None:  # what the cache was filled with (a training run opens it without saying)
            dtype = self._stored_dtype() or "int16"
        if dtype not in _DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.arrays = self.root / "arrays"
        self.stats = {"hits": 0, "built": 0, "rebuilt": 0}

    # ---------------------------------------------------------------------------------- keys
    def key(self, source: str | os.PathLike, preset: Preset | str | dict, series_uid: Optional[str] = None) -> str:
        preset = get_preset(preset)
        h = hashlib.sha256()
        h.update(
            json.dumps(
                {
                    "format": CACHE_FORMAT,
                    "dtype": self.dtype,
                    "source": source_fingerprint(source),
                    "series_uid": series_uid or "",
                    "preset": preset.to_dict(),
                },
                sort_keys=True,
            ).encode()
        )
        return h.hexdigest()[:32]

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.arrays / f"{key}.npy", self.arrays / f"{key}.json"

    # ---------------------------------------------------------------------------------- reading
    def _open(self, key: str, verify: str) -> Volume:
        array_path, info_path = self._paths(key)
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache entry {key}: sidecar unreadable ({exc})") from None
        try:
            array = np.load(array_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CacheError(f"cache entry {key}: array unreadable ({exc})") from None
        shape = tuple(int(s) for s in info["shape"])
        if array.shape != shape or array.dtype != np.dtype(info["dtype"]):
            raise CacheError(f"cache entry {key}: holds {array.shape} {array.dtype}, expected {shape} {info['dtype']}")
        if array_path.stat().st_size != int(info["file_size"]):
            raise CacheError(f"cache entry {key}: file size {array_path.stat().st_size}, expected {info['file_size']}")
        if verify == "full" and _crc32_file(array_path, int(info["data_offset"])) != int(info["crc32"]):
            raise CacheError(f"cache entry {key}: checksum mismatch (the file was modified or corrupted)")
        meta = dict(info.get("meta", {}))
        meta.update(cache_key=key, preset=info["preset"]["name"], source_ijk_to_ras=info.get("source_ijk_to_ras"))
        return Volume(array, np.array(info["ijk_to_ras"], dtype=np.float64), meta)

    def get(
        self,
        source: str | os.PathLike,
        preset: Preset | str | dict,
        series_uid: Optional[str] = None,
        verify: str = "size",
    ) -> Optional[Volume]:
        """The cached prepared volume, or None when absent or unusable (never reads the source)."""
        if verify not in ("size", "full"):
            raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
        key = self.key(source, preset, series_uid)
        if not self._paths(key)[0].exists():
            return None
        try:
            vol = self._open(key, verify)
        except CacheError:
            return None
        self.stats["hits"] += 1
        return vol

    # ---------------------------------------------------------------------------------- writing
    def build(
        self,
        source: str | os.PathLike,
        preset: Preset | str | dict,
        series_uid: Optional[str] = None,
        volume: Optional[Volume] = None,
        *,
        _counter: str = "built",
    ) -> Volume:
        """Read the source (or use ``volume``, already read from it), prepare it and store it."""
        from MMCAFNetLib import volume as volume_io
        from MMCAFNetLib.windows import prepare_volume

        preset = get_preset(preset)
        key = self.key(source, preset, series_uid)
        if volume is None:
            volume = volume_io.read_volume(source, series_uid=series_uid)
        prepared = prepare_volume(volume, preset)
        if self.dtype == "int16":
            data = np.clip(np.rint(prepared.array), -32768, 32767).astype(np.int16)
        else:
            data = prepared.array.astype(np.float16)
        self.arrays.mkdir(parents=True, exist_ok=True)
        array_path, info_path = self._paths(key)
        with atomic_output(array_path, suffix=".npy.tmp") as tmp:  # a full disk: OSError(ENOSPC)
            with open(tmp, "wb") as fh:
                np.save(fh, data, allow_pickle=False)
            file_size = os.path.getsize(tmp)
            data_offset = file_size - data.nbytes
            crc = _crc32_file(Path(tmp), data_offset)
        keep_meta = {
            k: v
            for k, v in volume.meta.items()
            if k in ("modality", "series_uid", "patient_sex", "patient_age", "patient_weight", "warnings")
        }
        info = {
            "format": CACHE_FORMAT,
            "key": key,
            "source": str(Path(source).resolve()),
            "series_uid": series_uid,
            "source_fingerprint": source_fingerprint(source),
            "source_ijk_to_ras": np.asarray(volume.ijk_to_ras).tolist(),
            "source_shape": list(volume.shape),
            "preset": preset.to_dict(),
            "shape": list(data.shape),
            "dtype": str(data.dtype),
            "ijk_to_ras": prepared.ijk_to_ras.tolist(),
            "file_size": file_size,
            "data_offset": data_offset,
            "crc32": crc,
            "meta": _json_safe(keep_meta),
        }
        _atomic_write_json(info_path, info)
        self._update_manifest(key, info)
        self.stats[_counter] += 1
        return self._open(key, "size")

    def ensure(
        self,
        source: str | os.PathLike,
        preset: Preset | str | dict,
        series_uid: Optional[str] = None,
        verify: str = "size",
    ) -> Volume:
        """The prepared volume from the cache, built (or rebuilt, if corrupt) when needed."""
        if verify not in ("size", "full"):
            raise ValueError(f"verify must be 'size' or 'full', got {verify!r}")
        key = self.key(source, preset, series_uid)
        if self._paths(key)[0].exists():
            try:
                vol = self._open(key, verify)
                self.stats["hits"] += 1
                return vol
            except CacheError:
                return self.build(source, preset, series_uid, _counter="rebuilt")
        return self.build(source, preset, series_uid)

    # ---------------------------------------------------------------------------------- manifest
    def _stored_dtype(self) -> Optional[str]:
        """The storage type of the most recently built entry, from the manifest (None if empty)."""
        try:
            manifest = json.loads((self.root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        dtype = manifest.get("dtype") if isinstance(manifest, dict) else None
        return dtype if dtype in _DTYPES else None

    def _update_manifest(self, key: str, info: dict[str, Any]) -> None:
        manifest = self.manifest()
        manifest["dtype"] = self.dtype
        manifest["entries"][key] = {
            k: info[k] for k in ("source", "series_uid", "source_fingerprint", "preset", "shape", "dtype", "file_size", "crc32")
        }
        _atomic_write_json(self.root / MANIFEST, manifest)

    def manifest(self) -> dict[str, Any]:
        """The index of entries (rebuilt from the sidecars when missing or unreadable)."""
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("format") == CACHE_FORMAT and isinstance(manifest.get("entries"), dict):
                return manifest
        except (OSError, ValueError):
            pass
        entries: dict[str, Any] = {}
        if self.arrays.is_dir():
            for side in sorted(self.arrays.glob("*.json")):
                try:
                    info = json.loads(side.read_text(encoding="utf-8"))
                    entries[info["key"]] = {k: info.get(k) for k in ("source", "series_uid", "source_fingerprint",
                                                                      "preset", "shape", "dtype", "file_size", "crc32")}
                except (OSError, ValueError, KeyError):
                    continue
        self.root.mkdir(parents=True, exist_ok=True)
        return {"format": CACHE_FORMAT, "entries": entries}

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.arrays.glob("*.npy")) if self.arrays.is_dir() else 0


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)
