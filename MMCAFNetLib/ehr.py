"""Clinical records: the schema as data, the sheet reader, and the encoding fed to the tabular encoder.

A schema is a list of fields; each field says what raw values it accepts (and how the sources spell
them), how a value becomes one code, and how that code is scaled into the KAN's input range
[-1, 1]. Imputation values and the continuous fields' scaling are *fitted* on the training split
only (``ClinicalSchema.fit``) and travel with the model as plain data (``to_dict``/``from_dict``).

Encoding of the default schema (the paper's 7 inputs, one float each, in the paper's order):

==========  ===========  ===========================================================  ==============
field       kind         codes                                                        scaled by
==========  ===========  ===========================================================  ==============
sex         binary       F=0, M=1                                                     codes -> -1/+1
age         continuous   years                                                        training min/max
weight      continuous   kg                                                           training min/max
t_stage     ordinal      is=0 < 1=1 < 1a=1.2 < 1b=1.4 < 1c=1.6 < 2=2 < 2a=2.2 < 2b=2.4 code range
                         < 3=3 < 4=4 (main stage, sub-stage as a fraction)
n_stage     ordinal      0, 1, 2, 3                                                   code range
m_stage     ordinal      0=0 < 1=1 < 1a=1.2 < 1b=1.4 < 1c=1.6                         code range
smoking     binary       0 (no history)=0, 1 (history)=1                              codes -> -1/+1
==========  ===========  ===========================================================  ==============

A missing value (None, NaN, "", "unknown", "x" for stages) is replaced by the fitted imputation
value (training median for continuous and ordinal fields, training mode for binary and categorical
ones); ``missing_mask`` tells which entries were imputed. Scaled values are clipped to [-1, 1] (a
test value beyond the training range lands on the edge of the KAN grid instead of off it).

The histopathological grading is read for reporting only and is never a field: whether it is
filled almost gives the class away.

pandas is imported only where a sheet is read: Slicer's clinical form uses the schema before the
module's first Apply has installed pandas.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

KINDS = ("binary", "categorical", "ordinal", "continuous")
SCHEMA_FORMAT = "mmcafnet-clinical-schema"
SCHEMA_VERSION = 1

#: Raw tokens that mean "unknown" for every field (compared after normalisation, case-insensitive).
MISSING_TOKENS = frozenset({"", "unknown", "unk", "nan", "none", "null", "na", "n/a", "nd", "?", "-", "missing"})

#: Column of the sheet kept for reporting only (never an input).
GRADING_COLUMN = "histopathological_grading"
PATIENT_ID_COLUMN = "patient_id"
PATIENT_ID_ALIASES = ("NewPatientID", "patient_id", "PatientID", "Patient ID", "Subject ID", "ID")
GRADING_ALIASES = ("Histopathological grading", "histopathological_grading", "Grading", "Grade")


class ClinicalValueError(ValueError):
    """A clinical value that the schema does not accept (names the field and what it accepts)."""


class ClinicalDataWarning(UserWarning):
    """A value in a source table that was treated as missing (the message says which and why)."""


def normalise_text(value: Any) -> str:
    """NFKC (full-width letters become ASCII, e.g. the sheet's U+FF2D), stripped, inner spaces collapsed."""
    text = unicodedata.normalize("NFKC", str(value))
    return re.sub(r"\s+", " ", text).strip()


def _header_key(header: Any) -> str:
    return normalise_text(header).lower()


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    pd = sys.modules.get("pandas")  # a pandas value can only exist once pandas is imported
    if pd is not None and (value is pd.NA or value is pd.NaT):
        return True
    if isinstance(value, np.floating) and np.isnan(value):
        return True
    return isinstance(value, str) and normalise_text(value).lower() in MISSING_TOKENS


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` of a value cut to ``limit`` characters (an error message must stay readable)."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails still gets a message
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: Keys a record may carry that are not clinical inputs (identifiers, cohort-table columns): ignored.
_NON_CLINICAL_KEYS = frozenset(
    normalise_text(k).lower()
    for k in (
        *PATIENT_ID_ALIASES, *GRADING_ALIASES, "case_id", "case", "label", "split", "fold", "input", "series_path",
        "series_uid", "path", "ct", "note", "notes", "comment", "comments",
    )
)


def _same_value(a: Any, b: Any) -> bool:
    if _is_missing(a) or _is_missing(b):
        return True
    try:
        return bool(a == b) or _token(a).lower() == _token(b).lower()
    except Exception:
        return False


def _token(value: Any) -> str:
    """A raw categorical value as a comparable token: 2.0 -> "2", True -> "1", " 1a " -> "1a"."""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = normalise_text(value)
    if re.fullmatch(r"[+-]?\d+\.0+", text):
        text = text.split(".")[0]
    return text


@dataclasses.dataclass(frozen=True)
class ClinicalField:
    """One clinical input. Plain data: everything here survives ``to_dict``/``from_dict``.

    ``values``/``codes``/``value_labels`` list the accepted canonical values (binary, categorical,
    ordinal), their numeric codes and display labels; ``synonyms`` maps other spellings (lower
    case) to a canonical value; ``strip_prefix`` is removed from a value before lookup ("T1a" ->
    "1a"); ``invalid_values`` are values known to occur in real sources that are not valid: read as
    missing with a warning. ``plausible_range`` bounds a continuous value (validation). The fitted
    part: ``impute`` (code), ``scale_low``/``scale_high`` (codes mapped to -1 and +1).
    """

    name: str
    label: str
    kind: str
    values: tuple[str, ...] = ()
    codes: tuple[float, ...] = ()
    value_labels: tuple[str, ...] = ()
    unit: str = ""
    plausible_range: tuple[float, float] | None = None
    aliases: tuple[str, ...] = ()
    synonyms: tuple[tuple[str, str], ...] = ()
    strip_prefix: str = ""
    invalid_values: tuple[str, ...] = ()
    description: str = ""
    #: any value outside ``values`` (and synonyms) is read as unknown with a warning, never refused
    #: (sex: DICOM's O, or any other entry, says nothing about M or F)
    other_values_unknown: bool = False
    impute: float | None = None
    scale_low: float | None = None
    scale_high: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "continuous":
            if self.plausible_range is None or len(self.plausible_range) != 2:
                raise ValueError(f"continuous field {self.name!r} needs a plausible_range (low, high)")
            object.__setattr__(self, "plausible_range", tuple(float(x) for x in self.plausible_range))
        else:
            if not self.values or len(self.values) != len(self.codes):
                raise ValueError(f"field {self.name!r}: values and codes must be non-empty and of equal length")
            if self.kind == "binary" and len(self.values) != 2:
                raise ValueError(f"binary field {self.name!r} must have exactly two values")
            if self.value_labels and len(self.value_labels) != len(self.values):
                raise ValueError(f"field {self.name!r}: value_labels must match values")
        for attr in ("values", "value_labels", "aliases", "invalid_values"):
            object.__setattr__(self, attr, tuple(str(v) for v in getattr(self, attr)))
        object.__setattr__(self, "codes", tuple(float(c) for c in self.codes))
        object.__setattr__(self, "synonyms", tuple((str(a), str(b)) for a, b in self.synonyms))

    # -- description -----------------------------------------------------------------------------
    @property
    def width(self) -> int:
        """Number of encoded floats: one, except a categorical field (one-hot)."""
        return len(self.values) if self.kind == "categorical" else 1

    @property
    def fitted(self) -> bool:
        return self.impute is not None and self.scale_low is not None and self.scale_high is not None

    def allowed_text(self) -> str:
        """What this field accepts, for error messages and forms."""
        if self.kind == "continuous":
            low, high = self.plausible_range  # type: ignore[misc]
            unit = f" {self.unit}" if self.unit else ""
            return f"a number from {low:g} to {high:g}{unit}, or unknown"
        return "one of " + ", ".join(repr(v) for v in self.values) + ", or unknown"

    # -- parsing ---------------------------------------------------------------------------------
    def _lookup(self) -> dict[str, str]:
        table = {v.lower(): v for v in self.values}
        table.update({a.lower(): b for a, b in self.synonyms})
        return table

    def canonical(self, value: Any, *, lenient: bool = False) -> Any:
        """The canonical raw value (str for coded fields, float for continuous) or None if unknown.

        Raises ClinicalValueError for a value this field does not accept. With ``lenient`` a value
        listed in ``invalid_values`` becomes None with a ClinicalDataWarning instead.
        """
        if _is_missing(value):
            return None
        if self.kind == "continuous":
            if isinstance(value, (bool, np.bool_)):
                raise ClinicalValueError(
                    f"{self.label} ({self.name}): {value!r} is a yes/no value, not a number; "
                    f"expected {self.allowed_text()}"
                )
            try:
                number = float(normalise_text(value)) if isinstance(value, str) else float(value)
            except (TypeError, ValueError, OverflowError):
                raise ClinicalValueError(
                    f"{self.label} ({self.name}): {_short(value)} is not a number; expected {self.allowed_text()}"
                ) from None
            if math.isnan(number):
                return None
            low, high = self.plausible_range  # type: ignore[misc]
            if not low <= number <= high:
                raise ClinicalValueError(
                    f"{self.label} ({self.name}): {number:g} is out of the plausible range; "
                    f"expected {self.allowed_text()}"
                )
            return number
        try:
            token = _token(value)
        except (ValueError, OverflowError):  # e.g. an int too long to print
            raise ClinicalValueError(
                f"{self.label} ({self.name}): {_short(value)} is not accepted; expected {self.allowed_text()}"
            ) from None
        if token.lower() in MISSING_TOKENS:
            return None
        if self.strip_prefix and token.lower().startswith(self.strip_prefix.lower()) and len(token) > len(
            self.strip_prefix
        ):
            stripped = token[len(self.strip_prefix) :]
            if stripped.lower() in {"x"}:
                return None
            if stripped.lower() in self._lookup():
                token = stripped
        if self.strip_prefix and token.lower() == "x":
            return None  # TX / NX / MX: cannot be assessed = unknown
        found = self._lookup().get(token.lower())
        if found is not None:
            return found
        if self.other_values_unknown or (lenient and token in self.invalid_values):
            warnings.warn(
                f"{self.label} ({self.name}): invalid value {token!r} read as unknown "
                f"(accepted: {self.allowed_text()})",
                ClinicalDataWarning,
                stacklevel=3,
            )
            return None
        raise ClinicalValueError(f"{self.label} ({self.name}): {_short(value)} is not accepted; expected {self.allowed_text()}")

    def code(self, canonical: Any) -> float:
        """Code of a canonical value (NaN when unknown)."""
        if canonical is None:
            return float("nan")
        if self.kind == "continuous":
            return float(canonical)
        return self.codes[self.values.index(canonical)]

    # -- fitting and scaling ---------------------------------------------------------------------
    def fitted_on(self, codes: np.ndarray) -> ClinicalField:
        """A copy with imputation and scaling fitted on these codes (NaN = missing)."""
        known = codes[~np.isnan(codes)]
        if self.kind == "continuous":
            low, high = self.plausible_range  # type: ignore[misc]
            if known.size:
                impute, scale_low, scale_high = float(np.median(known)), float(known.min()), float(known.max())
            else:
                impute, scale_low, scale_high = (low + high) / 2.0, low, high
            if scale_high - scale_low < 1e-6:
                scale_low, scale_high = scale_low - 1.0, scale_high + 1.0
            return dataclasses.replace(self, impute=impute, scale_low=scale_low, scale_high=scale_high)
        code_arr = np.asarray(self.codes)
        if self.kind == "ordinal":
            impute = float(np.median(known)) if known.size else float(np.median(code_arr))
            impute = float(code_arr[np.argmin(np.abs(code_arr - impute))])  # snap to a real stage
        else:  # binary / categorical: the most frequent value (first in order on ties)
            counts = [(int(np.sum(known == c)), -i) for i, c in enumerate(code_arr)]
            impute = float(code_arr[-max(counts)[1]])
        return dataclasses.replace(self, impute=impute, scale_low=float(code_arr.min()), scale_high=float(code_arr.max()))

    def scaled(self, codes: np.ndarray) -> np.ndarray:
        """Codes (NaN already imputed) -> [N, width] floats in [-1, 1]."""
        if not self.fitted:
            raise ValueError(
                f"clinical field {self.name!r} has no fitted statistics; call schema.fit(training_rows) first"
            )
        if self.kind == "categorical":
            onehot = codes[:, None] == np.asarray(self.codes)[None, :]
            return np.where(onehot, 1.0, -1.0)
        low, high = float(self.scale_low), float(self.scale_high)  # type: ignore[arg-type]
        span = high - low if high > low else 1.0
        return np.clip(2.0 * (codes - low) / span - 1.0, -1.0, 1.0)[:, None]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("values", "codes", "value_labels", "aliases", "invalid_values"):
            d[key] = list(d[key])
        d["synonyms"] = {a: b for a, b in self.synonyms}
        d["plausible_range"] = list(self.plausible_range) if self.plausible_range is not None else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClinicalField:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"clinical field description has unknown keys {sorted(unknown)}")
        kw = dict(d)
        library = FIELD_LIBRARY.get(str(kw.get("name")))
        if "other_values_unknown" not in kw and library is not None and library.kind == kw.get("kind"):
            kw["other_values_unknown"] = library.other_values_unknown  # schemas saved before the attribute
        syn = kw.get("synonyms") or {}
        kw["synonyms"] = tuple(syn.items()) if isinstance(syn, Mapping) else tuple(tuple(p) for p in syn)
        for key in ("values", "codes", "value_labels", "aliases", "invalid_values"):
            if key in kw and kw[key] is not None:
                kw[key] = tuple(kw[key])
        if kw.get("plausible_range") is not None:
            kw["plausible_range"] = tuple(kw["plausible_range"])
        return cls(**kw)


_SEX = ClinicalField(
    name="sex",
    label="Sex",
    kind="binary",
    values=("F", "M"),
    codes=(0.0, 1.0),
    value_labels=("female", "male"),
    aliases=("Sex", "PatientSex", "gender"),
    synonyms=(("female", "F"), ("woman", "F"), ("w", "F"), ("male", "M"), ("man", "M")),
    invalid_values=("O",),
    other_values_unknown=True,
    description="Sex as recorded; any value other than M or F (DICOM PatientSex 'O') reads as unknown.",
)
_AGE = ClinicalField(
    name="age",
    label="Age",
    kind="continuous",
    unit="years",
    plausible_range=(0.0, 120.0),
    aliases=("Age", "age (years)", "PatientAge"),
    description="Age at the CT examination.",
)
_WEIGHT = ClinicalField(
    name="weight",
    label="Weight",
    kind="continuous",
    unit="kg",
    plausible_range=(20.0, 300.0),
    aliases=("weight (kg)", "Weight", "PatientWeight"),
    description="Body weight.",
)
_T_STAGE = ClinicalField(
    name="t_stage",
    label="T stage",
    kind="ordinal",
    values=("is", "1", "1a", "1b", "1c", "2", "2a", "2b", "3", "4"),
    codes=(0.0, 1.0, 1.2, 1.4, 1.6, 2.0, 2.2, 2.4, 3.0, 4.0),
    value_labels=("Tis (in situ)", "T1", "T1a", "T1b", "T1c", "T2", "T2a", "T2b", "T3", "T4"),
    aliases=("T-Stage", "T stage", "t_stage", "T"),
    synonyms=(("in situ", "is"), ("tis", "is")),
    strip_prefix="T",
    description="Primary tumour (TNM T); main stage with the sub-stage as a fraction.",
)
_N_STAGE = ClinicalField(
    name="n_stage",
    label="N stage",
    kind="ordinal",
    values=("0", "1", "2", "3"),
    codes=(0.0, 1.0, 2.0, 3.0),
    value_labels=("N0", "N1", "N2", "N3"),
    aliases=("N-Stage", "N stage", "n_stage", "N"),
    strip_prefix="N",
    description="Regional lymph nodes (TNM N).",
)
_M_STAGE = ClinicalField(
    name="m_stage",
    label="M stage",
    kind="ordinal",
    values=("0", "1", "1a", "1b", "1c"),
    codes=(0.0, 1.0, 1.2, 1.4, 1.6),
    value_labels=("M0", "M1", "M1a", "M1b", "M1c"),
    aliases=("Ｍ-Stage", "M-Stage", "M stage", "m_stage", "M"),
    strip_prefix="M",
    invalid_values=("2", "3"),
    description="Distant metastasis (TNM M). The real sheet has invalid 2 and 3: read as unknown.",
)
_SMOKING = ClinicalField(
    name="smoking",
    label="Smoking history",
    kind="binary",
    values=("0", "1"),
    codes=(0.0, 1.0),
    value_labels=("no", "yes"),
    aliases=("Smoking History", "smoking", "Smoking"),
    synonyms=(("no", "0"), ("never", "0"), ("false", "0"), ("yes", "1"), ("former", "1"), ("current", "1"), ("true", "1")),
    description="Any smoking history.",
)

#: Every field the library knows, by name.
FIELD_LIBRARY: dict[str, ClinicalField] = {f.name: f for f in (_SEX, _AGE, _WEIGHT, _T_STAGE, _N_STAGE, _M_STAGE, _SMOKING)}
#: The paper's seven inputs in the paper's order.
PAPER_FIELDS = ("sex", "age", "weight", "t_stage", "n_stage", "m_stage", "smoking")
STAGING_FIELDS = ("t_stage", "n_stage", "m_stage")


class ClinicalSchema:
    """An ordered list of clinical fields, optionally with statistics fitted on a training split."""

    def __init__(self, fields: Sequence[ClinicalField]) -> None:
        fields = tuple(fields)
        if not fields:
            raise ValueError("a clinical schema needs at least one field")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"clinical field names must be unique, got {names}")
        if GRADING_COLUMN in names:
            raise ValueError("histopathological grading leaks the class and cannot be a clinical input")
        self.fields = fields

    # -- description -----------------------------------------------------------------------------
    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def num_features(self) -> int:
        return sum(f.width for f in self.fields)

    @property
    def feature_names(self) -> list[str]:
        """One name per encoded column (``field`` or ``field=value`` for a one-hot categorical)."""
        out: list[str] = []
        for f in self.fields:
            out.extend([f"{f.name}={v}" for v in f.values] if f.kind == "categorical" else [f.name])
        return out

    @property
    def fitted(self) -> bool:
        return all(f.fitted for f in self.fields)

    def field(self, name: str) -> ClinicalField:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"no clinical field {name!r}; the schema has {self.field_names}")

    def select(self, names: Iterable[str]) -> ClinicalSchema:
        """A schema with only these fields, in the given order (e.g. without staging)."""
        return ClinicalSchema([self.field(n) for n in names])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ClinicalSchema) and self.fields == other.fields

    def __repr__(self) -> str:
        return f"ClinicalSchema({self.field_names}, fitted={self.fitted})"

    # -- records ---------------------------------------------------------------------------------
    def _rows(self, records: Any) -> list[Mapping[str, Any]]:
        pd = sys.modules.get("pandas")  # a DataFrame can only exist once pandas is imported
        if pd is not None and isinstance(records, pd.DataFrame):
            return records.to_dict(orient="records")
        if isinstance(records, Mapping):
            return [records]
        if isinstance(records, (list, tuple)):
            if records and not all(isinstance(r, Mapping) for r in records):
                raise TypeError("records must be a DataFrame, a dict or a list of dicts")
            return list(records)
        raise TypeError(f"records must be a DataFrame, a dict or a list of dicts, got {type(records).__name__}")

    def _codes(self, records: Any, *, lenient: bool = True) -> np.ndarray:
        rows = self._rows(records)
        out = np.full((len(rows), len(self.fields)), np.nan, dtype=np.float64)
        for r, row in enumerate(rows):
            for c, f in enumerate(self.fields):
                out[r, c] = f.code(f.canonical(row.get(f.name), lenient=lenient))
        return out

    def validate_record(self, record: Any, notes: list[str] | None = None) -> dict[str, Any]:
        """Check one hand-typed record; returns {field: canonical value or None (unknown)}.

        A record is a JSON object (dict) of field values. Keys are matched to fields by name or by
        one of the field's aliases (``Age``, ``PatientSex``, ``T-Stage``). A key that looks like a
        misspelt field (``agee``) is refused, naming the field it resembles: silently dropping it
        would let a default or a DICOM header value stand in for what the user typed. Other keys
        (identifiers, a cohort table's columns) are ignored, and listed in ``notes`` when that list is
        given; values read as unknown with a warning (sex "O") are noted there too. A value the schema
        does not accept raises ClinicalValueError naming the field and what it accepts.
        """
        values = self.record_values(record, notes)
        out: dict[str, Any] = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ClinicalDataWarning)
            for f in self.fields:
                out[f.name] = f.canonical(values.get(f.name))
        for w in caught:
            if issubclass(w.category, ClinicalDataWarning):
                if notes is not None and str(w.message) not in notes:
                    notes.append(str(w.message))
            else:  # pragma: no cover - not ours: pass it on
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return out

    def record_values(self, record: Any, notes: list[str] | None = None) -> dict[str, Any]:
        """{field name: raw value} of a record whose keys may be names or aliases (see validate_record)."""
        if not isinstance(record, Mapping):
            raise ClinicalValueError(
                f"a clinical record must be a JSON object of field values such as {{\"sex\": \"M\", \"age\": 63}}, "
                f"got {type(record).__name__} {_short(record)}; fields: {', '.join(self.field_names)}"
            )
        by_key: dict[str, str] = {}
        for f in self.fields:
            for key in (f.name, *f.aliases):
                by_key.setdefault(_header_key(key), f.name)
        values: dict[str, Any] = {}
        ignored: list[str] = []
        for raw_key, value in record.items():
            key = _header_key(raw_key)
            name = by_key.get(key)
            if name is None:
                if key in _NON_CLINICAL_KEYS:
                    continue
                close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.75)
                if close:
                    raise ClinicalValueError(
                        f"unknown clinical key {_short(raw_key)}: did you mean {by_key[close[0]]!r}? "
                        f"The record's fields are: {', '.join(self.field_names)}"
                    )
                ignored.append(_short(raw_key, 40))
                continue
            if name in values and not _same_value(values[name], value):
                raise ClinicalValueError(
                    f"the record gives {self.field(name).label} ({name}) twice with different values "
                    f"({_short(values[name])} and {_short(value)}); keep one"
                )
            if name not in values or _is_missing(values[name]):
                values[name] = value
        if ignored and notes is not None:
            notes.append(
                f"clinical record key(s) {', '.join(ignored)} are not clinical fields and were ignored "
                f"(fields: {', '.join(self.field_names)})"
            )
        return values

    def fit(self, df: Any) -> ClinicalSchema:
        """A new schema whose imputation and scaling come from these rows (the training split only)."""
        codes = self._codes(df)
        if codes.shape[0] == 0:
            raise ValueError("cannot fit the clinical schema on zero rows")
        return ClinicalSchema([f.fitted_on(codes[:, i]) for i, f in enumerate(self.fields)])

    def missing_mask(self, records: Any) -> np.ndarray:
        """bool [N, num_features]: True where the value was unknown (and imputed)."""
        missing = np.isnan(self._codes(records))
        return np.repeat(missing, [f.width for f in self.fields], axis=1)

    def encode(self, records: Any) -> np.ndarray:
        """float32 [N, num_features] in [-1, 1]; unknown values imputed with the fitted statistics."""
        if not self.fitted:
            raise ValueError("the clinical schema has no fitted statistics; call schema.fit(training_rows) first")
        codes = self._codes(records)
        parts = []
        for i, f in enumerate(self.fields):
            col = np.where(np.isnan(codes[:, i]), float(f.impute), codes[:, i])  # type: ignore[arg-type]
            parts.append(f.scaled(col))
        if not parts or codes.shape[0] == 0:
            return np.zeros((codes.shape[0], self.num_features), dtype=np.float32)
        return np.concatenate(parts, axis=1).astype(np.float32)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": SCHEMA_FORMAT, "version": SCHEMA_VERSION, "fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClinicalSchema:
        if not isinstance(d, Mapping) or d.get("format") != SCHEMA_FORMAT:
            raise ValueError(f"not a clinical schema description (expected format {SCHEMA_FORMAT!r})")
        if int(d.get("version", 0)) > SCHEMA_VERSION:
            raise ValueError(
                f"clinical schema version {d.get('version')} is newer than this library supports "
                f"({SCHEMA_VERSION}); update MMCAFNet"
            )
        return cls([ClinicalField.from_dict(f) for f in d["fields"]])


def default_schema(fields: Sequence[str] | None = None, *, staging: bool = True) -> ClinicalSchema:
    """The paper's 7 fields in the paper's order (unfitted); ``fields`` picks others, ``staging=False`` drops T/N/M."""
    names = list(fields) if fields is not None else list(PAPER_FIELDS)
    unknown = [n for n in names if n not in FIELD_LIBRARY]
    if unknown:
        raise ValueError(f"unknown clinical field(s) {unknown}; known fields: {sorted(FIELD_LIBRARY)}")
    if not staging:
        names = [n for n in names if n not in STAGING_FIELDS]
    return ClinicalSchema([FIELD_LIBRARY[n] for n in names])


# -- the clinical sheet -------------------------------------------------------------------------------
def normalise_patient_id(value: Any) -> str:
    """'Lung_Dx-A0001', ' a0001 ' -> 'A0001' (the sheet's form)."""
    text = normalise_text(value)
    if "-" in text:
        text = text.rsplit("-", 1)[1]
    return text.upper()


def _find_column(columns: Sequence[Any], aliases: Iterable[str]) -> Any:
    keys = {_header_key(c): c for c in columns}
    for alias in aliases:
        found = keys.get(_header_key(alias))
        if found is not None:
            return found
    return None


def _clean_grading(value: Any) -> Any:
    return None if _is_missing(value) else normalise_text(value)


def read_clinical_sheet(
    path: str | Path, schema: ClinicalSchema | None = None, sheet_name: str | None = None, strict: bool = True
) -> pd.DataFrame:
    """Read the clinical sheet (.xlsx, or .csv with the same headers) into one row per patient.

    Columns: ``patient_id`` ("A0001"), the schema's field names (canonical raw values: "M", 63.0,
    "1a"; None when unknown) and ``histopathological_grading`` (reporting only). Headers are matched
    through the fields' aliases after Unicode normalisation (so the sheet's full-width ``Ｍ-Stage``
    is found). Invalid values known to occur (M stage 2 or 3) become unknown with a
    ClinicalDataWarning; any other unreadable value raises ClinicalValueError naming the row, or
    with ``strict=False`` also becomes unknown with a warning (so one typo does not stop indexing).
    The warnings are also listed in ``df.attrs["warnings"]``.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical sheet not found: {path}")
    schema = schema or default_schema()
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xlsm", ".xls"):
        from MMCAFNetLib.table_files import read_excel_file

        sheets = read_excel_file(path, sheet_name=None, dtype=object)
        if sheet_name is not None:
            if sheet_name not in sheets:
                raise ValueError(f"{path.name} has no sheet {sheet_name!r}; sheets: {list(sheets)}")
            raw = sheets[sheet_name]
        else:
            by_key = {_header_key(k): k for k in sheets}
            raw = sheets[by_key.get("clinical data", next(iter(sheets)))]
    elif suffix in (".csv", ".tsv", ".txt"):
        from MMCAFNetLib.table_files import read_csv_file

        raw = read_csv_file(path, dtype=object, sep=None if suffix != ".csv" else ",", engine="python", encoding="utf-8-sig")
    else:
        raise ValueError(f"clinical sheet must be .xlsx or .csv, got {path.name}")

    id_col = _find_column(raw.columns, PATIENT_ID_ALIASES)
    if id_col is None:
        raise ValueError(
            f"{path.name}: no patient ID column (looked for {list(PATIENT_ID_ALIASES)}); columns are {list(raw.columns)}"
        )
    columns = {f.name: _find_column(raw.columns, (f.name, *f.aliases)) for f in schema.fields}
    absent = [f"{schema.field(n).label} (e.g. {schema.field(n).aliases[0]!r})" for n, c in columns.items() if c is None]
    if absent:
        raise ValueError(f"{path.name}: missing clinical column(s): {', '.join(absent)}; columns are {list(raw.columns)}")
    grading_col = _find_column(raw.columns, GRADING_ALIASES)

    messages: list[str] = []
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, src in raw.iterrows():
        if _is_missing(src[id_col]):
            if all(_is_missing(v) for v in src.values):
                continue  # blank line
            messages.append(f"{path.name} row {index + 2}: no patient ID, row skipped")
            continue
        pid = normalise_patient_id(src[id_col])
        if pid in seen:
            messages.append(f"{path.name} row {index + 2}: duplicate patient {pid}, row skipped")
            continue
        seen.add(pid)
        row: dict[str, Any] = {PATIENT_ID_COLUMN: pid}
        for f in schema.fields:
            value = src[columns[f.name]]
            try:
                row[f.name] = f.canonical(value)
            except ClinicalValueError as exc:
                if _token(value) in f.invalid_values:
                    messages.append(f"{path.name} patient {pid}: {f.label} value {_token(value)!r} is invalid, read as unknown")
                    row[f.name] = None
                elif not strict:
                    messages.append(f"{path.name} patient {pid}: {exc}; read as unknown")
                    row[f.name] = None
                else:
                    raise ClinicalValueError(f"{path.name} patient {pid}: {exc}") from None
        row[GRADING_COLUMN] = _clean_grading(src[grading_col]) if grading_col is not None else None
        rows.append(row)
    for message in messages:
        warnings.warn(message, ClinicalDataWarning, stacklevel=2)
    df = pd.DataFrame(rows, columns=[PATIENT_ID_COLUMN, *schema.field_names, GRADING_COLUMN])
    for f in schema.fields:
        if f.kind == "continuous":
            df[f.name] = pd.to_numeric(df[f.name], errors="coerce").astype(float)
        else:
            df[f.name] = df[f.name].astype(object).where(df[f.name].notna(), None)
    df.attrs["warnings"] = messages
    df.attrs["source"] = str(path)
    return df


# -- values from the CT's DICOM header --------------------------------------------------------------
#: DICOM attribute each header-filled field comes from.
HEADER_ATTRIBUTES = {"sex": "PatientSex", "age": "PatientAge", "weight": "PatientWeight"}


def parse_dicom_age(value: Any) -> float | None:
    """Years from a DICOM AS value ("063Y", "006M", "012W", "010D"; a bare number is years), or
    already a number of years; None when absent or unreadable."""
    if _is_missing(value):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        years = float(value)
        return years if math.isfinite(years) and years >= 0 else None
    match = re.fullmatch(r"\s*(\d{1,3}(?:\.\d+)?)\s*([DWMYdwmy]?)\s*", normalise_text(value))
    if not match:
        return None
    number, unit = float(match.group(1)), (match.group(2) or "Y").upper()
    return number * {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}[unit]


def values_from_header(sex: Any = None, age: Any = None, weight: Any = None,
                       schema: ClinicalSchema | None = None) -> tuple[dict[str, Any], list[str]]:
    """Clinical values readable from a CT's DICOM header, filtered by the schema: one rule for the
    command line and for Slicer's form.

    Returns ({field: canonical value}, notes). A value the schema would not accept (an age of 150, a
    weight of 0) or that means unknown (PatientSex "O") is left out, with a note saying so; fields the
    schema does not have are left out silently.
    """
    schema = schema or default_schema()
    raw = {"sex": sex, "age": parse_dicom_age(age) if not _is_missing(age) else None, "weight": weight}
    record: dict[str, Any] = {}
    notes: list[str] = []
    for name, value in raw.items():
        if name not in schema.field_names:
            continue
        given = {"sex": sex, "age": age, "weight": weight}[name]
        if _is_missing(given):
            continue
        attribute = HEADER_ATTRIBUTES[name]
        if value is None:
            notes.append(f"DICOM {attribute} {_short(given)} is not readable; {name} left unknown")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ClinicalDataWarning)
            try:
                canonical = schema.field(name).canonical(value)
            except ClinicalValueError as exc:
                notes.append(f"DICOM {attribute} {_short(given)} not used: {exc}")
                continue
        if canonical is None:
            notes.append(f"DICOM {attribute} {_short(given)} means unknown; {name} left unknown")
            continue
        record[name] = round(canonical, 2) if isinstance(canonical, float) else canonical
    return record, notes


def fill_from_header(record: Mapping[str, Any], header: Mapping[str, Any],
                     schema: ClinicalSchema | None = None) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The record with sex, age and weight taken from the header where the user gave none.

    ``header`` holds ``patient_sex``, ``patient_age``, ``patient_weight`` (a Volume's ``meta``).
    Returns (filled record, {field: value taken from the header}, notes about header values left out).
    """
    schema = schema or default_schema()
    values, notes = values_from_header(header.get("patient_sex"), header.get("patient_age"),
                                       header.get("patient_weight"), schema)
    given = schema.record_values(record) if isinstance(record, Mapping) else {}
    filled = dict(record)
    taken: dict[str, Any] = {}
    for name, value in values.items():
        if _is_missing(given.get(name)):
            filled[name] = value
            taken[name] = value
    return filled, taken, notes


def describe_values(values: Mapping[str, Any]) -> str:
    """'sex M, age 63, weight 72.5': how the command line and Slicer announce header-filled values."""
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
