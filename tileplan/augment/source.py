"""An image source augmented as it is read: each crop the engine asks for is read from the
source (through the inverse geometric map) and augmented, and equals the same part of the
whole image augmented first (see ``geometry``, ``colour`` and ``noise`` for why each stage is
exact whichever crop reads a pixel)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from executor import ImageSource
from tileplan.augment.colour import ColourParams, apply_colour
from tileplan.augment.geometry import Geometry, sample
from tileplan.augment.noise import gaussian_noise
from tileplan.augment.spec import AugmentError

__all__ = ["AugmentedSource", "ImageParams"]


@dataclass(frozen=True, eq=False)
class ImageParams:
    """Everything one image's augmentation draws (a function of seed, epoch and image).

    Attributes:
        geometry: where each output pixel comes from.
        colour: the colour stages (8-bit images).
        noise: ``(key, std)``: counter-based Gaussian noise of ``std`` (on the 0..255 scale
            for 8-bit images, in the image's units for float images), or None.
        intensity: ``(scale, shift)``: every value times ``scale`` plus ``shift``, after the
            colour stages (``shift`` on the 0..255 scale for 8-bit images), or None.
        cutout: ``(start, stop)`` boxes (px per axis) of the augmented image filled with
            ``fill``.
        fill: the cutout's value per channel.
        drawn: what was drawn, in words (``name=value`` by op), for the run's record.
    """

    geometry: Geometry
    colour: ColourParams = ColourParams()
    noise: tuple[int, float] | None = None
    intensity: tuple[float, float] | None = None
    cutout: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()
    fill: tuple[float, ...] = ()
    drawn: str = ""

    @property
    def identity(self) -> bool:
        return (self.geometry.identity and not self.colour.active and self.noise is None
                and self.intensity is None and not self.cutout)  # fmt: skip


class AugmentedSource:
    """``base`` augmented image by image with ``params`` (one per image of its batch), as an
    ``executor.ImageSource`` of the augmented shape and the base's dtype.

    Args:
        base: the source read (a slide region, a volume, ``executor.TensorSource``, ...).
        params: one ``ImageParams`` per image of the batch; all give one augmented shape.
    """

    def __init__(self, base: ImageSource, params: Sequence[ImageParams]) -> None:
        self.base = base
        self.params = tuple(params)
        if len(self.params) != base.shape[0]:
            raise AugmentError(f"{len(self.params)} augmentations for a batch of {base.shape[0]}")
        shapes = {p.geometry.shape for p in self.params}
        if len(shapes) != 1:
            raise AugmentError(f"the batch's images augment to different shapes {sorted(shapes)}; "
                               "augment images of one batch with one geometry")  # fmt: skip

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.base.shape[:2], *self.params[0].geometry.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def path(self) -> Path | None:
        return getattr(self.base, "path", None)

    @property
    def version(self) -> int:
        return int(getattr(self.base, "version", 0))

    def open(self) -> AugmentedSource:
        if hasattr(self.base, "open"):
            self.base.open()
        return self

    def close(self) -> None:
        if hasattr(self.base, "close"):
            self.base.close()

    def read_all(self) -> torch.Tensor:
        """The whole augmented image, ``(N, C, *spatial)`` (tests and small images)."""
        return self.read(tuple(slice(0, n) for n in self.shape[2:]))

    def read(self, region: Sequence[slice]) -> torch.Tensor:
        region = tuple(region)
        boxes: dict[tuple[tuple[int, int], ...], np.ndarray] = {}  # one read per box

        def base_box(box: tuple[slice, ...]) -> np.ndarray:
            key = tuple((s.start, s.stop) for s in box)
            if key not in boxes:
                boxes[key] = self.base.read(box).numpy()
            return boxes[key]

        items = [self._item(k, p, region, base_box) for k, p in enumerate(self.params)]
        return torch.from_numpy(np.stack(items))

    def _item(self, k: int, p: ImageParams, region: tuple[slice, ...],
              base_box: Callable[[tuple[slice, ...]], np.ndarray]) -> np.ndarray:  # fmt: skip
        """Image ``k`` of the batch: ``region`` augmented, ``(C, *region)``."""
        g = p.geometry
        if g.remap_only:
            out = g.arrange(base_box(g.source_region(region))[k])
        else:
            values = sample(lambda box: base_box(box)[k : k + 1], g, region)
            out = _cast(values[0], self.dtype)
        if p.colour.active:
            out = apply_colour(out, p.colour)
        if p.intensity is not None:
            scale, shift = p.intensity
            out = _cast(out * scale + shift, self.dtype)
        if p.noise is not None:
            key, std = p.noise
            noise = gaussian_noise(key, out.shape[0], g.shape, region)
            out = _cast(out + std * noise, self.dtype)
        copied = False
        for start, stop in p.cutout:  # the box's part inside this region
            inside = [slice(max(a, s.start) - s.start, min(b, s.stop) - s.start)
                      for a, b, s in zip(start, stop, region, strict=True)]  # fmt: skip
            if all(s.start < s.stop for s in inside):
                if not copied:  # never fill the source's own buffer (it may be its pixels)
                    out, copied = out.copy(), True
                fill = np.asarray(p.fill, dtype=out.dtype).reshape(-1, *[1] * len(region))
                out[(slice(None), *inside)] = fill
        return out

    def __repr__(self) -> str:
        return f"AugmentedSource({self.base!r}, shape={self.shape})"

    def __getstate__(self) -> dict[str, Any]:
        return {"base": self.base, "params": self.params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]


def _cast(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Float values as the source's dtype: 8-bit rounded half to even and clipped."""
    if dtype == torch.uint8:
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return values.astype(np.float32 if dtype == torch.float32 else np.float64)
