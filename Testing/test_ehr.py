"""Clinical schema, encoding and the real clinical sheet."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from MMCAFNetLib.ehr import (
    GRADING_COLUMN,
    ClinicalDataWarning,
    ClinicalSchema,
    ClinicalValueError,
    default_schema,
    read_clinical_sheet,
)


def _shared_data() -> Path:
    root = Path(os.environ.get("MMCAFNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return root / "data" / "lung-pet-ct-dx"


SHEET = _shared_data() / "statistics-clinical-20201221.xlsx"
needs_sheet = pytest.mark.skipif(
    not SHEET.is_file(), reason="the real Lung-PET-CT-Dx clinical sheet is not available (set MMCAFNET_SHARED)"
)


@pytest.fixture(scope="module")
def sheet() -> pd.DataFrame:
    if not SHEET.is_file():
        pytest.skip("the real Lung-PET-CT-Dx clinical sheet is not available (set MMCAFNET_SHARED)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClinicalDataWarning)
        return read_clinical_sheet(SHEET)


RECORDS = [
    {"sex": "M", "age": 63, "weight": 70.5, "t_stage": "1a", "n_stage": 0, "m_stage": "0", "smoking": 1},
    {"sex": "F", "age": 48, "weight": 55, "t_stage": 3, "n_stage": "2", "m_stage": "1b", "smoking": "0"},
    {"sex": None, "age": float("nan"), "weight": "unknown", "t_stage": "", "n_stage": None, "m_stage": None},
]


def test_default_schema_is_the_papers_seven_fields_in_order():
    schema = default_schema()
    assert schema.field_names == ["sex", "age", "weight", "t_stage", "n_stage", "m_stage", "smoking"]
    assert schema.num_features == 7
    assert GRADING_COLUMN not in schema.field_names
    kinds = {f.name: f.kind for f in schema.fields}
    assert kinds["sex"] == "binary" and kinds["age"] == "continuous" and kinds["t_stage"] == "ordinal"
    assert schema.field("age").unit == "years" and schema.field("weight").unit == "kg"
    assert "Ｍ-Stage" in schema.field("m_stage").aliases


def test_t_stage_codes_follow_the_clinical_order():
    t = default_schema().field("t_stage")
    order = ["is", "1", "1a", "1b", "1c", "2", "2a", "2b", "3", "4"]
    codes = [t.code(t.canonical(v)) for v in order]
    assert codes == sorted(codes) and len(set(codes)) == len(codes)
    assert t.canonical("T2a") == "2a" and t.canonical(2.0) == "2" and t.canonical("Tis") == "is"
    assert t.canonical("TX") is None


def test_schema_without_staging_is_configurable():
    schema = default_schema(staging=False)
    assert schema.field_names == ["sex", "age", "weight", "smoking"]
    fitted = schema.fit(pd.DataFrame(RECORDS[:2]))
    assert fitted.encode(RECORDS).shape == (3, 4)
    assert default_schema().select(["age", "sex"]).field_names == ["age", "sex"]
    with pytest.raises(ValueError, match="unknown clinical field"):
        default_schema(["age", "histopathological_grading"])


def test_encode_is_in_kan_range_and_imputes_unknowns():
    schema = default_schema().fit(RECORDS)
    x = schema.encode(RECORDS)
    assert x.dtype == np.float32 and x.shape == (3, 7)
    assert np.all(x >= -1) and np.all(x <= 1)
    mask = schema.missing_mask(RECORDS)
    assert mask.dtype == bool and mask.shape == (3, 7)
    # the third record has unknown values everywhere and no 'smoking' key at all: all unknown
    assert not mask[0].any() and not mask[1].any() and mask[2].all()
    assert schema.missing_mask({"sex": "M"}).sum() == 6
    # male vs female land on opposite ends; imputed age is the training median (63 and 48 -> 55.5)
    assert x[0, 0] == 1.0 and x[1, 0] == -1.0
    age = schema.field("age")
    assert age.impute == pytest.approx(55.5)
    assert x[2, 1] == pytest.approx(2 * (55.5 - 48) / (63 - 48) - 1)
    # one dict and a DataFrame give the same rows
    np.testing.assert_array_equal(schema.encode(RECORDS[0])[0], x[0])
    np.testing.assert_array_equal(schema.encode(pd.DataFrame(RECORDS)), x)


def test_unfitted_schema_refuses_to_encode():
    with pytest.raises(ValueError, match="fit"):
        default_schema().encode(RECORDS)


def test_validation_errors_name_the_field_and_what_it_accepts():
    schema = default_schema()
    ok = schema.validate_record({"sex": "male", "age": "63", "t_stage": "T1b", "smoking": "yes", "extra": 1})
    assert ok["sex"] == "M" and ok["age"] == 63.0 and ok["t_stage"] == "1b" and ok["smoking"] == "1"
    assert ok["weight"] is None and "extra" not in ok
    with pytest.raises(ClinicalValueError, match=r"Age.*age.*0 to 120 years") as exc:
        schema.validate_record({"age": 150})
    assert "150" in str(exc.value)
    with pytest.raises(ClinicalValueError, match=r"T stage.*'5'.*'is', '1', '1a'"):
        schema.validate_record({"t_stage": "5"})
    with pytest.raises(ClinicalValueError, match=r"M stage.*'0', '1', '1a', '1b', '1c'"):
        schema.validate_record({"m_stage": 2})  # invalid in a typed record, unlike in the sheet
    with pytest.raises(ClinicalValueError, match="Weight"):
        schema.validate_record({"weight": "heavy"})


def test_json_round_trip_keeps_fitted_statistics():
    schema = default_schema().fit(RECORDS)
    text = json.dumps(schema.to_dict())
    back = ClinicalSchema.from_dict(json.loads(text))
    assert back == schema and back.fitted
    np.testing.assert_array_equal(back.encode(RECORDS), schema.encode(RECORDS))
    unfitted = ClinicalSchema.from_dict(json.loads(json.dumps(default_schema().to_dict())))
    assert not unfitted.fitted and unfitted.field_names == schema.field_names
    with pytest.raises(ValueError, match="clinical schema"):
        ClinicalSchema.from_dict({"fields": []})


def test_categorical_field_is_one_hot(tmp_path):
    from MMCAFNetLib.ehr import ClinicalField

    site = ClinicalField(name="site", label="Site", kind="categorical", values=("upper", "middle", "lower"), codes=(0, 1, 2))
    schema = ClinicalSchema([site, default_schema().field("age")]).fit([{"site": "lower", "age": 50}, {"site": "upper", "age": 60}])
    x = schema.encode([{"site": "middle", "age": 55}])
    assert schema.num_features == 4 and schema.feature_names[:3] == ["site=upper", "site=middle", "site=lower"]
    np.testing.assert_array_equal(x[0, :3], [-1, 1, -1])
    assert ClinicalSchema.from_dict(schema.to_dict()) == schema


@needs_sheet
def test_real_sheet_is_read_with_its_quirks():
    with pytest.warns(ClinicalDataWarning, match="M stage") as record:
        df = read_clinical_sheet(SHEET)
    assert len(df) == 355 and df["patient_id"].is_unique
    assert list(df.columns) == ["patient_id", *default_schema().field_names, GRADING_COLUMN]
    assert df["patient_id"].iloc[0] == "A0001"
    assert "A0266" in set(df["patient_id"]) and "A0251" not in set(df["patient_id"])
    # the full-width M column was found and read: values present, 2/3 turned into unknown with a warning
    m = df["m_stage"]
    assert m.notna().sum() == 352 and set(m.dropna()) <= {"0", "1", "1a", "1b", "1c"}
    invalid = [str(w.message) for w in record if "invalid" in str(w.message)]
    assert len(invalid) == 3 and len(df.attrs["warnings"]) == 3
    # mixed int/str stages become one canonical string set
    assert set(df["t_stage"]) == {"1", "1a", "1b", "1c", "2", "2a", "2b", "3", "4", "is"}
    assert (df["sex"] == "M").sum() == 190 and (df["sex"] == "F").sum() == 165
    assert df["age"].isna().sum() == 1 and df["weight"].isna().sum() == 4
    assert df["age"].min() >= 28 and df["weight"].max() <= 103
    # grading: leading spaces stripped, kept for reporting only
    grading = df[GRADING_COLUMN].dropna()
    assert len(grading) == 145 and not any(g != g.strip() for g in grading)


def test_grading_never_reaches_the_encoded_features(sheet):
    schema = default_schema().fit(sheet)
    x = schema.encode(sheet)
    assert x.shape == (len(sheet), 7)
    scrambled = sheet.copy()
    scrambled[GRADING_COLUMN] = np.where(sheet[GRADING_COLUMN].isna(), "G3", None)  # flip its missingness
    np.testing.assert_array_equal(default_schema().fit(scrambled).encode(scrambled), x)
    np.testing.assert_array_equal(schema.missing_mask(scrambled), schema.missing_mask(sheet))
    with pytest.raises(ValueError, match="leaks"):
        from MMCAFNetLib.ehr import ClinicalField

        ClinicalSchema([ClinicalField(name=GRADING_COLUMN, label="g", kind="binary", values=("0", "1"), codes=(0, 1))])


def test_statistics_come_from_the_rows_given_only(sheet):
    rng = np.random.default_rng(0)
    order = rng.permutation(len(sheet))
    train, other = sheet.iloc[order[:200]], sheet.iloc[order[200:]]
    # older patients only vs the rest: the fitted statistics must differ
    old, young = sheet[sheet["age"] >= 65], sheet[sheet["age"] < 65]
    a, b = default_schema().fit(old), default_schema().fit(young)
    assert a.field("age").scale_low >= 65 and b.field("age").scale_high < 65
    assert a.field("age").impute != b.field("age").impute
    fitted = default_schema().fit(train)
    assert fitted.field("weight").impute == pytest.approx(float(np.median(train["weight"].dropna())))
    assert fitted.field("weight").scale_high == pytest.approx(float(train["weight"].max()))
    x_other = fitted.encode(other)
    assert np.all(np.abs(x_other) <= 1)  # beyond-range test values are clipped to the KAN grid


def test_sheet_as_csv_with_the_same_headers(tmp_path):
    path = tmp_path / "clinical.csv"
    path.write_text(
        "No.,NewPatientID,Sex,Age,weight (kg),T-Stage,N-Stage,Ｍ-Stage,Histopathological grading,Smoking History\n"
        "1,A0001,M,58,65,2b,3,1b, G3,1\n"
        "2,B0002,F,,,is,0,3,,0\n",
        encoding="utf-8",
    )
    with pytest.warns(ClinicalDataWarning, match=r"B0002.*'3'"):
        df = read_clinical_sheet(path)
    assert list(df["patient_id"]) == ["A0001", "B0002"]
    assert df.loc[0, "m_stage"] == "1b" and df.loc[1, "m_stage"] is None and df.loc[1, "t_stage"] == "is"
    assert np.isnan(df.loc[1, "age"]) and df.loc[0, GRADING_COLUMN] == "G3"


def test_sheet_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_clinical_sheet(tmp_path / "absent.xlsx")
    bad = tmp_path / "bad.csv"
    bad.write_text("NewPatientID,Sex,Age\nA0001,M,50\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing clinical column.*Weight"):
        read_clinical_sheet(bad)
    wrong = tmp_path / "wrong.csv"
    wrong.write_text(
        "NewPatientID,Sex,Age,weight (kg),T-Stage,N-Stage,M-Stage,Smoking History\nA0001,M,50,60,7,0,0,1\n",
        encoding="utf-8",
    )
    with pytest.raises(ClinicalValueError, match=r"A0001.*T stage.*'7'"):
        read_clinical_sheet(wrong)
    with pytest.warns(ClinicalDataWarning, match=r"A0001.*T stage.*'7'.*read as unknown"):
        lenient = read_clinical_sheet(wrong, strict=False)
    assert lenient.loc[0, "t_stage"] is None and lenient.loc[0, "sex"] == "M"
