"""Candidate tiles from geometry, and the choice with injected memory and time models."""

from __future__ import annotations

import pytest
from torch import nn

from executor import analyze_trunk
from tileplan.planning.search import SMALLEST_TILE, Scored, candidate_tiles, choose, search


def _geometry() -> object:
    # stride 4, halo 9 px per side (see tests/executor/test_geometry.py)
    return analyze_trunk(
        nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1))
    )


def test_candidates_are_the_smallest_tiles_per_tile_count() -> None:
    g = _geometry()
    image = (512, 384)
    tiles = candidate_tiles(g, image)
    # The nearest to squares (cut to the image): growing tiles, falling tile counts.
    squares = [min((t for t in tiles if t[0] == side), key=lambda t: abs(t[1] - min(side, 384)))
               for side in sorted({t[0] for t in tiles})]  # fmt: skip
    counts = [max(g.tile_grid(image, t).counts) for t in squares]
    assert all(a[0] < b[0] for a, b in zip(squares, squares[1:], strict=False))
    assert all(a > b for a, b in zip(counts, counts[1:], strict=False))
    assert counts[-1] == 1
    assert tiles[-1] == (512, 384)  # the whole image, capped per axis
    for t in tiles:
        assert t[0] % 4 == 0
        assert t[1] % 4 == 0 or t[1] == 384
        # Minimal per axis: one alignment step smaller needs more tiles along it (or is
        # below the minimum).
        grid = g.tile_grid(image, t)
        for ax in (0, 1):
            smaller = list(t)
            smaller[ax] -= 4
            if smaller[ax] >= max(g.min_tile(ax), SMALLEST_TILE) and t[ax] < image[ax]:
                assert g.tile_grid(image, tuple(smaller)).counts[ax] > grid.counts[ax]
    assert tiles[0][0] == -(-max(g.min_tile(0), SMALLEST_TILE) // 4) * 4


def test_volume_candidates_vary_the_short_axis_on_its_own() -> None:
    """A scan has far fewer slices than pixels per slice: slabs whole in depth, and slabs cut
    in depth with the same in-plane tile, are both candidates; in-plane axes stay square."""
    g = analyze_trunk(nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.MaxPool3d(2),
                                    nn.Conv3d(4, 4, 3, padding=1)), 3)  # fmt: skip
    image = (160, 512, 512)
    tiles = candidate_tiles(g, image)
    assert all(t[1] == t[2] for t in tiles)
    in_plane = {t[1] for t in tiles if t[1] < 512}
    assert len(in_plane) > 3
    for side in in_plane:
        depths = {t[0] for t in tiles if t[1] == side}
        assert len(depths) >= 2, (side, depths)  # the cube, and at least one other depth
    assert (160, 512, 512) in tiles
    assert any(t[0] == 160 and t[1] < 160 for t in tiles)  # whole depth, small in-plane


def test_no_candidate_below_the_smallest_tile() -> None:
    """A part without halo would be priced the same in 4 px tiles: never below 64 px."""
    g = analyze_trunk(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU()))
    assert g.min_tile(0) == 1
    tiles = candidate_tiles(g, (512, 512))
    assert tiles[0] == (SMALLEST_TILE, SMALLEST_TILE)
    assert all(min(t) >= 40 for t in candidate_tiles(g, (40, 48)))


def test_image_smaller_than_minimum_tile_gives_one_candidate() -> None:
    g = _geometry()
    assert candidate_tiles(g, (20, 20)) == [(20, 20)]


def test_choose_fastest_that_fits() -> None:
    scored = [
        Scored((64, 64), peak_bytes=100, cost=9.0),
        Scored((128, 128), peak_bytes=300, cost=4.0),
        Scored((256, 256), peak_bytes=900, cost=2.0),
        Scored((512, 512), peak_bytes=3000, cost=1.0),
    ]
    assert choose(scored, usable_bytes=1000) == 2
    assert choose(scored, usable_bytes=300) == 1  # the limit is inclusive
    assert choose(scored, usable_bytes=99) is None
    tie = [Scored((1,), 500, 1.0), Scored((2,), 400, 1.0)]
    assert choose(tie, 1000) == 1  # equal time: the smaller peak


def test_search_with_injected_models_picks_exact_tile() -> None:
    g = _geometry()
    image = (1024, 1024)
    tiles = candidate_tiles(g, image)
    # Memory grows with tile area; time falls with the overlap (halo recompute).
    probes: list[tuple[int, ...]] = []

    def peak(tile: tuple[int, ...]) -> int:
        probes.append(tile)
        return 1000 + tile[0] * tile[1]

    def time(tile: tuple[int, ...]) -> float:
        return g.tile_grid(image, tile).overlap_factor

    budget = 1000 + 300 * 300
    scored, index = search(tiles, peak, time, budget)
    assert probes == tiles  # every candidate probed once, in order
    fitting = [t for t in tiles if t[0] * t[1] <= 300 * 300]
    assert scored[index].tile == max(fitting)  # largest fitting tile is the fastest here
    assert index == len(fitting) - 1


@pytest.mark.parametrize("budget", [0, 10])
def test_search_reports_no_fit(budget: int) -> None:
    g = _geometry()
    tiles = candidate_tiles(g, (256, 256))
    _, index = search(tiles, lambda t: 100 + t[0], lambda t: 1.0, budget)
    assert index is None
