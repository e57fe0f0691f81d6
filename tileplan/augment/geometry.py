"""Where an augmented pixel comes from: crop, the 8 symmetries of the square, rotation and
elastic deformation, as maps of global coordinates.

Remaps (crop, flips, transposition) move whole pixels: the region an output crop needs is
one box of the source, read and rearranged, so a crop equals the same part of the whole
augmented image bit for bit.

Interpolated maps (rotation, elastic) give each output pixel ``(y, x)`` (integers, pixel
centres) a continuous source coordinate, computed from its global coordinates alone in float64
with additions and multiplications in a fixed order (the angle's cosine and sine are per-image
constants), reflected into the source (``reflect-101``: ``-1 -> 1``), and bilinearly
interpolated. The crop reads the bounding box of its pixels' source coordinates (plus one pixel
for the interpolation): the margin its inverse map needs, found rather than bounded. The same
coordinates and weights come out for a pixel in any crop, so these are exact as well.

Order, from an output pixel back to the source: elastic displacement, rotation about the
augmented image's centre, the inverse symmetry, the crop's offset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ELASTIC_SPACING", "Geometry"]

ELASTIC_SPACING = 64  # px between the nodes of the elastic displacement field


@dataclass(frozen=True, eq=False)
class Geometry:
    """One image's geometric augmentation.

    Attributes:
        source: ``(H, W)`` of the image read (after any scale jitter), px.
        crop: ``(y0, x0, h, w)`` of the source kept, px.
        transpose, flip_y, flip_x: the symmetry: transpose first, then the flips.
        angle: rotation, radians (0: none).
        field: elastic displacements ``(2, gy, gx)`` in px at nodes ``ELASTIC_SPACING`` apart
            over the augmented image (None: none).
    """

    source: tuple[int, int]
    crop: tuple[int, int, int, int]
    transpose: bool = False
    flip_y: bool = False
    flip_x: bool = False
    angle: float = 0.0
    field: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of the augmented image."""
        _, _, h, w = self.crop
        return (w, h) if self.transpose else (h, w)

    @property
    def remap_only(self) -> bool:
        """Whether every output pixel is a source pixel (no interpolation)."""
        return self.angle == 0.0 and self.field is None

    @property
    def identity(self) -> bool:
        return (self.remap_only and self.crop == (0, 0, *self.source)
                and not (self.transpose or self.flip_y or self.flip_x))  # fmt: skip

    # -- remaps ------------------------------------------------------------------------------

    def source_region(self, rows: slice, cols: slice) -> tuple[slice, slice]:
        """The source box an output region's pixels come from (remaps only)."""
        h, w = self.shape
        if self.flip_y:
            rows = slice(h - rows.stop, h - rows.start)
        if self.flip_x:
            cols = slice(w - cols.stop, w - cols.start)
        if self.transpose:
            rows, cols = cols, rows
        y0, x0, _, _ = self.crop
        return slice(y0 + rows.start, y0 + rows.stop), slice(x0 + cols.start, x0 + cols.stop)

    def arrange(self, crop: np.ndarray) -> np.ndarray:
        """A ``(..., h, w)`` source box (``source_region``) as the output region it maps to."""
        if self.transpose:
            crop = np.swapaxes(crop, -1, -2)
        if self.flip_y:
            crop = crop[..., ::-1, :]
        if self.flip_x:
            crop = crop[..., :, ::-1]
        return np.ascontiguousarray(crop)

    # -- interpolated maps -------------------------------------------------------------------

    def coordinates(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates ``(py, px)``, each ``(h, w)`` float64 in ``[0, H-1] x [0, W-1]``,
        of the output region ``rows x cols``."""
        h, w = self.shape
        iy = np.arange(rows.start, rows.stop)[:, None]
        ix = np.arange(cols.start, cols.stop)[None, :]
        qy = np.broadcast_to(iy.astype(np.float64), (len(iy), ix.shape[1]))
        qx = np.broadcast_to(ix.astype(np.float64), qy.shape)
        if self.field is not None:
            dy, dx = _displacement(self.field, iy, ix)
            qy, qx = qy + dy, qx + dx
        if self.angle:
            cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
            cos, sin = math.cos(self.angle), math.sin(self.angle)
            ry, rx = qy - cy, qx - cx
            qy, qx = (cos * ry - sin * rx) + cy, (sin * ry + cos * rx) + cx
        if self.flip_y:
            qy = (h - 1) - qy
        if self.flip_x:
            qx = (w - 1) - qx
        if self.transpose:
            qy, qx = qx, qy
        y0, x0, _, _ = self.crop
        return _reflect(qy + y0, self.source[0]), _reflect(qx + x0, self.source[1])


def _displacement(field: np.ndarray, iy: np.ndarray, ix: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The field bilinearly interpolated at integer pixels ``iy (h, 1)``, ``ix (1, w)``."""
    s = ELASTIC_SPACING
    ny, nx = iy // s, ix // s  # the node before, exact integers
    fy, fx = (iy - ny * s) / s, (ix - nx * s) / s  # (h, 1), (1, w) in [0, 1)
    out = []
    for d in field:  # (gy, gx)
        a, b = d[ny, nx], d[ny, nx + 1]
        c, e = d[ny + 1, nx], d[ny + 1, nx + 1]
        out.append((a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + e * fx) * fy)
    return out[0], out[1]


def _reflect(t: np.ndarray, n: int) -> np.ndarray:
    """``t`` reflected into ``[0, n-1]`` about the edge pixels' centres (reflect-101)."""
    if n == 1:
        return np.zeros_like(t)
    period = 2.0 * (n - 1)
    t = np.mod(np.abs(t), period)
    return np.where(t > n - 1, period - t, t)


def field_nodes(shape: tuple[int, int]) -> tuple[int, int]:
    """Nodes ``(gy, gx)`` of an elastic field covering an image of ``shape`` (one past the last
    pixel's cell on each axis)."""
    return ((shape[0] - 1) // ELASTIC_SPACING + 2, (shape[1] - 1) // ELASTIC_SPACING + 2)


def sample_bilinear(read, geometry: Geometry, rows: slice, cols: slice) -> np.ndarray:  # noqa: ANN001
    """The output region ``rows x cols`` of an interpolated map, as ``(N, C, h, w)`` float64:
    ``read(rows, cols)`` gives the source box (a numpy ``(N, C, bh, bw)`` array)."""
    py, px = geometry.coordinates(rows, cols)
    hgt, wid = geometry.source
    y0 = np.floor(py).astype(np.int64)
    x0 = np.floor(px).astype(np.int64)
    fy, fx = py - y0, px - x0
    y1, x1 = np.minimum(y0 + 1, hgt - 1), np.minimum(x0 + 1, wid - 1)
    top, left = int(y0.min()), int(x0.min())
    box = read(slice(top, int(y1.max()) + 1), slice(left, int(x1.max()) + 1))
    y0, y1, x0, x1 = y0 - top, y1 - top, x0 - left, x1 - left
    a, b = box[..., y0, x0], box[..., y0, x1]
    c, d = box[..., y1, x0], box[..., y1, x1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy
