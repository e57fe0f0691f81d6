"""The trunk as a graph of spatial operations: the data that geometry is computed from.

``executor.classify`` builds it from the trunk's traced code; ``executor.geometry`` derives
strides, halos and tile grids from it. Per spatial axis, a node is either a *window* op
(convolution, pooling, padding: output position ``j`` reads input positions
``j*stride - pad_lo + dilation*t`` for ``t in range(kernel)``) or a *pointwise* op (output
position ``j`` reads position ``j`` of every input).

Note: [Dynamic same padding]
    TensorFlow-style 'same' padding (timm's ``pad_same``) pads ``max((ceil(n/s)-1)*s +
    (k-1)*d + 1 - n, 0)`` px in total, the odd one after, for an input of ``n`` px: it depends
    on ``n mod s``. Crop origins and lengths are multiples of the trunk's alignment (except the
    last crop, which ends where the image ends), so every crop but the last sees the same
    residue at each such layer (``executor.geometry`` works it out), and the last one the
    image's. The geometry uses the crops' padding; a grid is exact when the image gets the same
    padding *before* the map at every such layer (then every crop's grid lines up with the
    image's), or when one crop covers the axis. ``TrunkGeometry.tile_grid`` checks that and
    otherwise names the nearest image sizes that work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from executor.errors import GeometryError

__all__ = [
    "SpatialGraph", "SpatialNode", "Window", "conv_windows", "pool_windows", "same_pad_windows",
    "same_padding",
]  # fmt: skip


def same_padding(n: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """TensorFlow 'same' padding (before, after) of an input of ``n`` px."""
    total = max((-(-n // stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
    return total // 2, total - total // 2


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window along one spatial axis (convolution, pooling or padding).

    Output position ``j`` reads input positions ``j*stride - pad_lo + dilation*t`` for
    ``t = 0 .. kernel-1``; positions outside ``[0, n)`` are padding. ``same`` is
    ``(kernel, stride, dilation)`` of a dynamic 'same' padding (then ``pad_lo``/``pad_hi`` are
    its padding as the crops get it; see [Dynamic same padding]). ``whole`` windows
    (space to depth) need an input length that is a multiple of the stride; ``reflect``
    padding needs an input longer than the padding. ``reflect`` and ``replicate`` padding
    copy pixels near the border into the padding (see ``reads``).
    """

    kernel: int
    stride: int
    pad_lo: int
    pad_hi: int
    dilation: int = 1
    ceil_mode: bool = False
    same: tuple[int, int, int] | None = None
    whole: bool = False
    reflect: bool = False
    replicate: bool = False

    def padding(self, n: int) -> tuple[int, int]:
        """(before, after) padding for an input of length ``n``."""
        return same_padding(n, *self.same) if self.same else (self.pad_lo, self.pad_hi)

    def out_len(self, n: int, *, check: bool = True) -> int:
        """Output length for an input of length ``n`` (PyTorch's conv/pool formula).

        Raises:
            GeometryError: with ``check``, a ``whole`` window's input is not a multiple of its
                stride, or a reflect padding is not shorter than the input.
        """
        if check and self.whole and n % self.stride:
            raise GeometryError(
                f"a space-to-depth step needs maps whose size is a multiple of {self.stride} "
                f"px, this one is {n}; use an image size that divides evenly"
            )
        lo, hi = self.padding(n)
        if check and self.reflect and n <= max(lo, hi):
            raise GeometryError(
                f"reflect padding of {max(lo, hi)} px needs a map longer than that, this one is "
                f"{n}; use a larger image or tile"
            )
        span = n + lo + hi - self.dilation * (self.kernel - 1) - 1
        if not self.ceil_mode:
            return max(0, span // self.stride + 1)
        out = -(-span // self.stride) + 1  # Python's // floors, as PyTorch's div_rtn
        # PyTorch drops a last window that would start inside the right padding.
        if (out - 1) * self.stride >= n + lo:
            out -= 1
        return max(0, out)

    def reads(self, lo: int, hi: int) -> tuple[int, int]:
        """Input interval (inclusive) read by output positions ``lo..hi``.

        A window that reaches ``m >= n`` into a reflect padding reads ``2(n-1) - m``, one
        into a replicate padding reads ``n - 1``: at most ``2 * pad_hi`` (``pad_hi``) before
        its last position, as ``m <= n - 1 + pad_hi``; the same mirrored at the start. Only
        numbers are known here, not ``n``, so every window reads that far: a crop that owns
        outputs in the padding then holds the pixels they copy.
        """
        first = lo * self.stride - self.pad_lo
        last = hi * self.stride - self.pad_lo + self.dilation * (self.kernel - 1)
        if self.reflect or self.replicate:
            copies = 2 if self.reflect else 1  # positions mirrored per pixel of padding
            return min(first, last - copies * self.pad_hi), max(last, first + copies * self.pad_lo)
        return first, last


@dataclass(frozen=True, slots=True)
class SpatialNode:
    """One operation of the trunk that carries spatial extent.

    Attributes:
        name: the fx node name (unique).
        where: qualified module name or function, for messages.
        inputs: indices (into ``SpatialGraph.nodes``) of the spatial tensors it reads.
        windows: one ``Window`` per spatial axis, or ``None`` for a pointwise op.
        spatial_dims: tensor dimension of each spatial axis in this node's output.
        rank: number of dimensions of this node's output tensor.
    """

    name: str
    where: str
    inputs: tuple[int, ...]
    windows: tuple[Window, ...] | None
    spatial_dims: tuple[int, ...]
    rank: int


@dataclass(frozen=True, slots=True)
class SpatialGraph:
    """The trunk as a topologically ordered list of spatial nodes; node 0 is the image."""

    nodes: tuple[SpatialNode, ...]
    n_axes: int

    @property
    def output(self) -> int:
        return len(self.nodes) - 1

    def subgraph(self, sources: Sequence[int], inner: Sequence[int], outputs: Sequence[int],
                 name: str = "outputs") -> SpatialGraph:  # fmt: skip
        """The part of the graph that computes ``outputs`` from ``sources``.

        Args:
            sources: the part's input maps (become inputs: nodes without inputs, on one grid).
            inner: the nodes it computes, in graph order (every input of one is a source or
                another inner node).
            outputs: the maps it hands on; when there are several (or the one is not last),
                a pointwise node named ``name`` joins them as the part's output, so that the
                outputs' positions are owned together.
        """
        index: dict[int, int] = {}
        nodes: list[SpatialNode] = []
        for i in sources:
            index[i] = len(nodes)
            node = self.nodes[i]
            nodes.append(SpatialNode(node.name, node.where, (), None, node.spatial_dims,
                                     node.rank))  # fmt: skip
        for i in inner:
            node = self.nodes[i]
            try:
                inputs = tuple(index[j] for j in node.inputs)
            except KeyError:
                raise ValueError(f"node '{node.name}' reads a map outside the part") from None
            index[i] = len(nodes)
            nodes.append(SpatialNode(node.name, node.where, inputs, node.windows,
                                     node.spatial_dims, node.rank))  # fmt: skip
        last = index[outputs[0]]
        if len(outputs) > 1 or last != len(nodes) - 1:
            first = self.nodes[outputs[0]]
            nodes.append(SpatialNode(name, name, tuple(index[o] for o in outputs), None,
                                     first.spatial_dims, first.rank))  # fmt: skip
        return SpatialGraph(tuple(nodes), self.n_axes)


# --------------------------------------------------------------------------------------------
# Window helpers
# --------------------------------------------------------------------------------------------


def _tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ValueError(f"expected {n} values, got {value!r}")
    return values


def conv_windows(
    kernel: tuple[int, ...],
    stride: int | tuple[int, ...],
    padding: str | int | tuple[int, ...],
    dilation: int | tuple[int, ...],
) -> tuple[Window, ...]:
    n = len(kernel)
    strides, dilations = _tuple(stride, n), _tuple(dilation, n)
    if padding == "valid":
        pads = [(0, 0)] * n
    elif padding == "same":
        # PyTorch pads total = dilation*(kernel-1), the odd pixel on the right.
        totals = [d * (k - 1) for k, d in zip(kernel, dilations, strict=True)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in _tuple(padding, n)]  # type: ignore[arg-type]
    return tuple(
        Window(k, s, lo, hi, d)
        for k, s, (lo, hi), d in zip(kernel, strides, pads, dilations, strict=True)
    )


def pool_windows(
    kernel: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None,
    padding: int | tuple[int, ...],
    dilation: int | tuple[int, ...],
    ceil_mode: bool,
    n: int,
) -> tuple[Window, ...]:
    kernels = _tuple(kernel, n)
    strides = kernels if stride is None or stride == [] or stride == () else _tuple(stride, n)
    pads, dilations = _tuple(padding, n), _tuple(dilation, n)
    return tuple(
        Window(k, s, p, p, d, ceil_mode)
        for k, s, p, d in zip(kernels, strides, pads, dilations, strict=True)
    )


def same_pad_windows(
    kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int], n: int
) -> tuple[Window, ...]:
    """Dynamic 'same' padding as a padding window per axis (see [Dynamic same padding])."""
    windows = []
    for k, s, d in zip(_tuple(kernel, n), _tuple(stride, n), _tuple(dilation, n), strict=True):
        lo, hi = same_padding(s, k, s, d)  # n mod s == 0
        windows.append(Window(1, 1, lo, hi, 1, False, (k, s, d)))
    return tuple(windows)
