"""Synthetic whole-slide images (tissue on glass) in the Aperio SVS and pyramidal TIFF layouts.

For demos, tests and benchmarks that need real slide files without shipping any: the content
is procedural, so a slide of any size is written tile by tile and never held in memory (a
32768 x 32768 SVS adds well under 200 MB to the writing process), with tifffile only.

**Content.** :class:`SyntheticSlide` renders any rectangle of any pyramid level from global
coordinates, deterministically from a seed:

- glass: near-white ``(241, 241, 243)`` with small pixel noise (low saturation);
- tissue: the union of 2-4 large ellipses with a wobbly outline (a smooth random field),
  grown or shrunk so that 25-45 % of the slide is tissue, pushed smoothly away from the
  edges and never within 3 % of the short side plus 24 px of them; coloured like H&E (pink
  eosin to purple haematoxylin, with dark purple nuclei-like blobs) plus stronger noise;
- with ``label`` 1 or 0, a few tiny bright **rings** (label 1) or same-area **discs**
  (label 0) inside the tissue, as in :mod:`tileplan.run.demo_data`: the classes only differ at
  full resolution (3-6 per slide plus one per 2 Mpx of tissue).

Every value is a function of ``(seed, global position)`` alone: smooth fields are cubic
B-splines over lattices of hashed values, pixel noise is read from a per-seed 512 x 512
Gaussian table at ``(row, column)`` modulo 512 (shifted per level), and every per-pixel sum is
taken in a fixed order. A region therefore renders identically (bit for bit) whichever tiles
it is split into, and a 256 x 256 tile takes about 2 ms (glass tiles less, tissue ones 3 ms).

**Pyramid levels** are rendered procedurally at their own resolution, not averaged from level
0: a pixel of a level of downsample ``ds`` is evaluated at its centre in level-0 coordinates,
texture finer than 3 level pixels (nuclei, then the finest octaves) is replaced by its mean,
pixel noise shrinks by ``ds`` (the average of ``ds * ds`` independent values), the tissue
edge is anti-aliased over one level pixel, and rings/discs are drawn with their area
preserved. This approximates area averaging of level 0 (the same colours and shapes, not the
same pixels: mean absolute difference from the pooled level 0 about 1.3 at ``ds`` 4 and 3 at
``ds`` 16) at a fraction of the cost.

**Level sizes.** Levels have downsamples ``1, 4, 16, ...`` and sizes ``floor(level0 / ds)``
(what Aperio scanners write: CMU-1.svs is 46000x32914, 11500x8228, 2875x2057), stopping after
the first level whose long side is under :data:`SMALLEST_LEVEL_SIDE` (1024) px. OpenSlide
reports each level's downsample as the mean of the two axes' ratios, so it is ``4`` only when
the sides divide; its ``read_region`` on a reduced level divides the level-0 position by that
downsample and resamples (interpolates) when the result is fractional.

**SVS layout** (:func:`write_svs`), as OpenSlide's ``aperio`` driver expects:

- page 0: level 0, tiled, JPEG; ImageDescription ``Aperio Image Library ...`` with
  ``|AppMag = 40|MPP = 0.25`` (``AppMag = 10 / mpp``); OpenSlide turns ``MPP`` into
  ``openslide.mpp-x``/``-y``. That is the only place the pixel size is stored: the
  resolution tags say 1 px per unit, ResolutionUnit NONE;
- page 1: the thumbnail, stripped JPEG, long side :data:`THUMBNAIL_SIDE` (OpenSlide's
  associated image ``thumbnail``);
- pages 2, 3, ...: the reduced levels, tiled JPEG.

JPEG is stored like Aperio's ``JPEG/RGB``: PhotometricInterpretation RGB, no colour transform
and no chroma subsampling (tifffile also writes a harmless ``YCbCrSubSampling = (1, 1)`` tag).
``ycbcr=True`` writes the more common YCbCr 4:2:0 JPEG instead (PhotometricInterpretation
YCbCr, about 3x smaller). Both decode to identical pixels in OpenSlide and tifffile (both use
libjpeg-turbo's exact integer IDCT).

**Pyramidal TIFF layout** (:func:`write_pyramidal_tiff`): page 0 is level 0, tiled, and the
reduced levels are its SubIFDs (NewSubfileType 1), tiled, which tifffile reads as
``series[0].levels``. The pixel size is in XResolution/YResolution with ResolutionUnit
CENTIMETER (``1e4 / mpp`` px per cm at level 0, scaled by each level's size ratio). OpenSlide
ignores SubIFDs and opens such a file as a single-level ``generic-tiff``.

:func:`write_demo_slides` writes a small dataset of such slides (mixed sizes and formats,
labels balanced) with ``train.csv``/``val.csv`` like :mod:`tileplan.run.demo_data`. Every file
is written to a temporary name and renamed into place, and the CSVs are written last.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import tifffile

from executor import atomic_write, atomic_write_path
from tileplan.run.demo_data import RING_WIDTH, DemoObject, _csv_text, _split

__all__ = [
    "DEFAULT_SIZES", "MIN_SIDE", "SMALLEST_LEVEL_SIDE", "THUMBNAIL_SIDE", "Level",
    "SyntheticSlide", "demo_slide_sizes", "pyramid_levels", "write_demo_slides",
    "write_pyramidal_tiff", "write_svs",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Smallest slide side accepted, px.
MIN_SIDE = 64
#: Automatic pyramids stop after the first level whose long side is under this, px.
SMALLEST_LEVEL_SIDE = 1024
#: Long side of the SVS thumbnail (page 1), px (smaller if the slide is smaller).
THUMBNAIL_SIDE = 1024
#: Default ``(height, width)`` of the slides of :func:`write_demo_slides` (about 30 Mpx).
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (3000, 4000), (2500, 2048), (2048, 3072), (1536, 2560), (3200, 2400), (1800, 1800),
)  # fmt: skip

_APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"
_LEVEL_FACTOR = 4
_FORMATS = {"svs": ".svs", "tiff": ".tif"}

# Colours (RGB) and pixel-noise standard deviations at level 0.
_GLASS_RGB = (241.0, 241.0, 243.0)
_EOSIN_RGB = (232.0, 156.0, 198.0)
_HAEMATOXYLIN_RGB = (160.0, 96.0, 176.0)
_NUCLEUS_RGB = (84.0, 44.0, 124.0)
_OBJECT_RGB = (246.0, 238.0, 246.0)  # as tileplan.run.demo_data
_COLOUR_JITTER = 8.0
_GLASS_NOISE = 2.0
_TISSUE_NOISE = 7.0

# Smooth fields: (lattice spacing in level-0 px, amplitude), plus one octave whose spacing is
# a fraction of the short side (large-scale variation on large slides).
_TEXTURE_OCTAVES = ((512.0, 0.6), (128.0, 0.45), (32.0, 0.3))
_SLIDE_OCTAVE = (0.15, 0.5)
_TEXTURE_GAIN = 1.6
_NUCLEUS_SPACING = 12.0
_DETAIL = 3.0  # octaves with a spacing under this many level px are replaced by their mean
_NOISE_PERIOD = 512  # px; pixel noise repeats with this period on each axis
_NUCLEUS_THRESHOLD = 0.36
_NUCLEUS_SLOPE = 8.0
_EDGE_WIDTH = 3.0  # level-0 px over which the tissue edge fades at full resolution

# Tissue shape, relative to the short side of the slide.
_N_BLOBS = (2, 4)
_BLOB_RADIUS = (0.14, 0.26)
_BLOB_ELONGATION = (1.0, 1.8)
_WOBBLE = ((0.2, 0.05), (0.05, 0.015))  # (spacing, amplitude) of the outline perturbation
_TISSUE_FRACTION = (0.25, 0.45)
_GLASS_FRAME = 0.03  # plus _GLASS_FRAME_PX
_GLASS_FRAME_PX = 24.0
_FRACTION_GRID = 96

# Rings/discs (see tileplan.run.demo_data): per slide 3-6, plus one per 2 Mpx of tissue.
_OUTER_RADIUS = (3.5, 6.0)
_N_OBJECTS = (3, 6)
_TISSUE_PX_PER_OBJECT = 2**21
_MAX_OBJECTS = 1024

# 64-bit hashing (splitmix64 finaliser).
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_M3 = 0xD6E8FEB86659FD93
_U64_GOLDEN, _U64_M1, _U64_M2, _U64_M3 = (np.uint64(v) for v in (_GOLDEN, _M1, _M2, _M3))

_T = TypeVar("_T")
_R = TypeVar("_R")


# --------------------------------------------------------------------------------------------
# Hashing and smooth fields
# --------------------------------------------------------------------------------------------


def _mix_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def _mix_array(z: np.ndarray) -> np.ndarray:
    """The same finaliser as :func:`_mix_int`, in place on a uint64 array (wraps mod 2**64)."""
    z ^= z >> np.uint64(30)
    z *= _U64_M1
    z ^= z >> np.uint64(27)
    z *= _U64_M2
    z ^= z >> np.uint64(31)
    return z


def _subkey(key: int, salt: int) -> int:
    return _mix_int(key ^ _mix_int(salt * _GOLDEN + 1))


def _hash(key: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """64-bit hash of ``(key, row, col)``; ``rows`` and ``cols`` broadcast (int64)."""
    hr = rows.astype(np.uint64) * _U64_GOLDEN
    hr ^= np.uint64(key)
    _mix_array(hr)
    z = hr ^ (cols.astype(np.uint64) * _U64_M3)
    return _mix_array(z)


def _uniform(z: np.ndarray) -> np.ndarray:
    """Hashes to float32 uniform in [-1, 1) (exactly: 24-bit fractions)."""
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)


def _bspline(u: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline weights of positions ``u`` on a lattice of ``spacing``.

    Returns ``(k, w)``: the first of the four lattice nodes each position depends on (int64,
    the nodes are ``k .. k + 3``) and their weights, float64 ``(4,) + u.shape``.
    """
    p = u / spacing
    base = np.floor(p)
    f = p - base
    f2 = f * f
    f3 = f2 * f
    g = 1.0 - f
    w = np.stack([g * g * g, 3.0 * f3 - 6.0 * f2 + 4.0, -3.0 * f3 + 3.0 * f2 + 3.0 * f + 1.0, f3])
    w /= 6.0
    return base.astype(np.int64) - 1, w


