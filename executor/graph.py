"""Reduce a trunk's forward code to a small graph of spatial operations.

The trunk is traced with ``torch.fx`` (so arbitrary forward code works, not only
``nn.Sequential``) and every traced operation is classified per spatial axis as one of:

* a *window* op (convolution or pooling): output position ``j`` reads input positions
  ``j*stride - pad_lo + dilation*t`` for ``t in range(kernel)``;
* a *pointwise* op (activation, eval-mode norm, residual add, channel concat, permute,
  channel-wise LayerNorm/Linear): output position ``j`` reads position ``j`` of every input.

Anything else inside the trunk (global pooling, reshapes, attention, train-mode BatchNorm
statistics, ...) would make a tile's output depend on pixels outside its receptive field, so it
is refused here, before any work, with the module's qualified name and a fix.

The graph is only used for geometry: the executor runs the user's own module on each tile.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.fx
import torch.nn.functional as F  # noqa: N812
from torch import nn

from executor.errors import UnsupportedLayerError

__all__ = ["SpatialGraph", "SpatialNode", "Window", "trace_trunk"]


@dataclass(frozen=True, slots=True)
class Window:
    """A sliding window along one spatial axis (convolution or pooling).

    Output position ``j`` reads input positions ``j*stride - pad_lo + dilation*t`` for
    ``t = 0 .. kernel-1``; positions outside ``[0, n)`` are padding.
    """

    kernel: int
    stride: int
    pad_lo: int
    pad_hi: int
    dilation: int = 1
    ceil_mode: bool = False

    def out_len(self, n: int) -> int:
        """Output length for an input of length ``n`` (PyTorch's conv/pool formula)."""
        span = n + self.pad_lo + self.pad_hi - self.dilation * (self.kernel - 1) - 1
        if not self.ceil_mode:
            return max(0, span // self.stride + 1)
        out = -(-span // self.stride) + 1  # Python's // floors, as PyTorch's div_rtn
        # PyTorch drops a last window that would start inside the right padding.
        if (out - 1) * self.stride >= n + self.pad_lo:
            out -= 1
        return max(0, out)

    def reads(self, lo: int, hi: int) -> tuple[int, int]:
        """Input interval (inclusive) read by output positions ``lo..hi``."""
        first = lo * self.stride - self.pad_lo
        last = hi * self.stride - self.pad_lo + self.dilation * (self.kernel - 1)
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
    """

    name: str
    where: str
    inputs: tuple[int, ...]
    windows: tuple[Window, ...] | None
    spatial_dims: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SpatialGraph:
    """The trunk as a topologically ordered list of spatial nodes; node 0 is the image."""

    nodes: tuple[SpatialNode, ...]
    n_axes: int

    @property
    def output(self) -> int:
        return len(self.nodes) - 1


# --------------------------------------------------------------------------------------------
# Classification tables
# --------------------------------------------------------------------------------------------

_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Softmax2d,
    nn.LocalResponseNorm,
    # Norms with fixed statistics are per-position affine maps; their train mode is refused
    # at run time by executor.modes.
    nn.modules.batchnorm._BatchNorm,
    # Dropout is only allowed when inactive (eval mode or p == 0), checked at run time.
    nn.modules.dropout._DropoutNd,
)  # fmt: skip

_REFUSED_MODULES: tuple[tuple[type[nn.Module], str, str], ...] = (
    (
        nn.modules.pooling._AdaptiveAvgPoolNd,
        "adaptive/global pooling mixes every position of the map",
        "end the trunk before it (split the model there) so it runs in the head",
    ),
    (
        nn.modules.pooling._AdaptiveMaxPoolNd,
        "adaptive/global pooling mixes every position of the map",
        "end the trunk before it (split the model there) so it runs in the head",
    ),
    (
        nn.GroupNorm,
        "GroupNorm normalises over all spatial positions",
        "replace it by a channel-wise norm or end the trunk before it",
    ),
    (
        nn.modules.instancenorm._InstanceNorm,
        "InstanceNorm normalises over all spatial positions",
        "replace it by a channel-wise norm or end the trunk before it",
    ),
    (
        nn.Flatten,
        "flattening merges spatial positions",
        "end the trunk before it so it runs in the head",
    ),
    (
        nn.MultiheadAttention,
        "attention is non-local",
        "end the trunk before it so it runs in the head",
    ),
    (
        nn.modules.conv._ConvTransposeNd,
        "transposed convolutions are not supported yet",
        "end the trunk before it",
    ),
    (
        nn.Upsample,
        "upsampling is not supported yet",
        "end the trunk before it",
    ),
)

_POINTWISE_FUNCTIONS: frozenset[Any] = frozenset(
    {
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        operator.truediv, operator.itruediv, operator.neg, operator.pos,
        torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.sigmoid,
        torch.tanh, torch.exp, torch.abs, torch.clamp, torch.clip, torch.maximum, torch.minimum,
        torch.where, torch.square, torch.sqrt, torch.rsqrt,
        F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.elu, F.selu, F.hardswish,
        F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh, F.logsigmoid,
    }
)  # fmt: skip

_POINTWISE_METHODS: frozenset[str] = frozenset(
    {
        "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "relu", "relu_",
        "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clamp_min", "clamp_max",
        "exp", "abs", "sqrt", "rsqrt", "square", "contiguous", "clone", "float", "double", "half",
        "bfloat16", "to", "type", "type_as", "__add__", "__mul__", "__radd__", "__rmul__",
    }
)  # fmt: skip

_MOVE_SPLIT = "end the trunk before it (split the model there) so it runs in the head"

# Tensor methods and functions users reach for that mix positions, with the reason.
_NONLOCAL = {
    name: "it reduces over or reshapes the spatial positions"
    for name in (
        "mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "flatten", "view",
        "reshape", "unflatten", "transpose", "size", "interpolate", "adaptive_avg_pool2d",
        "adaptive_max_pool2d", "upsample", "pad", "roll", "flip", "getitem", "getattr",
    )
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


def _tuple(value: int | tuple[int, ...] | list[int], n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"expected {n} values, got {value!r}")
    return tuple(int(v) for v in value)


def _conv_windows(
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


def _pool_windows(
    kernel: int | tuple[int, ...],
    stride: int | tuple[int, ...] | None,
    padding: int | tuple[int, ...],
    dilation: int | tuple[int, ...],
    ceil_mode: bool,
    n: int,
) -> tuple[Window, ...]:
    kernels = _tuple(kernel, n)
    strides = kernels if stride is None or stride == [] else _tuple(stride, n)
    pads, dilations = _tuple(padding, n), _tuple(dilation, n)
    return tuple(
        Window(k, s, p, p, d, ceil_mode)
        for k, s, p, d in zip(kernels, strides, pads, dilations, strict=True)
    )


@dataclass(frozen=True, slots=True)
class _Const:
    """A traced value without spatial extent: a parameter, buffer, or Python value."""

    shape: tuple[int, ...] | None  # None: not a tensor


class _Builder:
    """Walks an fx graph once and builds the SpatialGraph."""

    def __init__(self, gm: torch.fx.GraphModule, n_axes: int) -> None:
        self.gm = gm
        self.n_axes = n_axes
        # Every spatial map keeps N and C: its rank is 2 + n_axes whatever the layout.
        self.rank = 2 + n_axes
        self.modules = dict(gm.named_modules())
        self.nodes: list[SpatialNode] = []
        self.env: dict[torch.fx.Node, int | _Const] = {}

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def where(node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        target = getattr(node.target, "__name__", str(node.target))
        if stack:
            path = list(stack.values())[-1][0]
            if path:
                return f"{path} ({target})"
        return f"{target} (at {node.name})"

    def refuse(self, node: torch.fx.Node, reason: str, fix: str = _MOVE_SPLIT) -> NoReturn:
        raise UnsupportedLayerError(self.where(node), reason, fix)

    def spatial_args(self, node: torch.fx.Node) -> list[int]:
        found: list[int] = []

        def visit(arg: Any) -> Any:
            value = self.env[arg]
            if isinstance(value, int):
                found.append(value)
            return arg

        torch.fx.node.map_arg((node.args, node.kwargs), visit)
        return found

    def const_shapes(self, node: torch.fx.Node) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def visit(arg: Any) -> Any:
            value = self.env[arg]
            if isinstance(value, _Const) and value.shape is not None:
                shapes.append(value.shape)
            return arg

        torch.fx.node.map_arg((node.args, node.kwargs), visit)
        for arg in (*node.args, *node.kwargs.values()):
            if isinstance(arg, torch.Tensor):
                shapes.append(tuple(arg.shape))
        return shapes

    def add(self, node: torch.fx.Node, inputs: list[int], windows: tuple[Window, ...] | None,
            spatial_dims: tuple[int, ...]) -> None:  # fmt: skip
        self.env[node] = len(self.nodes)
        self.nodes.append(
            SpatialNode(node.name, self.where(node), tuple(inputs), windows, spatial_dims)
        )

    def standard_input(self, node: torch.fx.Node, inputs: list[int], what: str) -> int:
        """The single spatial input of a window op, which must be in (N, C, *spatial) layout."""
        if len(inputs) != 1:
            self.refuse(node, f"{what} must read exactly one feature map")
        src = self.nodes[inputs[0]]
        expected = tuple(range(2, 2 + self.n_axes))
        if src.spatial_dims != expected:
            self.refuse(
                node,
                f"{what} reads a map whose spatial axes are at dims {src.spatial_dims}, "
                f"expected {expected}",
                "permute back to (N, C, *spatial) before it",
            )
        return inputs[0]

    # -- node kinds ---------------------------------------------------------------------------

    def pointwise(self, node: torch.fx.Node, inputs: list[int]) -> None:
        """Elementwise op: all spatial inputs aligned, constants may broadcast over channels."""
        if not inputs:
            self.env[node] = _Const(None)
            return
        first = self.nodes[inputs[0]].spatial_dims
        for i in inputs[1:]:
            if self.nodes[i].spatial_dims != first:
                self.refuse(node, "combines maps with different layouts", "permute them alike")
        for shape in self.const_shapes(node):
            # Broadcasting aligns trailing dims: a constant may vary along channels only.
            offset = self.rank - len(shape)
            for dim in first:
                if 0 <= dim - offset < len(shape) and shape[dim - offset] != 1:
                    self.refuse(
                        node,
                        f"a constant of shape {shape} varies along spatial dim {dim} "
                        "(position-dependent, e.g. a positional embedding)",
                    )
        self.add(node, inputs, None, first)

    def channel_op(self, node: torch.fx.Node, inputs: list[int], last_dims: int, what: str) -> None:
        """LayerNorm/Linear acting on the last ``last_dims`` dims, which must not be spatial."""
        if len(inputs) != 1:
            self.refuse(node, f"{what} must read exactly one feature map")
        dims = self.nodes[inputs[0]].spatial_dims
        if any(d >= self.rank - last_dims for d in dims):
            self.refuse(
                node,
                f"{what} acts on spatial dims (only channel-wise use is local)",
                "apply it over channels only, or end the trunk before it",
            )
        self.add(node, inputs, None, dims)

    def window(self, node: torch.fx.Node, inputs: list[int], windows: tuple[Window, ...],
               what: str) -> None:  # fmt: skip
        src = self.standard_input(node, inputs, what)
        if len(windows) != self.n_axes:
            self.refuse(node, f"{what} has {len(windows)} spatial axes, the image {self.n_axes}")
        self.add(node, [src], windows, self.nodes[src].spatial_dims)

    def permute(self, node: torch.fx.Node, inputs: list[int], dims: Any) -> None:
        order = [int(d) for d in (dims[0] if len(dims) == 1 else dims)]
        ndim = len(order)
        order = [d % ndim for d in order]
        old = self.nodes[inputs[0]].spatial_dims
        self.add(node, inputs, None, tuple(order.index(d) for d in old))

    def cat(self, node: torch.fx.Node, inputs: list[int]) -> None:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        spatial = self.nodes[inputs[0]].spatial_dims
        if int(dim) % self.rank in spatial or int(dim) % self.rank == 0:
            self.refuse(
                node,
                f"concatenation along dim {dim} (a spatial or batch axis)",
                "concatenate along channels only",
            )
        self.pointwise(node, inputs)

    # -- dispatch -----------------------------------------------------------------------------

    def call_module(self, node: torch.fx.Node, inputs: list[int]) -> None:
        module = self.modules[str(node.target)]
        for kind, reason, fix in _REFUSED_MODULES:
            if isinstance(module, kind):
                self.refuse(node, f"{type(module).__name__}: {reason}", fix)
        name = type(module).__name__
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.padding_mode != "zeros":
                self.refuse(
                    node,
                    f"padding_mode='{module.padding_mode}' is not supported (only zero padding "
                    "matches at tile borders)",
                    "use padding_mode='zeros'",
                )
            windows = _conv_windows(
                module.kernel_size, module.stride, module.padding, module.dilation
            )
            self.window(node, inputs, windows, name)
        elif isinstance(module, nn.modules.pooling._MaxPoolNd):
            if module.return_indices:
                self.refuse(node, "MaxPool with return_indices", "set return_indices=False")
            n = self.n_axes
            windows = _pool_windows(
                module.kernel_size, module.stride, module.padding, module.dilation,
                module.ceil_mode, n,
            )  # fmt: skip
            self.window(node, inputs, windows, name)
        elif isinstance(module, nn.modules.pooling._AvgPoolNd):
            windows = _pool_windows(
                module.kernel_size, module.stride, module.padding, 1, module.ceil_mode,
                self.n_axes,
            )  # fmt: skip
            self.window(node, inputs, windows, name)
        elif isinstance(module, _POINTWISE_MODULES):
            self.pointwise(node, inputs)
        elif isinstance(module, nn.LayerNorm):
            self.channel_op(node, inputs, len(module.normalized_shape), "LayerNorm")
        elif isinstance(module, nn.Linear):
            self.channel_op(node, inputs, 1, "Linear")
        elif isinstance(module, nn.Softmax | nn.LogSoftmax):
            self.softmax(node, inputs, module.dim)
        else:
            self.refuse(
                node,
                f"{name} is not a supported streaming layer",
                "end the trunk before it, or open an issue to add it",
            )

    def softmax(self, node: torch.fx.Node, inputs: list[int], dim: int | None) -> None:
        spatial = self.nodes[inputs[0]].spatial_dims
        if dim is None or dim % self.rank in spatial:
            self.refuse(node, f"softmax over dim {dim} mixes spatial positions")
        self.pointwise(node, inputs)

    def call_function(self, node: torch.fx.Node, inputs: list[int]) -> None:
        fn = node.target
        if not inputs:
            self.env[node] = _Const(None)  # arithmetic on constants only
            return

        def arg(i: int, key: str, default: Any) -> Any:
            return node.kwargs.get(key, node.args[i] if len(node.args) > i else default)

        windows = self.functional_windows(node, fn, arg)
        if windows is not None:
            self.window(node, inputs[:1], windows, getattr(fn, "__name__", "window op"))
        elif self.inactive_random_op(node, fn, arg):
            self.pointwise(node, inputs[:1])
        elif fn in (torch.cat, torch.concat):
            self.cat(node, inputs)
        elif fn is torch.permute:
            self.permute(node, inputs, node.args[1:])
        elif fn is F.layer_norm:
            shape = arg(1, "normalized_shape", ())
            n_dims = 1 if isinstance(shape, int) else len(shape)
            self.channel_op(node, inputs[:1], n_dims, "layer_norm")
        elif fn is F.linear:
            self.channel_op(node, inputs[:1], 1, "linear")
        elif fn in (F.softmax, F.log_softmax, torch.softmax):
            self.softmax(node, inputs, arg(1, "dim", None))
        elif fn in _POINTWISE_FUNCTIONS:
            self.pointwise(node, inputs)
        else:
            name = getattr(fn, "__name__", str(fn))
            why = _NONLOCAL.get(name, "it is not a supported streaming operation")
            self.refuse(node, f"the operation '{name}' is not allowed inside the trunk: {why}")

    def functional_windows(
        self, node: torch.fx.Node, fn: Any, arg: Callable[[int, str, Any], Any]
    ) -> tuple[Window, ...] | None:
        """Windows of a functional convolution or pooling call; None for other functions."""
        if fn in (F.conv1d, F.conv2d, F.conv3d):
            weight = self.env[arg(1, "weight", None)]
            if not isinstance(weight, _Const) or weight.shape is None:
                self.refuse(node, "the convolution's weight is computed from the image")
            return _conv_windows(
                weight.shape[2:], arg(3, "stride", 1), arg(4, "padding", 0), arg(5, "dilation", 1)
            )
        if fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            if arg(6, "return_indices", False):
                self.refuse(node, "max_pool with return_indices", "set return_indices=False")
            return _pool_windows(
                arg(1, "kernel_size", None), arg(2, "stride", None), arg(3, "padding", 0),
                arg(4, "dilation", 1), bool(arg(5, "ceil_mode", False)), self.n_axes,
            )  # fmt: skip
        if fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
            return _pool_windows(
                arg(1, "kernel_size", None), arg(2, "stride", None), arg(3, "padding", 0), 1,
                bool(arg(4, "ceil_mode", False)), self.n_axes,
            )  # fmt: skip
        return None

    def inactive_random_op(
        self, node: torch.fx.Node, fn: Any, arg: Callable[[int, str, Any], Any]
    ) -> bool:
        """True for dropout, batch_norm and stochastic depth calls that are inactive (then
        pointwise); refuses active ones, whose result would differ per tile."""
        if fn in (F.dropout, F.dropout2d, F.dropout3d, F.alpha_dropout):
            if arg(2, "training", True) and arg(1, "p", 0.5) > 0:
                self.refuse(node, "active dropout differs per tile", "call trunk.eval()")
            return True
        if fn is F.batch_norm:
            if arg(5, "training", False):
                self.refuse(
                    node,
                    "batch_norm with training=True uses batch statistics over all positions",
                    "call trunk.eval() to freeze its statistics (its affine weights still train)",
                )
            return True
        if getattr(fn, "__name__", "") == "stochastic_depth":  # torchvision.ops (fx-wrapped)
            if arg(3, "training", True) and arg(1, "p", 0.0) > 0:
                self.refuse(node, "active stochastic depth differs per tile", "call trunk.eval()")
            return True
        return False

    def call_method(self, node: torch.fx.Node, inputs: list[int]) -> None:
        method = str(node.target)
        if not inputs:
            self.env[node] = _Const(None)
        elif method == "permute":
            self.permute(node, inputs, node.args[1:])
        elif method in _POINTWISE_METHODS:
            self.pointwise(node, inputs)
        elif method in ("softmax", "log_softmax"):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            self.softmax(node, inputs, dim)
        else:
            why = _NONLOCAL.get(method, "it is not a supported streaming operation")
            self.refuse(node, f"the tensor method '.{method}()' is not allowed in the trunk: {why}")

    def build(self) -> SpatialGraph:
        output_seen = False
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if self.nodes:
                    self.refuse(node, "the trunk takes more than one input", "take one image")
                self.add(node, [], None, tuple(range(2, 2 + self.n_axes)))
            elif node.op == "get_attr":
                value = operator.attrgetter(str(node.target))(self.gm)
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
                self.env[node] = _Const(shape)
            elif node.op == "output":
                self.finish(node)
                output_seen = True
            else:
                inputs = self.spatial_args(node)
                handler: Callable[[torch.fx.Node, list[int]], None] = getattr(self, node.op)
                handler(node, inputs)
        assert output_seen
        return SpatialGraph(tuple(self.nodes), self.n_axes)

    def finish(self, node: torch.fx.Node) -> None:
        result = node.args[0]
        value = self.env.get(result) if isinstance(result, torch.fx.Node) else None
        if not isinstance(value, int):
            self.refuse(node, "the trunk must return one feature map tensor", "return a tensor")
        if self.nodes[value].spatial_dims != tuple(range(2, 2 + self.n_axes)):
            self.refuse(node, "the trunk's output is not in (N, C, *spatial) layout",
                        "permute back before returning")  # fmt: skip
        if value != len(self.nodes) - 1:
            # Keep the output last so that topological order ends at it; nodes after it
            # (dead code) are dropped by re-adding the output as an alias.
            self.add(node, [value], None, self.nodes[value].spatial_dims)


def trace_trunk(trunk: nn.Module, n_axes: int) -> SpatialGraph:
    """Trace ``trunk`` and reduce it to a SpatialGraph over ``n_axes`` spatial axes.

    Args:
        trunk: the streamable part of the network. It is traced, never modified.
        n_axes: number of spatial axes of its input (2 for images, 3 for volumes).

    Raises:
        UnsupportedLayerError: an op inside the trunk cannot be streamed, or the trunk cannot
            be traced by torch.fx.
    """
    try:
        gm = torch.fx.symbolic_trace(trunk)
    except Exception as err:  # fx raises many kinds; report them uniformly
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsupportedLayerError(
            type(trunk).__name__,
            f"its forward cannot be traced by torch.fx ({first})",
            "make the trunk's forward free of data-dependent Python control flow",
        ) from err
    return _Builder(gm, n_axes).build()
