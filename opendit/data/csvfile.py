"""The dataset CSV: ``path,text[,num_frames,fps,height,width,...]``.

Open-Sora v1.0 used headerless ``path,text`` rows; we read those as they are and also accept a header row
(detected when its first field is ``path``, ``video`` or ``filepath``), in which ``caption`` is an alias of
``text`` and further columns are kept as metadata. Every error names the file and the 1-based row (the header,
when present, is row 1), so a broken row in a million-line CSV is found at once.
"""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

PATH_ALIASES = ("path", "video", "filepath")
TEXT_ALIASES = ("text", "caption")
INT_COLUMNS = ("num_frames", "height", "width")
FLOAT_COLUMNS = ("fps", "duration", "aspect_ratio")


class DataError(ValueError):
    """Invalid input data (CSV, captions, flags); the message names the file and row or flag."""


def _canonical_column(name: str) -> str:
    key = name.strip().lower()
    if key in PATH_ALIASES:
        return "path"
    if key in TEXT_ALIASES:
        return "text"
    return name.strip()


def _parse_header(fields: list[str], csv_path: Path, row: int) -> list[str]:
    columns = [_canonical_column(f) for f in fields]
    if "text" not in columns:
        raise DataError(f"{csv_path} row {row}: unknown header layout {fields}: expected a 'text' (or 'caption') "
                        f"column after 'path'")
    if "" in columns:
        raise DataError(f"{csv_path} row {row}: unknown header layout {fields}: empty column name")
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise DataError(f"{csv_path} row {row}: unknown header layout {fields}: duplicate column(s) {duplicates}")
    return columns


def _convert(column: str, value: str, csv_path: Path, row: int) -> Any:
    """Numbers for the known numeric columns (empty means unknown: None), strings otherwise."""
    if column not in INT_COLUMNS and column not in FLOAT_COLUMNS:
        return value
    value = value.strip()
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise DataError(f"{csv_path} row {row}: column {column!r} must be a number, got {value!r}") from None
    if column in INT_COLUMNS:
        if not number.is_integer():
            raise DataError(f"{csv_path} row {row}: column {column!r} must be an integer, got {value!r}")
        return int(number)
    return number


def read_csv(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Read a dataset CSV into one dict per row.

    Each dict has ``"path"`` (absolute: relative paths are resolved against ``data_root``, or else the CSV's
    folder) and ``"text"``, plus the header's other columns; ``num_frames``, ``height`` and ``width`` become
    ints and ``fps``/``duration``/``aspect_ratio`` floats (``None`` when empty). Without a header, the first
    column is the path, the second the caption and further columns are ignored. Blank lines are skipped.

    Raises :class:`DataError` naming the file and the row for a missing or empty file, a row with fewer than 2
    columns (or more than the header), an empty path or caption, and an unknown header layout.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file")
    root = Path(data_root) if data_root is not None else csv_path.parent
    rows: list[dict[str, Any]] = []
    columns: list[str] | None = None
    first_record = True
    # utf-8-sig drops the byte-order mark spreadsheet programs put at the start.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        for row_number, fields in enumerate(csv.reader(f), start=1):
            if not fields or all(not x.strip() for x in fields):
                continue
            if first_record:
                first_record = False
                if fields[0].strip().lower() in PATH_ALIASES:
                    columns = _parse_header(fields, csv_path, row_number)
                    continue
            if len(fields) < 2:
                raise DataError(f"{csv_path} row {row_number}: expected at least 2 columns (path,text), "
                                f"got {len(fields)}: {fields}")
            if columns is None:
                record = {"path": fields[0], "text": fields[1]}
            else:
                if len(fields) > len(columns):
                    raise DataError(f"{csv_path} row {row_number}: {len(fields)} columns but the header has "
                                    f"{len(columns)}")
                record = {c: _convert(c, v, csv_path, row_number) for c, v in zip(columns, fields)}
                if "text" not in record:
                    raise DataError(f"{csv_path} row {row_number}: no value for the 'text' column")
            record["path"] = record["path"].strip()
            if not record["path"]:
                raise DataError(f"{csv_path} row {row_number}: empty path")
            if not record["text"].strip():
                raise DataError(f"{csv_path} row {row_number}: empty caption for {record['path']}")
            record["path"] = os.path.normpath(os.path.join(root, os.path.expanduser(record["path"])))
            rows.append(record)
    if not rows:
        what = "no data rows after the header" if columns is not None else "empty CSV (no rows)"
        raise DataError(f"{csv_path}: {what}")
    return rows


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        # Enough digits for fps like 30000/1001 without float noise such as 0.30000000000000004.
        return f"{value:.10g}"
    return str(value)


def relative_path(path: str | os.PathLike, csv_path: str | os.PathLike) -> str:
    """``path`` relative to the folder of ``csv_path`` (how CSVs written here store paths), POSIX-style."""
    folder = os.path.dirname(os.path.abspath(csv_path))
    try:
        return Path(os.path.relpath(os.path.abspath(path), folder)).as_posix()
    except ValueError:  # another drive on Windows: keep it absolute
        return Path(os.path.abspath(path)).as_posix()


def write_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` with a header of ``columns`` (missing values are empty) and return the path.

    The file is written to a temporary name in the same folder and renamed, so a reader (or a crash) never
    sees half a CSV. Paths are written as given; use :func:`relative_path` to make them portable.
    """
    path = Path(path)
    if "path" not in columns or "text" not in columns:
        raise ValueError(f"{path}: columns must include 'path' and 'text', got {list(columns)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_format(row.get(c)) for c in columns])
        # mkstemp creates the file private (0600); a dataset CSV is meant to be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path
