"""Where an augmented pixel (or voxel) comes from: crop, flips and axis permutations (the
symmetries of the square or cube), rotation and elastic deformation, as maps of global
coordinates, for images (2 axes) and volumes (3).

Remaps (crop, flips, permutations) move whole pixels: the region an output crop needs is one
box of the source, read and rearranged, so a crop equals the same part of the whole augmented
image bit for bit.

Interpolated maps (rotation, elastic) give each output pixel (integer coordinates, pixel
centres) a continuous source coordinate, computed from its global coordinates alone in float64
with additions and multiplications in a fixed order (the rotation matrix is a per-image
constant), reflected into the source (``reflect-101``: ``-1 -> 1``) and interpolated
(bilinear, trilinear: the corners summed in a fixed order). A crop reads the bounding box of
its pixels' source coordinates (plus one pixel for the interpolation): the margin its inverse
map needs, found rather than bounded. The same coordinates and weights come out for a pixel in
any crop, so these are exact as well.

Order, from an output pixel back to the source: elastic displacement, rotation about the
augmented image's centre, the inverse symmetry (flips, then the permutation), the crop's offset.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ELASTIC_SPACING", "Geometry", "field_nodes", "sample"]

ELASTIC_SPACING = 64  # px between the nodes of the elastic displacement field


@dataclass(frozen=True, eq=False)
class Geometry:
    """One image's geometric augmentation, over its spatial axes.

    Attributes:
        source: spatial shape of the image read (after any scale jitter), px.
        start, size: the box of the source kept (the crop), px per source axis.
        perm: output axis ``i`` is source axis ``perm[i]`` (the identity: none; ``(1, 0)``:
            the transposition of an image).
        flips: per output axis, whether it is reversed (after the permutation).
        rotation: ``(n, n)`` matrix taking an output pixel's offset from the augmented image's
            centre to the offset it is read at (None: none).
        field: elastic displacements ``(n, *nodes)`` in px at nodes ``ELASTIC_SPACING`` apart
            over the augmented image (None: none).
    """

    source: tuple[int, ...]
    start: tuple[int, ...]
    size: tuple[int, ...]
    perm: tuple[int, ...]
    flips: tuple[bool, ...]
    rotation: np.ndarray | None = None
    field: np.ndarray | None = None

    @classmethod
    def whole(cls, source: Sequence[int]) -> Geometry:
        """The identity on an image of spatial shape ``source``."""
        n = len(source)
        return cls(tuple(source), (0,) * n, tuple(source), tuple(range(n)), (False,) * n)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial shape of the augmented image."""
        return tuple(self.size[a] for a in self.perm)

    @property
    def remap_only(self) -> bool:
        """Whether every output pixel is a source pixel (no interpolation)."""
        return self.rotation is None and self.field is None

    @property
    def identity(self) -> bool:
        return (self.remap_only and self.size == self.source and not any(self.flips)
                and self.perm == tuple(range(len(self.perm))))  # fmt: skip

    # -- remaps ------------------------------------------------------------------------------

    def source_region(self, region: Sequence[slice]) -> tuple[slice, ...]:
        """The source box an output region's pixels come from (remaps only)."""
        shape = self.shape
        flipped = [slice(n - s.stop, n - s.start) if f else s
                   for s, n, f in zip(region, shape, self.flips, strict=True)]  # fmt: skip
        box: list[slice] = [slice(0)] * len(shape)
        for i, axis in enumerate(self.perm):
            box[axis] = flipped[i]
        return tuple(slice(o + s.start, o + s.stop) for s, o in zip(box, self.start, strict=True))

    def arrange(self, box: np.ndarray) -> np.ndarray:
        """A ``(..., *spatial)`` source box (``source_region``) as the output region it maps
        to."""
        lead = box.ndim - len(self.perm)
        out = np.transpose(box, (*range(lead), *(lead + a for a in self.perm)))
        index = tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)
        return np.ascontiguousarray(out[(..., *index)])

    # -- interpolated maps -------------------------------------------------------------------

    def coordinates(self, region: Sequence[slice]) -> list[np.ndarray]:
        """Source coordinates, one float64 array per source axis (each the region's shape),
        within ``[0, source - 1]``, of the output region."""
        shape = self.shape
        n = len(shape)
        grids = [np.arange(s.start, s.stop).reshape([-1 if k == i else 1 for k in range(n)])
                 for i, s in enumerate(region)]  # fmt: skip
        full = tuple(s.stop - s.start for s in region)
        q = [np.broadcast_to(g.astype(np.float64), full) for g in grids]
        if self.field is not None:
            q = [qi + d for qi, d in zip(q, displacement(self.field, grids), strict=True)]
        if self.rotation is not None:
            centre = [(m - 1) / 2.0 for m in shape]
            offset = [qi - c for qi, c in zip(q, centre, strict=True)]
            rotated = []
            for i in range(n):  # fixed order: ((r0 o0 + r1 o1) + r2 o2) + c
                acc = self.rotation[i, 0] * offset[0]
                for k in range(1, n):
                    acc = acc + self.rotation[i, k] * offset[k]
                rotated.append(acc + centre[i])
            q = rotated
        q = [(m - 1) - qi if f else qi for qi, m, f in zip(q, shape, self.flips, strict=True)]
        out: list[np.ndarray] = [q[0]] * n
        for i, axis in enumerate(self.perm):
            out[axis] = q[i]
        return [_reflect(c + o, m) for c, o, m in zip(out, self.start, self.source, strict=True)]


