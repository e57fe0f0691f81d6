"""Geometry as integer arithmetic: known values and tile-grid invariants."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from executor import GeometryError, analyze_trunk
from tests.executor.random_nets import Spec, build, specs


def test_hand_computed_chain() -> None:
    # conv k7 s2 p3 -> maxpool k3 s2 p1 -> conv k3 s1 p1 (ResNet stem + one conv)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1))
    g = analyze_trunk(trunk)
    # L = 3*1 + 1*2 + 1*4 = 9 ; R = (6-3)*1 + (2-1)*2 + (2-1)*4 = 9
    assert g.output_stride == (4, 4)
    assert (g.halo_lo, g.halo_hi) == ((9, 9), (9, 9))
    assert g.receptive_field == (19, 19)


def test_asymmetric_halo_of_even_pooling() -> None:
    # 2x2/2 pooling reads 2j and 2j+1: all reach is to the right.
    g = analyze_trunk(nn.Sequential(nn.MaxPool2d(2), nn.MaxPool2d(2)))
    assert (g.output_stride, g.halo_lo, g.halo_hi) == ((4, 4), (0, 0), (3, 3))


def test_resnet18_geometry() -> None:
    tv = pytest.importorskip("torchvision")
    trunk = nn.Sequential(*list(tv.models.resnet18().children())[:-2]).eval()
    g = analyze_trunk(trunk)
    assert g.output_stride == (32, 32)
    assert g.halo_lo == g.halo_hi == (217, 217)  # receptive field 435 px
    grid = g.tile_grid((8192, 8192), (2048, 2048))
    assert grid.output_shape == (256, 256)
    assert grid.counts == (5, 5)
    assert grid.largest_crop[0] <= 2048


def test_tile_grid_of_known_axis() -> None:
    g = analyze_trunk(nn.Sequential(*[nn.Conv2d(1, 1, 3, padding=1) for _ in range(2)]))
    grid = g.tile_grid((100, 10), (40, 40))  # halo 2/2, stride 1
    axis0 = [(t.out_start, t.out_stop, t.in_start, t.in_stop) for t in grid.axes[0]]
    # Balanced: 3 crops of 36 px each instead of greedy 40 + 40 + 28.
    assert axis0 == [(0, 34, 0, 36), (34, 66, 32, 68), (66, 100, 64, 100)]
    assert grid.axes[1][0].in_start == 0
    assert grid.axes[1][0].in_stop == 10
    assert grid.overlap_factor == pytest.approx(3 * 36 / 100)


@settings(max_examples=80, deadline=None)
@given(
    spec=specs(),
    size=st.tuples(st.integers(8, 400), st.integers(8, 400)),
    extra=st.tuples(st.integers(0, 300), st.integers(0, 300)),
)
def test_tile_grid_invariants(spec: Spec, size: tuple[int, int], extra: tuple[int, int]) -> None:
    g = analyze_trunk(build(spec))
    try:
        out_shape = g.output_shape(size)
    except GeometryError:
        assume(False)
    assume(min(out_shape) >= 1)
    tile = tuple(g.min_tile(ax) + e for ax, e in enumerate(extra))
    try:
        grid = g.tile_grid(size, tile)
    except GeometryError as err:  # refused, never wrong: see [Dynamic same padding]
        assert "pads 'same' dynamically" in str(err) or "space-to-depth" in str(err)  # noqa: PT017
        assume(False)
    for ax, tiles in enumerate(grid.axes):
        # Ownership: the tiles partition the output positions, in order, without gaps.
        assert tiles[0].out_start == 0
        assert tiles[-1].out_stop == out_shape[ax]
        assert all(a.out_stop == b.out_start for a, b in zip(tiles, tiles[1:], strict=False))
        for t in tiles:
            assert t.out_start < t.out_stop
            assert t.in_start % g.align[ax] == 0  # alignment
            assert 0 <= t.in_start < t.in_stop <= size[ax]
            assert t.in_len <= max(tile[ax] // g.align[ax] * g.align[ax], min(tile[ax], size[ax]))
            # Validity: the crop holds the owned outputs' receptive field, or the border.
            s = g.output_stride[ax]
            assert t.in_start <= max(0, t.out_start * s - g.halo_lo[ax])
            assert t.in_stop >= min(size[ax], (t.out_stop - 1) * s + g.halo_hi[ax] + 1)
    assert grid.n_tiles == math.prod(grid.counts) == len(list(grid))


def test_output_shape_matches_real_run() -> None:
    trunk = build(
        (("conv", 3, 2, 1, 1, True), ("maxpool", 3, 2, 1, True), ("conv", 2, 1, 0, 2, False))
    )
    g = analyze_trunk(trunk)
    for size in [(9, 13), (31, 64), (100, 77)]:
        real = trunk(torch.zeros(1, 2, *size)).shape[2:]
        assert g.output_shape(size) == tuple(real)


def test_node_intervals_give_each_layers_region_of_a_tile() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 7, 2, 3), nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, 1, 1))
    g = analyze_trunk(trunk)
    intervals = g.node_intervals(0, 10, 20)  # outputs [10, 20) along axis 0
    assert intervals[-1] == (10, 19)  # the output node: the owned positions
    assert intervals[0] == (10 * 4 - 9, 19 * 4 + 9)  # the input: receptive field of the block
    # Each layer in between needs a region that shrinks toward the output.
    widths = [hi - lo for lo, hi in intervals]
    assert widths == sorted(widths, reverse=True)
