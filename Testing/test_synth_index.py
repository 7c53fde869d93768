"""A synthetic cohort written in the real layout is indexed back to what was generated."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from MMCAFNetLib.cli import main as cli_main
from MMCAFNetLib.dataset import index_download, read_cohort
from MMCAFNetLib.ehr import default_schema
from MMCAFNetLib.volume import read_volume

synthetic = pytest.importorskip("MMCAFNetLib.synthetic", reason="the synthetic cohort writer is not available")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return synthetic.write_cohort(out, patients=10, seed=7, size=64, classes="A,B,E,G")


def test_synth_then_index_recovers_every_patient(written, tmp_path):
    lines: list[str] = []
    result = index_download(written.root, seed=0, sink=lines.append)
    assert lines == [], f"a clean synthetic cohort gave warnings: {lines[:3]}"
    truth = {p.patient_id: p for p in written.patients}
    cohort = result.cohort.set_index("patient_id")
    assert sorted(cohort.index) == sorted(truth)
    assert cohort["label"].value_counts().to_dict() == written.class_counts()
    schema = default_schema()
    for pid, p in truth.items():
        row = cohort.loc[pid]
        assert row["label"] == p.label
        assert row["series_uid"] == p.series_uid and row["num_slices"] == p.num_slices
        assert row["annotated_slices"] == p.annotated_slices
        got_ijk = np.array([row[f"box_ijk_{m}_{a}"] for m in ("min", "max") for a in "ijk"])
        want_ijk = np.array([*p.lesion_box_ijk[0], *p.lesion_box_ijk[1]])
        assert np.abs(got_ijk - want_ijk).max() <= 1, pid
        got_ras = np.array([row[f"box_ras_{m}_{a}"] for m in ("min", "max") for a in "ras"])
        want_ras = np.array([*p.lesion_box_ras[0], *p.lesion_box_ras[1]])
        voxel = float(np.max(read_volume(row["series_path"]).spacing))
        assert np.abs(got_ras - want_ras).max() <= voxel + 1e-3, pid  # within one voxel
        record = {f: (None if pd.isna(row[f]) else row[f]) for f in schema.field_names}
        assert schema.validate_record(record) == schema.validate_record(p.record), pid


def test_synth_then_index_command(written, tmp_path, capsys):
    out = tmp_path / "cohort.csv"
    assert cli_main(["index", str(written.root), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert f"indexed {len(written.patients)} patient(s)" in text and "skipped items: 0" in text
    # 10 patients over four classes: every split is too small for some class, and index says which.
    assert "warning: the test split holds only" in captured.err and "not meaningful" in captured.err
    cohort = read_cohort(out)
    assert set(cohort["split"]) <= {"train", "val", "test"} and len(cohort) == len(written.patients)
    fitted = default_schema().fit(cohort[cohort["split"] == "train"])
    assert fitted.encode(cohort).shape == (len(cohort), 7)


def test_a_file_location_leading_outside_the_download_is_refused_with_one_warning_per_row(tmp_path):
    """metadata.csv is data from the internet: its File Location must not lead the indexer (and then
    training) into folders outside the download."""
    small = synthetic.write_cohort(tmp_path / "data", patients=4, seed=3, size=32, classes="A,G", extra_series=False)
    meta_path = small.root / "metadata.csv"
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    first = meta.index[0]
    original = small.root / meta.loc[first, "File Location"].replace("\\", "/").removeprefix("./")
    outside = tmp_path / "outside" / "series"
    outside.parent.mkdir()
    original.rename(outside)  # a real CT series, but outside the download
    (small.root / "link-out").symlink_to(tmp_path / "outside", target_is_directory=True)
    meta = pd.concat([meta, meta.loc[[first]], meta.loc[[first]]], ignore_index=True)
    meta.loc[first, "File Location"] = "./../outside/series"
    meta.loc[len(meta) - 2, "File Location"] = str(outside)  # an absolute path
    meta.loc[len(meta) - 1, "File Location"] = "./link-out/series"  # a link leading out
    meta.to_csv(meta_path, index=False)
    lines: list[str] = []
    result = index_download(small.root, seed=0, progress=False, sink=lines.append)
    outside_lines = [line for line in lines if "leads outside the download" in line]
    assert len(outside_lines) == 3, lines
    assert all("metadata.csv row" in line for line in outside_lines)
    assert result.report.skipped["series folder outside the download"] == 3
    assert not any(str(outside) in str(p) for p in result.cohort["series_path"])
    assert len(result.cohort) == 3  # the patient whose only series is outside is skipped


@pytest.mark.parametrize("damage", ["binary", "ragged", "not-utf8"])
def test_unreadable_tables_are_named_in_the_error(tmp_path, damage):
    from MMCAFNetLib.dataset import read_metadata
    from MMCAFNetLib.ehr import read_clinical_sheet
    from MMCAFNetLib.table_files import TableFileError

    data = {"binary": bytes(range(256)) * 8, "ragged": b'a,b\n1,2\n1,2,3,4\n"unclosed\n',
            "not-utf8": "Series UID,Subject ID\n\xe9t\xe9,x\n".encode("latin-1")}[damage]
    for name, reader in (("metadata.csv", read_metadata), ("clinical.csv", read_clinical_sheet),
                         ("cohort.csv", read_cohort)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as info:
            reader(path)
        assert str(path) in str(info.value) or path.name in str(info.value), (name, str(info.value))
    (tmp_path / "clinical.xlsx").write_bytes(data)
    with pytest.raises(TableFileError, match=r"clinical\.xlsx"):
        read_clinical_sheet(tmp_path / "clinical.xlsx")
