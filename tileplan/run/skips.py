"""Images a run left out because they failed to read (``--on-read-error skip``), kept in the
checkpoint and written to ``skipped.csv`` in the run folder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from tileplan.run.csv_out import write_csv

__all__ = ["SKIPPED_FILE", "SkippedImage", "save_skipped"]

SKIPPED_FILE = "skipped.csv"


@dataclass(frozen=True)
class SkippedImage:
    """One image left out of one epoch.

    Attributes:
        epoch: 1-based epoch.
        step: 1-based optimizer step of the epoch (0 for validation).
        phase: ``train`` or ``val``.
        csv: the CSV that lists the image; row: its 1-based data row.
        image: the image file.
        reason: the one-line read error (file, level, region, the decoder's reason).
    """

    epoch: int
    step: int
    phase: str
    csv: str
    row: int
    image: str
    reason: str


def save_skipped(path: Path, records: Sequence[SkippedImage]) -> None:
    """Write every skipped image as a CSV (atomically: a reader never sees half a file)."""
    write_csv(path, [f.name for f in fields(SkippedImage)], (astuple(r) for r in records))
