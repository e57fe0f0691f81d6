"""Pixels as tileplan returns them: how a stored array maps to ``(C, H, W)``, which pixel
types are kept, and the error a reader raises for an image it cannot use."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from executor import StreamingError
from tileplan.run.advice import UnusableImageError

__all__ = ["DTYPE_HINT", "BadImageError", "DataError", "ImageReadError", "Layout", "out_dtype"]

DTYPE_HINT = "store 8-bit (uint8) or float32 images"


class DataError(StreamingError):
    """A data file (the CSV or an image it lists) cannot be used.

    The message is one line naming the file (and the CSV row) and the fix, ready for the CLI.

    Attributes:
        csv_path: the CSV being read, when the problem was found through one.
        row: the 1-based data row of the CSV, when the problem belongs to a row.
    """

    def __init__(self, message: str, *, csv_path: Path | None = None, row: int | None = None):
        self.csv_path = csv_path
        self.row = row
        super().__init__(message)


class ImageReadError(DataError):
    """A file that passed its checks failed to read or decode while it was streamed (a corrupt
    tile, a truncated file, a storage error): one line naming the file, the level and region
    being read, and the decoder's reason. Training skips such an image or stops
    (``--on-read-error``)."""


class BadImageError(UnusableImageError):
    """Why an image cannot be read (the caller adds file and row)."""


@dataclass(frozen=True)
class Layout:
    """How a raw array maps to (C, H, W): ``kind`` in {"hw", "hwc", "chw"}, keep ``channels``."""

    kind: str
    channels: int
    invert: bool = False


def out_dtype(dtype: np.dtype) -> Literal["uint8", "float32"]:
    if dtype == np.uint8:
        return "uint8"
    if dtype.kind == "f":
        return "float32"
    raise BadImageError(f"pixel type {dtype.name} is not supported; {DTYPE_HINT}")
