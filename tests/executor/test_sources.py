"""Streaming from an ``ImageSource`` equals streaming the tensor of its pixels, bit for bit.

The engine reads each tile's crop from the source (on a read-ahead thread) in both passes
instead of slicing a tensor; nothing else changes, so outputs, parameter gradients and the
input gradient must be *equal* (not close) to streaming the tensor, for a single segment and
for a chain, with the last forward tile's graph cached or not. A source that fails or returns
a wrong crop must stop the pass with its error and leave no thread and no half-added gradient.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from executor import (
    CropReader,
    GeometryError,
    SegmentedStreamingCNN,
    StreamingCNN,
    TensorSource,
    analyze_trunk,
)
from tests.executor.random_nets import Spec, build, specs
from tests.executor.test_chain import SMALL_SEGMENTS, _run, _small_trunk


class _CountingSource:
    """A uint8 image served region by region from a NumPy array, counting the reads and the
    threads they ran on (what a slide reader does, minus the decoding)."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self._array = pixels.numpy()
        self.reads: list[tuple[tuple[int, int], ...]] = []
        self.threads: set[str] = set()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._array.shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.from_numpy(self._array[:0]).dtype

    def read(self, region: Sequence[slice]) -> torch.Tensor:
        self.reads.append(tuple((s.start, s.stop) for s in region))
        self.threads.add(threading.current_thread().name)
        return torch.from_numpy(self._array[(..., *region)].copy())


def _assert_same_run(a: tuple, b: tuple) -> None:
    out_a, grads_a, image_grad_a = a
    out_b, grads_b, image_grad_b = b
    assert torch.equal(out_a, out_b), "output differs"
    assert torch.equal(image_grad_a, image_grad_b), "input gradient differs"
    for k, (g_a, g_b) in enumerate(zip(grads_a, grads_b, strict=True)):
        assert torch.equal(g_a, g_b), f"gradient of parameter {k} differs"


def _normalise(crop: torch.Tensor) -> torch.Tensor:
    return crop.to(torch.float64) / 255.0 - 0.5  # pointwise, as the training preprocess


@pytest.mark.parametrize("cache_last_tile", [True, False])
def test_source_streams_bit_identically_to_its_tensor(cache_last_tile: bool) -> None:
    trunk = _small_trunk()
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (1, 3, 230, 170), generator=gen, dtype=torch.uint8)
    make = lambda: StreamingCNN(trunk, 100, forward_tile_shape=130, input_grad=True,  # noqa: E731
                                preprocess=_normalise, cache_last_tile=cache_last_tile)  # fmt: skip
    source = _CountingSource(pixels)
    from_tensor = _run(make(), trunk, pixels)
    from_source = _run(make(), trunk, source)
    _assert_same_run(from_tensor, from_source)
    # Both passes read exactly their grids' crops, in their order, off the main thread.
    scnn = make()
    fwd = [t.input_slices() for t in scnn.tile_grid((230, 170), forward=True)]
    bwd = [t.input_slices() for t in reversed(list(scnn.tile_grid((230, 170))))]
    if cache_last_tile and fwd[-1] == bwd[0]:
        bwd = bwd[1:]  # the cached tile is not read again
    as_pairs = [tuple((s.start, s.stop) for s in sl) for sl in (*fwd, *bwd)]
    assert source.reads == as_pairs
    assert len(fwd) > 1
    assert source.threads == {"tileplan-read_0"}


def test_chain_streams_a_source_bit_identically() -> None:
    trunk = _small_trunk()
    image = torch.randn(1, 3, 131, 90, dtype=torch.float64)
    source = TensorSource(image)
    from_tensor = _run(SegmentedStreamingCNN(trunk, SMALL_SEGMENTS, input_grad=True), trunk, image)
    chained = SegmentedStreamingCNN(trunk, SMALL_SEGMENTS, input_grad=True)
    _assert_same_run(from_tensor, _run(chained, trunk, source))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs(), height=st.integers(9, 60), width=st.integers(8, 60), data=st.data())
def test_random_trunks_stream_a_source_bit_identically(
    spec: Spec, height: int, width: int, data: st.DataObject
) -> None:
    """Random trunks, sizes and tiles (rarely dividing the image): the source run equals the
    tensor run, or both are refused for the same reason."""
    torch.manual_seed(height * 100 + width)
    trunk = build(spec).double()
    try:
        geometry = analyze_trunk(trunk)
        assume(min(geometry.output_shape((height, width))) >= 1)
    except GeometryError:
        assume(False)
    tile = tuple(geometry.min_tile(ax) + data.draw(st.integers(0, n)) for ax, n in
                 enumerate((height, width)))  # fmt: skip
    image = torch.randn(1, 2, height, width, dtype=torch.float64)
    make = lambda: StreamingCNN(trunk, tile, input_grad=True)  # noqa: E731
    try:
        expected = _run(make(), trunk, image)
    except GeometryError as err:
        with pytest.raises(GeometryError, match=re.escape(str(err)[:30])):
            _run(make(), trunk, TensorSource(image))
        return
    _assert_same_run(expected, _run(make(), trunk, TensorSource(image)))


class _FailingSource(_CountingSource):
    def __init__(self, pixels: torch.Tensor, fail_at: int, wrong_shape: bool = False) -> None:
        super().__init__(pixels)
        self.fail_at = fail_at
        self.wrong_shape = wrong_shape

    def read(self, region: Sequence[slice]) -> torch.Tensor:
        crop = super().read(region)
        if len(self.reads) == self.fail_at:
            if self.wrong_shape:
                return crop[..., 1:]
            raise OSError("slide.svs: JPEG tile 12 is corrupt")
        return crop


@pytest.mark.parametrize("wrong_shape", [False, True])
def test_a_failing_read_stops_the_pass_and_restores_gradients(wrong_shape: bool) -> None:
    trunk = _small_trunk()
    pixels = torch.randint(0, 256, (1, 3, 230, 170), dtype=torch.uint8)
    scnn = StreamingCNN(trunk, 100, preprocess=_normalise, cache_last_tile=False)
    out = scnn.forward(pixels).requires_grad_()
    out.sum().backward()
    for p in trunk.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in trunk.parameters()]
    n_tiles = scnn.tile_grid((230, 170)).n_tiles
    source = _FailingSource(pixels, fail_at=n_tiles + 2, wrong_shape=wrong_shape)
    scnn.forward(source)  # forward reads n_tiles crops; the backward's 2nd read fails
    error = GeometryError if wrong_shape else OSError
    with pytest.raises(error, match="returned|corrupt"):
        scnn.backward(source, out.grad)
    for p, g in zip(trunk.parameters(), before, strict=True):
        assert torch.equal(p.grad, g), "a failed backward pass left partial gradients"
    assert not [t for t in threading.enumerate() if t.name.startswith("tileplan-read")]


def test_crop_reader_reads_ahead_but_never_more_than_asked() -> None:
    geometry = analyze_trunk(torch.nn.Conv2d(1, 1, 3, padding=1))
    grid = geometry.tile_grid((64, 64), (16, 16))
    source = _CountingSource(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    with CropReader(source, grid, ahead=2) as reader:
        tile, crop = next(reader)
        # The crop handed out and the two after it were asked for; nothing beyond.
        assert len(source.reads) <= 3
        assert crop.shape == (1, 1, *(s.stop - s.start for s in tile.input_slices()))
    assert grid.n_tiles > 3
    assert not [t for t in threading.enumerate() if t.name.startswith("tileplan-read")]
