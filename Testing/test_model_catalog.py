"""MMCAFNetLib.model_catalog: the bundled catalog, user models, safe archives, checked downloads."""

from __future__ import annotations

import functools
import http.server
import json
import struct
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from archive_support import make_zip

from MMCAFNetLib import checkpoint as ck
from MMCAFNetLib import model_catalog as mc
from MMCAFNetLib.resources import resources_dir


class NotWeights:
    """Any pickled class: loading it would run code, so weights_only refuses it."""


def write_checkpoint(path: Path, demo: bool = False) -> Path:
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 2)
    payload = {
        "format_version": ck.FORMAT_VERSION, "model_name": "tabular-mlp", "model_config": {}, "class_names": ["A", "G"],
        "task": "AG", "state_dict": layer.state_dict(),
        "schema": {"fields": [{"name": "sex"}, {"name": "age"}]}, "preset": {"name": "default"}, "threshold": 0.5,
        "provenance": {"library_version": "0.1.0"}, "metrics": {}, "demo": demo,
    }
    return ck.save_checkpoint(payload, path)


def entry_for(path: Path, url: str) -> mc.ModelEntry:
    return mc.parse_entry({
        "id": "remote-model", "title": "Remote", "version": "1.0", "url": url, "sha256": mc.sha256_file(path),
        "classes": ["A", "G"], "schema": ["sex", "age"], "licence": "CC-BY-4.0", "demo": False,
    })


def test_bundled_catalog_is_valid_and_names_a_demo_model():
    entries = mc.load_catalog()
    assert entries, "Resources/Models.json lists no model"
    demo = [e for e in entries if e.demo and e.file]
    assert demo, "the catalog must bundle a demo model so the module works offline"
    for e in entries:
        assert e.licence and e.classes and e.schema
        assert e.schema_spec is not None, f"{e.id}: the Slicer form needs its schema_spec before torch is installed"
    raw = json.loads((resources_dir() / "Models.json").read_text())
    assert [m["id"] for m in raw["models"]] == [e.id for e in entries]


def test_bundled_files_match_their_sha256():
    checked = 0
    for e in mc.load_catalog():
        if e.file is None:
            continue
        path = resources_dir() / e.file
        if not path.is_file():
            continue
        mc.verify_file(e, path)  # run mc.refresh_bundled_checksums() after rebuilding a bundled model
        checked += 1
    if not checked:
        pytest.skip("no bundled model file is present yet (Resources/Models/*.pt)")


def test_bundled_demo_checkpoint_agrees_with_its_catalog_entry():
    for e in mc.load_catalog():
        if e.file and (resources_dir() / e.file).is_file():
            facts = mc.checkpoint_facts(resources_dir() / e.file)
            assert facts["classes"] == e.classes and facts["demo"] == e.demo
            return
    pytest.skip("no bundled model file is present yet")


def test_catalog_schema_spec_is_the_bundled_checkpoints_own_schema():
    """The Slicer form reads the catalog's copy (torch may not be installed yet); it must be the model's."""
    checked = 0
    for e in mc.load_catalog():
        if e.file and (resources_dir() / e.file).is_file():
            payload = torch.load(resources_dir() / e.file, map_location="cpu", weights_only=True)
            assert e.schema_spec == json.loads(json.dumps(payload["schema"])), (
                f"{e.id}: Models.json's schema_spec is not the checkpoint's; run mc.refresh_bundled_checksums()"
            )
            assert e.schema == [f["name"] for f in payload["schema"]["fields"]]
            checked += 1
    if not checked:
        pytest.skip("no bundled model file is present yet")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sha256": "abc"}, "sha256"),
        ({"schema_spec": {"fields": [{"name": "age"}]}}, "schema_spec"),
        ({"schema_spec": ["age"]}, "schema_spec"),
        ({"url": "https://example.org/m.pt"}, "exactly one"),
        ({"id": "../x"}, "model id"),
        ({"classes": []}, "classes"),
    ],
)
def test_bad_catalog_entries_are_refused(change, message):
    good = {
        "id": "m", "title": "M", "version": "1", "file": "Models/m.pt", "sha256": "0" * 64, "classes": ["A"],
        "schema": [], "licence": "x", "demo": False,
    }
    with pytest.raises(mc.CatalogError, match=message):
        mc.parse_entry({**good, **change})
    missing = dict(good)
    del missing["licence"]
    with pytest.raises(mc.CatalogError, match="lacks"):
        mc.parse_entry(missing)


