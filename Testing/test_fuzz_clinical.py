"""Property-based fuzzing of clinical records: accepted and canonical, or a ClinicalValueError.

Hand-typed forms, JSON files and spreadsheets deliver anything: numbers as text, full-width
digits, booleans, huge integers, NaN and infinities, lists, emoji, control characters. The schema
must answer each with a canonical value (or "unknown") or a ClinicalValueError naming the field --
and whatever it accepts must encode to finite values in [-1, 1].
"""

from __future__ import annotations

import decimal
import fractions
import math
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MMCAFNetLib.ehr import ClinicalDataWarning, ClinicalValueError, default_schema, read_clinical_sheet

SCHEMA = default_schema()
FITTED = SCHEMA.fit(
    [
        {"sex": "M", "age": 61, "weight": 72, "t_stage": "2a", "n_stage": "1", "m_stage": "0", "smoking": "1"},
        {"sex": "F", "age": 70, "weight": 58, "t_stage": "1b", "n_stage": "0", "m_stage": "1a", "smoking": "0"},
        {"sex": "M", "age": 48, "weight": 90, "t_stage": "4", "n_stage": "3", "m_stage": "1c", "smoking": "1"},
    ]
)
PLAUSIBLE_TOKENS = [
    "M", "F", "m", "female", "Ｍ", " F ", "O", "1", "0", "1a", "T1a", "t2B", "Tis", "in situ", "TX", "N0", "N3",
    "M1c", "2", "3", "yes", "never", "unknown", "", " ", "nan", "n/a", "?", "63", "６３", "63.5", "1e3", "-0",
    "120", "120.0001", "20", "300", "1_000", "0x10", "∞", "NaN",
]

VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers().map(lambda n: n * 10**400),  # far beyond float range
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(PLAUSIBLE_TOKENS),
    st.text(max_size=12),
    st.binary(max_size=8),
    st.lists(st.integers(0, 100), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.fractions(max_denominator=7),
    st.complex_numbers(max_magnitude=1e3),
    st.sampled_from([np.float32(np.nan), np.int64(63), np.float64(70.5), np.bool_(True), pd.NA, pd.NaT]),
)
RECORDS = st.dictionaries(
    st.one_of(st.sampled_from(SCHEMA.field_names), st.text(max_size=6)), VALUES, max_size=len(SCHEMA.field_names) + 2
)
FUZZ_SETTINGS = settings(
    max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def check_canonical(validated: dict[str, Any]) -> None:
    assert list(validated) == SCHEMA.field_names
    for f in SCHEMA.fields:
        value = validated[f.name]
        if value is None:
            continue
        if f.kind == "continuous":
            low, high = f.plausible_range
            assert isinstance(value, float) and math.isfinite(value) and low <= value <= high, (f.name, value)
        else:
            assert value in f.values, (f.name, value)


@FUZZ_SETTINGS
@given(RECORDS)
def test_any_record_is_canonical_or_a_clinical_value_error(record: dict[Any, Any]) -> None:
    try:
        validated = SCHEMA.validate_record(record)
    except ClinicalValueError as exc:
        message = str(exc)
        assert any(f.name in message for f in SCHEMA.fields), f"the message names no field: {message}"
        assert len(message) < 2000, "the message must stay readable"
        return
    check_canonical(validated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ClinicalDataWarning)
        encoded = FITTED.encode(record)
        missing = FITTED.missing_mask(record)
    assert encoded.shape == (1, FITTED.num_features) and encoded.dtype == np.float32
    assert np.all(np.isfinite(encoded)) and np.all(np.abs(encoded) <= 1.0)
    unknown = np.array([validated[n] is None for n in SCHEMA.field_names])
    np.testing.assert_array_equal(missing[0], unknown)


@FUZZ_SETTINGS
@given(st.sampled_from(SCHEMA.field_names), VALUES)
def test_one_field_at_a_time_names_that_field(name: str, value: Any) -> None:
    try:
        out = SCHEMA.validate_record({name: value})
    except ClinicalValueError as exc:
        assert SCHEMA.field(name).label in str(exc) and name in str(exc)
        return
    check_canonical(out)


def test_known_fuzz_findings() -> None:
    """Values that once escaped as other exceptions (found by this fuzzing)."""
    for value in (10**400, -(10**5000), decimal.Decimal("1e999999")):
        try:
            SCHEMA.validate_record({"age": value, "sex": value})
        except ClinicalValueError:
            continue
    assert SCHEMA.validate_record({"age": fractions.Fraction(127, 2)})["age"] == 63.5


SHEET_CELLS = st.one_of(st.sampled_from(PLAUSIBLE_TOKENS), st.text(max_size=10), st.none())


@settings(max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(*[SHEET_CELLS] * 7), min_size=1, max_size=4), st.booleans())
def test_a_fuzzed_sheet_reads_or_names_the_row(rows: list[tuple[Any, ...]], strict: bool) -> None:
    headers = ["Sex", "Age", "weight (kg)", "T-Stage", "N-Stage", "Ｍ-Stage", "Smoking History"]
    table = pd.DataFrame([dict(zip(headers, r)) for r in rows])
    table.insert(0, "NewPatientID", [f"A{i:04d}" for i in range(len(rows))])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clinical.csv"
        table.to_csv(path, index=False)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ClinicalDataWarning)
                df = read_clinical_sheet(path, strict=strict)
        except ClinicalValueError as exc:
            assert strict, "a lenient read must not stop at a bad value"
            assert "patient A0" in str(exc)
            return
    assert list(df["patient_id"]) == [f"A{i:04d}" for i in range(len(rows))]
    for record in df[SCHEMA.field_names].to_dict(orient="records"):
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        check_canonical(SCHEMA.validate_record(clean))
