"""The model catalog: bundled and downloadable checkpoints (Resources/Models.json) plus user models.

User models live in one folder the user can see, open and clear. Nothing is ever downloaded
unless ``download_model`` is called (the GUI calls it only after the user asks), every download is
checked against the catalog's sha256, plain ``http`` is refused unless explicitly allowed, and
archive members that would land outside the models folder are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from MMCAFNetLib.atomic import atomic_output

CATALOG_FORMAT = 1
MODELS_DIR_ENV = "MMCAFNET_MODELS_DIR"
CHECKPOINT_SUFFIXES = (".pt", ".pth")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


#: The Predictor's heatmap methods (``inference.predictor.HEATMAP_METHODS``; a test checks they agree),
#: repeated here so the catalog is read without torch.
HEATMAP_METHODS = ("attention", "gradcam", "gradcam++")


class CatalogError(ValueError):
    """The catalog, a model file or a download is not usable; the message says why and what to do."""


@dataclass
class ModelEntry:
    """One model the GUI can offer. ``file`` is relative to Resources/ (bundled) or absolute (user)."""

    id: str
    title: str
    version: str
    sha256: str
    classes: list[str]
    schema: list[str]
    licence: str
    demo: bool
    file: Optional[str] = None
    url: Optional[str] = None
    description: str = ""
    source: str = "catalog"  # "catalog" | "user"
    extra: dict[str, Any] = field(default_factory=dict)
    #: the checkpoint's whole clinical schema (catalog: Models.json; user models: their sidecar), so the
    #: Slicer form is built without reading the checkpoint, i.e. before torch is installed
    schema_spec: Optional[dict[str, Any]] = None
    #: the file's size in bytes as the catalog declares it: a download stops past it (plus a margin)
    size: Optional[int] = None
    #: the heatmap method the model recommends (its checkpoint's ``heatmap`` entry), shown by the GUI
    heatmap: Optional[str] = None

    @property
    def downloadable(self) -> bool:
        return self.url is not None and self.file is None

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None and k not in ("source", "extra")}
        data.update(self.extra)
        return data


_REQUIRED = ("id", "title", "version", "sha256", "classes", "schema", "licence", "demo")


def parse_entry(data: dict[str, Any], where: str = "catalog") -> ModelEntry:
    """Validate one catalog entry (plain JSON data)."""
    if not isinstance(data, dict):
        raise CatalogError(f"{where}: each model entry must be a JSON object")
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise CatalogError(f"{where}: model entry {data.get('id', '?')!r} lacks {missing}")
    if not _ID.match(str(data["id"])):
        raise CatalogError(f"{where}: model id {data['id']!r} must be letters, digits, '.', '_' or '-'")
    if ("file" in data) == ("url" in data):
        raise CatalogError(f"{where}: model {data['id']!r} needs exactly one of 'file' (bundled) or 'url'")
    sha = str(data["sha256"]).lower()
    if not _SHA256.match(sha):
        raise CatalogError(f"{where}: model {data['id']!r} has no valid sha256 (64 hex digits)")
    if "url" in data and not str(data["url"]).startswith(("https://", "http://")):
        raise CatalogError(f"{where}: model {data['id']!r} url must start with https://")
    if not isinstance(data["classes"], list) or not data["classes"]:
        raise CatalogError(f"{where}: model {data['id']!r} must list its classes")
    spec = data.get("schema_spec")
    if spec is not None and _spec_field_names(spec) != [str(f) for f in data["schema"]]:
        raise CatalogError(
            f"{where}: model {data['id']!r} schema_spec must be a clinical schema whose fields are exactly "
            f"its 'schema' list {data['schema']}"
        )
    size = data.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise CatalogError(f"{where}: model {data['id']!r} size must be a positive number of bytes, got {size!r}")
    known = set(_REQUIRED) | {"file", "url", "description", "schema_spec", "size", "heatmap"}
    heatmap = data.get("heatmap")
    if heatmap is not None and heatmap not in HEATMAP_METHODS:
        raise CatalogError(f"{where}: model {data['id']!r} heatmap must be one of {HEATMAP_METHODS}, got {heatmap!r}")
    return ModelEntry(
        id=str(data["id"]),
        title=str(data["title"]),
        version=str(data["version"]),
        sha256=sha,
        classes=[str(c) for c in data["classes"]],
        schema=[str(f) for f in data["schema"]],
        licence=str(data["licence"]),
        demo=bool(data["demo"]),
        file=data.get("file"),
        url=data.get("url"),
        description=str(data.get("description", "")),
        extra={k: v for k, v in data.items() if k not in known},
        schema_spec=spec,
        size=size,
        heatmap=heatmap,
    )


def _spec_field_names(spec: Any) -> Optional[list[str]]:
    """Field names of a clinical schema dict, or None when it is not one."""
    fields = spec.get("fields") if isinstance(spec, dict) else None
    if not isinstance(fields, list) or not all(isinstance(f, dict) for f in fields):
        return None
    return [str(f.get("name", "")) for f in fields]


def catalog_path() -> Path:
    from MMCAFNetLib.resources import MODEL_CATALOG, resource_path

    return resource_path(MODEL_CATALOG)


def load_catalog(path: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Entries of Resources/Models.json (or ``path``), validated; ids are unique."""
    path = Path(path) if path is not None else catalog_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path} is not valid JSON ({exc}); restore it from the release") from None
    if data.get("format_version") != CATALOG_FORMAT:
        raise CatalogError(f"{path}: format_version {data.get('format_version')!r} is not {CATALOG_FORMAT}")
    entries = [parse_entry(e, str(path)) for e in data.get("models", [])]
    ids = [e.id for e in entries]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise CatalogError(f"{path}: duplicate model ids {dupes}")
    return entries


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def default_models_dir() -> Path:
    """Where user models are kept: $MMCAFNET_MODELS_DIR, else ~/.mmcafnet/models."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".mmcafnet" / "models"


def _models_dir(models_dir: str | os.PathLike | None) -> Path:
    return Path(models_dir) if models_dir is not None else default_models_dir()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def user_models(models_dir: str | os.PathLike | None = None) -> list[ModelEntry]:
    """Checkpoints in the user folder, described by the sidecar written when they were added."""
    folder = _models_dir(models_dir)
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if path.suffix not in CHECKPOINT_SUFFIXES or not path.is_file():
            continue
        meta: dict[str, Any] = {}
        if _sidecar(path).is_file():
            try:
                meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                meta = {}
        entries.append(
            ModelEntry(
                id=str(meta.get("id", path.stem)),
                title=str(meta.get("title", path.stem)),
                version=str(meta.get("version", "")),
                sha256=str(meta.get("sha256", "")),
                classes=list(meta.get("classes", [])),
                schema=list(meta.get("schema", [])),
                licence=str(meta.get("licence", "unknown")),
                demo=bool(meta.get("demo", False)),
                file=str(path),
                description=str(meta.get("description", "")),
                heatmap=meta.get("heatmap") if meta.get("heatmap") in HEATMAP_METHODS else None,
                source="user",
                schema_spec=meta["schema_spec"] if isinstance(meta.get("schema_spec"), dict) else None,
            )
        )
    return entries


def list_models(
    catalog: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None
) -> list[ModelEntry]:
    """Catalog entries first (bundled, then downloadable), then user models."""
    entries = load_catalog(catalog)
    entries.sort(key=lambda e: (e.downloadable, e.id))
    return entries + user_models(models_dir)


def model_path(entry: ModelEntry, models_dir: str | os.PathLike | None = None) -> Path:
    """Local file of a model: bundled file, user file, or an earlier download. Never downloads."""
    if entry.source == "user":
        path = Path(entry.file or "")
    elif entry.file is not None:
        from MMCAFNetLib.resources import resources_dir

        path = resources_dir() / entry.file
    else:
        path = downloaded_path(entry, models_dir)
        if not path.is_file():
            raise FileNotFoundError(
                f"model {entry.title!r} is not downloaded yet; press Download (it fetches {entry.url}) "
                "or add the file with 'Add model from file'"
            )
        verify_file(entry, path)  # a file changed on disk after its checked download is not used
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} is missing; reinstall the extension or re-add the model")
    return path


def downloaded_path(entry: ModelEntry, models_dir: str | os.PathLike | None = None) -> Path:
    return _models_dir(models_dir) / f"{entry.id}-{entry.version}.pt"


def verify_file(entry: ModelEntry, path: str | os.PathLike) -> None:
    """Raise CatalogError unless the file's sha256 equals the catalog's."""
    actual = sha256_file(path)
    if actual != entry.sha256:
        raise CatalogError(
            f"{path} does not match the catalog (sha256 {actual}, expected {entry.sha256}); the file is "
            "corrupt or not the published model. Delete it and download again."
        )


def checkpoint_facts(path: Path) -> dict[str, Any]:
    """Plain facts of a checkpoint, read safely (weights_only); refuses anything else."""
    from MMCAFNetLib.checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    schema = payload.get("schema") or {}
    fields = schema.get("fields", []) if isinstance(schema, dict) else []
    return {
        "classes": list(payload.get("class_names", [])),
        "schema": [f.get("name", "") if isinstance(f, dict) else str(f) for f in fields],
        "schema_spec": schema if isinstance(schema, dict) and fields else None,
        "demo": bool(payload.get("demo", False)),
        "version": str((payload.get("provenance") or {}).get("library_version", "")),
        "title": str(payload.get("model_name", path.stem)),
        "heatmap": payload.get("heatmap") if payload.get("heatmap") in HEATMAP_METHODS else None,
    }


def _atomic_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as tmp:
        shutil.copyfile(source, tmp)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    from MMCAFNetLib.strict_json import write_json

    write_json(path, data)


def add_model_from_file(
    path: str | os.PathLike, models_dir: str | os.PathLike | None = None, title: Optional[str] = None
) -> ModelEntry:
    """Copy a checkpoint (or a .zip holding one) into the user folder after loading it safely.

    The offline path for users behind proxies. A file that is not a loadable checkpoint is refused
    before anything is copied.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"model file not found: {source}")
    folder = _models_dir(models_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if source.suffix.lower() == ".zip":  # (a .pt file is itself a zip: decide by name)
        if not zipfile.is_zipfile(source):
            raise CatalogError(f"{source.name} is not a readable zip archive")
        return _register(extract_archive(source, folder), title)
    if source.suffix not in CHECKPOINT_SUFFIXES:
        raise CatalogError(f"{source.name}: expected a .pt/.pth checkpoint or a .zip holding one")
    facts = checkpoint_facts(source)  # refuses pickled code before copying
    target = folder / source.name
    if target.resolve() != source.resolve():
        _atomic_copy(source, target)
    return _register(target, title, facts)


def _register(path: Path, title: Optional[str], facts: Optional[dict[str, Any]] = None) -> ModelEntry:
    try:
        facts = facts or checkpoint_facts(path)
    except ValueError:
        path.unlink(missing_ok=True)
        raise
    meta = {
        "id": path.stem,
        "title": title or f"{facts['title']} ({path.stem})",
        "version": facts["version"],
        "sha256": sha256_file(path),
        "classes": facts["classes"],
        "schema": facts["schema"],
        "schema_spec": facts.get("schema_spec"),
        "licence": "unknown",
        "demo": facts["demo"],
        "heatmap": facts.get("heatmap"),
    }
    _write_json(_sidecar(path), meta)
    return next(e for e in user_models(path.parent) if Path(e.file or "") == path)


#: Largest checkpoint taken from an archive (``mmcafnet`` in float32 is about 360 MB): a bound on
#: what a hostile archive can make us write, whatever its headers claim.
MAX_ARCHIVE_CHECKPOINT_BYTES = 4 << 30


def flat_member_name(name: str) -> str:
    """The file name of an archive member without its folders ("models/v2/m.pt" -> "m.pt")."""
    return name.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def extract_archive(archive: str | os.PathLike, folder: str | os.PathLike,
                    max_bytes: int = MAX_ARCHIVE_CHECKPOINT_BYTES) -> Path:
    """Extract the one checkpoint a zip holds into ``folder`` and return its path.

    Checked before anything is written: no member may point outside ``folder`` or be a symbolic
    link, exactly one member is a checkpoint, it is not larger than ``max_bytes``, and no file of
    that name is in ``folder`` yet (an archive never replaces a model). The size check on the
    header is enough: ``zipfile`` never yields more bytes than the header states (a member that
    holds more fails its CRC check), so no more than ``max_bytes`` is ever written. Other members
    are not extracted. The checkpoint is written under a temporary name and renamed when complete.
    """
    name = Path(archive).name
    root = Path(folder).resolve()
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        for member in members:
            target = (root / member.filename).resolve()
            if member.filename.startswith(("/", "\\")) or (root != target and root not in target.parents):
                raise CatalogError(
                    f"{name}: member {member.filename!r} would be written outside the models folder; "
                    "the archive is refused"
                )
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise CatalogError(f"{name}: member {member.filename!r} is a symbolic link; refused")
        checkpoints = [m for m in members if Path(flat_member_name(m.filename)).suffix in CHECKPOINT_SUFFIXES]
        if len(checkpoints) != 1:
            raise CatalogError(f"{name} must hold exactly one .pt checkpoint; it holds {len(checkpoints)}")
        member = checkpoints[0]
        if member.file_size > max_bytes:
            raise CatalogError(f"{name}: {member.filename!r} is larger than {max_bytes / 2**30:.1f} GiB, more than "
                               "any MMCAF-Net checkpoint; the archive is refused")
        # flattened: a checkpoint in a sub-folder of the archive lands directly in the models folder,
        # where it is listed and cleared like any other
        target = root / flat_member_name(member.filename)
        if target.exists():
            raise CatalogError(
                f"{name}: a model file {member.filename!r} is already in the models folder; remove that model "
                "first or rename the checkpoint inside the archive"
            )
        root.mkdir(parents=True, exist_ok=True)
        with atomic_output(target) as tmp, zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


def _redirect_guard(allow_http: bool):
    """A redirect handler that refuses a redirect to plain http (or any non-https scheme)."""
    import urllib.request

    class RefuseDowngrade(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            allowed = ("https://", "http://") if allow_http else ("https://",)
            if not newurl.lower().startswith(allowed):
                raise CatalogError(
                    f"refusing a redirect from {req.full_url} to {newurl}: a download that starts over "
                    "https must stay on https (allow http explicitly if you trust this server)"
                )
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return RefuseDowngrade()


def download_model(
    entry: ModelEntry,
    models_dir: str | os.PathLike | None = None,
    allow_http: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch a catalog model on the user's request, check its sha256, store it in the user folder.

    Plain http is refused unless ``allow_http`` (the checksum still protects integrity, but not
    privacy). The file is written to a temp name and renamed only after the checksum matched.
    """
    if not entry.url:
        raise CatalogError(f"model {entry.id!r} has no URL to download from")
    if entry.url.startswith("http://") and not allow_http:
        raise CatalogError(
            f"refusing to download {entry.url} over plain http; use an https URL (or allow http explicitly)"
        )
    if not entry.url.startswith(("https://", "http://")):
        raise CatalogError(f"model {entry.id!r}: only https (or allowed http) URLs are downloaded")
    target = downloaded_path(entry, models_dir)
    if target.is_file() and sha256_file(target) == entry.sha256:
        return target
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        digest = hashlib.sha256()
        opener = urllib.request.build_opener(_redirect_guard(allow_http))
        limit = download_limit(entry)
        with os.fdopen(fd, "wb") as out, opener.open(entry.url, timeout=timeout) as response:
            try:
                total = int(response.headers.get("Content-Length") or 0)
            except ValueError:
                total = 0
            if total > limit:
                raise CatalogError(_too_large(entry, limit, f"the server announces {total} bytes"))
            done = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                if done + len(block) > limit:
                    raise CatalogError(_too_large(entry, limit, f"the server sent more than {limit} bytes"))
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
        if digest.hexdigest() != entry.sha256:
            raise CatalogError(
                f"download of {entry.url} does not match the catalog (sha256 {digest.hexdigest()}, expected "
                f"{entry.sha256}); nothing was kept. Try again later or add the file by hand."
            )
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _write_json(_sidecar(target), {**entry.to_dict(), "id": target.stem})
    return target


#: What a download may exceed the catalog's declared size by (servers may add nothing, but a catalog
#: entry rounded by hand should still download).
DOWNLOAD_MARGIN_BYTES = 1 << 20
DOWNLOAD_MARGIN_FRACTION = 0.01


def download_limit(entry: ModelEntry) -> int:
    """Bytes a download of ``entry`` may reach: its declared size plus a margin, else the archive cap."""
    if entry.size:
        return int(entry.size) + max(DOWNLOAD_MARGIN_BYTES, int(entry.size * DOWNLOAD_MARGIN_FRACTION))
    return MAX_ARCHIVE_CHECKPOINT_BYTES


def _too_large(entry: ModelEntry, limit: int, what: str) -> str:
    declared = f"the catalog declares {entry.size} bytes" if entry.size else "the catalog declares no size"
    return (f"download of {entry.url} stopped: {what}, but {declared} (limit {limit} bytes); nothing was kept. "
            "The server or the catalog entry is wrong.")


def clear_models_folder(models_dir: str | os.PathLike | None = None) -> int:
    """Delete the user's models (checkpoints, sidecars, partial downloads); returns files removed."""
    folder = _models_dir(models_dir)
    if not folder.is_dir():
        return 0
    removed = 0
    for path in folder.iterdir():
        if path.is_file() and (
            path.suffix in CHECKPOINT_SUFFIXES or path.name.endswith((".pt.json", ".pth.json", ".part", ".tmp"))
        ):
            path.unlink()
            removed += 1
    return removed


class ModelFolder:
    """The catalog plus one user models folder: what the Slicer panel lists, adds, downloads and clears."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = _models_dir(folder)

    def entries(self) -> list[ModelEntry]:
        return list_models(models_dir=self.folder)

    def path(self, entry: ModelEntry) -> Path:
        return model_path(entry, self.folder)

    def add_file(self, path: str | os.PathLike) -> ModelEntry:
        return add_model_from_file(path, self.folder)

    def download(self, entry: ModelEntry) -> Path:
        return download_model(entry, self.folder)

    def clear(self) -> int:
        return clear_models_folder(self.folder)

    @staticmethod
    def key(entry: ModelEntry) -> str:
        """What a saved scene remembers: the catalog id, or a user model's file (ids may repeat there)."""
        return entry.file if entry.source == "user" and entry.file else entry.id

    @staticmethod
    def index(entries: list[ModelEntry], key: str) -> Optional[int]:
        """Position of the entry with this key (id or file) in ``entries``, or None."""
        return next((i for i, e in enumerate(entries) if key in (e.id, e.file)), None)


def refresh_bundled_checksums(catalog: str | os.PathLike | None = None) -> list[str]:
    """Maintainer tool: write the sha256 and clinical schema of every bundled file present into the catalog.

    Run after replacing a bundled checkpoint; the test suite fails while the two disagree.
    """
    from MMCAFNetLib.resources import resources_dir

    path = Path(catalog) if catalog is not None else catalog_path()
    data = json.loads(path.read_text(encoding="utf-8"))
    changed = []
    for item in data.get("models", []):
        if "file" in item and (resources_dir() / item["file"]).is_file():
            facts = checkpoint_facts(resources_dir() / item["file"])
            fresh = {"sha256": sha256_file(resources_dir() / item["file"]), "schema": facts["schema"],
                     "schema_spec": facts["schema_spec"]}
            if any(item.get(k) != v for k, v in fresh.items()):
                item.update(fresh)
                changed.append(item["id"])
    if changed:
        _write_json(path, data)
    return changed
