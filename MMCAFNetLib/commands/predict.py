"""``mmcafnet predict``: classify a CT (or a batch of CTs) and write prediction, heatmap, labelmap, segmentation,
preview, and for a DICOM series a DICOM SEG and Parametric Map."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from MMCAFNetLib.atomic import atomic_output

#: Clinical flags -> record field names (the paper's seven fields).
CLINICAL_FLAGS = {
    "sex": "sex",
    "age": "age",
    "weight": "weight",
    "t_stage": "t_stage",
    "n_stage": "n_stage",
    "m_stage": "m_stage",
    "smoking": "smoking",
}
VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")
INPUT_COLUMNS = ("input", "series_path", "path", "ct")
ID_COLUMNS = ("case_id", "patient_id", "id")
#: Columns holding a case's true class (a cohort table from ``mmcafnet index`` has "label").
TRUE_LABEL_COLUMNS = ("label", "true_label", "true_class")
BOX_COLUMNS = ("box_ras_min_r", "box_ras_min_a", "box_ras_min_s", "box_ras_max_r", "box_ras_max_a", "box_ras_max_s")
POINT_COLUMNS = ("point_r", "point_a", "point_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="CKPT", help="model checkpoint (default: the bundled demo model)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", metavar="CT", help="CT as a DICOM folder or file, .nrrd, .nii(.gz) or .mha")
    src.add_argument(
        "--batch", metavar="CSV_OR_FOLDER",
        help="many cases: a folder of CT files / DICOM series folders, or a CSV with an 'input' (or "
             "'series_path') column, optional 'case_id'/'patient_id', clinical columns, and a lesion as "
             "point_r/a/s or box_ras_min_r..box_ras_max_s (a cohort table from `mmcafnet index` works)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (batch: one sub-folder per case)")
    parser.add_argument("--series-uid", help="the series to read when the DICOM folder holds several")
    lesion = parser.add_mutually_exclusive_group()
    lesion.add_argument("--point", nargs=3, type=float, metavar=("R", "A", "S"), help="lesion point (mm)")
    lesion.add_argument(
        "--box", nargs=6, type=float, metavar=("R0", "A0", "S0", "R1", "A1", "S1"), help="lesion box: two corners (mm)"
    )
    lesion.add_argument("--mask", metavar="FILE", help="lesion segmentation (labelmap file); its bounding box is used")
    parser.add_argument("--lps", action="store_true", help="--point/--box are in LPS (DICOM) instead of RAS")
    clin = parser.add_argument_group("clinical record (unknown values may be left out; they are imputed)")
    clin.add_argument("--sex", help="M or F")
    clin.add_argument("--age", type=float, help="years")
    clin.add_argument("--weight", type=float, help="kg")
    clin.add_argument("--t-stage", dest="t_stage", help="T stage, e.g. 1a, 2, 4")
    clin.add_argument("--n-stage", dest="n_stage", help="N stage, e.g. 0, 2")
    clin.add_argument("--m-stage", dest="m_stage", help="M stage, e.g. 0, 1b")
    clin.add_argument("--smoking", help="smoking history (as the checkpoint's schema lists, e.g. 0 / 1)")
    clin.add_argument("--clinical", metavar="FILE", help="clinical record as JSON (an object) or CSV (one row per case)")
    clin.add_argument("--row", metavar="ID", help="which CSV row: its case_id/patient_id, or a 0-based row number")
    parser.add_argument("--heatmap", choices=("model", "attention", "gradcam", "gradcam++", "none"), default="model",
                        help="heatmap method; model (default): the one the checkpoint recommends, chosen by "
                             "measured localisation (mmcafnet info shows it)")
    parser.add_argument("--threshold", type=float, default=0.5, help="heatmap level drawn into the labelmap (0..1)")
    add_scan_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per forward pass")
    parser.add_argument("--no-preview", action="store_true", help="skip preview.png")
    parser.add_argument(
        "--no-dicom", action="store_true",
        help="for a DICOM series input, skip segmentation.dcm (DICOM SEG) and heatmap.dcm (Parametric Map)",
    )


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    """Overrides of the checkpoint's whole-volume scan settings (``mmcafnet info`` shows them)."""
    parser.add_argument("--scan-overlap", type=float, default=None, metavar="F",
                        help="whole-volume scans: overlap of neighbouring windows, 0..0.75 (default: the "
                             "checkpoint's; 0.25 evaluates about a third of the windows of 0.5)")
    parser.add_argument("--scan-levels", choices=("all", "finest"), default=None,
                        help="whole-volume scans: the attention map of all pyramid levels or of the finest "
                             "(default: the checkpoint's)")


