"""Exact streaming geometry of a trunk: output stride, halos, tile grids.

Everything here is integer arithmetic on the trunk's ``SpatialGraph`` (kernel, stride, padding,
dilation of each op, and the graph's merges), per spatial axis, so volumes work like images.

Note: [Output ownership]
    The trunk's *output* positions are partitioned among tiles: each tile owns a contiguous
    block ``[a, b)`` of output positions per axis and computes it from an input crop that
    contains the whole receptive field of the block (or reaches the image border, where the
    zero padding is real). Those outputs are then bit-for-bit the same function of the weights
    and the image as in the full-image network. Because backprop is linear in the output
    gradient, the per-tile parameter gradients of ``sum(grad_out[a:b] * out[a:b])`` add up
    to the exact full gradient: every output position contributes exactly once, and every
    intermediate position contributes exactly its share through the outputs its tile owns.
    Hence the backward halo equals the forward halo (no extra gradient-validity margin).

Note: [Alignment]
    Crop origins are multiples of ``align`` (the lcm of every node's cumulative stride, in
    practice the trunk's output stride), so that each node's local index ``i`` in a crop is
    global index ``i + start // stride_node``: every layer's tile grid lies on the full
    image's grid. Crop lengths are rounded up to multiples of ``align`` too (except at the
    image's end), so branches that agree on the image's size agree on the crop's.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from executor.classify import trace_trunk
from executor.errors import GeometryError, UnsupportedLayerError
from executor.graph import SpatialGraph

__all__ = [
    "AxisGeometry", "AxisTile", "Tile", "TileGrid", "TrunkGeometry", "analyze_trunk",
    "build_tile_grid",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class AxisTile:
    """One tile along one axis.

    Attributes:
        out_start, out_stop: output positions ``[out_start, out_stop)`` this tile owns.
        in_start, in_stop: input pixels ``[in_start, in_stop)`` of its crop.
    """

    out_start: int
    out_stop: int
    in_start: int
    in_stop: int

    @property
    def in_len(self) -> int:
        return self.in_stop - self.in_start


@dataclass(frozen=True, slots=True)
class Tile:
    """A tile of the grid: one ``AxisTile`` per spatial axis."""

    index: tuple[int, ...]
    axes: tuple[AxisTile, ...]
    stride: tuple[int, ...]

    def input_slices(self) -> tuple[slice, ...]:
        """Slices of the image's spatial dims that form this tile's crop."""
        return tuple(slice(a.in_start, a.in_stop) for a in self.axes)

    def output_slices(self) -> tuple[slice, ...]:
        """Slices of the full output map that this tile owns."""
        return tuple(slice(a.out_start, a.out_stop) for a in self.axes)

    def local_output_slices(self) -> tuple[slice, ...]:
        """Slices of the crop's output that hold the owned positions (see [Alignment])."""
        return tuple(
            slice(a.out_start - a.in_start // s, a.out_stop - a.in_start // s)
            for a, s in zip(self.axes, self.stride, strict=True)
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(a.in_len for a in self.axes)


@dataclass(frozen=True, slots=True)
class TileGrid:
    """The tiles that cover one image, and what they cost.

    Attributes:
        image_shape: spatial shape of the image (px).
        output_shape: spatial shape of the trunk's output for it.
        tile_shape: the largest crop allowed per axis after alignment (px).
        axes: per axis, the tiles along it; the grid is their Cartesian product.
        stride: the trunk's output stride per axis.
    """

    image_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    tile_shape: tuple[int, ...]
    axes: tuple[tuple[AxisTile, ...], ...]
    stride: tuple[int, ...]

    @property
    def counts(self) -> tuple[int, ...]:
        """Number of tiles along each axis."""
        return tuple(len(a) for a in self.axes)

    @property
    def n_tiles(self) -> int:
        return math.prod(self.counts)

    @property
    def overlap_factor(self) -> float:
        """Input pixels processed by all tiles ÷ image pixels (1.0 = no recompute)."""
        processed = math.prod(sum(t.in_len for t in axis) for axis in self.axes)
        return processed / math.prod(self.image_shape)

    @property
    def largest_crop(self) -> tuple[int, ...]:
        """The largest crop actually used per axis (px), at most ``tile_shape``."""
        return tuple(max(t.in_len for t in axis) for axis in self.axes)

    def __iter__(self) -> Iterator[Tile]:
        for index in itertools.product(*(range(len(a)) for a in self.axes)):
            axes = tuple(axis[i] for axis, i in zip(self.axes, index, strict=True))
            yield Tile(index, axes, self.stride)

    def __len__(self) -> int:
        return self.n_tiles


@dataclass(frozen=True, slots=True)
class AxisGeometry:
    """Tiling along one axis, from the trunk's numbers alone (no model needed).

    Output position ``j`` depends on input pixels ``[j*stride - halo_lo, j*stride + halo_hi]``;
    crop origins are multiples of ``align``.
    """

    stride: int
    halo_lo: int
    halo_hi: int
    align: int

    def crop(self, length: int, out_start: int, out_stop: int) -> AxisTile:
        """The aligned input crop that computes outputs ``[out_start, out_stop)`` exactly."""
        s, a = self.stride, self.align
        first = out_start * s - self.halo_lo  # leftmost input pixel read
        last = (out_stop - 1) * s + self.halo_hi  # rightmost input pixel read
        start = max(0, first // a * a)
        stop = min(length, start + -(-(last + 1 - start) // a) * a)
        return AxisTile(out_start, out_stop, start, stop)

    def min_tile(self) -> int:
        """Smallest crop (px) owning at least one output away from the borders."""
        # The aligned crop of one output depends on j mod (align / stride): take the worst
        # phase, far enough from the image's start that the left halo is not clipped.
        j0 = self.halo_lo // self.stride + 1
        return max(
            self.crop(1 << 62, j, j + 1).in_len for j in range(j0, j0 + self.align // self.stride)
        )

    def greedy(self, length: int, n_out: int, tile: int) -> list[AxisTile] | None:
        """Left-to-right tiles owning as many outputs as fit in ``tile`` px; None if none fit."""
        s, a = self.stride, self.align
        span = tile // a * a  # the longest unclipped crop: crops are whole multiples of align
        tiles: list[AxisTile] = []
        start = 0
        while start < n_out:
            first = self.crop(length, start, start + 1)
            if first.in_len > tile:
                return None
            if length - first.in_start <= tile:
                stop = n_out  # the crop reaches the image's end: it may own everything left
            else:
                # Unclipped, outputs [start, stop) need (stop-1)*s + halo_hi + 1 - in_start px
                # rounded up to align; the largest stop whose rounded length is <= span.
                stop = min(n_out, (span + first.in_start - self.halo_hi - 1) // s + 1)
            tiles.append(self.crop(length, start, stop))
            start = stop
        return tiles

    def tiles(self, length: int, n_out: int, tile: int) -> tuple[AxisTile, ...]:
        """Balanced tiles covering ``n_out`` outputs with crops of at most ``tile`` px.

        Raises:
            GeometryError: the tile cannot own even one output position.
        """
        tiles = self.greedy(length, n_out, tile)
        if tiles is None:
            raise GeometryError(
                f"tile of {tile} px is smaller than the trunk's receptive field "
                f"({self.halo_lo}+{self.halo_hi}+1 px, halo per side {self.halo_lo}/"
                f"{self.halo_hi}): use a tile of at least {self.min_tile()} px"
            )
        # Balance: the smallest tile size that still needs no more tiles, so that the last
        # tile is not a sliver and all crops are about equal.
        count, a = len(tiles), self.align
        lo, hi = 1, -(-tile // a)
        while lo < hi:
            mid = (lo + hi) // 2
            trial = self.greedy(length, n_out, mid * a)
            if trial is not None and len(trial) <= count:
                hi = mid
            else:
                lo = mid + 1
        balanced = self.greedy(length, n_out, min(tile, lo * a))
        assert balanced is not None
        assert len(balanced) == count
        return tuple(balanced)

    def aligned_tile(self, length: int, tile: int) -> int:
        """``tile`` aligned down to ``align``; a tile covering the image is the image."""
        return length if tile >= length else tile // self.align * self.align


@dataclass(frozen=True, slots=True)
class TrunkGeometry:
    """Streaming geometry of a trunk, derived exactly from its ops.

    For every axis, output position ``j`` depends on input pixels
    ``[j*output_stride - halo_lo, j*output_stride + halo_hi]`` (receptive field
    ``halo_lo + halo_hi + 1`` px).

    Attributes:
        graph: the trunk reduced to spatial ops.
        output_stride: total stride per axis (input px per output position).
        halo_lo, halo_hi: receptive-field reach before/after ``j*output_stride`` (px).
        align: crop origins are multiples of this per axis (see [Alignment]).
    """

    graph: SpatialGraph
    output_stride: tuple[int, ...]
    halo_lo: tuple[int, ...]
    halo_hi: tuple[int, ...]
    align: tuple[int, ...]

    @classmethod
    def from_graph(cls, graph: SpatialGraph) -> TrunkGeometry:
        """Derive strides and halos; refuses merges of maps with different strides."""
        strides: list[tuple[int, ...]] = []
        for node in graph.nodes:
            if not node.inputs:
                strides.append((1,) * graph.n_axes)
                continue
            incoming = {strides[i] for i in node.inputs}
            if len(incoming) > 1:
                raise UnsupportedLayerError(
                    node.where,
                    f"it merges maps with different strides {sorted(incoming)}",
                    "merge only maps of the same resolution",
                )
            (stride,) = incoming
            if node.windows is not None:
                stride = tuple(s * w.stride for s, w in zip(stride, node.windows, strict=True))
            strides.append(stride)
        out_stride = strides[graph.output]
        align = tuple(math.lcm(*(s[ax] for s in strides)) for ax in range(graph.n_axes))
        graph = _settle_same_padding(graph, align)
        lo, hi = [], []
        for axis in range(graph.n_axes):
            first, last = _input_interval(graph, axis, 0, 0)
            lo.append(-first)
            hi.append(last)
        return cls(graph, out_stride, tuple(lo), tuple(hi), align)

    @property
    def sources(self) -> tuple[int, ...]:
        """Indices of the graph's inputs (nodes without inputs): the image, or the maps a
        segment reads, which share one position grid."""
        return tuple(i for i, node in enumerate(self.graph.nodes) if not node.inputs)

    @property
    def n_axes(self) -> int:
        return self.graph.n_axes

    @property
    def receptive_field(self) -> tuple[int, ...]:
        return tuple(a + b + 1 for a, b in zip(self.halo_lo, self.halo_hi, strict=True))

    def node_lengths(self, axis: int, length: int) -> list[int]:
        """Length along ``axis`` of every node's output for an input of ``length`` px.

        Raises:
            GeometryError: branches that are merged disagree in length.
        """
        lengths: list[int] = []
        for node in self.graph.nodes:
            if not node.inputs:
                lengths.append(length)
                continue
            incoming = {lengths[i] for i in node.inputs}
            if len(incoming) > 1:
                raise GeometryError(
                    f"at '{node.where}' the merged maps have lengths {sorted(incoming)} along "
                    f"axis {axis} for an input of {length} px; use sizes that are multiples of "
                    f"{self.output_stride[axis]}"
                )
            (n,) = incoming
            if node.windows is None:
                lengths.append(n)
                continue
            if n < 1:  # a window over an empty map: PyTorch refuses it, so must we
                raise GeometryError(
                    f"the map entering '{node.where}' is empty along axis {axis} for an input "
                    f"of {length} px; use a larger image"
                )
            try:
                lengths.append(node.windows[axis].out_len(n))
            except GeometryError as err:
                raise GeometryError(f"at '{node.where}' along axis {axis}: {err}") from None
        return lengths

    def output_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of the trunk's output for an image of ``image_shape`` px."""
        self._check_rank(image_shape)
        return tuple(self.node_lengths(ax, n)[-1] for ax, n in enumerate(image_shape))

    def node_intervals(self, axis: int, out_start: int, out_stop: int) -> list[tuple[int, int]]:
        """Global positions (inclusive) each node must provide for outputs ``[start, stop)``.

        Positions outside a node's extent are its padding. Useful to draw, per layer, what a
        tile computes.
        """
        return _intervals(self.graph, axis, out_start, out_stop - 1)

    def axis(self, axis: int) -> AxisGeometry:
        """The tiling numbers of one axis."""
        return AxisGeometry(
            self.output_stride[axis], self.halo_lo[axis], self.halo_hi[axis], self.align[axis]
        )

    def crop(self, axis: int, length: int, out_start: int, out_stop: int) -> AxisTile:
        """The aligned input crop that computes outputs ``[out_start, out_stop)`` exactly."""
        return self.axis(axis).crop(length, out_start, out_stop)

    def min_tile(self, axis: int) -> int:
        """Smallest crop (px) owning at least one output away from the borders."""
        return self.axis(axis).min_tile()

    def tile_grid(self, image_shape: Sequence[int], tile_shape: Sequence[int]) -> TileGrid:
        """Balanced tile grid for an image, with crops no larger than ``tile_shape``.

        ``tile_shape`` is aligned down to a multiple of ``align`` per axis (a tile that is
        larger than the image simply becomes the whole image).

        Raises:
            GeometryError: the tile cannot own even one output position, or the image is too
                small for the trunk.
        """
        self._check_rank(image_shape)
        self._check_rank(tile_shape)
        axes = tuple(self.axis(ax) for ax in range(self.n_axes))
        grid = build_tile_grid(axes, image_shape, self.output_shape(image_shape), tile_shape)
        for axis, (n, tiles) in enumerate(zip(image_shape, grid.axes, strict=True)):
            self._check_crops(axis, n, tiles)
            if any(t.in_len < n for t in tiles):  # a crop pads by its own length
                self._check_same_padding(axis, n)
        return grid

    # -- internals ----------------------------------------------------------------------------

    def _check_rank(self, shape: Sequence[int]) -> None:
        if len(shape) != self.n_axes:
            raise GeometryError(
                f"expected {self.n_axes} spatial sizes, got {tuple(shape)}; pass one per axis"
            )

    def _check_same_padding(self, axis: int, n: int) -> None:
        """Dynamic 'same' padding must pad the image as it pads every crop (see
        [Dynamic same padding] in ``executor.graph``)."""
        bad = self._same_padding_mismatch(axis, n)
        if bad is None:
            return
        sizes = [m for m in range(max(1, n - 4 * self.align[axis]), n + 4 * self.align[axis] + 1)
                 if self._fits_same_padding(axis, m)]  # fmt: skip
        below = max((m for m in sizes if m < n), default=None)
        above = min((m for m in sizes if m > n), default=None)
        nearest = " or ".join(str(m) for m in (below, above) if m is not None)
        fix = f"use an image size of {nearest} px along that axis" if nearest else (
            "use another image size along that axis"
        )  # fmt: skip
        raise GeometryError(
            f"'{bad}' pads 'same' dynamically (TensorFlow style): an image of {n} px along axis "
            f"{axis} is padded unlike its tiles, which would not line up; {fix}"
        )

    def _same_padding_mismatch(self, axis: int, n: int) -> str | None:
        """The first dynamic 'same' padding that pads an image of ``n`` px unlike its crops."""
        lengths = self.node_lengths(axis, n)
        for node in self.graph.nodes:
            window = node.windows[axis] if node.windows is not None else None
            same = window is not None and window.same is not None
            if same and window.padding(lengths[node.inputs[0]])[0] != window.pad_lo:
                return node.where
        return None

    def _fits_same_padding(self, axis: int, n: int) -> bool:
        try:
            return (
                self.node_lengths(axis, n)[-1] > 0 and self._same_padding_mismatch(axis, n) is None
            )
        except GeometryError:
            return False

    def _check_crops(self, axis: int, n: int, tiles: Sequence[AxisTile]) -> None:
        """Every crop must produce the positions it owns (exact, from the size formulas)."""
        s = self.output_stride[axis]
        produced_by: dict[int, int] = {}  # outputs of a crop of each length (few distinct)
        for t in tiles:
            if t.in_len not in produced_by:
                produced_by[t.in_len] = self.node_lengths(axis, t.in_len)[-1]
            produced = produced_by[t.in_len]
            if t.out_stop - t.in_start // s > produced:
                raise GeometryError(
                    f"a crop [{t.in_start}, {t.in_stop}) along axis {axis} yields {produced} "
                    f"outputs, fewer than the {t.out_stop - t.in_start // s} it must own; "
                    "this trunk's padding is not supported for streaming"
                )


def analyze_trunk(trunk: nn.Module, n_axes: int = 2) -> TrunkGeometry:
    """Trace ``trunk`` and derive its exact streaming geometry without running it.

    Args:
        trunk: the streamable part of the network (traced, never modified).
        n_axes: spatial axes of its input: 2 for images, 3 for volumes.

    Raises:
        UnsupportedLayerError: the trunk holds an op that cannot be streamed exactly.

    Example:
        >>> geometry = analyze_trunk(trunk)
        >>> geometry.tile_grid((8192, 8192), (2048, 2048)).n_tiles
    """
    return TrunkGeometry.from_graph(trace_trunk(trunk, n_axes))


def build_tile_grid(
    axes: Sequence[AxisGeometry],
    image_shape: Sequence[int],
    output_shape: Sequence[int],
    tile_shape: Sequence[int],
) -> TileGrid:
    """The balanced tile grid from per-axis numbers alone (no model needed).

    This is the one rule for tile grids: ``TrunkGeometry.tile_grid`` uses it with the trunk's
    numbers, and a plan (``executor.Plan.tile_grid``) with the numbers it recorded, so both
    give the tiles that the executor runs.

    Args:
        axes: the tiling numbers of each spatial axis.
        image_shape: spatial shape of the image (px).
        output_shape: the trunk's output shape for it (positions).
        tile_shape: largest crop per axis (px), aligned down to each axis's ``align``.

    Raises:
        GeometryError: the output is empty, or a tile cannot own even one output position.
    """
    shapes = (image_shape, output_shape, tile_shape)
    if any(len(s) != len(axes) for s in shapes):
        raise GeometryError(
            f"image {tuple(image_shape)}, output {tuple(output_shape)} and tile "
            f"{tuple(tile_shape)} must each have {len(axes)} spatial sizes"
        )
    tiles, aligned = [], []
    for axis, (geometry, n, n_out, t) in enumerate(
        zip(axes, image_shape, output_shape, tile_shape, strict=True)
    ):
        if n_out < 1:
            rf = geometry.halo_lo + geometry.halo_hi + 1
            raise GeometryError(
                f"an image of {n} px along axis {axis} gives an empty output; the trunk "
                f"needs at least {rf} px"
            )
        t_aligned = geometry.aligned_tile(n, t)
        try:
            tiles.append(geometry.tiles(n, n_out, t_aligned))
        except GeometryError as err:
            raise GeometryError(f"along axis {axis}: {err}") from None
        aligned.append(t_aligned)
    return TileGrid(
        tuple(image_shape), tuple(output_shape), tuple(aligned), tuple(tiles),
        tuple(g.stride for g in axes),
    )  # fmt: skip


def _settle_same_padding(graph: SpatialGraph, align: tuple[int, ...]) -> SpatialGraph:
    """Give every dynamic 'same' padding the padding its crops get.

    Note: [Dynamic same padding] For any input that is a multiple of ``align``, the length of
    every map is ``k * align / stride + c`` for a constant ``c`` (each window divides exactly by
    its stride), so every crop but the last one, whose length the image's residue decides,
    sees the same residue at each 'same' padding and so the same padding. The geometry uses
    that padding; ``TrunkGeometry.tile_grid`` checks that the image gets it too.
    """
    if not any(w.same for node in graph.nodes for w in node.windows or ()):
        return graph
    nodes = list(graph.nodes)
    for axis in range(graph.n_axes):
        lengths: list[int] = []
        for i, node in enumerate(nodes):
            if not node.inputs:
                lengths.append(64 * align[axis])  # any multiple of align: the same residues
                continue
            n = lengths[node.inputs[0]]
            window = node.windows[axis] if node.windows is not None else None
            if window is not None and window.same is not None:
                lo, hi = window.padding(n)
                windows = list(node.windows)
                windows[axis] = dataclasses.replace(window, pad_lo=lo, pad_hi=hi)
                nodes[i] = node = dataclasses.replace(node, windows=tuple(windows))
            out = node.windows[axis].out_len(n, check=False) if node.windows is not None else n
            lengths.append(out)
    return SpatialGraph(tuple(nodes), graph.n_axes)


def _intervals(graph: SpatialGraph, axis: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Back-propagate the inclusive output interval [lo, hi] to every node (hull of reads)."""
    big = 1 << 62
    first = [big] * len(graph.nodes)
    last = [-big] * len(graph.nodes)
    first[graph.output], last[graph.output] = lo, hi
    for index in range(graph.output, -1, -1):
        node = graph.nodes[index]
        if first[index] > last[index]:
            continue  # does not feed the output
        if node.windows is None:
            reads = (first[index], last[index])
        else:
            reads = node.windows[axis].reads(first[index], last[index])
        for i in node.inputs:
            first[i] = min(first[i], reads[0])
            last[i] = max(last[i], reads[1])
    return list(zip(first, last, strict=True))


def _input_interval(graph: SpatialGraph, axis: int, lo: int, hi: int) -> tuple[int, int]:
    """What outputs ``[lo, hi]`` read of the graph's inputs (the hull over all of them: a
    segment's maps share one position grid and one crop)."""
    intervals = _intervals(graph, axis, lo, hi)
    read = [intervals[i] for i, node in enumerate(graph.nodes) if not node.inputs]
    used = [(a, b) for a, b in read if a <= b] or read
    return min(a for a, _ in used), max(b for _, b in used)
