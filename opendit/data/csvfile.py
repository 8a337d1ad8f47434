"""The dataset CSV: ``path,text[,num_frames,fps,height,width,...]``, and reading users' text files.

Open-Sora v1.0 used headerless ``path,text`` rows; we read those as they are and also accept a header row
(recognised when one of its fields names the path or the text column, in any order: ``text,path`` is a header), in
which ``caption`` is an alias of ``text`` and further columns are kept as metadata. Every error names the file and
the 1-based row (the header, when present, is row 1), so a broken row in a million-line CSV is found at once.

Nothing is read silently wrong (docs/data.md, "What is refused"):

- every row is one line: a quoted field that runs over a line end (a caption that opens a quote and never closes
  it swallows the rows after it) is an error naming ``file:line``;
- text is UTF-8 (a byte-order mark is dropped) unless an ``encoding`` is given; a byte that does not decode is an
  error naming the file, line and byte, never a replacement character.
"""

from __future__ import annotations

import argparse
import codecs
import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from opendit.data.video import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

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


def read_text_file(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The text of a user's file (CSV, caption list, caption sidecar), decoded with ``encoding``.

    UTF-8 drops a leading byte-order mark (spreadsheet programs write one). A byte that is not valid in
    ``encoding`` raises a :class:`DataError` naming the file, line and byte: decoding with replacement characters
    would put mangled captions into training without a word.
    """
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"--encoding {encoding!r}: unknown text encoding (e.g. utf-8, latin-1, cp1252)") from None
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig" if codec == "utf-8" else codec)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid {encoding} text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"convert the file to UTF-8, or give its encoding (opendit prepare ... --encoding latin-1)"
                        ) from None


def add_encoding_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--encoding`` for a command that reads users' text files (``what`` names them in the help)."""
    parser.add_argument("--encoding", default="utf-8",
                        help=f"text encoding of {what} (default utf-8; a byte that does not decode is an error "
                             f"naming the file and line), e.g. latin-1 or cp1252")


def add_csv_arguments(parser: argparse.ArgumentParser, data_help: str) -> None:
    """``--data`` (a dataset CSV), ``--data_root`` and ``--encoding``: how a command reads a CSV (:func:`read_csv`)."""
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--data_root", default=None,
                        help="folder relative paths of --data are under (default: its folder)")
    add_encoding_argument(parser, "--data")


def iter_records(path: str | os.PathLike, text: str, delimiter: str = ",") -> Iterator[tuple[int, list[str]]]:
    """``(line, fields)`` for each line of a CSV ``text`` read from ``path`` (blank lines give ``[]``).

    A record must be one line: a quoted field spanning lines is almost always a caption whose opening quote was
    never closed, which would swallow the rows after it, so it is a :class:`DataError` naming ``path:line``.
    """
    # newline="": lines end at \n, \r\n or a lone \r (what open(newline="") gave csv before: classic Mac Excel
    # writes \r), and the line ends inside quoted fields are kept for the check below.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    num_lines = sum(1 for _ in io.StringIO(text, newline=""))  # counted as the reader counts them
    last_line = 0
    try:
        for fields in reader:
            line, last_line = last_line + 1, reader.line_num
            if last_line > line or any("\n" in f or "\r" in f for f in fields):
                reach = "the end of the file" if last_line >= num_lines else f"line {last_line}"
                raise DataError(f"{path}:{line}: unclosed quote: the quoted field opened on line {line} runs to "
                                f"{reach}, swallowing the lines after it as its text; close the quote (a quote "
                                f"inside a quoted field is written twice: \"\"); a caption may not hold line "
                                f"breaks: replace them with spaces")
            yield line, fields
    except csv.Error as e:  # e.g. a NUL byte
        raise DataError(f"{path}:{reader.line_num}: not a CSV line ({e})") from None


def _is_header(fields: list[str]) -> bool:
    """A first row naming the path or text column (any order), unless it holds a media file name: then it is a
    headerless data row whose caption happens to be a column name (``a.mp4,Video``)."""
    if any(Path(f.strip()).suffix.lower() in VIDEO_EXTENSIONS + IMAGE_EXTENSIONS for f in fields):
        return False
    return any(_canonical_column(f) in ("path", "text") for f in fields)


