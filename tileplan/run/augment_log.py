"""``augmentations.csv``: what ``--augment`` drew for every training image of every epoch
(one row per image trained, in training order), derived from (seed, epoch, image, repeat) and
appended at each epoch's checkpoint, so that a resumed run's file is the uninterrupted
run's."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from executor import ImageSource
from tileplan.augment import Augmentation
from tileplan.run.csv_out import write_csv
from tileplan.run.dataset import Dataset

__all__ = ["AUGMENTATIONS_FILE", "draw_counts", "save_augmentations"]

AUGMENTATIONS_FILE = "augmentations.csv"


@dataclass(frozen=True)
class _Shape:
    """An image's shape and dtype without its pixels: all that drawing parameters needs."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, region: Sequence[slice]) -> torch.Tensor:  # never called when drawing
        raise RuntimeError("a shape has no pixels")


def _unread(data: Dataset, index: int) -> ImageSource:
    """Image ``index`` as a source that reads nothing when parameters are drawn: a slide's
    region (opened only on a read), or the shape of an image read whole."""
    if data.streamed:
        return data.source(index)
    return _Shape((1, *data.image_shape(index)), data.dtype)


def draw_counts(order: Sequence[int]) -> list[int]:
    """For each position of an epoch's image order, how many times that image came before
    (``--balance`` draws with replacement): its augmentation's ``repeat``."""
    seen: Counter[int] = Counter()
    counts = []
    for index in order:
        counts.append(seen[index])
        seen[index] += 1
    return counts


def save_augmentations(path: Path, augmentation: Augmentation, data: Dataset, *, seed: int,
                       epoch: int, order: Sequence[int]) -> None:  # fmt: skip
    """Append the parameters drawn for each image of 0-based ``epoch`` (``order``: its images
    in training order) to the CSV at ``path``, whose rows of later epochs (a resumed run's
    file) are dropped; written atomically."""
    header = ["epoch", "position", "row", "image", "drawn"]
    kept: list[list[str]] = []
    if path.is_file():
        with path.open(newline="") as f:
            kept = [r for r in list(csv.reader(f))[1:] if r and int(r[0]) <= epoch]
    rows: list[list[object]] = [*kept]
    for position, (index, repeat) in enumerate(zip(order, draw_counts(order), strict=True)):
        source = augmentation.apply(_unread(data, index), seed=seed, epoch=epoch, index=index,
                                    repeat=repeat)  # fmt: skip
        sample = data.samples[index]
        rows.append([epoch + 1, position + 1, sample.row, str(sample.path),
                     source.params[0].drawn])  # type: ignore[attr-defined]  # fmt: skip
    write_csv(path, header, rows)