def displacement(field: np.ndarray, grids: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The field ``(n, *nodes)`` interpolated (multilinear) at the integer pixels of ``grids``
    (one broadcastable array per axis)."""
    s = ELASTIC_SPACING
    nodes = [g // s for g in grids]  # the node before, exact integers
    fractions = [(g - k * s) / s for g, k in zip(grids, nodes, strict=True)]
    return [
        _multilinear(fractions, lambda corner, d=d: d[tuple(
            k + c for k, c in zip(nodes, corner, strict=True))])
        for d in field
    ]  # fmt: skip


def _multilinear(fractions: Sequence[np.ndarray],
                 at: Callable[[tuple[int, ...]], np.ndarray]) -> np.ndarray:  # fmt: skip
    """``sum over corners c of at(c) * prod_i (f_i if c_i else 1 - f_i)``: multilinear
    interpolation from the values ``at`` each corner of the cell (0: the node before, 1: the
    one after, per axis), with weights and sum in a fixed order (the same bits in any crop)."""
    acc = None
    for corner in itertools.product((0, 1), repeat=len(fractions)):
        weight = None
        for f, c in zip(fractions, corner, strict=True):
            w = f if c else 1 - f
            weight = w if weight is None else weight * w
        value = at(corner) * weight
        acc = value if acc is None else acc + value
    return acc


def _reflect(t: np.ndarray, n: int) -> np.ndarray:
    """``t`` reflected into ``[0, n-1]`` about the edge pixels' centres (reflect-101)."""
    if n == 1:
        return np.zeros_like(t)
    period = 2.0 * (n - 1)
    t = np.mod(np.abs(t), period)
    return np.where(t > n - 1, period - t, t)


def field_nodes(shape: Sequence[int]) -> tuple[int, ...]:
    """Nodes per axis of an elastic field covering an image of ``shape`` (one past the last
    pixel's cell on each axis)."""
    return tuple((m - 1) // ELASTIC_SPACING + 2 for m in shape)


def sample(read: Callable[[tuple[slice, ...]], np.ndarray], geometry: Geometry,
           region: Sequence[slice]) -> np.ndarray:  # fmt: skip
    """The output region of an interpolated map, ``(N, C, *region)`` float64: ``read(box)``
    gives the source box (a numpy ``(N, C, *box)`` array)."""
    coords = geometry.coordinates(region)
    lo = [np.floor(c).astype(np.int64) for c in coords]
    fractions = [c - k for c, k in zip(coords, lo, strict=True)]
    hi = [np.minimum(k + 1, m - 1) for k, m in zip(lo, geometry.source, strict=True)]
    origin = [int(k.min()) for k in lo]
    box = read(tuple(slice(o, int(h.max()) + 1) for o, h in zip(origin, hi, strict=True)))
    lo = [k - o for k, o in zip(lo, origin, strict=True)]
    hi = [h - o for h, o in zip(hi, origin, strict=True)]
    return _multilinear(fractions, lambda corner: box[(..., *(
        h if c else k for k, h, c in zip(lo, hi, corner, strict=True)))])  # fmt: skip
