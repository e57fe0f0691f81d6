"""CSV files that runs write (skipped images, bad reads, the regions and volumes streamed):
one writer, atomic, so that a reader never sees half a file."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from executor import atomic_write

__all__ = ["csv_text", "write_csv"]


def csv_text(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """The CSV text of a header line and its rows (``\\n`` line ends)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Write a header line and its rows to ``path`` atomically (UTF-8)."""
    data = csv_text(header, rows).encode()
    atomic_write(path, lambda f: f.write(data))