def _parse_header(fields: list[str], csv_path: Path, row: int) -> list[str]:
    columns = [_canonical_column(f) for f in fields]
    if "text" not in columns or "path" not in columns:
        raise DataError(f"{csv_path} row {row}: unknown header layout {fields}: expected a 'path' (or 'video', "
                        f"'filepath') and a 'text' (or 'caption') column, in any order")
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


def read_csv(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
             encoding: str = "utf-8") -> list[dict[str, Any]]:
    """Read a dataset CSV into one dict per row.

    Each dict has ``"path"`` (absolute: relative paths are resolved against ``data_root``, or else the CSV's
    folder) and ``"text"``, plus the header's other columns; ``num_frames``, ``height`` and ``width`` become
    ints and ``fps``/``duration``/``aspect_ratio`` floats (``None`` when empty). Without a header, the first
    column is the path, the second the caption and further columns are ignored. Blank lines are skipped. The
    file is decoded with ``encoding`` (see :func:`read_text_file`).

    Raises :class:`DataError` naming the file and the row for a missing or empty file, a row with fewer than 2
    columns (or more than the header), an empty path or caption, an unknown header layout, an unclosed quote
    (:func:`iter_records`) and text that is not valid in ``encoding``.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file")
    root = Path(data_root) if data_root is not None else csv_path.parent
    rows: list[dict[str, Any]] = []
    columns: list[str] | None = None
    first_record = True
    for row_number, fields in iter_records(csv_path, read_text_file(csv_path, encoding)):
        if not fields or all(not x.strip() for x in fields):
            continue
        if first_record:
            first_record = False
            if _is_header(fields):
                columns = _parse_header(fields, csv_path, row_number)
                continue
        rows.append(_record(fields, columns, root, csv_path, row_number))
    if not rows:
        what = "no data rows after the header" if columns is not None else "empty CSV (no rows)"
        raise DataError(f"{csv_path}: {what}")
    return rows


def _record(fields: list[str], columns: list[str] | None, root: Path, csv_path: Path, row: int) -> dict[str, Any]:
    """One data row as a dict (see :func:`read_csv`), its path made absolute."""
    if len(fields) < 2:
        raise DataError(f"{csv_path} row {row}: expected at least 2 columns (path,text), got {len(fields)}: {fields}")
    if columns is None:
        record = {"path": fields[0], "text": fields[1]}
    else:
        if len(fields) > len(columns):
            raise DataError(f"{csv_path} row {row}: {len(fields)} columns but the header has {len(columns)}")
        record = {c: _convert(c, v, csv_path, row) for c, v in zip(columns, fields)}
        for column in ("path", "text"):
            if column not in record:
                raise DataError(f"{csv_path} row {row}: no value for the {column!r} column")
    record["path"] = record["path"].strip()
    if not record["path"]:
        raise DataError(f"{csv_path} row {row}: empty path")
    if not record["text"].strip():
        raise DataError(f"{csv_path} row {row}: empty caption for {record['path']}")
    record["path"] = os.path.normpath(os.path.join(root, os.path.expanduser(record["path"])))
    return record


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


def write_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, flush it to disk, then rename it to ``path``.

    A reader (or a crash) never sees half a file: a file that exists is complete. The temporary file is removed
    if ``write`` fails.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        # mkstemp creates the file private (0600); datasets and caches are meant to be shared.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> Path:
    """Write ``rows`` with a header of ``columns`` (missing values are empty) and return the path.

    The file is written atomically (:func:`write_atomically`), so a reader (or a crash) never sees half a CSV.
    Paths are written as given; use :func:`relative_path` to make them portable.
    """
    path = Path(path)
    if "path" not in columns or "text" not in columns:
        raise ValueError(f"{path}: columns must include 'path' and 'text', got {list(columns)}")
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for row in rows:
                writer.writerow([_format(row.get(c)) for c in columns])

    write_atomically(path, write)
    return path