def test_add_model_from_file_lists_it_and_clear_removes_it(tmp_path):
    source = write_checkpoint(tmp_path / "src" / "my-model.pt", demo=False)
    models = tmp_path / "models"
    entry = mc.add_model_from_file(source, models)
    assert entry.source == "user" and Path(entry.file).parent == models
    assert entry.classes == ["A", "G"] and entry.schema == ["sex", "age"] and not entry.demo
    assert entry.sha256 == mc.sha256_file(source)
    listed = mc.list_models(models_dir=models)
    assert listed[-1].file == entry.file and any(e.source == "catalog" for e in listed)
    assert mc.model_path(entry, models) == Path(entry.file)
    assert mc.clear_models_folder(models) == 2  # checkpoint + its description
    assert mc.user_models(models) == []


def test_files_holding_pickled_code_are_refused_before_copying(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "x": NotWeights()}, evil)
    models = tmp_path / "models"
    with pytest.raises(ck.CheckpointError, match="cannot be loaded safely"):
        mc.add_model_from_file(evil, models)
    assert not (models / "evil.pt").exists()
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(mc.CatalogError, match="checkpoint"):
        mc.add_model_from_file(text, models)


def test_archives_are_extracted_only_inside_the_models_folder(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pt")
    models = tmp_path / "models"
    entry = mc.add_model_from_file(make_zip(tmp_path / "good.zip", {"inner/m.pt": ckpt}), models)
    assert Path(entry.file) == models / "m.pt"  # flattened into the models folder

    with pytest.raises(mc.CatalogError, match="outside the models folder"):
        mc.add_model_from_file(make_zip(tmp_path / "evil.zip", {"../escaped.pt": ckpt}), models)
    assert not (tmp_path / "escaped.pt").exists()
    absolute = tmp_path / "absolute.zip"
    with zipfile.ZipFile(absolute, "w") as zf:
        zf.writestr(zipfile.ZipInfo("/abs.pt"), ckpt.read_bytes())
    with pytest.raises(mc.CatalogError):
        mc.extract_archive(absolute, models)


def test_an_archive_never_replaces_a_model_and_brings_only_its_checkpoint(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pt")
    models = tmp_path / "models"
    entry = mc.add_model_from_file(make_zip(tmp_path / "bundle.zip", {"m.pt": ckpt, "README.txt": b"notes"}), models)
    assert Path(entry.file) == models / "m.pt"
    assert not (models / "README.txt").exists(), "only the checkpoint is extracted"
    before = (models / "m.pt").read_bytes()

    other = make_zip(tmp_path / "other.zip", {"m.pt": b"a different file under the same name"})
    with pytest.raises(mc.CatalogError, match="already in the models folder"):
        mc.add_model_from_file(other, models)
    assert (models / "m.pt").read_bytes() == before

    with pytest.raises(mc.CatalogError, match="exactly one"):
        mc.add_model_from_file(make_zip(tmp_path / "two.zip", {"a.pt": ckpt, "b.pt": ckpt}), models)
    assert sorted(p.name for p in models.iterdir() if p.suffix == ".pt") == ["m.pt"]


def test_an_oversized_archive_member_is_refused_before_anything_is_written(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.pt", bytes(4096))  # compresses to a few bytes: the shape of a zip bomb
    with pytest.raises(mc.CatalogError, match="larger than"):
        mc.extract_archive(archive, models, max_bytes=1024)
    assert not list(models.iterdir())


def test_an_archive_member_larger_than_its_header_says_writes_nothing(tmp_path):
    """The size check trusts the header because zipfile never yields more than it states."""
    models = tmp_path / "models"
    models.mkdir()
    archive = make_zip(tmp_path / "lying.zip", {"m.pt": bytes(100_000)})
    data = bytearray(archive.read_bytes())
    struct.pack_into("<I", data, data.find(b"PK\x01\x02") + 24, 1000)  # central directory: 1000 bytes
    struct.pack_into("<I", data, data.find(b"PK\x03\x04") + 22, 1000)  # local header: 1000 bytes
    archive.write_bytes(bytes(data))
    with pytest.raises(zipfile.BadZipFile, match="CRC"):
        mc.extract_archive(archive, models, max_bytes=2000)
    assert not list(models.iterdir())

@pytest.fixture
def local_http(tmp_path):
    """A real HTTP server on the loopback interface serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_is_checked_against_sha256_and_plain_http_needs_consent(tmp_path, local_http):
    root, base = local_http
    served = write_checkpoint(root / "model.pt")
    entry = entry_for(served, f"{base}/model.pt")
    models = tmp_path / "models"
    with pytest.raises(FileNotFoundError, match="not downloaded yet"):
        mc.model_path(entry, models)
    with pytest.raises(mc.CatalogError, match="plain http"):
        mc.download_model(entry, models)
    assert not models.exists() or not any(models.iterdir())
    seen = []
    path = mc.download_model(entry, models, allow_http=True, progress=lambda d, t: seen.append((d, t)))
    assert mc.sha256_file(path) == entry.sha256 and seen[-1][0] == served.stat().st_size
    assert mc.model_path(entry, models) == path

    tampered = mc.ModelEntry(**{**entry.__dict__, "id": "tampered", "sha256": "1" * 64})
    with pytest.raises(mc.CatalogError, match="does not match"):
        mc.download_model(tampered, models, allow_http=True)
    assert not mc.downloaded_path(tampered, models).exists()
    assert not [p for p in models.iterdir() if p.name.endswith(".part")]


def test_refresh_bundled_checksums_writes_the_real_digest(tmp_path, monkeypatch):
    res = tmp_path / "Resources"
    (res / "Models").mkdir(parents=True)
    ckpt = write_checkpoint(res / "Models" / "x.pt")
    catalog = res / "Models.json"
    catalog.write_text(json.dumps({"format_version": 1, "models": [{
        "id": "x", "title": "X", "version": "1", "file": "Models/x.pt", "sha256": "0" * 64, "classes": ["A", "G"],
        "schema": [], "licence": "x", "demo": True}]}))
    monkeypatch.setenv("MMCAFNET_RESOURCES", str(res))
    assert mc.refresh_bundled_checksums(catalog) == ["x"]
    entry = mc.load_catalog(catalog)[0]
    mc.verify_file(entry, ckpt)
    assert entry.schema == ["sex", "age"] and entry.schema_spec == ck.load_checkpoint(ckpt)["schema"]
    assert mc.refresh_bundled_checksums(catalog) == []  # nothing left to refresh


def test_the_clinical_form_asks_for_the_models_own_schema(tmp_path):
    """A checkpoint trained with other clinical fields gets a form for exactly those fields."""
    import dataclasses

    from MMCAFNetLib import ehr
    from MMCAFNetLib import slicer_logic as sl

    default = ehr.default_schema()
    age = default.select(["age"]).fields[0]
    pack_years = dataclasses.replace(age, name="pack_years", label="Pack-years", aliases=(), plausible_range=(0.0, 150.0))
    schema = ehr.ClinicalSchema([*default.select(["sex", "smoking"]).fields, pack_years])
    path = write_checkpoint(tmp_path / "custom.pt")
    payload = ck.load_checkpoint(path)
    payload["schema"] = schema.to_dict()
    ck.save_checkpoint(payload, path)

    models = tmp_path / "models"
    entry = mc.add_model_from_file(path, models)
    assert entry.schema == ["sex", "smoking", "pack_years"] and entry.schema_spec is not None
    form = sl.form_schema(entry, models)
    assert form.field_names == ["sex", "smoking", "pack_years"]  # pack_years is not a default field
    assert [f.name for f in sl.form_fields(form)] == form.field_names

    # a sidecar written before the schema was stored: the checkpoint itself is read
    sidecar = models / "custom.pt.json"
    meta = json.loads(sidecar.read_text())
    del meta["schema_spec"]
    sidecar.write_text(json.dumps(meta))
    (old,) = mc.user_models(models)
    assert old.schema_spec is None and sl.form_schema(old, models).field_names == form.field_names

    # the bundled demo model: its checkpoint's schema
    demo = next(e for e in mc.load_catalog() if e.demo)
    demo_schema = ck.load_checkpoint(mc.model_path(demo))["schema"]
    assert sl.form_schema(demo).to_dict() == ehr.ClinicalSchema.from_dict(demo_schema).to_dict()

    # a catalog model not downloaded yet: the default fields the catalog names; no model: all of them
    remote = entry_for(path, "https://example.org/model.pt")
    assert sl.form_schema(remote, tmp_path / "empty").field_names == ["sex", "age"]
    assert sl.form_schema(None).field_names == default.field_names


def test_a_checkpoint_in_a_sub_folder_of_an_archive_is_flattened_listed_and_cleared(tmp_path):
    ckpt = write_checkpoint(tmp_path / "m.pt")
    models = tmp_path / "models"
    for n, name in enumerate(("release/v2/model-a.pt", "release\\model-b.pt")):
        entry = mc.add_model_from_file(make_zip(tmp_path / f"nested{n}.zip", {name: ckpt}), models)
        flat = models / name.replace("\\", "/").rsplit("/", 1)[-1]
        assert Path(entry.file) == flat and flat.is_file()
    assert [p.name for p in models.iterdir() if p.is_dir()] == [], "no sub-folder is created"
    assert sorted(Path(e.file).name for e in mc.user_models(models)) == ["model-a.pt", "model-b.pt"]
    assert mc.clear_models_folder(models) >= 2
    assert list(models.iterdir()) == []


class _NoLengthHandler(http.server.BaseHTTPRequestHandler):
    """Streams ``body`` without a Content-Length header (a server that does not say how much comes)."""

    body = b""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        for start in range(0, len(self.body), 1 << 16):
            self.wfile.write(self.body[start:start + (1 << 16)])

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "no-content-length"])
def test_a_download_stops_at_the_declared_size_plus_a_margin(tmp_path, local_http, announced):
    root, base = local_http
    body = bytes(3 << 20)  # 3 MiB where the catalog declares 1000 bytes
    (root / "model.pt").write_bytes(body)
    url = f"{base}/model.pt"
    server = None
    if not announced:
        handler = type("Handler", (_NoLengthHandler,), {"body": body})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.server_address[1]}/model.pt"
    entry = mc.parse_entry({
        "id": "remote-model", "title": "Remote", "version": "1.0", "url": url, "sha256": "0" * 64, "size": 1000,
        "classes": ["A", "G"], "schema": ["sex", "age"], "licence": "CC-BY-4.0", "demo": False,
    })
    assert mc.download_limit(entry) == 1000 + (1 << 20)
    models = tmp_path / "models"
    seen = []
    try:
        with pytest.raises(mc.CatalogError, match="declares 1000 bytes"):
            mc.download_model(entry, models, allow_http=True, progress=lambda d, t: seen.append(d))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    assert not any(models.iterdir()), "nothing is kept"
    assert not seen or seen[-1] <= mc.download_limit(entry)
    with pytest.raises(mc.CatalogError, match="size"):
        mc.parse_entry({**entry.to_dict(), "size": -5})
