"""Untrusted files and the network: nothing runs that should not, nothing is fetched unasked.

- A checkpoint carrying a pickled callable whose unpickling would create a file is refused through
  every door a user can open (library, Predictor, model catalog plain and zipped, Slicer logic), and
  the file is never created -- while the same file loaded unsafely does create it (the payload is real).
- Downloaded models are verified against their sha256 at download and again at use.
- Archives cannot write outside the models folder (``..``, absolute paths, symbolic links).
- Only https is fetched unless plain http is allowed; other schemes never; a refused download
  does not even connect (a real loopback server counts requests).
- Importing and using the library offline opens no socket (checked with a Python audit hook in a
  fresh interpreter), and only ``model_catalog.download_model`` contains network code.
"""

from __future__ import annotations

import builtins
import functools
import http.server
import json
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from archive_support import make_zip

from MMCAFNetLib import model_catalog as mc
from MMCAFNetLib.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]


class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def valid_payload() -> dict:
    layer = torch.nn.Linear(7, 1)
    return {
        "format_version": FORMAT_VERSION, "model_name": "tabular-mlp", "model_config": {}, "class_names": ["A", "G"],
        "task": "AG", "state_dict": layer.state_dict(), "schema": {"fields": [{"name": "sex"}]},
        "preset": {"name": "default"}, "threshold": 0.5, "provenance": {"library_version": "test"}, "metrics": {},
        "demo": True,
    }


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """(checkpoint holding a complete payload plus the callable, marker it would create)."""
    marker = tmp_path / "PAYLOAD-RAN"
    path = tmp_path / "evil.pt"
    torch.save({**valid_payload(), "metrics": {"note": CreatesFile(marker)}}, path)
    return path, marker


def test_the_payload_is_real_loading_it_unsafely_creates_the_file(evil) -> None:
    path, marker = evil
    torch.load(path, weights_only=False)  # what a careless loader would do
    assert marker.exists()


