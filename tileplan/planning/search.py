"""Which tile shapes to consider, and which one to choose. Pure logic, no hardware.

Candidates: for every tile count per axis ``k`` worth considering, the *smallest* aligned square
tile that needs no more than ``k`` tiles along each axis. A larger tile with the same count only
costs memory, and a smaller one needs more tiles, so these are the only shapes that can be
optimal (the tile grid balances crops, see ``executor.geometry``).

Choice: the minimum predicted cost per image among candidates whose predicted peak fits the
usable budget ``budget * (1 - margin)``; ties go to the smaller peak. The cost is the predicted
time when tile timings were measured, else ``proxy_cost``: pixels processed, with a backward
tile counted as three forward passes (forward with grad, then a backward of about twice its
cost), and each tile's launches of the trunk's ops counted as some pixels more.
"""

from __future__ import annotations

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


def _count(geometry: TrunkGeometry, image: tuple[int, ...], outputs: tuple[int, ...], tile: int
           ) -> int | float:  # fmt: skip
    """Largest number of tiles along any axis for a square tile of ``tile`` px (inf when it
    owns nothing). The greedy left-to-right count: balancing a grid never changes it."""
    counts = []
    for ax, (n, n_out) in enumerate(zip(image, outputs, strict=True)):
        tiles = geometry.axis(ax).greedy(n, n_out, geometry.axis(ax).aligned_tile(n, tile))
        counts.append(math.inf if tiles is None else len(tiles))
    return max(counts)


# Tiles below this many positions per side are never candidates: each tile costs a call of
# every op of its segment and the engine's own work, and a segment without halo (pointwise and
# 1x1 layers between two statistics) would otherwise be priced the same in 4 px tiles.
SMALLEST_TILE = 64


def candidate_tiles(geometry: TrunkGeometry, image_shape: Sequence[int],
                    floor: int = SMALLEST_TILE) -> list[tuple[int, ...]]:  # fmt: skip
    """Square tile shapes worth considering, from the whole image down to halo-dominated (and
    no smaller than ``floor`` positions, or the image).

    Raises:
        GeometryError: the image is too small for the trunk.
    """
    image = tuple(image_shape)
    outputs = geometry.output_shape(image)
    align = max(geometry.align)
    smallest = max(geometry.min_tile(ax) for ax in range(geometry.n_axes))
    smallest = max(smallest, min(floor, min(image)))
    smallest = -(-smallest // align) * align
    largest = -(-max(image) // align) * align
    if smallest >= largest:
        return [tuple(min(largest, n) for n in image)]
    tiles: list[int] = []
    for k in _COUNTS:
        # Smallest aligned tile with at most k tiles per axis (the count falls as tiles grow).
        lo, hi = smallest // align, largest // align
        if _count(geometry, image, outputs, hi * align) > k:
            continue
        while lo < hi:
            mid = (lo + hi) // 2
            if _count(geometry, image, outputs, mid * align) <= k:
                hi = mid
            else:
                lo = mid + 1
        tile = lo * align
        if tile not in tiles:
            tiles.append(tile)
        if tile == smallest:
            break
    return [tuple(min(t, n) for n in image) for t in sorted(tiles)]


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
