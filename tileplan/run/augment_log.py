"""``augmentations.csv``: what ``--augment`` drew for every training image of every epoch
(one row per image trained, in training order), derived again from (seed, epoch, image) at
each checkpoint, so that a resumed run's file is the uninterrupted run's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from executor import ImageSource
from tileplan.augment import Augmentation
from tileplan.run.csv_out import write_csv
from tileplan.run.dataset import Dataset

__all__ = ["AUGMENTATIONS_FILE", "save_augmentations"]

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


def save_augmentations(path: Path, augmentation: Augmentation, data: Dataset, *, seed: int,
                       epochs: int, order: Callable[[int], list[int]]) -> None:  # fmt: skip
    """Write the parameters drawn for each image of epochs ``0 .. epochs-1`` (``order(e)``:
    epoch ``e``'s images in training order) as a CSV, atomically."""
    rows = []
    for epoch in range(epochs):
        for position, index in enumerate(order(epoch)):
            source = augmentation.apply(_unread(data, index), seed=seed, epoch=epoch,
                                        index=index)  # fmt: skip
            sample = data.samples[index]
            rows.append([epoch + 1, position + 1, sample.row, str(sample.path),
                         source.params[0].drawn])  # type: ignore[attr-defined]  # fmt: skip
    write_csv(path, ["epoch", "position", "row", "image", "drawn"], rows)