def test_load_checkpoint_refuses_it_without_running_it(evil) -> None:
    path, marker = evil
    with pytest.raises(CheckpointError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_the_predictor_refuses_it_without_running_it(evil) -> None:
    inference = pytest.importorskip("MMCAFNetLib.inference", reason="the Predictor has not landed")
    path, marker = evil
    with pytest.raises(CheckpointError):
        inference.Predictor.load(path, device="cpu")
    assert not marker.exists()


def test_the_slicer_worker_refuses_it_without_running_it(evil) -> None:
    """Slicer's classification worker process loads the checkpoint: it refuses it as bad input."""
    from MMCAFNetLib.volume import Volume
    from MMCAFNetLib.worker_client import WorkerProcess, wait_for

    path, marker = evil
    worker = WorkerProcess()
    try:
        ct = Volume.from_geometry(np.full((8, 16, 16), -800, np.int16), (1.0, 1.0, 2.0))
        job = worker.submit(ct, {}, None, {"model_path": str(path), "device": "cpu", "heatmap": "none", "threshold": 0.5})
        events: list = []
        assert wait_for(lambda: events.extend(worker.read_events()) or any(e.get("job") == job and e["event"] in ("done", "error") for e in events), 120)
        outcome = next(e for e in events if e["event"] in ("done", "error"))
        assert outcome["event"] == "error" and outcome["kind"] == "input", outcome
        assert "could run code" in outcome["message"]
    finally:
        worker.close()
    assert not marker.exists()


def test_the_model_catalog_refuses_it_plain_and_zipped_and_keeps_nothing(evil, tmp_path: Path) -> None:
    path, marker = evil
    models = tmp_path / "models"
    with pytest.raises(CheckpointError):
        mc.add_model_from_file(path, models)
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(path, "model.pt")
    with pytest.raises(CheckpointError):
        mc.add_model_from_file(archive, models)
    assert not marker.exists()
    assert not [p for p in models.rglob("*") if p.is_file()], "a refused model left files behind"


# ---------------------------------------------------------------------------------------------
# archives


@pytest.mark.parametrize(
    "members, symlink",
    [
        ({"../outside.pt": b"x"}, None),
        ({"inner/../../outside.pt": b"x"}, None),
        ({"/abs-outside.pt": b"x"}, None),
        ({"ok.pt": b"x"}, "link.pt"),
    ],
    ids=["dot-dot", "nested-dot-dot", "absolute", "symlink"],
)
def test_archive_members_cannot_escape_or_link_out(tmp_path: Path, members, symlink) -> None:
    models = tmp_path / "sub" / "models"
    models.mkdir(parents=True)
    archive = make_zip(tmp_path / "a.zip", members, symlink)
    with pytest.raises(mc.CatalogError, match="refused"):
        mc.extract_archive(archive, models)
    assert not list(models.rglob("*")), "a refused archive wrote into the models folder"
    assert not (tmp_path / "sub" / "outside.pt").exists() and not (tmp_path / "outside.pt").exists()


# ---------------------------------------------------------------------------------------------
# downloads


@pytest.fixture
def server(tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www and counting requests."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            requests.append(self.path)

    handler = functools.partial(Handler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", requests
    httpd.shutdown()
    httpd.server_close()


def _entry(url: str, sha256: str) -> mc.ModelEntry:
    return mc.ModelEntry(
        id="remote", title="Remote", version="1", sha256=sha256, classes=["A", "G"], schema=["sex"], licence="x",
        demo=False, url=url,
    )


def test_plain_http_is_refused_before_any_connection(server, tmp_path: Path) -> None:
    root, base, requests = server
    served = save_checkpoint(valid_payload(), root / "m.pt")
    entry = _entry(f"{base}/m.pt", mc.sha256_file(served))
    with pytest.raises(mc.CatalogError, match="plain http"):
        mc.download_model(entry, tmp_path / "models")
    assert requests == [], "a refused download still contacted the server"
    path = mc.download_model(entry, tmp_path / "models", allow_http=True)
    assert requests == ["/m.pt"] and mc.sha256_file(path) == entry.sha256


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://127.0.0.1/m.pt", "data:,abc", "//127.0.0.1/m.pt"])
def test_other_schemes_are_never_fetched(url: str, tmp_path: Path) -> None:
    with pytest.raises(mc.CatalogError):
        mc.download_model(_entry(url, "0" * 64), tmp_path / "models", allow_http=True)
    with pytest.raises(mc.CatalogError):
        mc.parse_entry({**_entry(url, "0" * 64).to_dict(), "url": url})
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_a_downloaded_file_changed_on_disk_is_not_used(server, tmp_path: Path) -> None:
    root, base, _ = server
    served = save_checkpoint(valid_payload(), root / "m.pt")
    entry = _entry(f"{base}/m.pt", mc.sha256_file(served))
    models = tmp_path / "models"
    path = mc.download_model(entry, models, allow_http=True)
    assert mc.model_path(entry, models) == path
    with open(path, "ab") as fh:  # tampered after the download
        fh.write(b"\0")
    with pytest.raises(mc.CatalogError, match="does not match"):
        mc.model_path(entry, models)
    # downloading again replaces the bad file with the verified one
    assert mc.sha256_file(mc.download_model(entry, models, allow_http=True)) == entry.sha256


def test_a_wrong_checksum_keeps_nothing(server, tmp_path: Path) -> None:
    root, base, _ = server
    save_checkpoint(valid_payload(), root / "m.pt")
    models = tmp_path / "models"
    with pytest.raises(mc.CatalogError, match="does not match"):
        mc.download_model(_entry(f"{base}/m.pt", "a" * 64), models, allow_http=True)
    assert not [p for p in models.iterdir() if p.is_file()]


# ---------------------------------------------------------------------------------------------
# no network unless asked

_OFFLINE_SCRIPT = r"""
import importlib, json, pkgutil, sys
events = []
def hook(event, args):
    if event.startswith(("socket.", "urllib.", "http.", "ftplib.", "smtplib.")):
        events.append(event)
sys.addaudithook(hook)
import MMCAFNetLib
skipped = []
for info in pkgutil.walk_packages(MMCAFNetLib.__path__, "MMCAFNetLib."):
    try:
        importlib.import_module(info.name)
    except ImportError as exc:  # optional dependency (e.g. slicer) absent
        skipped.append(f"{info.name}: {exc}")
from MMCAFNetLib import model_catalog as mc
models = sys.argv[1]
entries = mc.list_models(models_dir=models)
remote = mc.ModelEntry(id="r", title="R", version="1", sha256="0" * 64, classes=["A", "G"], schema=[],
                       licence="x", demo=False, url="https://example.invalid/r.pt")
try:
    mc.model_path(remote, models)
except FileNotFoundError:
    pass
try:
    from MMCAFNetLib.slicer_logic import ClassificationLogic
    ClassificationLogic()
except ImportError:
    pass
print(json.dumps({"events": events, "skipped": skipped, "entries": len(entries)}))
"""


def test_using_the_library_offline_opens_no_socket(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT, str(tmp_path / "models")], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["events"] == [], f"network activity without a URL: {report['events']}"
    assert report["entries"] >= 1


def test_network_code_lives_only_in_the_download_function() -> None:
    pattern = re.compile(r"\b(urllib|http\.client|socket|requests|httpx|ftplib|urlopen)\b")
    offenders = []
    for path in sorted((REPO / "MMCAFNetLib").rglob("*.py")) + sorted((REPO / "MMCAFNet").rglob("*.py")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if pattern.search(code) and not code.strip().startswith(('"', "'")):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    allowed = [o for o in offenders if o.startswith("MMCAFNetLib/model_catalog.py")]
    assert offenders == allowed, "network code outside model_catalog: " + "; ".join(set(offenders) - set(allowed))
    source = (REPO / "MMCAFNetLib" / "model_catalog.py").read_text(encoding="utf-8")
    body = source.split("def download_model", 1)[1].split("\ndef ", 1)[0]
    # The only place a connection is opened: download_model's opener (with the redirect guard).
    assert "opener.open(entry.url" in body and "urlopen" not in source
    assert source.count("build_opener") == body.count("build_opener") == 1


def test_redirect_from_https_to_plain_http_is_refused() -> None:
    import urllib.request

    from MMCAFNetLib.model_catalog import CatalogError, _redirect_guard

    request = urllib.request.Request("https://models.example/m.pt")
    guard = _redirect_guard(allow_http=False)
    with pytest.raises(CatalogError, match="must stay on https"):
        guard.redirect_request(request, None, 302, "Found", {}, "http://models.example/m.pt")
    with pytest.raises(CatalogError, match="refusing a redirect"):
        _redirect_guard(allow_http=True).redirect_request(request, None, 302, "Found", {}, "file:///etc/passwd")
    followed = guard.redirect_request(request, None, 302, "Found", {}, "https://cdn.example/m.pt")
    assert followed.full_url == "https://cdn.example/m.pt"
