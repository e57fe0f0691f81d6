"""A validated dataset: images (or regions of slides, or volumes) and labels, and the task
the labels imply."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from executor import ImageSource, TensorSource
from tileplan.run.csv_rows import FIX_ROW
from tileplan.run.images import ImageInfo, check_shape, read_image
from tileplan.run.pixels import DataError

if TYPE_CHECKING:
    from tileplan.run.slides import Pyramid, Region

__all__ = ["Dataset", "Sample", "Task", "infer_task"]

Task = Literal["binary", "multiclass", "regression"]


@dataclass(frozen=True)
class Sample:
    """One row of a dataset CSV.

    Attributes:
        path: absolute path of the image file.
        label: the label as a float.
        row: 1-based data row in the CSV (for error messages).
        level: the pyramid level this row asks for (the CSV's ``level`` column), or None.
    """

    path: Path
    label: float
    row: int
    level: int | None = None
    mpp: float | None = None  # the row's statement of the file's µm/px (CSV column ``mpp``)


def infer_task(labels: Iterable[float], max_classes: int = 100) -> Task:
    """Tell the task type from the labels.

    Args:
        labels: the labels (floats).
        max_classes: the largest number of classes ``max(label) + 1`` still taken as
            classification.

    Returns:
        ``"binary"`` when every label is 0 or 1; ``"multiclass"`` when every label is a
        non-negative integer and ``2 < max(label) + 1 <= max_classes``; otherwise
        ``"regression"``.

    Raises:
        ValueError: if there are no labels or one is not finite.
    """
    values = [float(v) for v in labels]
    if not values:
        raise ValueError("no labels: cannot infer the task")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("labels must be finite numbers")
    if all(v in (0.0, 1.0) for v in values):
        return "binary"
    if all(v >= 0 and v.is_integer() for v in values) and max(values) + 1 <= max_classes:
        return "multiclass"
    return "regression"


class Dataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Whole images and labels listed in a validated CSV (see :func:`load_csv`).

    ``dataset[i]`` reads image ``i`` from disk (as described in the module docstring), fits it
    to ``target_shape`` when one is set, and returns ``(image, label)``: ``image`` is
    ``(C, H, W)`` ``uint8`` (or ``float32``), ``label`` a 0-d ``float32`` tensor. No file
    handles are kept open, so the dataset can be sent to DataLoader worker processes.

    Attributes:
        samples: the rows, in CSV order.
        infos: header information of each sample's image (same order).
        target_shape: ``(H, W)`` every image is fitted to, or None to return images as stored.
            With ``regions`` it is the largest image size instead (nothing is fitted).
        csv_path: the CSV the samples came from, if any.
        regions: with settings (see :func:`load_csv`): what is streamed of each image (level,
            resolution, box), read region by region through :meth:`source`; ``infos`` then
            describe those regions.
        pyramids: each image's levels and resolution, alongside ``regions``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        infos: Sequence[ImageInfo],
        target_shape: Sequence[int] | None = None,
        csv_path: Path | None = None,
        regions: Sequence[Region] | None = None,
        pyramids: Sequence[Pyramid] | None = None,
    ) -> None:
        self.regions: tuple[Region, ...] | None = None if regions is None else tuple(regions)
        self.pyramids: tuple[Pyramid, ...] | None = None if pyramids is None else tuple(pyramids)
        if len(samples) != len(infos):
            raise ValueError(f"{len(samples)} samples but {len(infos)} image infos")
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.infos: tuple[ImageInfo, ...] = tuple(infos)
        self.target_shape: tuple[int, int] | None = (
            None if target_shape is None else check_shape(target_shape)
        )
        self.csv_path = csv_path

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def streamed(self) -> bool:
        """Whether images stream from their files region by region (``source``), not whole."""
        return self.regions is not None

    def source(self, index: int) -> ImageSource:
        """Image ``index`` as an ``executor.ImageSource`` of shape ``(1, C, H, W)``: read region
        by region from its file with ``regions``, else the tensor ``self[index]`` holds."""
        if self.regions is None or self.pyramids is None:
            return TensorSource(self[index][0][None])
        from tileplan.run.slides import SlideSource

        return SlideSource(self.pyramids[index], self.regions[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]  # IndexError ends iteration as usual
        try:
            if self.regions is not None:
                source = self.source(index)
                image = source.read_all()[0]  # type: ignore[attr-defined]
                source.close()  # type: ignore[attr-defined]
            else:
                image = read_image(sample.path, self.target_shape)
        except DataError as exc:
            where = self.csv_path if self.csv_path is not None else "dataset"
            raise DataError(
                f"{where} row {sample.row}: {exc}; {FIX_ROW}",
                csv_path=self.csv_path,
                row=sample.row,
            ) from exc
        return image, torch.tensor(sample.label, dtype=torch.float32)

    @property
    def labels(self) -> list[float]:
        """The labels, in sample order."""
        return [s.label for s in self.samples]

    @property
    def task(self) -> Task:
        """The task type the labels imply (see :func:`infer_task`)."""
        return infer_task(self.labels)

    @property
    def largest_shape(self) -> tuple[int, int]:
        """``(H, W)``: the largest height and the largest width of the images (as streamed)."""
        shapes = [self.image_shape(i)[1:] for i in range(len(self))]
        return (max(h for h, _ in shapes), max(w for _, w in shapes))

    @property
    def channels(self) -> int:
        """Channels of every image (validated to be equal)."""
        return self.infos[0].channels if self.infos else 0

    @property
    def dtype(self) -> torch.dtype:
        """Pixel dtype of every image: ``torch.uint8`` or ``torch.float32``."""
        return self.infos[0].torch_dtype if self.infos else torch.uint8

    def image_shape(self, index: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of ``self[index][0]`` without reading the image."""
        info = self.infos[index]
        if self.target_shape is None or self.regions is not None:
            return info.shape
        return (info.channels, *self.target_shape)

    def with_target_shape(self, shape: Sequence[int] | None) -> Dataset:
        """The same samples, fitted to another ``(H, W)`` (or as stored, for None)."""
        if self.regions is not None:
            raise ValueError("a dataset of slide regions is not fitted to a shape")
        return Dataset(self.samples, self.infos, shape, self.csv_path)
