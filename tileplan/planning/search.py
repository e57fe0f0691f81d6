"""Which tile shapes to consider, and which one to choose. Pure logic, no hardware.

Candidates: for every tile count per axis ``k`` worth considering, the *smallest* aligned
tile that needs no more than ``k`` tiles along each axis (square on axes of equal length;
``candidate_tiles`` says how axes of other lengths vary). A larger tile with the same count only
costs memory, and a smaller one needs more tiles, so these are the only shapes that can be
optimal (the tile grid balances crops, see ``executor.geometry``).

Choice: the minimum predicted cost per image among candidates whose predicted peak fits the
usable budget ``budget * (1 - margin)``; ties go to the smaller peak. The cost is the predicted
time when tile timings were measured, else ``proxy_cost``: pixels processed, with a backward
tile counted as three forward passes (forward with grad, then a backward of about twice its
cost), and each tile's launches of the trunk's ops counted as some pixels more.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from executor import TileGrid, TrunkGeometry

__all__ = [
    "BACKWARD_WEIGHT", "SMALLEST_TILE", "TILE_OVERHEAD_PX", "Scored", "candidate_tiles",
    "choose", "proxy_cost", "search",
]  # fmt: skip

# Cost of a backward-pass tile relative to a no-grad forward of the same crop.
BACKWARD_WEIGHT = 3
# What one tile costs besides its pixels, in pixels of the whole trunk: launching every op of
# the trunk once more (what a time fit's intercept measures). Without it, a part without halo
# would cost the same in one tile or in thousands.
TILE_OVERHEAD_PX = 128 * 128


def proxy_cost(forward: TileGrid, backward: TileGrid, batch: int = 1) -> int:
    """Pixels processed per image, a backward-pass pixel weighing three forward ones, and
    each tile ``TILE_OVERHEAD_PX`` more (px)."""
    pixels = [
        sum(math.prod(t.input_shape) * batch + TILE_OVERHEAD_PX for t in grid)
        for grid in (forward, backward)
    ]
    return pixels[0] + BACKWARD_WEIGHT * pixels[1]


# Tile counts per axis to consider: dense where it matters (few tiles), sparse beyond.
_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 64, 96, 128, 192, 256)


# Tiles below this many positions per side are never candidates: each tile costs a call of
# every op of its segment and the engine's own work, and a segment without halo (pointwise and
# 1x1 layers between two statistics) would otherwise be priced the same in 4 px tiles.
SMALLEST_TILE = 64


def _count(geometry: TrunkGeometry, image: tuple[int, ...], outputs: tuple[int, ...],
           tile: tuple[int, ...]) -> int | float:  # fmt: skip
    """Largest number of tiles along any axis for ``tile`` (px per axis; inf when it owns
    nothing). The greedy left-to-right count: balancing a grid never changes it."""
    counts = []
    for ax, (n, n_out, t) in enumerate(zip(image, outputs, tile, strict=True)):
        tiles = geometry.axis(ax).greedy(n, n_out, geometry.axis(ax).aligned_tile(n, t))
        counts.append(math.inf if tiles is None else len(tiles))
    return max(counts)


def _group_tiles(geometry: TrunkGeometry, image: tuple[int, ...], outputs: tuple[int, ...],
                 axes: Sequence[int], smallest: int) -> list[int]:  # fmt: skip
    """For every count ``k`` in ``_COUNTS``: the smallest aligned length that needs at most
    ``k`` tiles along each of ``axes`` (the other axes whole), largest first; ``smallest``
    px at least."""
    align = max(geometry.align[ax] for ax in axes)
    largest = -(-max(image[ax] for ax in axes) // align) * align
    smallest = -(-min(smallest, largest) // align) * align

    def count(length: int) -> int | float:
        shape = tuple(length if ax in axes else n for ax, n in enumerate(image))
        return _count(geometry, image, outputs, shape)

    lengths: list[int] = []
    for k in _COUNTS:
        lo, hi = smallest // align, largest // align
        if count(hi * align) > k:
            continue
        while lo < hi:  # the count falls as tiles grow
            mid = (lo + hi) // 2
            if count(mid * align) <= k:
                hi = mid
            else:
                lo = mid + 1
        if lo * align not in lengths:
            lengths.append(lo * align)
        if lo * align == smallest:
            break
    return lengths


def candidate_tiles(geometry: TrunkGeometry, image_shape: Sequence[int],
                    floor: int = SMALLEST_TILE) -> list[tuple[int, ...]]:  # fmt: skip
    """Tile shapes worth considering, from the whole image down to halo-dominated (and no
    smaller than ``floor`` positions per axis, or the image).

    Axes of equal length (an image's H and W, a scan's in-plane axes) share one tile length;
    axes of another length (a scan's far fewer slices) get their own: for each length of the
    longest axes, the other axes take their own smallest length nearest to it (about a
    cube, cut to the image), or that of one tile more or one fewer along them. So a
    96x384x384 volume is considered in whole-depth slabs as well as in cubes, and a 2-D
    square image in squares only.

    Raises:
        GeometryError: the image is too small for the trunk.
    """
    image = tuple(image_shape)
    outputs = geometry.output_shape(image)
    smallest = max(geometry.min_tile(ax) for ax in range(geometry.n_axes))
    smallest = max(smallest, min(floor, min(image)))
    groups: dict[int, list[int]] = {}
    for ax, n in enumerate(image):
        groups.setdefault(n, []).append(ax)
    ordered = [groups[n] for n in sorted(groups, reverse=True)]  # longest axes first
    lengths = [_group_tiles(geometry, image, outputs, axes, smallest) for axes in ordered]
    tiles: set[tuple[int, ...]] = set()
    for t in lengths[0]:
        options = [[t]]
        for own in lengths[1:]:  # the same length, or the neighbouring counts of this group
            near = min(range(len(own)), key=lambda i: (abs(own[i] - t), own[i]))
            options.append(sorted({own[i] for i in (near - 1, near, near + 1)
                                   if 0 <= i < len(own)}))  # fmt: skip
        for combo in itertools.product(*options):
            shape = [0] * len(image)
            for axes, length in zip(ordered, combo, strict=True):
                for ax in axes:
                    shape[ax] = min(length, image[ax])
            tiles.add(tuple(shape))
    return sorted(tiles, key=lambda s: (math.prod(s), s))


@dataclass(frozen=True, slots=True)
class Scored:
    """A candidate with its predicted peak (bytes) and cost per image (seconds, or the proxy's
    weighted pixels when nothing was timed)."""

    tile: tuple[int, ...]
    peak_bytes: int
    cost: float

    def fits(self, usable_bytes: int) -> bool:
        return self.peak_bytes <= usable_bytes


def choose(scored: Sequence[Scored], usable_bytes: int) -> int | None:
    """Index of the fastest candidate that fits (ties: smaller peak), or None if none fits."""
    feasible = [i for i, s in enumerate(scored) if s.fits(usable_bytes)]
    if not feasible:
        return None
    return min(feasible, key=lambda i: (scored[i].cost, scored[i].peak_bytes))


def search(
    tiles: Sequence[tuple[int, ...]],
    peak_of: Callable[[tuple[int, ...]], int],
    cost_of: Callable[[tuple[int, ...]], float],
    usable_bytes: int,
) -> tuple[list[Scored], int | None]:
    """Score every tile with the injected memory and cost models and choose one."""
    scored = [Scored(t, peak_of(t), cost_of(t)) for t in tiles]
    return scored, choose(scored, usable_bytes)
