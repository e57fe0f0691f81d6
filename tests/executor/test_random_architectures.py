"""Property tests: random architectures, sizes and tiles (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from executor import GeometryError, analyze_trunk
from tests.executor.random_nets import Spec, build, specs
from tests.oracle import compare_with_conventional

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(
    spec=specs(),
    height=st.integers(8, 90),
    width=st.integers(8, 90),
    tile_frac=st.tuples(st.floats(0.0, 1.2), st.floats(0.0, 1.2)),
    seed=st.integers(0, 2**16),
)
def test_random_trunk_streams_exactly(
    spec: Spec, height: int, width: int, tile_frac: tuple[float, float], seed: int
) -> None:
    torch.manual_seed(seed)
    trunk = build(spec)
    geometry = analyze_trunk(trunk)
    try:
        out_shape = geometry.output_shape((height, width))
    except GeometryError:
        assume(False)  # branches disagree for this image size: refused, not a wrong result
    assume(min(out_shape) >= 1)
    # Tiles from the smallest allowed to beyond the image: halo-dominated to single tile.
    tile = tuple(
        geometry.min_tile(ax) + int(f * n)
        for ax, (f, n) in enumerate(zip(tile_frac, (height, width), strict=True))
    )
    image = torch.randn(1, 2, height, width)
    try:
        compare_with_conventional(trunk, image, tile)
        return
    except GeometryError as err:
        refused = str(err)
    # Refused, never wrong: dynamic 'same' padding of an image size that pads unlike its
    # tiles, or a space-to-depth step on crops of odd size.
    assert any(w in refused for w in ("pads 'same'", "space-to-depth", "reflect")), refused
    assume(False)


def _receptive_hull(
    trunk: nn.Module, shape: tuple[int, int], j: tuple[int, int]
) -> list[tuple[int, int]]:
    """Empirical probe: input pixels with a non-zero gradient of output j (positive weights)."""
    x = torch.ones(1, 2, *shape, dtype=torch.float64, requires_grad=True)
    out = trunk(x)
    out[0, :, j[0], j[1]].sum().backward()
    nz = x.grad[0].abs().sum(0).nonzero()
    return [(int(nz[:, ax].min()), int(nz[:, ax].max())) for ax in range(2)]


@settings(max_examples=60, deadline=None)
@given(spec=specs(nonlinear=False), size=st.integers(40, 120), where=st.floats(0.0, 1.0))
def test_geometry_matches_empirical_receptive_field(spec: Spec, size: int, where: float) -> None:
    trunk = build(spec).double()
    with torch.no_grad():
        for p in trunk.parameters():
            p.uniform_(0.1, 1.0)  # positive weights: no cancellation hides a dependency
    geometry = analyze_trunk(trunk)
    try:
        out_shape = geometry.output_shape((size, size))
    except GeometryError:
        assume(False)
    assume(min(out_shape) >= 1)
    # The geometry describes crops; dynamic 'same' padding pads some image sizes otherwise
    # (streamed only as one crop along that axis, which is the image itself).
    assume(all(geometry._same_padding_mismatch(ax, size) is None for ax in range(2)))
    assert tuple(trunk(torch.zeros(1, 2, size, size, dtype=torch.float64)).shape[2:]) == out_shape
    try:  # a size that dynamic 'same' padding pads unlike its tiles is refused for streaming
        geometry.tile_grid((size, size), (geometry.min_tile(0), geometry.min_tile(1)))
    except GeometryError:
        assume(False)
    # An output whose receptive field lies inside the image (at the border, dilation holes
    # make the clipped hull ambiguous).
    s, lo, hi = geometry.output_stride, geometry.halo_lo, geometry.halo_hi

    def inside(ax: int) -> list[int]:
        return [j for j in range(out_shape[ax]) if j * s[ax] - lo[ax] >= 0
                and j * s[ax] + hi[ax] <= size - 1]  # fmt: skip

    assume(inside(0) and inside(1))
    j = tuple(inside(ax)[int(where * (len(inside(ax)) - 1))] for ax in range(2))
    hull = _receptive_hull(trunk, (size, size), j)
    bounds = [(j[ax] * s[ax] - lo[ax], j[ax] * s[ax] + hi[ax]) for ax in range(2)]
    if any(entry[0] == "pad" and entry[2] != "constant" for entry in spec):
        # Reflect/replicate padding: an output in the padding copies pixels up to twice (once)
        # the padding away, so the halo reaches that far for every output; inside, less.
        pairs = zip(hull, bounds, strict=True)
        assert all(a <= h_lo and h_hi <= b for (h_lo, h_hi), (a, b) in pairs), hull
    else:
        assert hull == bounds