def _spline_grid(
    values: np.ndarray,
    origin: tuple[int, int],
    ky: tuple[np.ndarray, np.ndarray],
    kx: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Separable B-spline of lattice ``values`` ``(C, ny, nx)`` on a grid of positions.

    ``origin`` is the lattice index of ``values[:, 0, 0]``; ``ky``/``kx`` come from
    :func:`_bspline` for the rows and columns. Each output value is the same fixed-order sum
    of the same products whatever the grid, so results do not depend on how a region is cut.
    """
    (by, wy), (bx, wx) = ky, kx
    cols = bx - origin[1]
    wx = wx.astype(values.dtype)
    rows_pass = wx[0] * values[:, :, cols]
    for b in range(1, 4):
        rows_pass += wx[b] * values[:, :, cols + b]
    rows = by - origin[0]
    wy = wy.astype(values.dtype)[:, :, None]
    out = wy[0] * rows_pass[:, rows]
    for a in range(1, 4):
        out += wy[a] * rows_pass[:, rows + a]
    return out


def _octave_grid(key: int, uy: np.ndarray, ux: np.ndarray, spacing: float) -> np.ndarray:
    """Value noise (B-spline of hashed lattice values in [-1, 1)) on the grid ``uy x ux``."""
    ky, kx = _bspline(uy, spacing), _bspline(ux, spacing)
    y0, x0 = int(ky[0].min()), int(kx[0].min())
    lat_rows = np.arange(y0, int(ky[0].max()) + 4, dtype=np.int64)
    lat_cols = np.arange(x0, int(kx[0].max()) + 4, dtype=np.int64)
    lattice = _uniform(_hash(key, lat_rows[:, None], lat_cols[None, :])).astype(np.float64)
    return _spline_grid(lattice[None], (y0, x0), ky, kx)[0]


def _octave_points(key: int, uy: np.ndarray, ux: np.ndarray, spacing: float) -> np.ndarray:
    """:func:`_octave_grid` at scattered points (equal up to rounding)."""
    (by, wy), (bx, wx) = _bspline(uy, spacing), _bspline(ux, spacing)
    out = np.zeros(np.broadcast_shapes(uy.shape, ux.shape))
    for a in range(4):
        for b in range(4):
            out += wy[a] * wx[b] * _uniform(_hash(key, by + a, bx + b))
    return out


@lru_cache(maxsize=1)
def _mean_nucleus_alpha() -> float:
    """Mean of the nucleus mask before texture weighting (used where nuclei are sub-pixel)."""
    n = 512
    u = np.arange(n, dtype=np.float64) + 0.5
    ky = kx = _bspline(u, _NUCLEUS_SPACING)
    nodes = np.arange(int(ky[0].min()), int(ky[0].max()) + 4, dtype=np.int64)
    lattice = _uniform(_hash(12345, nodes[:, None], nodes[None, :]))
    field_ = _spline_grid(lattice[None], (int(nodes[0]), int(nodes[0])), ky, kx)[0]
    return float(np.clip((field_ - _NUCLEUS_THRESHOLD) * _NUCLEUS_SLOPE, 0.0, 1.0).mean())


# --------------------------------------------------------------------------------------------
# The slide
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    """An ellipse of tissue: centre, semi-axes ``a`` (along angle) and ``b``, and rotation."""

    cy: float
    cx: float
    a: float
    b: float
    cos: float
    sin: float

    @property
    def scale(self) -> float:
        """Converts ``rho - 1`` (normalised radius) to about px near the outline."""
        return math.sqrt(self.a * self.b)


@dataclass(frozen=True)
class SyntheticSlide:
    """A procedural slide: tissue on glass, rendered on demand from global coordinates.

    Attributes:
        height: level-0 rows.
        width: level-0 columns.
        seed: non-negative random seed; everything is a function of it.
        label: 1 to draw rings, 0 to draw same-area discs, None to draw neither.
        objects: the rings or discs (level-0 px), all inside tissue.
        tissue_target: fraction of the slide the tissue was sized to cover (the real fraction
            is within a few percent of it).
    """

    height: int
    width: int
    seed: int = 0
    label: int | None = 0
    objects: tuple[DemoObject, ...] = field(init=False, repr=False)
    tissue_target: float = field(init=False)
    _blobs: tuple[_Blob, ...] = field(init=False, repr=False)
    _wobble: tuple[tuple[int, float, float], ...] = field(init=False, repr=False)
    _octaves: tuple[tuple[int, float, float], ...] = field(init=False, repr=False)
    _offset: float = field(init=False, repr=False)
    _frame: float = field(init=False, repr=False)
    _key: int = field(init=False, repr=False)
    _palette: np.ndarray = field(init=False, repr=False, compare=False)
    _object_arrays: np.ndarray = field(init=False, repr=False, compare=False)
    _noise: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_side("height", self.height)
        _check_side("width", self.width)
        _check_seed(self.seed)
        if self.label not in (0, 1, None) or isinstance(self.label, bool):
            raise ValueError(f"label must be 0, 1 or None, got {self.label!r}")
        shape_seq, colour_seq, object_seq, noise_seq = np.random.SeedSequence(self.seed).spawn(4)
        rng = np.random.default_rng(shape_seq)
        short = float(min(self.height, self.width))
        blobs = []
        for _ in range(int(rng.integers(_N_BLOBS[0], _N_BLOBS[1] + 1))):
            cy, cx = rng.uniform(0.3, 0.7, size=2) * (self.height, self.width)
            radius = float(rng.uniform(*_BLOB_RADIUS)) * short
            angle = float(rng.uniform(0.0, math.pi))
            a = radius * float(rng.uniform(*_BLOB_ELONGATION))
            blobs.append(_Blob(float(cy), float(cx), a, radius, math.cos(angle), math.sin(angle)))
        key = _mix_int(self.seed * _GOLDEN + 0x5EED)
        wobble = tuple(
            (_subkey(key, 100 + i), sp * short, amp * short) for i, (sp, amp) in enumerate(_WOBBLE)
        )
        octaves = ((_SLIDE_OCTAVE[0] * short, _SLIDE_OCTAVE[1]), *_TEXTURE_OCTAVES)
        set_ = object.__setattr__
        set_(self, "_octaves", tuple((_subkey(key, i), s, a) for i, (s, a) in enumerate(octaves)))
        set_(self, "_blobs", tuple(blobs))
        set_(self, "_wobble", wobble)
        set_(self, "_key", key)
        set_(self, "_frame", _GLASS_FRAME * short + _GLASS_FRAME_PX)
        set_(self, "_offset", 0.0)
        target = float(rng.uniform(*_TISSUE_FRACTION))
        set_(self, "tissue_target", target)
        set_(self, "_offset", self._fraction_offset(target))
        jitter = np.random.default_rng(colour_seq).uniform(-1.0, 1.0, size=(5, 3))
        base = np.array(
            [_GLASS_RGB, _EOSIN_RGB, _HAEMATOXYLIN_RGB, _NUCLEUS_RGB, _OBJECT_RGB], np.float32
        )
        jitter[0] *= 0.25  # glass stays near-white and grey
        jitter[4] = 0.0
        set_(self, "_palette", (base + _COLOUR_JITTER * jitter).astype(np.float32))
        noise_shape = (3, _NOISE_PERIOD, _NOISE_PERIOD)
        noise = np.random.default_rng(noise_seq).standard_normal(noise_shape, dtype=np.float32)
        set_(self, "_noise", noise)
        objects = self._place_objects(np.random.default_rng(object_seq))
        set_(self, "objects", objects)
        arrays = np.array([(o.y, o.x, o.radius, o.ring) for o in objects], dtype=np.float64)
        set_(self, "_object_arrays", arrays.reshape(-1, 4))

    # -- geometry ---------------------------------------------------------------------------

    def _distance(
        self, uy: np.ndarray, ux: np.ndarray, *, grid: bool, raw: bool = False
    ) -> np.ndarray:
        """About the signed distance (px) to the tissue outline, negative inside.

        ``uy`` and ``ux`` are level-0 positions: a grid (``(n, 1)`` and ``(1, m)``, with
        ``grid=True``) or scattered points of one shape. ``raw`` leaves out the offset and
        the glass frame.
        """
        d = np.full(np.broadcast_shapes(uy.shape, ux.shape), np.inf)
        for e in self._blobs:
            dy, dx = uy - e.cy, ux - e.cx
            p = dy * e.cos + dx * e.sin
            q = dx * e.cos - dy * e.sin
            p /= e.a
            q /= e.b
            rho = np.sqrt(p * p + q * q)
            np.minimum(d, (rho - 1.0) * e.scale, out=d)
        for key, spacing, amplitude in self._wobble:
            if grid:
                noise = _octave_grid(key, uy[:, 0], ux[0], spacing)
            else:
                noise = _octave_points(key, uy, ux, spacing)
            d += amplitude * noise
        if raw:
            return d
        d -= self._offset
        border = np.minimum(np.minimum(uy, self.height - uy), np.minimum(ux, self.width - ux))
        # Push the outline away from the edges smoothly (rounded, not cut straight), and
        # keep the frame glass whatever the wobble.
        push = np.maximum(2.0 * self._frame - border, 0.0)
        d += push * push / self._frame
        return np.maximum(d, self._frame - border)

    def _fraction_offset(self, target: float) -> float:
        """The shift of the outline that makes ``target`` of the slide tissue (on a grid)."""
        n = _FRACTION_GRID
        uy = (np.arange(n) + 0.5) * (self.height / n)
        ux = (np.arange(n) + 0.5) * (self.width / n)
        d = self._distance(uy[:, None], ux[None, :], grid=True, raw=True)
        border = np.minimum(np.minimum(uy, self.height - uy)[:, None],
                            np.minimum(ux, self.width - ux)[None, :])  # fmt: skip
        push = np.maximum(2.0 * self._frame - border, 0.0)
        d += push * push / self._frame
        d[border <= self._frame] = np.inf  # the frame stays glass whatever the offset
        ordered = np.sort(d.ravel())
        return float(ordered[min(len(ordered) - 1, int(target * len(ordered)))])

    def _place_objects(self, rng: np.random.Generator) -> tuple[DemoObject, ...]:
        if self.label is None:
            return ()
        tissue_px = self.tissue_target * self.height * self.width
        count = int(rng.integers(_N_OBJECTS[0], _N_OBJECTS[1] + 1))
        count = min(_MAX_OBJECTS, count + int(tissue_px // _TISSUE_PX_PER_OBJECT))
        margin = _OUTER_RADIUS[1] + 3.0
        cand = rng.uniform(
            (margin, margin), (self.height - margin, self.width - margin), size=(64 * count, 2)
        )
        outer = rng.uniform(*_OUTER_RADIUS, size=len(cand))
        d = self._distance(cand[:, 0], cand[:, 1], grid=False)
        inside = d < -(outer + 2.0 * _NUCLEUS_SPACING)
        min_dist = 4.0 * _OUTER_RADIUS[1]
        chosen: list[int] = []
        for i in np.flatnonzero(inside):
            if len(chosen) == count:
                break
            if chosen:
                gap = cand[chosen] - cand[i]
                if float(np.min(np.einsum("ij,ij->i", gap, gap))) < min_dist**2:
                    continue
            chosen.append(int(i))
        ring = self.label == 1
        objects = []
        for i in chosen:
            radius = float(outer[i]) if ring else _disc_radius(float(outer[i]))
            objects.append(DemoObject(float(cand[i, 0]), float(cand[i, 1]), radius, ring))
        return tuple(objects)

    # -- rendering --------------------------------------------------------------------------

    def _fields(
        self, y: int, x: int, h: int, w: int, ds: float
    ) -> tuple[np.ndarray | float, np.ndarray | None, np.ndarray | None]:
        """``(tissue alpha, texture, nucleus alpha)`` of a region, float32 ``(h, w)`` each.

        Shortcuts with identical results: alpha is the float 0.0 (and texture and nuclei
        None) where every lattice node is glass, 1.0 where every node is tissue; nucleus is
        None where nuclei are finer than the level shows.
        """
        kept = [octave for octave in self._octaves if octave[1] >= _DETAIL * ds]
        nuclei = _DETAIL * ds <= _NUCLEUS_SPACING
        # Node spacing: the nucleus lattice itself where nuclei show, else two level px (so
        # the interpolation blurs about as much as area averaging would).
        spacing = max(_NUCLEUS_SPACING, 2.0 * ds)
        ky = _bspline((np.arange(y, y + h, dtype=np.float64) + 0.5) * ds, spacing)
        kx = _bspline((np.arange(x, x + w, dtype=np.float64) + 0.5) * ds, spacing)
        y0, x0 = int(ky[0][0]), int(kx[0][0])
        node_rows = np.arange(y0, int(ky[0][-1]) + 4, dtype=np.int64)
        node_cols = np.arange(x0, int(kx[0][-1]) + 4, dtype=np.int64)
        vy, vx = (node_rows * spacing)[:, None], (node_cols * spacing)[None, :]
        distance = self._distance(vy, vx, grid=True)
        edge = max(ds, _EDGE_WIDTH)
        # A B-spline is a convex combination of its nodes: bounds on the nodes bound the pixels.
        if float(distance.min()) >= 0.5 * edge:
            return 0.0, None, None
        solid = float(distance.max()) <= -0.5 * edge
        channels = [] if solid else [distance]
        texture = np.zeros(distance.shape)
        for key, octave_spacing, amplitude in kept:
            texture += amplitude * _octave_grid(key, vy[:, 0], vx[0], octave_spacing)
        texture *= _TEXTURE_GAIN
        texture += 0.5
        channels.append(np.clip(texture, 0.0, 1.0))
        if nuclei:
            key = _subkey(self._key, 50)
            channels.append(_uniform(_hash(key, node_rows[:, None], node_cols[None, :])))
        out = _spline_grid(np.stack(channels).astype(np.float32), (y0, x0), ky, kx)
        alpha: np.ndarray | float = 1.0
        if not solid:
            alpha = np.clip(np.float32(0.5) - out[0] / np.float32(edge), 0.0, 1.0)
        nucleus = None
        if nuclei:
            nucleus = np.clip((out[-1] - _NUCLEUS_THRESHOLD) * _NUCLEUS_SLOPE, 0.0, 1.0)
        return alpha, out[0 if solid else 1], nucleus

    def tissue_alpha(
        self, y: int, x: int, height: int, width: int, downsample: float = 1.0
    ) -> np.ndarray:
        """Tissue coverage in [0, 1] of a region (float32 ``(height, width)``).

        Coordinates are pixels of the level of ``downsample`` (see :meth:`render`).
        """
        _check_region(y, x, height, width, downsample)
        alpha = self._fields(y, x, height, width, float(downsample))[0]
        return np.broadcast_to(np.float32(alpha), (height, width)).copy()

    def render(
        self, y: int, x: int, height: int, width: int, downsample: float = 1.0
    ) -> np.ndarray:
        """RGB uint8 ``(height, width, 3)`` of a region of a pyramid level.

        Args:
            y: first row, in pixels of the level (level-0 position ``y * downsample``).
            x: first column, likewise.
            height: rows; the region may extend past the slide (more glass).
            width: columns.
            downsample: the level's downsample (>= 1, need not be an integer).

        Returns:
            The pixels; the same for a region however it is split into sub-regions.
        """
        _check_region(y, x, height, width, downsample)
        ds = float(downsample)
        alpha, texture, nucleus = self._fields(y, x, height, width, ds)
        # Channel-first planes: numpy broadcasts (3, H, W) with (H, W) much faster than
        # (H, W, 3) with (H, W, 1).
        glass, eosin, haem, nuc, obj = self._palette[:, :, None, None]
        if texture is None:  # all glass: what the general case gives with alpha = 0
            colour = np.repeat(glass, height, axis=1).repeat(width, axis=2)
        else:
            colour = texture * (haem - eosin)
            colour += eosin
            weight = np.float32(0.3) + np.float32(0.7) * texture
            weight *= nucleus if nucleus is not None else np.float32(_mean_nucleus_alpha())
            shade = nuc - colour
            shade *= weight
            colour += shade
            colour -= glass
            colour *= alpha
            colour += glass
            self._draw_objects(colour, y, x, ds, obj)
        noise = self._noise_block(ds, y, x, height, width)
        std = np.float32(alpha) * np.float32((_TISSUE_NOISE - _GLASS_NOISE) / ds)
        std += np.float32(_GLASS_NOISE / ds)
        noise *= std
        colour += noise
        np.clip(colour, 0.0, 255.0, out=colour)
        colour += np.float32(0.5)  # round half up on the cast below
        planes = colour.astype(np.uint8)
        return np.stack([planes[0], planes[1], planes[2]], axis=-1)

    def _noise_block(self, ds: float, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Unit Gaussian noise ``(3, h, w)`` of a level: the periodic table, shifted per level."""
        key = _subkey(self._key, 1000 + _level_salt(ds))
        period = _NOISE_PERIOD
        y, x = (y + key % period) % period, (x + (key >> 32) % period) % period
        out = np.empty((3, h, w), dtype=np.float32)
        r = 0
        while r < h:
            rows = min(h - r, period - (y + r) % period)
            c = 0
            while c < w:
                cols = min(w - c, period - (x + c) % period)
                ty, tx = (y + r) % period, (x + c) % period
                out[:, r : r + rows, c : c + cols] = self._noise[:, ty : ty + rows, tx : tx + cols]
                c += cols
            r += rows
        return out

    def _draw_objects(self, image: np.ndarray, y: int, x: int, ds: float, rgb: np.ndarray) -> None:
        arrays = self._object_arrays
        if not len(arrays):
            return
        h, w = image.shape[1:]
        reach = arrays[:, 2] / ds + 3.0
        cy, cx = arrays[:, 0] / ds, arrays[:, 1] / ds
        hit = (cy + reach > y) & (cy - reach < y + h) & (cx + reach > x) & (cx - reach < x + w)
        for i in np.flatnonzero(hit):
            rows, cols, alpha = _object_alpha(self.objects[i], ds)
            r0, r1 = max(rows.start, y), min(rows.stop, y + h)
            c0, c1 = max(cols.start, x), min(cols.stop, x + w)
            if r0 >= r1 or c0 >= c1:
                continue
            a = alpha[r0 - rows.start : r1 - rows.start, c0 - cols.start : c1 - cols.start]
            patch = image[:, r0 - y : r1 - y, c0 - x : c1 - x]
            patch += a * (rgb - patch)


def _disc_radius(outer: float) -> float:
    """Radius of the disc with the same area as a ring of this outer radius."""
    inner = outer - RING_WIDTH
    return math.sqrt(outer * outer - inner * inner)


def _coverage(dist: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased fraction of each pixel inside a circle of ``radius``."""
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


def _object_alpha(obj: DemoObject, ds: float) -> tuple[slice, slice, np.ndarray]:
    """Alpha of a ring or disc on the grid of a level: ``(rows, cols, alpha)``, level px.

    At level 0 this is :func:`tileplan.run.demo_data.render_object`; on reduced levels the
    shape is drawn at its scaled size and its total alpha rescaled to the true area, so that a
    ring and its same-area disc carry the same mass at every level.
    """
    cy, cx, r = obj.y / ds, obj.x / ds, obj.radius / ds
    y0, y1 = math.floor(cy - r - 2), math.floor(cy + r + 3)
    x0, x1 = math.floor(cx - r - 2), math.floor(cx + r + 3)
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    dist = np.sqrt(yy * yy + xx * xx)
    alpha = _coverage(dist, r)
    if obj.ring:
        alpha = alpha - _coverage(dist, r - RING_WIDTH / ds)
    if ds != 1.0:
        area = math.pi * r * r
        if obj.ring:
            inner = r - RING_WIDTH / ds
            area -= math.pi * inner * inner
        alpha = np.clip(alpha * np.float32(area / max(float(alpha.sum()), 1e-6)), 0.0, 1.0)
    return slice(y0, y1), slice(x0, x1), alpha.astype(np.float32)


def _level_salt(ds: float) -> int:
    return int(np.float64(ds).view(np.uint64))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_side(name: str, value: object) -> None:
    if not _is_int(value) or int(value) < MIN_SIDE:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be an integer of at least {MIN_SIDE} px, got {value!r}")


def _check_seed(seed: object) -> None:
    if not _is_int(seed) or int(seed) < 0:  # type: ignore[call-overload]
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_region(y: int, x: int, height: int, width: int, downsample: float) -> None:
    if not all(_is_int(v) for v in (y, x, height, width)) or height < 1 or width < 1:
        raise ValueError(f"region must be integers with positive size, got {(y, x, height, width)}")
    number = isinstance(downsample, (int, float, np.integer, np.floating))
    if isinstance(downsample, bool) or not (number and math.isfinite(downsample)):
        raise ValueError(f"downsample must be a finite number >= 1, got {downsample!r}")
    if downsample < 1:
        raise ValueError(f"downsample must be a finite number >= 1, got {downsample!r}")


def _check_mpp(mpp: object) -> float:
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)):
        raise ValueError(f"mpp must be a positive number (micrometres per pixel), got {mpp!r}")
    if not (math.isfinite(mpp) and 0.0 < mpp <= 1000.0):
        raise ValueError(f"mpp must be in (0, 1000] micrometres per pixel, got {mpp!r}")
    return float(mpp)


def _check_tile(tile: object) -> int:
    if not _is_int(tile) or not 16 <= tile <= 4096 or tile % 16:  # type: ignore[operator]
        raise ValueError(f"tile must be a multiple of 16 between 16 and 4096, got {tile!r}")
    return int(tile)  # type: ignore[call-overload]


def _check_quality(quality: object) -> int:
    if not _is_int(quality) or not 1 <= int(quality) <= 100:  # type: ignore[call-overload]
        raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}")
    return int(quality)  # type: ignore[call-overload]


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return min(4, os.cpu_count() or 1)
    if not _is_int(workers) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return int(workers)


# --------------------------------------------------------------------------------------------
# Pyramid geometry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One pyramid level: integer ``downsample`` and its size ``floor(level0 / downsample)``."""

    downsample: int
    height: int
    width: int


def pyramid_levels(
    height: int, width: int, downsamples: Sequence[int] | None = None
) -> tuple[Level, ...]:
    """The levels written for a slide of ``height x width``.

    Args:
        height: level-0 rows.
        width: level-0 columns.
        downsamples: explicit increasing integer downsamples starting with 1; by default
            ``1, 4, 16, ...`` up to and including the first level whose long side is under
            :data:`SMALLEST_LEVEL_SIDE` (and while both sides stay at least 1 px).

    Raises:
        ValueError: for bad sizes or downsamples.
    """
    _check_side("height", height)
    _check_side("width", width)
    if downsamples is None:
        found = [1]
        while max(height, width) // found[-1] >= SMALLEST_LEVEL_SIDE:
            nxt = found[-1] * _LEVEL_FACTOR
            if min(height, width) // nxt < 1:
                break
            found.append(nxt)
        downsamples = found
    ds = list(downsamples)
    if not ds or ds[0] != 1 or not all(_is_int(v) for v in ds):
        raise ValueError(f"downsamples must be integers starting with 1, got {downsamples!r}")
    if any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"downsamples must be strictly increasing, got {downsamples!r}")
    if min(height, width) // ds[-1] < 1:
        raise ValueError(f"downsample {ds[-1]} leaves an empty level of a {height}x{width} slide")
    return tuple(Level(int(d), height // int(d), width // int(d)) for d in ds)


def _thumbnail_shape(height: int, width: int) -> tuple[float, int, int]:
    ds = max(1.0, max(height, width) / THUMBNAIL_SIDE)
    return ds, max(1, round(height / ds)), max(1, round(width / ds))


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map(fn, items)`` on ``workers`` threads, in order, at most ``2 * workers`` ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="demo-slides") as pool:
        pending: deque[Future[_R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _tiles(slide: SyntheticSlide, level: Level, tile: int, workers: int) -> Iterator[np.ndarray]:
    """Full ``tile x tile`` tiles of a level in row-major order (edge tiles run past it)."""
    ds = float(level.downsample)
    origins = ((y, x) for y in range(0, level.height, tile) for x in range(0, level.width, tile))
    return _ordered_map(lambda o: slide.render(o[0], o[1], tile, tile, ds), origins, workers)


def _codec(compression: str, quality: int, ycbcr: bool) -> dict[str, object]:
    """tifffile keyword arguments for the compression (and photometric) of RGB data."""
    if compression == "jpeg":
        # tifffile's default for RGB input is YCbCr 4:2:0; Aperio stores RGB, unsubsampled.
        args: dict[str, object] = {"level": quality}
        if not ycbcr:
            args["outcolorspace"] = "rgb"
        return {"compression": "jpeg", "compressionargs": args, "photometric": "rgb",
                "subsampling": (2, 2) if ycbcr else (1, 1)}  # fmt: skip
    if compression == "zlib":
        return {"compression": "zlib", "compressionargs": {"level": 1}, "photometric": "rgb"}
    return {"compression": None, "photometric": "rgb"}


def _needs_bigtiff(levels: Sequence[Level], extra_px: int = 0) -> bool:
    raw = 3 * (extra_px + sum(lv.height * lv.width for lv in levels))
    return raw > 2**32 - 2**25


def _write_level(
    tw: tifffile.TiffWriter,
    slide: SyntheticSlide,
    level: Level,
    tile: int,
    workers: int,
    codec: dict[str, object],
    **kwargs: object,
) -> None:
    tw.write(
        _tiles(slide, level, tile, workers),
        shape=(level.height, level.width, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        metadata=None,
        software=False,
        maxworkers=workers,
        buffersize=tile * tile * 3 * 4 * workers,
        **codec,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def _check_common(
    height: int, width: int, mpp: float, seed: int, tile: int, quality: int
) -> tuple[float, int, int]:
    _check_side("height", height)
    _check_side("width", width)
    _check_seed(seed)
    return _check_mpp(mpp), _check_tile(tile), _check_quality(quality)


def write_svs(
    path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    mpp: float = 0.25,
    seed: int = 0,
    label: int | None = 0,
    tile: int = 256,
    quality: int = 90,
    downsamples: Sequence[int] | None = None,
    ycbcr: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic slide as an Aperio SVS file (OpenSlide vendor ``aperio``).

    Args:
        path: the file to write (replaced atomically if it exists).
        height: level-0 rows (at least :data:`MIN_SIDE`).
        width: level-0 columns.
        mpp: micrometres per level-0 pixel; written as ``MPP`` (and ``AppMag = 10 / mpp``) in
            the ImageDescription.
        seed: content seed; the same arguments give the same bytes.
        label: 1 (rings), 0 (discs) or None (neither); see :class:`SyntheticSlide`.
        tile: tile side, a multiple of 16.
        quality: JPEG quality, 1-100.
        downsamples: level downsamples (default ``1, 4, 16, ...``; see
            :func:`pyramid_levels`).
        ycbcr: store YCbCr 4:2:0 JPEG instead of Aperio's RGB JPEG (about 3x smaller).
        workers: threads rendering and encoding tiles (default: up to 4 CPUs).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for bad arguments.
    """
    mpp, tile, quality = _check_common(height, width, mpp, seed, tile, quality)
    workers = _check_workers(workers)
    levels = pyramid_levels(height, width, downsamples)
    slide = SyntheticSlide(height, width, seed=seed, label=label)
    codec = _codec("jpeg", quality, ycbcr)
    thumb_ds, thumb_h, thumb_w = _thumbnail_shape(height, width)
    space = "YCbCr" if ycbcr else "RGB"
    geometry = f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    description = (
        f"{_APERIO_HEADER}{geometry} JPEG/{space} Q={quality}"
        f"|AppMag = {10.0 / mpp:.10g}|MPP = {mpp:.10g}|ImageID = synthetic-{seed}"
    )

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(levels, thumb_h * thumb_w)) as tw:
            _write_level(tw, slide, levels[0], tile, workers, codec, description=description)
            thumbnail = slide.render(0, 0, thumb_h, thumb_w, thumb_ds)
            tw.write(
                thumbnail,
                rowsperstrip=64,
                description=f"{_APERIO_HEADER}{width}x{height} -> {thumb_w}x{thumb_h} - ",
                metadata=None,
                software=False,
                **codec,  # type: ignore[arg-type]
            )
            for level in levels[1:]:
                text = f"{_APERIO_HEADER}{geometry} -> {level.width}x{level.height} JPEG/{space}"
                _write_level(
                    tw, slide, level, tile, workers, codec, description=f"{text} Q={quality}"
                )

    start = time.perf_counter()
    out = atomic_write_path(path, write)
    log.debug(
        "wrote %s: %dx%d SVS, %d levels, %.1f s",
        out, width, height, len(levels), time.perf_counter() - start,
    )  # fmt: skip
    return out


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    mpp: float = 0.5,
    seed: int = 0,
    label: int | None = 0,
    tile: int = 256,
    compression: Literal["jpeg", "zlib", "none"] = "jpeg",
    quality: int = 90,
    downsamples: Sequence[int] | None = None,
    ycbcr: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic slide as a tiled pyramidal TIFF (reduced levels in SubIFDs).

    Args:
        path: the file to write (replaced atomically if it exists).
        height: level-0 rows (at least :data:`MIN_SIDE`).
        width: level-0 columns.
        mpp: micrometres per level-0 pixel, stored as X/YResolution in px per centimetre.
        seed: content seed; the same arguments give the same bytes.
        label: 1 (rings), 0 (discs) or None (neither).
        tile: tile side, a multiple of 16.
        compression: ``"jpeg"`` (RGB JPEG, or YCbCr with ``ycbcr``), ``"zlib"`` (deflate
            level 1) or ``"none"``.
        quality: JPEG quality, 1-100 (ignored otherwise).
        downsamples: level downsamples (default ``1, 4, 16, ...``).
        ycbcr: with JPEG, store YCbCr 4:2:0 instead of RGB.
        workers: threads rendering and encoding tiles (default: up to 4 CPUs).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for bad arguments.
    """
    mpp, tile, quality = _check_common(height, width, mpp, seed, tile, quality)
    if compression not in ("jpeg", "zlib", "none"):
        raise ValueError(f"compression must be 'jpeg', 'zlib' or 'none', got {compression!r}")
    workers = _check_workers(workers)
    levels = pyramid_levels(height, width, downsamples)
    slide = SyntheticSlide(height, width, seed=seed, label=label)
    codec = _codec(compression, quality, ycbcr)
    px_per_cm = 1e4 / mpp

    def resolution(level: Level) -> tuple[float, float]:
        return (px_per_cm * level.width / width, px_per_cm * level.height / height)

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(levels)) as tw:
            _write_level(
                tw, slide, levels[0], tile, workers, codec,
                subifds=len(levels) - 1, resolution=resolution(levels[0]),
                resolutionunit="CENTIMETER",
            )  # fmt: skip
            for level in levels[1:]:
                _write_level(
                    tw, slide, level, tile, workers, codec,
                    subfiletype=1, resolution=resolution(level), resolutionunit="CENTIMETER",
                )  # fmt: skip

    start = time.perf_counter()
    out = atomic_write_path(path, write)
    log.debug(
        "wrote %s: %dx%d pyramidal TIFF, %d levels, %.1f s",
        out, width, height, len(levels), time.perf_counter() - start,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# A demo dataset
# --------------------------------------------------------------------------------------------


def _check_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(s) for s in sizes]
    except TypeError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"sizes must be a non-empty sequence of (height, width), got {sizes!r}")
    for h, w in pairs:
        _check_side("height", h)
        _check_side("width", w)
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"sizes must be distinct, got {sizes!r}")
    return [(int(h), int(w)) for h, w in pairs]


def _slide_sizes(pairs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``n`` distinct sizes: ``pairs`` in turn, grown by 32 px per round (and past clashes)."""
    used: set[tuple[int, int]] = set()
    out = []
    for i in range(n):
        grow = 32 * (i // len(pairs))
        h, w = pairs[i % len(pairs)]
        while (h + grow, w + grow) in used:
            grow += 32
        used.add((h + grow, w + grow))
        out.append((h + grow, w + grow))
    return out


def demo_slide_sizes(n: int, largest: int) -> list[tuple[int, int]]:
    """``n`` distinct slide sizes ``(H, W)`` from about half of ``largest`` up to ``largest``
    per side, portrait and landscape (what ``tileplan demo-data --slides --size`` writes).

    The first is ``largest x (3/4 largest)``; the others step down evenly, alternating in
    orientation, so the plan for the set is ``largest`` on one axis.

    Raises:
        ValueError: ``largest`` too small for ``n`` distinct sizes of at least MIN_SIDE.
    """
    if n < 1 or largest // 2 < MIN_SIDE:
        raise ValueError(f"--size {largest} is too small for slides; use at least {4 * MIN_SIDE}")
    sizes = []
    for i in range(n):
        long = largest - (largest // 2) * i // max(1, n - 1)  # largest down to about half
        short = max(MIN_SIDE, 3 * long // 4)
        sizes.append((long, short) if i % 2 == 0 else (short, long))
    if len(set(sizes)) != n:
        raise ValueError(f"--size {largest} is too small for {n} distinct slides; use a larger one")
    return sizes


def write_demo_slides(
    out_dir: str | os.PathLike[str],
    *,
    n: int = 6,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    mpp: float = 0.25,
    seed: int = 0,
    formats: Sequence[Literal["svs", "tiff"]] = ("svs", "tiff"),
    quality: int = 90,
    workers: int | None = None,
) -> Path:
    """Write ``n`` synthetic slides of different sizes plus ``train.csv`` and ``val.csv``.

    Slide ``i`` is ``slide_{i:03d}.svs`` or ``.tif`` (``formats`` taken in turn), of size
    ``sizes[i % len(sizes)]`` grown by ``32 * (i // len(sizes))`` px per side (and by 32 more
    while it equals an earlier one, so all sizes differ). Half the slides (rounded down) are
    label 1 (rings), the rest label 0 (discs). The CSVs (``image,label``, paths relative to
    ``out_dir``, a stratified ~75/25 split with both classes on each side) are written last.
    The same arguments give the same bytes.

    Args:
        out_dir: folder to write into (created if needed).
        n: number of slides, at least 4.
        sizes: distinct ``(height, width)`` pairs, each side at least :data:`MIN_SIDE`.
        mpp: micrometres per level-0 pixel, for every slide.
        seed: random seed.
        formats: ``"svs"`` and/or ``"tiff"`` (pyramidal TIFF, JPEG).
        quality: JPEG quality.
        workers: threads per slide (see :func:`write_svs`).

    Returns:
        The path of ``train.csv``.

    Raises:
        ValueError: for bad arguments.
    """
    if not _is_int(n) or n < 4:
        raise ValueError(f"n must be an integer of at least 4 (two per class), got {n!r}")
    pairs = _check_sizes(sizes)
    mpp = _check_mpp(mpp)
    _check_seed(seed)
    quality = _check_quality(quality)
    fmts = list(formats)
    if not fmts or any(f not in _FORMATS for f in fmts):
        raise ValueError(f"formats must be a non-empty sequence of 'svs'/'tiff', got {formats!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    split_seq, *slide_seqs = np.random.SeedSequence(seed).spawn(n + 1)
    split_rng = np.random.default_rng(split_seq)
    labels = [int(v) for v in split_rng.permutation([1] * (n // 2) + [0] * (n - n // 2))]
    width_digits = max(3, len(str(n - 1)))
    names = []
    for i, (label, (h, w)) in enumerate(zip(labels, _slide_sizes(pairs, n), strict=True)):
        fmt = fmts[i % len(fmts)]
        name = f"slide_{i:0{width_digits}d}{_FORMATS[fmt]}"
        slide_seed = int(slide_seqs[i].generate_state(1)[0])
        writer = write_svs if fmt == "svs" else write_pyramidal_tiff
        writer(
            out / name, h, w, mpp=mpp, seed=slide_seed, label=label, quality=quality,
            workers=workers,
        )  # fmt: skip
        names.append(name)
        log.debug("wrote %s (%dx%d, label %d)", name, w, h, label)
    train, val = _split(labels, split_rng)
    for csv_name, idx in (("train.csv", train), ("val.csv", val)):
        text = _csv_text([(names[i], labels[i]) for i in idx]).encode("utf-8")
        atomic_write(out / csv_name, lambda f, data=text: f.write(data))
    log.info(
        "demo slides: %d slides (%d train, %d val) in %s, %.1f s",
        n, len(train), len(val), out, time.perf_counter() - start,
    )  # fmt: skip
    return out / "train.csv"
