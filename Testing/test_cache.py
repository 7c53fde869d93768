"""The preprocessed cache and the window dataset, on a synthetic cohort of real DICOM series."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pydicom
import pytest
import torch

import MMCAFNetLib.volume as volume_module
from MMCAFNetLib.cache import PreprocessCache, WindowDataset, source_fingerprint
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


def test_window_dataset_training_and_evaluation(cohort, tmp_path):
    schema = default_schema().fit(cohort)
    cache = PreprocessCache(tmp_path / "c")
    train = WindowDataset(cohort, cache, SMALL, schema, augment=True, windows_per_patient=2, seed=5)
    assert len(train) == 6
    item = train[0]
    assert item["image"].shape == (1, *SMALL.window) and item["image"].dtype == torch.float32
    assert item["clinical"].shape == (schema.num_features,) and item["clinical"].dtype == torch.float32
    np.testing.assert_allclose(item["clinical"].numpy(), schema.encode(cohort.iloc[[0]][schema.field_names])[0])
    assert train.class_names == ["A", "G"]
    expected = [train.class_names.index(lbl) for lbl in cohort.label for _ in range(2)]
    assert [train[i]["label"] for i in range(len(train))] == expected
    # deterministic per (seed, epoch, index); another epoch draws other windows
    np.testing.assert_array_equal(train[3]["image"].numpy(), train[3]["image"].numpy())
    e0 = [train[i]["image"].numpy() for i in range(len(train))]
    train.set_epoch(1)
    e1 = [train[i]["image"].numpy() for i in range(len(train))]
    assert any(not np.array_equal(a, b) for a, b in zip(e0, e1))
    assert cache.stats["built"] == 3

    evaluation = WindowDataset(cohort, cache, SMALL, schema, augment=False, build_missing=False)
    assert cache.stats["hits"] == 3
    assert len(evaluation) == sum(len(c) for c in evaluation.centers) >= 3
    assert set(evaluation.item_patients()) == set(cohort.patient_id)
    first = [evaluation[i]["image"].numpy() for i in range(len(evaluation))]
    again = [evaluation[i]["image"].numpy() for i in range(len(evaluation))]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # every evaluation window holds lesion tissue: denser than lung at the box centre
    for i in range(len(evaluation)):
        assert evaluation[i]["image"].max() > SMALL.normalise(np.float32(-500.0))

    loader = torch.utils.data.DataLoader(evaluation, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 1, *SMALL.window) and len(batch["patient_id"]) == 2

    # pickled for worker processes without the arrays; the copy serves the same windows
    blob = pickle.dumps(evaluation)
    assert len(blob) < 50_000
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone[0]["image"].numpy(), first[0])


def test_window_dataset_refuses_missing_entries_and_bad_input(cohort, tmp_path):
    schema = default_schema().fit(cohort)
    with pytest.raises(FileNotFoundError, match="mmcafnet preprocess"):
        WindowDataset(cohort, PreprocessCache(tmp_path / "empty"), SMALL, schema, augment=False, build_missing=False)
    with pytest.raises(ValueError, match="no patients"):
        WindowDataset(cohort.iloc[:0], PreprocessCache(tmp_path / "c"), SMALL, schema, augment=False)
    with pytest.raises(ValueError, match="class_names"):
        WindowDataset(cohort, PreprocessCache(tmp_path / "c"), SMALL, schema, augment=False, class_names=["A"])
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
