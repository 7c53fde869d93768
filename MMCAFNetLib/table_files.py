"""Reading CSV and Excel files with errors that name the file.

pandas reports a damaged table with messages such as "Error tokenizing data. C error: Expected 3
fields in line 5, saw 7" or "File is not a zip file", which do not say which of a run's several tables
(metadata.csv, the clinical sheet, a cohort table, a batch list) is at fault. Every table the library
reads goes through here.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any


class TableFileError(ValueError):
    """A CSV or Excel file cannot be read; the message names the file, the reason and the fix."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else 'no detail'}"


def read_csv_file(path: str | os.PathLike, **kwargs: Any):
    """``pandas.read_csv`` whose failures (bad encoding, ragged rows, binary data) name the file."""
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_csv(path, **kwargs)
    except FileNotFoundError:
        raise
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise TableFileError(
            f"{path} cannot be read as a CSV table ({_reason(exc)}). Check that it is a comma-separated text "
            "file in UTF-8 with one header row, as written by a spreadsheet's 'Save as CSV'."
        ) from None


def read_excel_file(path: str | os.PathLike, **kwargs: Any):
    """``pandas.read_excel`` whose failures (not a workbook, damaged zip, missing openpyxl) name the file."""
    import pandas as pd

    path = Path(path)
    try:
        return pd.read_excel(path, **kwargs)
    except ImportError as exc:
        raise ImportError(f"reading {path.name} needs openpyxl: pip install openpyxl ({exc})") from exc
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise TableFileError(
            f"{path} cannot be read as an Excel workbook ({_reason(exc)}). Open it in a spreadsheet program and "
            "save it again as .xlsx, or save the sheet as CSV."
        ) from None
