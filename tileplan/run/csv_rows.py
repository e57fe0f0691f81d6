"""The rows of a dataset CSV: header, numbering, and the fields every reader shares.

A UTF-8 text file with a header line ``image,label`` (in either order) and optional columns
``level`` (a slide's pyramid level), ``mpp`` (a slide's microns per pixel, for files that
record none) or ``spacing`` (a volume's mm per voxel, ``DxHxW``), one row per image. ``image``
is a path, relative to the CSV file's folder (or absolute); ``label`` is a number. Blank lines
are ignored. Rows are numbered from 1 for the first line after the header, so ``row N`` is
line ``N + 1`` of the file.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tileplan.run.pixels import DataError

__all__ = [
    "FIX_ROW", "RowError", "parse_label", "parse_level", "parse_mpp", "read_csv_rows", "row_image",
]  # fmt: skip

_COLUMNS = ("image", "label")
_OPTIONAL_COLUMNS = ("level", "mpp", "spacing")  # spacing: of volumes (tileplan.run.volumes)
FIX_ROW = "fix or remove the row"


class RowError(Exception):
    def __init__(self, row: int, reason: str) -> None:
        self.row = row
        self.reason = reason
        super().__init__(reason)


def read_csv_rows(csv_path: Path, shown: str) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """Return the column index of each name and ``(row, fields)`` for each non-blank data row."""
    if not csv_path.exists():
        raise DataError(f"{shown}: file not found", csv_path=csv_path)
    if not csv_path.is_file():
        raise DataError(f"{shown}: not a regular file", csv_path=csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            records = list(_numbered(csv.reader(fh)))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{shown}: not a UTF-8 text file ({exc.reason})", csv_path=csv_path
        ) from exc
    except (OSError, csv.Error) as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"{shown}: cannot read: {why}", csv_path=csv_path) from exc
    if not records:
        raise DataError(
            f"{shown}: the file is empty; expected a header line 'image,label' and one row per "
            "image",
            csv_path=csv_path,
        )
    header_line, header = records[0]
    columns = _check_header(header, shown, csv_path)
    rows = [(line - header_line, fields) for line, fields in records[1:]]
    if not rows:
        raise DataError(
            f"{shown}: no data rows after the header; add one 'image,label' row per image",
            csv_path=csv_path,
        )
    return columns, rows


def _numbered(reader: Any) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of each non-blank record of a ``csv.reader``."""
    for fields in reader:
        if any(f.strip() for f in fields):
            yield reader.line_num, fields


def _check_header(header: list[str], shown: str, csv_path: Path) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    missing = [c for c in _COLUMNS if c not in names]
    extra = [h for h in names if h not in (*_COLUMNS, *_OPTIONAL_COLUMNS)]
    dupes = sorted({h for h in names if names.count(h) > 1})
    problems = []
    if missing:
        problems.append("missing column(s) " + ", ".join(repr(c) for c in missing))
    if extra:
        problems.append("unexpected column(s) " + ", ".join(repr(c) for c in extra))
    if dupes:
        problems.append("repeated column(s) " + ", ".join(repr(c) for c in dupes))
    if problems:
        raise DataError(
            f"{shown}: {'; '.join(problems)} in header {','.join(header)!r}; "
            "the header must be 'image,label' (and optionally 'level' and 'mpp', or 'spacing' for "
            "volumes)",
            csv_path=csv_path,
        )
    return {name: names.index(name) for name in (*_COLUMNS, *_OPTIONAL_COLUMNS) if name in names}


def parse_label(text: str, row: int) -> float:
    try:
        label = float(text)
    except ValueError:
        raise RowError(row, f"label {text.strip()!r} is not a number") from None
    if not math.isfinite(label):
        raise RowError(row, f"label {text.strip()!r} is not a finite number")
    return label


def parse_level(text: str, row: int) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise RowError(row, f"level {text!r} is not a whole number >= 0 (0 = full resolution)")
    return int(text)


def parse_mpp(text: str, row: int) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise RowError(row, f"mpp {text!r} is not a positive number of microns per pixel")
    return value


def row_image(row: int, fields: list[str], columns: dict[str, int], base: Path
              ) -> tuple[str, float, Path]:  # fmt: skip
    """A row's image as written, its label, and the image's absolute path (relative paths
    from the CSV's folder ``base``).

    Raises:
        RowError: a wrong number of fields, an empty path, a bad label, a missing file.
    """
    if len(fields) != len(columns):
        raise RowError(row, f"expected {len(columns)} fields ({','.join(columns)}), got "
                            f"{len(fields)}")  # fmt: skip
    name = fields[columns["image"]].strip()
    if not name:
        raise RowError(row, "the image path is empty")
    label = parse_label(fields[columns["label"]], row)
    path = Path(name).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.exists():
        raise RowError(row, f"image {name!r} not found (looked for {path})")
    return name, label, path
