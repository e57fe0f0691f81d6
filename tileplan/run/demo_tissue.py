"""Synthetic whole-slide content: tissue on glass, rendered region by region.

For demos, tests and benchmarks that need real slide files without shipping any: the content
is procedural, so a slide of any size is written tile by tile and never held in memory (a
32768 x 32768 SVS adds well under 200 MB to the writing process), with tifffile only.

**Content.** ``SyntheticSlide`` renders any rectangle of any pyramid level from global
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from tileplan.run.demo_data import RING_WIDTH, DemoObject
from tileplan.run.demo_noise import (
    GOLDEN,
    bspline,
    hash_cells,
    mix_int,
    octave_grid,
    octave_points,
    spline_grid,
    subkey,
    uniform01,
)

__all__ = ["MIN_SIDE", "SyntheticSlide", "check_region", "check_seed", "check_side", "is_int"]

#: Smallest slide side accepted, px.
MIN_SIDE = 64
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


def is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_side(name: str, value: object) -> None:
    if not is_int(value) or int(value) < MIN_SIDE:  # type: ignore[call-overload]
        raise ValueError(f"{name} must be an integer of at least {MIN_SIDE} px, got {value!r}")


def check_seed(seed: object) -> None:
    if not is_int(seed) or int(seed) < 0:  # type: ignore[call-overload]
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def check_region(y: int, x: int, height: int, width: int, downsample: float) -> None:
    if not all(is_int(v) for v in (y, x, height, width)) or height < 1 or width < 1:
        raise ValueError(f"region must be integers with positive size, got {(y, x, height, width)}")
    number = isinstance(downsample, (int, float, np.integer, np.floating))
    if isinstance(downsample, bool) or not (number and math.isfinite(downsample)):
        raise ValueError(f"downsample must be a finite number >= 1, got {downsample!r}")
    if downsample < 1:
        raise ValueError(f"downsample must be a finite number >= 1, got {downsample!r}")


@lru_cache(maxsize=1)
def _mean_nucleus_alpha() -> float:
    """Mean of the nucleus mask before texture weighting (used where nuclei are sub-pixel)."""
    n = 512
    u = np.arange(n, dtype=np.float64) + 0.5
    ky = kx = bspline(u, _NUCLEUS_SPACING)
    nodes = np.arange(int(ky[0].min()), int(ky[0].max()) + 4, dtype=np.int64)
    lattice = uniform01(hash_cells(12345, nodes[:, None], nodes[None, :]))
    field_ = spline_grid(lattice[None], (int(nodes[0]), int(nodes[0])), ky, kx)[0]
    return float(np.clip((field_ - _NUCLEUS_THRESHOLD) * _NUCLEUS_SLOPE, 0.0, 1.0).mean())


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
        check_side("height", self.height)
        check_side("width", self.width)
        check_seed(self.seed)
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
        key = mix_int(self.seed * GOLDEN + 0x5EED)
        wobble = tuple(
            (subkey(key, 100 + i), sp * short, amp * short) for i, (sp, amp) in enumerate(_WOBBLE)
        )
        octaves = ((_SLIDE_OCTAVE[0] * short, _SLIDE_OCTAVE[1]), *_TEXTURE_OCTAVES)
        set_ = object.__setattr__
        set_(self, "_octaves", tuple((subkey(key, i), s, a) for i, (s, a) in enumerate(octaves)))
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
                noise = octave_grid(key, uy[:, 0], ux[0], spacing)
            else:
                noise = octave_points(key, uy, ux, spacing)
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
        ky = bspline((np.arange(y, y + h, dtype=np.float64) + 0.5) * ds, spacing)
        kx = bspline((np.arange(x, x + w, dtype=np.float64) + 0.5) * ds, spacing)
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
            texture += amplitude * octave_grid(key, vy[:, 0], vx[0], octave_spacing)
        texture *= _TEXTURE_GAIN
        texture += 0.5
        channels.append(np.clip(texture, 0.0, 1.0))
        if nuclei:
            key = subkey(self._key, 50)
            channels.append(uniform01(hash_cells(key, node_rows[:, None], node_cols[None, :])))
        out = spline_grid(np.stack(channels).astype(np.float32), (y0, x0), ky, kx)
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
        check_region(y, x, height, width, downsample)
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
        check_region(y, x, height, width, downsample)
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
        key = subkey(self._key, 1000 + _level_salt(ds))
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
