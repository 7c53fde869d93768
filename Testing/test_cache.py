"""The preprocessed cache, and training windows served from it, on a synthetic cohort of real DICOM series."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pydicom
import pytest

import MMCAFNetLib.volume as volume_module
from MMCAFNetLib.cache import PreprocessCache, source_fingerprint
from MMCAFNetLib.cli import main as cli_main
from MMCAFNetLib.ehr import default_schema
from MMCAFNetLib.preset import Preset
from MMCAFNetLib.synthetic import write_cohort
from MMCAFNetLib.windows import prepare_volume

SMALL = Preset(name="small", spacing=(5.0, 4.0, 4.0), window=(6, 24, 24), hu_range=(-1000.0, 400.0), mean=0.3)
COARSE = Preset(name="coarse", spacing=(6.0, 6.0, 6.0), window=(6, 16, 16), hu_range=(-1000.0, 400.0), mean=0.3)


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cache") / "cohort", 3, seed=21, size=48, classes="A,G",
                        extra_series=False, small_lesion_share=0.0)


@pytest.fixture
def cohort(cohort_dir, tmp_path):
    """A private copy of the DICOM tree per test (tests modify the sources)."""
    root = tmp_path / "src"
    shutil.copytree(cohort_dir.root, root)
    df = cohort_dir.to_frame()
    df["series_path"] = [str(root / os.path.relpath(p, cohort_dir.root)) for p in df["series_path"]]
    return df


class _Counter:
    def __init__(self, monkeypatch):
        self.reads = 0
        self.dcm = 0
        real_read, real_dcm = volume_module.read_volume, pydicom.dcmread

        def read_volume(*a, **k):
            self.reads += 1
            return real_read(*a, **k)

        def dcmread(*a, **k):
            self.dcm += 1
            return real_dcm(*a, **k)

        monkeypatch.setattr(volume_module, "read_volume", read_volume)
        monkeypatch.setattr(pydicom, "dcmread", dcmread)
        import MMCAFNetLib.dicom_series as ds_module

        monkeypatch.setattr(ds_module.pydicom, "dcmread", dcmread)


def _ensure_all(cache, df, preset, verify="size"):
    return [cache.ensure(r["series_path"], preset, r["series_uid"], verify=verify) for r in df.to_dict("records")]


def test_second_run_reads_no_dicom(cohort, tmp_path, monkeypatch):
    counter = _Counter(monkeypatch)
    first = _ensure_all(PreprocessCache(tmp_path / "c"), cohort, SMALL)
    assert counter.reads == 3 and counter.dcm > 0
    # the cached array is the prepared volume, rounded to int16 HU
    direct = prepare_volume(volume_module.read_volume(cohort.series_path[0]), SMALL)
    np.testing.assert_allclose(np.asarray(first[0].array, dtype=np.float32), direct.array, atol=0.51)
    np.testing.assert_allclose(first[0].ijk_to_ras, direct.ijk_to_ras)

    # overwrite every DICOM file with zeros, keeping its size and modification time: any read would now fail
    for path in cohort.series_path:
        for f in os.scandir(path):
            st = os.stat(f.path)
            with open(f.path, "r+b") as fh:
                fh.write(b"\0" * st.st_size)
            os.utime(f.path, ns=(st.st_atime_ns, st.st_mtime_ns))
    counter.reads = counter.dcm = 0
    cache2 = PreprocessCache(tmp_path / "c")
    second = _ensure_all(cache2, cohort, SMALL)
    assert counter.reads == 0 and counter.dcm == 0
    assert cache2.stats == {"hits": 3, "built": 0, "rebuilt": 0}
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a.array), np.asarray(b.array))
        assert isinstance(b.array, np.memmap) or isinstance(getattr(b.array, "base", None), np.memmap)


def test_changed_preset_or_source_rebuilds(cohort, tmp_path):
    cache = PreprocessCache(tmp_path / "c")
    row = cohort.iloc[0]
    a = cache.ensure(row.series_path, SMALL, row.series_uid)
    b = cache.ensure(row.series_path, COARSE, row.series_uid)
    assert cache.stats["built"] == 2
    assert a.meta["cache_key"] != b.meta["cache_key"]
    np.testing.assert_allclose(b.spacing, (6.0, 6.0, 6.0))
    # touching one source file changes the fingerprint
    before = source_fingerprint(row.series_path)
    f = sorted(os.scandir(row.series_path), key=lambda e: e.name)[0].path
    st = os.stat(f)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert source_fingerprint(row.series_path) != before
    c = cache.ensure(row.series_path, SMALL, row.series_uid)
    assert cache.stats["built"] == 3 and c.meta["cache_key"] != a.meta["cache_key"]
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert set(manifest["entries"]) == {a.meta["cache_key"], b.meta["cache_key"], c.meta["cache_key"]}
    assert {e["preset"]["name"] for e in manifest["entries"].values()} == {"small", "coarse"}
    assert not [p for p in (tmp_path / "c" / "arrays").iterdir() if p.name.endswith(".tmp")]


def test_corrupt_or_truncated_entries_are_rebuilt(cohort, tmp_path):
    cache = PreprocessCache(tmp_path / "c")
    row = cohort.iloc[1]
    good = np.array(cache.ensure(row.series_path, SMALL, row.series_uid).array)
    key = cache.key(row.series_path, SMALL, row.series_uid)
    npy = tmp_path / "c" / "arrays" / f"{key}.npy"

    # truncated: detected by size on any lookup
    data = npy.read_bytes()
    npy.write_bytes(data[: len(data) // 2])
    assert cache.get(row.series_path, SMALL, row.series_uid) is None
    again = cache.ensure(row.series_path, SMALL, row.series_uid)
    assert cache.stats["rebuilt"] == 1
    np.testing.assert_array_equal(np.asarray(again.array), good)

    # same size, changed bytes: the checksum finds it
    del again
    data = bytearray(npy.read_bytes())
    data[-100:] = bytes(255 - b for b in data[-100:])
    npy.write_bytes(bytes(data))
    assert cache.get(row.series_path, SMALL, row.series_uid, verify="full") is None
    fixed = cache.ensure(row.series_path, SMALL, row.series_uid, verify="full")
    assert cache.stats["rebuilt"] == 2
    np.testing.assert_array_equal(np.asarray(fixed.array), good)

    # a garbled sidecar is an unusable entry too
    (tmp_path / "c" / "arrays" / f"{key}.json").write_text("{not json")
    assert cache.get(row.series_path, SMALL, row.series_uid) is None
    with pytest.raises(ValueError, match="verify"):
        cache.get(row.series_path, SMALL, row.series_uid, verify="sometimes")


def _train_config(**settings):
    from MMCAFNetLib.train.config import TrainConfig

    return TrainConfig(preset=SMALL.to_dict(), progress=False, windows_per_patient=2, **settings)


def test_training_and_evaluation_windows_come_from_the_preprocessed_cache(cohort, tmp_path, monkeypatch, capsys):
    from MMCAFNetLib.train.data import build_dataset

    table, config_file = tmp_path / "cohort.csv", tmp_path / "run.json"
    cohort.to_csv(table, index=False)
    config_file.write_text(json.dumps({"preset": SMALL.to_dict()}))
    assert cli_main(["preprocess", "--cohort", str(table), "--config", str(config_file),
                     "--cache", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "3 built" in capsys.readouterr().out
    schema = default_schema().fit(cohort)

    counter = _Counter(monkeypatch)
    cached_config = _train_config(cache_dir=str(tmp_path / "c"))
    train = build_dataset(cohort, cached_config, schema, SMALL, train=True)
    evaluation = build_dataset(cohort, cached_config, schema, SMALL, train=False)
    assert counter.dcm == 0  # no DICOM file opened: every CT came from the cache
    assert len(train) == 6 and len(evaluation) >= 3

    direct = build_dataset(cohort, _train_config(), schema, SMALL, train=False)
    assert counter.dcm > 0
    assert len(direct) == len(evaluation)
    for i in range(len(direct)):
        a, b = direct[i], evaluation[i]
        assert a["patient"] == b["patient"]
        # the cache stores whole HU (int16): windows agree to half a HU on the normalised scale
        np.testing.assert_allclose(a["image"].numpy(), b["image"].numpy(), atol=0.51 / 1400)
        assert b["image"].max() > SMALL.normalise(np.float32(-500.0))  # lesion tissue in every window

    # a CT missing from the cache is prepared and added on first use
    shutil.rmtree(tmp_path / "c" / "arrays")
    build_dataset(cohort.iloc[:1], cached_config, schema, SMALL, train=False)
    assert len(list((tmp_path / "c" / "arrays").glob("*.npy"))) == 1


def test_training_uses_a_float16_cache_as_it_was_filled(cohort, tmp_path, monkeypatch, capsys):
    from MMCAFNetLib.train.data import build_dataset

    table, config_file = tmp_path / "cohort.csv", tmp_path / "run.json"
    cohort.to_csv(table, index=False)
    config_file.write_text(json.dumps({"preset": SMALL.to_dict()}))
    assert cli_main(["preprocess", "--cohort", str(table), "--config", str(config_file), "--dtype", "float16",
                     "--cache", str(tmp_path / "c"), "--no-progress"]) == 0
    assert PreprocessCache(tmp_path / "c").dtype == "float16"
    counter = _Counter(monkeypatch)
    build_dataset(cohort, _train_config(cache_dir=str(tmp_path / "c")), default_schema().fit(cohort), SMALL,
                  train=False)
    assert counter.dcm == 0  # served from the float16 entries, nothing re-prepared
    assert len(list((tmp_path / "c" / "arrays").glob("*.npy"))) == len(cohort)
    assert PreprocessCache(tmp_path / "empty").dtype == "int16"


def test_preprocess_takes_the_preset_of_a_training_config(cohort, tmp_path, capsys):
    table = tmp_path / "cohort.csv"
    cohort.to_csv(table, index=False)
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"preset": COARSE.to_dict()}))
    cache = tmp_path / "c"
    assert cli_main(["preprocess", "--cohort", str(table), "--config", str(config_file), "--cache", str(cache),
                     "--no-progress"]) == 0
    assert "preset coarse" in capsys.readouterr().out
    row = cohort.iloc[0]
    assert PreprocessCache(cache).get(row.series_path, COARSE, row.series_uid) is not None
    assert PreprocessCache(cache).get(row.series_path, SMALL, row.series_uid) is None
    assert cli_main(["preprocess", "--cohort", str(table), "--config", str(config_file), "--preset", "paper",
                     "--cache", str(cache)]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli_main(["preprocess", "--cohort", str(table), "--config", str(tmp_path / "none.json"),
                     "--cache", str(cache)]) == 2
    assert "not found" in capsys.readouterr().err


def test_cache_refuses_an_unknown_storage_type(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        PreprocessCache(tmp_path / "c", dtype="int8")


def test_preprocess_command(cohort, tmp_path, capsys):
    table = tmp_path / "cohort.csv"
    cohort.to_csv(table, index=False)
    args = ["preprocess", "--cohort", str(table), "--preset", "paper", "--cache", str(tmp_path / "c"), "--no-progress"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "3 series" in out and "3 built" in out
    assert cli_main([*args, "--verify"]) == 0
    assert "3 cached" in capsys.readouterr().out
    assert cli_main(["preprocess", "--cohort", str(table), "--preset", "nope", "--cache", str(tmp_path / "c")]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli_main(["preprocess", "--cohort", str(tmp_path / "none.csv"), "--cache", str(tmp_path / "c")]) == 2