def apply_scan_arguments(args: argparse.Namespace, predictor) -> None:
    from MMCAFNetLib.cli import UsageError
    from MMCAFNetLib.inference.predictor import InputError

    try:
        predictor.set_scan_options(args.scan_overlap, args.scan_levels)
    except InputError as exc:
        raise UsageError(f"--scan-overlap: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from MMCAFNetLib.cli import UsageError
    from MMCAFNetLib.inference import Predictor

    if not 0.0 <= args.threshold <= 1.0:
        raise UsageError(f"--threshold must lie in 0..1, got {args.threshold}")
    if args.lps and args.point is None and args.box is None:
        raise UsageError("--lps applies to --point or --box; give one of them")
    checkpoint = _checkpoint_path(args.checkpoint)
    predictor = Predictor.load(checkpoint, device=args.device)
    apply_scan_arguments(args, predictor)
    if args.batch:
        return _run_batch(args, predictor)
    record = _record_from_args(args)
    lesion = _lesion_from_args(args)
    out = Path(args.out)
    result = predict_case(predictor, args.input, out, record, lesion, args, case_id=None)
    _print_result(result, out)
    return 0


# ------------------------------------------------------------------------------------------- one case


def predict_case(predictor, input_path, out: Path, record, lesion, args, case_id=None, quiet: bool = False):
    """Read, classify and write one case; returns the Classification."""
    from MMCAFNetLib.inference import write_outputs
    from MMCAFNetLib.volume import read_volume

    volume = read_volume(input_path, series_uid=getattr(args, "series_uid", None))
    if isinstance(lesion, (str, Path)):
        lesion = read_volume(lesion)
    from MMCAFNetLib.ehr import describe_values, fill_from_header

    record, from_header, header_notes = fill_from_header(dict(record or {}), volume.meta, predictor.schema)
    progress = None if quiet else _progress_printer()
    result = predictor.classify(
        volume,
        record,
        lesion=lesion,
        heatmap=None if args.heatmap == "none" else args.heatmap,
        threshold=args.threshold,
        progress=progress,
        batch_size=args.batch_size,
    )
    if progress is not None:
        print(file=sys.stderr)
    read_warnings = [str(w) for w in volume.meta.get("warnings") or []] + header_notes
    if from_header:  # announced with the other warnings (printed, and kept in prediction.json)
        read_warnings.append(f"clinical values taken from the DICOM header: {describe_values(from_header)} "
                             f"(give --{'/--'.join(from_header)} to use others)")
    result.warnings = read_warnings + [w for w in result.warnings if w not in read_warnings]
    write_outputs(
        result, volume, out, input_path=str(Path(input_path).resolve()), case_id=case_id,
        record=predictor.schema.validate_record(record), preview=not args.no_preview,
        record_from_header=from_header,
        dicom=not getattr(args, "no_dicom", False),
    )
    return result


def _progress_printer():
    def report(done: int, total: int) -> None:
        print(f"\rwindows {done}/{total}", end="", file=sys.stderr, flush=True)

    return report


def _print_result(result, out: Path) -> None:
    probs = ", ".join(f"{c} {p:.3f}" for c, p in zip(result.class_names, result.probabilities))
    print(f"predicted: {result.decision_text(3)}  [{probs}]")
    print(f"windows: {len(result.windows)}, time: {result.timings.get('total_s', 0.0):.1f} s")
    if result.candidates:
        places = "; ".join(f"{n} ({', '.join(f'{v:.1f}' for v in c.ras)}) {c.value:.2f}"
                           for n, c in enumerate(result.candidates, 1))
        print(f"heatmap places to look at (RAS mm, map value): {places}")
    for w in result.warnings:
        print(f"warning: {w}")
    if result.model.get("demo"):
        print("note: demo model trained on synthetic data; not for clinical use")
    print(f"written to {out}/")


def _checkpoint_path(given: Optional[str]) -> Path:
    if given:
        return Path(given)
    from MMCAFNetLib.resources import demo_checkpoint_path

    try:
        return demo_checkpoint_path()
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no --checkpoint given and the bundled demo model is missing ({exc})") from None


# ------------------------------------------------------------------------------------- clinical input


def _record_from_args(args: argparse.Namespace) -> dict[str, Any]:
    from MMCAFNetLib.cli import UsageError

    record: dict[str, Any] = {}
    if args.clinical:
        record.update(read_clinical_file(args.clinical, args.row))
    elif args.row:
        raise UsageError("--row selects a row of --clinical FILE; give the file too")
    for flag, field in CLINICAL_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            record[field] = int(value) if isinstance(value, float) and flag == "age" and value.is_integer() else value
    return record


def read_clinical_file(path: str | os.PathLike, row: Optional[str] = None) -> dict[str, Any]:
    """One clinical record from a JSON object or a CSV row (chosen by id or number)."""
    from MMCAFNetLib.cli import UsageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical file not found: {path}")
    if path.suffix.lower() == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                raise UsageError(f"{path} is not valid JSON ({detail})") from None
        if isinstance(data, list):
            if not all(isinstance(r, dict) for r in data):
                raise UsageError(f"{path}: a list of clinical records must hold only JSON objects ({{...}}), one per case")
            data = _pick_row(data, row, path)
        if not isinstance(data, dict):
            raise UsageError(
                f"{path} must hold a JSON object of clinical values such as {{\"sex\": \"M\", \"age\": 63}} "
                f"(or a list of them), not a JSON {type(data).__name__}"
            )
        return {k: v for k, v in data.items() if v is not None}
    if path.suffix.lower() in (".csv", ".tsv"):
        from MMCAFNetLib.table_files import read_csv_file

        df = read_csv_file(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
        rows = df.to_dict(orient="records")
        return {k: v for k, v in _pick_row(rows, row, path).items() if v not in ("", None)}
    raise UsageError(f"clinical file {path}: use .json or .csv")


def _pick_row(rows: list, row: Optional[str], path: Path) -> dict[str, Any]:
    from MMCAFNetLib.cli import UsageError

    if not rows:
        raise UsageError(f"{path} holds no rows")
    if row is None:
        if len(rows) == 1:
            return rows[0]
        raise UsageError(f"{path} holds {len(rows)} rows; choose one with --row ID (its case_id / patient_id or number)")
    for r in rows:
        if any(str(r.get(c, "")) == str(row) for c in ID_COLUMNS):
            return r
    if str(row).isdigit() and int(row) < len(rows):
        return rows[int(row)]
    raise UsageError(f"{path} has no row {row!r} (looked in columns {', '.join(ID_COLUMNS)} and row numbers)")


# -------------------------------------------------------------------------------------------- lesion


def _lesion_from_args(args: argparse.Namespace):
    flip = np.array([-1.0, -1.0, 1.0]) if args.lps else np.ones(3)
    if args.point is not None:
        return np.asarray(args.point, dtype=float) * flip
    if args.box is not None:
        b = np.asarray(args.box, dtype=float).reshape(2, 3) * flip
        return np.stack([b.min(axis=0), b.max(axis=0)])
    if args.mask:
        if not Path(args.mask).exists():
            raise FileNotFoundError(f"lesion mask not found: {args.mask}")
        return args.mask
    return None


# --------------------------------------------------------------------------------------------- batch


def list_batch_cases(batch: str | os.PathLike) -> list[dict[str, Any]]:
    """Cases of a batch: dicts with case_id, input, record, lesion (RAS array or None)."""
    from MMCAFNetLib.cli import UsageError

    batch = Path(batch)
    if batch.is_dir():
        cases = []
        for entry in sorted(batch.iterdir()):
            if entry.name.startswith("."):
                continue
            name = entry.name
            if entry.is_dir():
                cases.append({"case_id": name, "input": str(entry), "record": {}, "lesion": None})
            elif any(name.lower().endswith(s) for s in VOLUME_SUFFIXES):
                stem = next(name[: -len(s)] for s in VOLUME_SUFFIXES if name.lower().endswith(s))
                cases.append({"case_id": stem, "input": str(entry), "record": {}, "lesion": None})
        if not cases:
            raise UsageError(f"{batch} holds no CT files ({', '.join(VOLUME_SUFFIXES)}) or DICOM series folders")
        return cases
    if not batch.is_file():
        raise FileNotFoundError(f"batch list not found: {batch}")
    from MMCAFNetLib.table_files import read_csv_file

    df = read_csv_file(batch, dtype=str, keep_default_na=False)
    input_col = next((c for c in INPUT_COLUMNS if c in df.columns), None)
    if input_col is None:
        raise UsageError(f"{batch} needs a column naming each CT: one of {', '.join(INPUT_COLUMNS)}")
    id_col = next((c for c in ID_COLUMNS if c in df.columns), None)
    label_col = next((c for c in TRUE_LABEL_COLUMNS if c in df.columns), None)
    cases = []
    for n, row in enumerate(df.to_dict(orient="records")):
        path = Path(row[input_col])
        if not path.is_absolute():
            path = batch.parent / path
        lesion = None
        if all(c in row and row[c] != "" for c in BOX_COLUMNS):
            lesion = np.array([float(row[c]) for c in BOX_COLUMNS]).reshape(2, 3)
        elif all(c in row and row[c] != "" for c in POINT_COLUMNS):
            lesion = np.array([float(row[c]) for c in POINT_COLUMNS])
        record = {f: row[f] for f in CLINICAL_FLAGS.values() if row.get(f, "") != ""}
        case_id = row[id_col] if id_col and row[id_col] else f"case{n:04d}"
        case = {"case_id": case_id, "input": str(path), "record": record, "lesion": lesion,
                "series_uid": row.get("series_uid") or None}
        if label_col:
            case["true_label"] = str(row[label_col]).strip()
        cases.append(case)
    if not cases:
        raise UsageError(f"{batch} lists no cases")
    ids = [c["case_id"] for c in cases]
    if len(set(ids)) != len(ids):
        raise UsageError(f"{batch}: case ids repeat; each case needs its own id (its output folder)")
    return cases


def _run_batch(args: argparse.Namespace, predictor) -> int:
    from MMCAFNetLib.cli import UsageError

    if args.point is not None or args.box is not None or args.mask:
        raise UsageError("--point/--box/--mask apply to one --input; in batch mode give the lesion per case in the CSV")
    cases = list_batch_cases(args.batch)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flag_record = {f: getattr(args, k) for k, f in CLINICAL_FLAGS.items() if getattr(args, k, None) is not None}
    unknown = _warn_unknown_classes(cases, predictor.class_names)
    rows = []
    failures = 0
    for n, case in enumerate(cases, 1):
        print(f"[{n}/{len(cases)}] {case['case_id']}", file=sys.stderr)
        row: dict[str, Any] = {"case_id": case["case_id"], "input": case["input"], "out_dir": str(out / _safe(case["case_id"]))}
        if "true_label" in case:
            row["true_label"] = case["true_label"]
        try:
            record = dict(case["record"])
            if args.clinical:
                record.update(read_clinical_file(args.clinical, case["case_id"]))
            record.update(flag_record)
            case_args = argparse.Namespace(**{**vars(args), "series_uid": case.get("series_uid") or args.series_uid})
            result = predict_case(
                predictor, case["input"], out / _safe(case["case_id"]), record, case["lesion"], case_args,
                case_id=case["case_id"], quiet=True,
            )
            cut = result.model.get("decision_threshold")
            row.update(status="ok", predicted_class=result.predicted_class, predicted_label=result.predicted_label,
                       probability=f"{result.probability:.6f}",
                       decision_threshold="" if cut is None else f"{float(cut):.6f}",
                       windows=len(result.windows), seconds=f"{result.timings.get('total_s', 0.0):.2f}", error="")
            if case.get("true_label"):
                row["correct"] = "" if case["true_label"] in unknown else str(result.predicted_class == case["true_label"]).lower()
            for c, p in zip(result.class_names, result.probabilities):
                row[f"p_{c}"] = f"{float(p):.6f}"
            if result.candidates:  # the heatmap's peak (the others are in the case's prediction.json)
                row.update({f"peak_{axis}": f"{float(v):.2f}" for axis, v in zip("ras", result.candidates[0].ras)})
        except (ValueError, FileNotFoundError, NotADirectoryError, OSError, RuntimeError) as exc:
            failures += 1
            row.update(status="error", error=f"{type(exc).__name__}: {exc}")
            print(f"  error: {exc}", file=sys.stderr)
        rows.append(row)
    _write_summary(out / "summary.csv", rows)
    print(f"{len(cases) - failures}/{len(cases)} cases classified; summary: {out / 'summary.csv'}")
    return 0 if failures == 0 else 1


def _warn_unknown_classes(cases: list[dict[str, Any]], class_names: list[str]) -> set[str]:
    """Warn when the batch holds true classes the model was not trained on (an A-vs-G model given
    small-cell or large-cell patients must call them A or G: those predictions cannot be right).
    Returns the unknown classes."""
    from collections import Counter

    counts = Counter(c["true_label"] for c in cases if c.get("true_label") and c["true_label"] not in class_names)
    if counts:
        listed = ", ".join(f"{n} of class {letter}" for letter, n in sorted(counts.items()))
        print(
            f"warning: the batch holds patients of classes this model was not trained on ({listed}); the model "
            f"knows only {', '.join(class_names)}, so it must call them one of those. Their 'correct' column is "
            "left empty; leave them out, or use a model trained on all four classes (task ABEG).",
            file=sys.stderr,
        )
    return set(counts)


def _safe(case_id: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(case_id)).strip(".")
    return keep or "case"


def _write_summary(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    with atomic_output(path, suffix=".csv") as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
