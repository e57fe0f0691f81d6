"""Classify a trunk's traced code into a ``SpatialGraph``: what is local, what is not.

The trunk is traced with ``torch.fx`` (``executor.trace``: real model code, asserts and all)
and every traced value is classified. Tensors that carry the image's spatial extent become
nodes of a ``SpatialGraph``, per spatial axis one of:

* a *window* op (convolution, pooling, padding): output position ``j`` reads input positions
  ``j*stride - pad_lo + dilation*t`` for ``t in range(kernel)``;
* a *pointwise* op (activations, eval-mode norms, residual adds, channel concatenation, channel
  splits and shuffles, permutes, channel-wise LayerNorm/Linear, reductions over channels):
  output position ``j`` reads position ``j`` of every input.

Everything else is tracked without becoming a node:

* values computed from parameters, buffers and literals only (weight standardisation, a
  layer scale) are evaluated for real: they are the same for every tile;
* a map's metadata (``ndim``, ``dtype``, ``device``, its batch and channel sizes) is the same
  for a tile as for the image, so it may be used freely;
* a map's *spatial* size (``x.shape[-1]``) is not: a tile is smaller than the image. It may be
  checked (asserts) and used to reshape a map without touching its spatial dims (channel
  shuffle); anything else that computes with it is refused, because the tile would compute
  with its own size instead of the image's.

Anything that would make a tile's output depend on pixels outside its receptive field (global
pooling, squeeze-excitation, reshapes over positions, attention, train-mode BatchNorm...) is
refused here, before any work, with the module's qualified name and a fix.

The graph is only used for geometry: the executor runs the user's own module on each tile.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.fx
import torch.nn.functional as F  # noqa: N812
from torch import nn

from executor.errors import UnsupportedLayerError
from executor.graph import (
    SpatialGraph,
    SpatialNode,
    Window,
    conv_windows,
    pool_windows,
    same_pad_windows,
)
from executor.layout import GLOBAL, LayoutOps
from executor.statistics import EFFECTS, MOMENTS, NORMALIZERS, decompose_norms
from executor.trace import (
    Traced,
    functionalize,
    same_padding_functions,
    space_to_depth_types,
    trace_leaves,
)
from executor.values import (
    Const,
    Flat,
    Maps,
    Meta,
    NotConstantError,
    PositionCount,
    SizeDep,
    SpatialSize,
    Stat,
    Value,
    shape_of,
)

__all__ = ["Classified", "MapInput", "StatInput", "classify", "trace_trunk", "traced_trunk"]


# --------------------------------------------------------------------------------------------
# Classification tables
# --------------------------------------------------------------------------------------------

_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Softmax2d,
    nn.Hardshrink, nn.Softshrink, nn.RReLU,
    # Norms with fixed statistics are per-position affine maps; their train mode is refused
    # at run time by executor.modes.
    nn.modules.batchnorm._BatchNorm,
    # Dropout is only allowed when inactive (eval mode or p == 0), checked at run time.
    nn.modules.dropout._DropoutNd,
)  # fmt: skip

_MOVE_SPLIT = "end the trunk before it (split the model there) so it runs in the head"

_REFUSED_MODULES: tuple[tuple[type[nn.Module], str, str], ...] = (
    (nn.Flatten, "flattening merges spatial positions", _MOVE_SPLIT),
    (nn.MultiheadAttention, "attention mixes all positions", _MOVE_SPLIT),
    (nn.modules.conv._ConvTransposeNd, "transposed convolutions are not supported yet",
     "end the trunk before it"),
    (nn.Upsample, "upsampling is not supported yet", "end the trunk before it"),
    (nn.LocalResponseNorm, "LocalResponseNorm is not supported yet", "end the trunk before it"),
)  # fmt: skip

# Elementwise functions and tensor methods (in-place variants are the name plus '_').
_ELEMENTWISE = frozenset(
    {
        "abs", "acos", "acosh", "add", "addcdiv", "addcmul", "asin", "asinh", "atan", "atan2",
        "atanh", "ceil", "clamp", "clamp_max", "clamp_min", "clip", "cos", "cosh", "div",
        "divide", "erf", "erfc", "erfinv", "exp", "exp2", "expm1", "float_power", "floor",
        "floor_divide", "fmod", "frac", "hypot", "lerp", "log", "log10", "log1p", "log2",
        "logaddexp", "logit", "maximum", "minimum", "mul", "multiply", "nan_to_num", "neg",
        "negative", "pow", "reciprocal", "relu", "remainder", "round", "rsqrt", "sigmoid", "sign",
        "sgn", "sin", "sinh", "sqrt", "square", "sub", "subtract", "tan", "tanh", "trunc",
        "true_divide", "where", "xlogy", "masked_fill", "heaviside", "copysign", "fmax", "fmin",
        "relu6", "leaky_relu", "gelu", "silu", "mish", "elu", "selu", "celu", "hardswish",
        "hardsigmoid", "hardtanh", "softplus", "softsign", "logsigmoid", "tanhshrink",
        "threshold", "hardshrink", "softshrink", "rrelu", "prelu",
    }
)  # fmt: skip
_IDENTITY_METHODS = frozenset(
    {
        "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type", "type_as",
        "detach", "requires_grad_", "cpu", "cuda",
    }
)  # fmt: skip
_OPERATORS = frozenset(
    {
        operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
        operator.truediv, operator.itruediv, operator.floordiv, operator.neg, operator.pos,
        operator.pow, operator.abs, operator.mod, operator.eq, operator.ne, operator.lt,
        operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.xor,
        operator.invert,
    }
)  # fmt: skip
_REDUCTIONS = frozenset(
    {
        "mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp", "prod",
        "median", "nansum", "nanmean", "argmax", "argmin", "all", "any", "std_mean", "var_mean",
        "count_nonzero",
    }
)  # fmt: skip
_RANDOM = frozenset(
    {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "randperm",
     "bernoulli", "normal", "uniform", "multinomial", "poisson", "exponential",
     "geometric", "cauchy", "log_normal", "random"}
)  # fmt: skip
_PERMUTES = frozenset({"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis"})
_SPLITS = frozenset({"split", "chunk", "tensor_split", "split_with_sizes", "unbind"})
_METADATA = frozenset({"ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"})
_REFUSED_FUNCTIONS = {
    "interpolate": "upsampling/resizing is not supported yet",
    "upsample": "upsampling/resizing is not supported yet",
    "grid_sample": "sampling at computed positions is not local",
    "unfold": "unfolding turns positions into channels",
    "fold": "folding turns channels into positions",
    "pixel_shuffle": "pixel shuffle (depth to space) is upsampling, not supported yet",
    "roll": "rolling moves pixels across the whole map",
    "flip": "flipping mirrors the whole map",
    "scaled_dot_product_attention": "attention mixes all positions",
    "group_norm": f"group norm normalises over all positions: {GLOBAL}",
    "instance_norm": f"instance norm normalises over all positions: {GLOBAL}",
    "adaptive_avg_pool1d": f"adaptive/global pooling: {GLOBAL}",
    "adaptive_avg_pool2d": f"adaptive/global pooling: {GLOBAL}",
    "adaptive_avg_pool3d": f"adaptive/global pooling: {GLOBAL}",
    "adaptive_max_pool1d": f"adaptive/global pooling: {GLOBAL}",
    "adaptive_max_pool2d": f"adaptive/global pooling: {GLOBAL}",
    "adaptive_max_pool3d": f"adaptive/global pooling: {GLOBAL}",
    "matmul": "matrix products over positions mix them",
    "bmm": "matrix products over positions mix them",
    "einsum": "einsum is not classified yet",
    "cumsum": "cumulative sums run over the map",
}


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------


def _name(fn: Any) -> str:
    return getattr(fn, "__name__", str(fn))


@dataclass(frozen=True, slots=True)
class MapInput:
    """A graph input that is a feature map, with its spatial dims at ``spatial_dims``."""

    spatial_dims: tuple[int, ...]
    rank: int


@dataclass(frozen=True, slots=True)
class StatInput:
    """A graph input that is a statistic of whole maps (the same for every tile)."""


Input = MapInput | StatInput


@dataclass(frozen=True)
class Classified:
    """What every node of a traced trunk is.

    Attributes:
        gm: the graph module classified (norms over whole maps decomposed, see
            ``executor.statistics``).
        graph: its feature maps as spatial operations (node names are the fx nodes').
        values: fx node name -> its abstract value (``executor.values``): an ``int`` (index
            into ``graph.nodes``) for a map, ``Stat``/``Flat`` for values computed from whole
            maps, ``Const``/``Meta``/``SizeDep`` for the rest.
        reductions: node name -> (what it computes, the map node it reduces) for every node
            where a map becomes a statistic.
        effects: nodes that change buffers in place (running statistics), run once per pass.
    """

    gm: torch.fx.GraphModule
    graph: SpatialGraph
    values: dict[str, Value]
    reductions: dict[str, tuple[str, str]]
    effects: frozenset[str]


class _Builder(LayoutOps):
    """Walks an fx graph once and builds the SpatialGraph."""

    def __init__(self, traced: Traced, n_axes: int, inputs: Sequence[Input] | None = None
                 ) -> None:  # fmt: skip
        self.gm = traced.gm
        self.n_axes = n_axes
        self.inputs = list(inputs) if inputs is not None else [
            MapInput(tuple(range(2, 2 + n_axes)), 2 + n_axes)
        ]  # fmt: skip
        self.modules = dict(self.gm.named_modules())
        self.opaque = traced.opaque
        self.nodes: list[SpatialNode] = []
        self.grids: list[int] = []  # per node: the node whose positions it has
        self.env: dict[torch.fx.Node, Value] = {}
        self.reductions: dict[str, tuple[str, str]] = {}
        self.effects: set[str] = set()

    # -- helpers ------------------------------------------------------------------------------

    @staticmethod
    def where(node: torch.fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        stack = node.meta.get("nn_module_stack")
        target = _name(node.target)
        if stack:
            path = list(stack.values())[-1][0]
            if path:
                return f"{path} ({target})"
        return f"{target} (at {node.name})"

    def refuse(self, node: torch.fx.Node, reason: str, fix: str = _MOVE_SPLIT) -> NoReturn:
        raise UnsupportedLayerError(self.where(node), reason, fix, node.name)

    def values(self, node: torch.fx.Node) -> list[Value]:
        """Abstract values of every fx node among the node's (nested) arguments."""
        found: list[Value] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(self.env[a]))
        return found

    def spatial_args(self, node: torch.fx.Node) -> list[int]:
        return [v for v in self.values(node) if isinstance(v, int)]

    def concrete(self, value: Any) -> Any:
        """Replace fx nodes in a (nested) argument by their constant values."""
        return torch.fx.node.map_arg(value, lambda a: self._const_value(a))

    def _const_value(self, arg: torch.fx.Node) -> Any:
        value = self.env[arg]
        if isinstance(value, Const):
            return value.value
        raise NotConstantError

    def add(self, node: torch.fx.Node, inputs: Sequence[int], windows: tuple[Window, ...] | None,
            spatial_dims: tuple[int, ...], rank: int) -> int:  # fmt: skip
        self.env[node] = len(self.nodes)
        # The position grid: the image or a window op that changes the map's size makes one;
        # pointwise ops and size-keeping windows (a 'same' convolution) keep it, so a map's
        # x.shape may reshape another on the same grid.
        makes = not inputs or (windows is not None and not all(map(_keeps_size, windows)))
        self.grids.append(len(self.nodes) if makes else self.grids[inputs[0]])
        self.nodes.append(
            SpatialNode(node.name, self.where(node), tuple(inputs), windows, spatial_dims, rank)
        )
        return len(self.nodes) - 1

    def standard_input(self, node: torch.fx.Node, inputs: list[int], what: str) -> int:
        """The single spatial input of a window op, which must be in (N, C, *spatial) layout."""
        if len(inputs) != 1:
            self.refuse(node, f"{what} must read exactly one feature map")
        src = self.nodes[inputs[0]]
        expected = tuple(range(2, 2 + self.n_axes))
        if src.spatial_dims != expected or src.rank != 2 + self.n_axes:
            self.refuse(
                node,
                f"{what} reads a map whose spatial axes are at dims {src.spatial_dims} of "
                f"{src.rank}, expected {expected} of {2 + self.n_axes}",
                "permute back to (N, C, *spatial) before it",
            )
        return inputs[0]

    def check_sizes(self, node: torch.fx.Node, allowed: Sequence[Any] = ()) -> None:
        """Refuse a spatial op that computes with a map's spatial size (outside ``allowed``)."""
        for value in self.values(node):
            if isinstance(value, SizeDep) and value not in allowed:
                self.refuse(
                    node,
                    "it computes with a map's spatial size (x.shape / x.size()), which a tile "
                    "has smaller than the image",
                    "compute it from the image size outside the trunk, or end the trunk before it",
                )

    # -- node kinds ---------------------------------------------------------------------------

    def pointwise(self, node: torch.fx.Node, inputs: list[int]) -> None:
        """Elementwise op: all spatial inputs aligned, constants may broadcast over channels."""
        self.check_sizes(node)
        first = self.nodes[inputs[0]]
        for i in inputs[1:]:
            other = self.nodes[i]
            if (other.spatial_dims, other.rank) != (first.spatial_dims, first.rank):
                self.refuse(node, "combines maps with different layouts", "permute them alike")
        for value in self.values(node):
            shape = shape_of(value)
            if shape is None:
                continue
            # Broadcasting aligns trailing dims: a constant may vary along channels only.
            offset = first.rank - len(shape)
            for dim in first.spatial_dims:
                if 0 <= dim - offset < len(shape) and shape[dim - offset] != 1:
                    self.refuse(
                        node,
                        f"a constant of shape {tuple(shape)} varies along spatial dim {dim} "
                        "(position-dependent, e.g. a positional embedding)",
                    )
        self.add(node, inputs, None, first.spatial_dims, first.rank)

    def channel_op(self, node: torch.fx.Node, inputs: list[int], last_dims: int, what: str) -> None:
        """LayerNorm/Linear acting on the last ``last_dims`` dims, which must not be spatial."""
        if len(inputs) != 1:
            self.refuse(node, f"{what} must read exactly one feature map")
        src = self.nodes[inputs[0]]
        if any(d >= src.rank - last_dims for d in src.spatial_dims):
            self.refuse(
                node,
                f"{what} acts on spatial dims (only channel-wise use is local)",
                "apply it over channels only, or end the trunk before it",
            )
        self.check_sizes(node)
        self.add(node, inputs, None, src.spatial_dims, src.rank)

    def window(self, node: torch.fx.Node, inputs: list[int], windows: tuple[Window, ...],
               what: str) -> None:  # fmt: skip
        src = self.standard_input(node, inputs, what)
        if len(windows) != self.n_axes:
            self.refuse(node, f"{what} has {len(windows)} spatial axes, the image {self.n_axes}")
        self.check_sizes(node)
        self.add(node, [src], windows, self.nodes[src].spatial_dims, self.nodes[src].rank)

    # -- dispatch -----------------------------------------------------------------------------

    def call_module(self, node: torch.fx.Node, inputs: list[int]) -> None:
        target = str(node.target)
        module = self.modules[target]
        if not inputs:
            if isinstance(module, nn.MultiheadAttention) and self.on_stats(node):
                self.refuse(node, "attention mixes all positions", _MOVE_SPLIT)
            if self.on_stats(node):  # e.g. squeeze-excitation's convolutions on the means
                if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and (
                    module.p > 0
                ):  # fmt: skip
                    self.refuse(node, "active dropout on a statistic draws another mask when "
                                "the backward pass recomputes it", "call eval() on it")  # fmt: skip
                self.env[node] = Stat()
                return
            self.constant(node, lambda *a, **k: module(*a, **k))
            return
        if isinstance(module, nn.SyncBatchNorm) and (
            module.training or not module.track_running_stats
        ):
            self.refuse(
                node,
                "SyncBatchNorm with batch statistics gathers them over processes, which "
                "streaming does not do",
                "use BatchNorm (statistics over each process's images) or call eval() on it",
            )
        if target in self.opaque:
            self.refuse(
                node,
                f"{type(module).__name__}'s forward cannot be traced by torch.fx "
                f"({self.opaque[target]}), so tileplan cannot check that it is local",
                "end the trunk before it, or make its forward free of data-dependent control flow",
            )
        for kind, reason, fix in _REFUSED_MODULES:
            if isinstance(module, kind):
                self.refuse(node, f"{type(module).__name__}: {reason}", fix)
        for kind, handler in self.module_handlers:
            if isinstance(module, kind):
                handler(node, inputs, module)
                return
        self.refuse(
            node,
            f"{type(module).__name__} is not a supported streaming layer",
            "end the trunk before it, or open an issue to add it",
        )

    @functools.cached_property
    def module_handlers(
        self,
    ) -> tuple[tuple[Any, Callable[[torch.fx.Node, list[int], Any], None]], ...]:
        """Module types and their handlers, the first match wins."""
        pads = nn.ZeroPad2d | nn.ConstantPad1d | nn.ConstantPad2d | nn.ConstantPad3d
        return (
            (nn.modules.conv._ConvNd, self.conv_module),
            (nn.modules.pooling._MaxPoolNd, self.pool_module),
            (nn.modules.pooling._AvgPoolNd, self.pool_module),
            (nn.PixelUnshuffle, lambda node, inputs, m: self.space_to_depth(
                node, inputs, m.downscale_factor)),
            (space_to_depth_types(), lambda node, inputs, m: self.space_to_depth(node, inputs,
                                                                               m.bs)),
            (pads, lambda node, inputs, m: self.padding(node, inputs, list(m.padding),
                                                        "constant")),
            (nn.modules.pooling._AdaptiveAvgPoolNd | nn.modules.pooling._AdaptiveMaxPoolNd,
             lambda node, inputs, m: self.adaptive_pool(node, inputs, m.output_size,
                                                        type(m).__name__)),
            (_POINTWISE_MODULES, lambda node, inputs, m: self.pointwise(node, inputs)),
            (nn.LayerNorm, lambda node, inputs, m: self.channel_op(
                node, inputs, len(m.normalized_shape), "LayerNorm")),
            (nn.Linear, lambda node, inputs, m: self.channel_op(node, inputs, 1, "Linear")),
            (nn.Softmax | nn.LogSoftmax, lambda node, inputs, m: self.softmax(node, inputs,
                                                                              m.dim)),
        )  # fmt: skip

    def check_padding_mode(self, node: torch.fx.Node, mode: str) -> None:
        """Constant, reflect and replicate padding read only pixels near the border, which
        the border tile holds; circular padding reads the opposite border."""
        if mode in ("circular",):
            self.refuse(
                node,
                "circular padding wraps around to the opposite border, which another tile holds",
                "use zero, reflect or replicate padding",
            )
        if mode not in ("constant", "zeros", "reflect", "replicate"):
            self.refuse(node, f"padding mode '{mode}' is not classified", "use zero padding")

    def conv_module(self, node: torch.fx.Node, inputs: list[int], module: Any) -> None:
        self.check_padding_mode(node, module.padding_mode)
        windows = conv_windows(module.kernel_size, module.stride, module.padding, module.dilation)
        if module.padding_mode in ("reflect", "replicate"):
            windows = tuple(dataclasses.replace(w, reflect=module.padding_mode == "reflect",
                                                replicate=module.padding_mode == "replicate")
                            for w in windows)  # fmt: skip
        self.window(node, inputs, windows, type(module).__name__)

    def space_to_depth(self, node: torch.fx.Node, inputs: list[int], block: int) -> None:
        """Pixel unshuffle / space-to-depth: output position ``j`` holds the ``block`` input
        pixels ``block*j ..`` as channels, a window of kernel and stride ``block``."""
        block = int(block)
        windows = tuple(Window(block, block, 0, 0, whole=True) for _ in range(self.n_axes))
        self.window(node, inputs[:1], windows, "space to depth")

    def pool_module(self, node: torch.fx.Node, inputs: list[int], module: Any) -> None:
        if getattr(module, "return_indices", False):
            self.refuse(node, "MaxPool with return_indices", "set return_indices=False")
        windows = pool_windows(
            module.kernel_size, module.stride, module.padding, getattr(module, "dilation", 1),
            module.ceil_mode, self.n_axes,
        )  # fmt: skip
        self.window(node, inputs, windows, type(module).__name__)

    def on_stats(self, node: torch.fx.Node) -> bool:
        """Whether a node without map inputs computes with statistics of whole maps."""
        return any(isinstance(v, Stat | Flat) for v in self.values(node))

    def statistic(self, node: torch.fx.Node, src: int, what: str) -> None:
        """A value computed from every position of map ``src``: a statistic (see
        [Statistics] in ``executor.statistics``)."""
        self.check_sizes(node)
        self.env[node] = Stat()
        self.reductions[node.name] = (what, self.nodes[src].name)

    def adaptive_pool(self, node: torch.fx.Node, inputs: list[int], size: Any, what: str) -> None:
        """Adaptive pooling to one position per axis is a statistic; to more, regions of
        the map that depend on its size."""
        try:
            sizes = self.concrete(size)
        except NotConstantError:
            self.refuse(node, f"{what} to a size computed at run time")
        sizes = list(sizes) if isinstance(sizes, list | tuple) else [sizes] * self.n_axes
        if any(v != 1 for v in sizes):
            self.refuse(node, f"{what} to {tuple(sizes)} positions pools regions whose bounds "
                        f"depend on the whole map's size: {GLOBAL}")  # fmt: skip
        src = self.standard_input(node, inputs, what)
        self.statistic(node, src, what)

    def expanded(self, node: torch.fx.Node, grid_of: int) -> None:
        """A statistic broadcast to the shape of a map (``s.expand_as(x)``): the same value at
        every position of that map's grid."""
        source = self.nodes[grid_of]
        self.add(node, [grid_of], None, source.spatial_dims, source.rank)

    def effect(self, node: torch.fx.Node) -> None:
        """An in-place change of a buffer (running statistics, a batch counter): never run
        while classifying; the engine runs it once per forward pass."""
        self.env[node] = Meta()
        self.effects.add(node.name)

    def softmax(self, node: torch.fx.Node, inputs: list[int], dim: Any) -> None:
        source = self.nodes[inputs[0]]
        try:
            dim = self.concrete(dim)
        except NotConstantError:
            self.refuse(node, "softmax over a dim computed at run time")
        if dim is None or int(dim) % source.rank in source.spatial_dims:
            self.refuse(node, f"softmax over dim {dim} mixes spatial positions")
        self.pointwise(node, inputs)

    def padding(self, node: torch.fx.Node, inputs: list[int], pad: Any, mode: Any) -> None:
        """F.pad with amounts fixed in the code (not computed from the input's size)."""
        try:
            amounts = [int(p) for p in self.concrete(pad)]
            mode = self.concrete(mode)
        except NotConstantError:
            self.refuse(node, "padding by amounts computed at run time (from the input size?)",
                        "pad by fixed amounts, or use timm's pad_same")  # fmt: skip
        self.check_padding_mode(node, mode)
        source = self.nodes[self.standard_input(node, inputs, "pad")]
        # F.pad lists (before, after) pairs from the last dim backwards.
        pairs = {source.rank - 1 - i: (amounts[2 * i], amounts[2 * i + 1])
                 for i in range(len(amounts) // 2)}  # fmt: skip
        if any(d not in source.spatial_dims and pair != (0, 0) for d, pair in pairs.items()):
            self.refuse(node, "padding along channel or batch dims", "pad spatial dims only")
        if any(min(pair) < 0 for pair in pairs.values()):
            self.refuse(node, "negative padding crops the map", "crop outside the trunk")
        windows = tuple(
            Window(
                1,
                1,
                *pairs.get(d, (0, 0)),
                reflect=mode == "reflect",
                replicate=mode == "replicate",
            )
            for d in source.spatial_dims
        )
        self.window(node, inputs, windows, "pad")

    def constant(self, node: torch.fx.Node, fn: Callable[..., Any]) -> None:
        """A node without spatial inputs: evaluated when its inputs are constants."""
        values = self.values(node)
        if any(isinstance(v, SizeDep) for v in values):
            self.env[node] = _position_count(node, values) or SizeDep()
            return
        if _name(node.target).rstrip("_") in _RANDOM:
            self.refuse(node, "random values differ from one call (tile) to the next",
                        "call eval() or make it deterministic")  # fmt: skip
        try:
            with torch.no_grad():
                value = fn(*self.concrete(tuple(node.args)), **self.concrete(dict(node.kwargs)))
        except NotConstantError:
            self.env[node] = Meta()
            return
        except Exception as err:  # the user's code on constants failed: say so, do not guess
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.refuse(node, f"computing it from parameters failed ({first})")
        self.env[node] = Const(value)

    def metadata(self, node: torch.fx.Node, src: int | Stat, attr: str) -> None:
        """getattr on a map: its shape, or metadata that tiles share with the image; on a
        statistic: the same for every tile."""
        if isinstance(src, Stat):
            self.env[node] = Meta()
            return
        source = self.nodes[src]
        if attr == "shape":
            self.env[node] = self.shape_of(src)
        elif attr == "ndim":
            self.env[node] = Const(source.rank)
        elif attr in _METADATA:
            self.env[node] = Meta()
        else:
            self.refuse(node, f"reading '.{attr}' of a feature map is not classified yet")

    def shape_of(self, src: int) -> tuple[Value, ...]:
        source = self.nodes[src]
        return tuple(
            SpatialSize(self.grids[src], source.spatial_dims.index(d), src)
            if d in source.spatial_dims
            else Meta()
            for d in range(source.rank)
        )

    def getitem(self, node: torch.fx.Node, base: Value, key: Any) -> None:
        if isinstance(base, Stat | Flat):
            self.env[node] = Stat()
        elif isinstance(base, Maps):
            self.pointwise(node, [base.node])
        elif isinstance(base, int):
            self.index(node, base, key)
        elif isinstance(base, tuple):
            try:
                self.env[node] = base[self.concrete(key)]
            except NotConstantError:
                self.env[node] = Meta()
            if isinstance(self.env[node], tuple | list):
                self.env[node] = tuple(self.env[node])
        elif isinstance(base, SizeDep):
            self.env[node] = SizeDep()
        else:
            self.constant(node, operator.getitem)

    def call_function(self, node: torch.fx.Node, inputs: list[int]) -> None:
        fn = node.target
        args = node.args
        arg = _Args(node, args)
        if fn is torch._assert:
            self.env[node] = Meta()  # a check; nothing flows on
        elif fn is operator.getitem:
            self.getitem(node, self.env[args[0]], args[1])
        elif fn is getattr and isinstance(self.env.get(args[0]), int | Stat):
            self.metadata(node, self.env[args[0]], str(args[1]))
        elif fn in EFFECTS or (not inputs and self.on_stats(node)):
            self.stat_function(node, fn)
        elif not inputs:
            if fn in same_padding_functions():
                self.refuse(node, "'same' padding of a value that is not a feature map")
            self.constant(node, fn)  # type: ignore[arg-type]
        elif fn in same_padding_functions():  # pad_same(x, kernel, stride, dilation, value)
            windows = same_pad_windows(
                self.concrete(arg(1, "kernel_size", None)), self.concrete(arg(2, "stride", None)),
                self.concrete(arg(3, "dilation", (1,) * self.n_axes)), self.n_axes,
            )  # fmt: skip
            self.window(node, inputs[:1], windows, "pad_same")
        elif fn in self.functions:
            self.functions[fn](node, inputs, arg)
        elif _name(fn) == "stochastic_depth":  # torchvision.ops (fx-wrapped)
            self.inactive(node, inputs, "stochastic depth", arg(3, "training", True),
                          arg(1, "p", 0.0))  # fmt: skip
        elif fn in _OPERATORS:
            self.pointwise(node, inputs)
        elif _is_torch(fn) and isinstance(self.env.get(args[0]), int):
            # torch.f(x, *rest) is x.f(*rest): one table for both spellings.
            self.tensor_op(node, _name(fn), self.env[args[0]], inputs, _Args(node, args[1:]))
        else:
            self.other_function(node, fn, inputs)

    def other_function(self, node: torch.fx.Node, fn: Any, inputs: list[int]) -> None:
        """A function whose first argument is not a map: elementwise torch functions are
        local (``torch.addcmul(bias, weight, x)``), the rest refused."""
        name = _name(fn)
        if _is_torch(fn) and name.rstrip("_") in _ELEMENTWISE:
            self.pointwise(node, inputs)
            return
        why = _REFUSED_FUNCTIONS.get(name, "it is not a supported streaming operation")
        self.refuse(node, f"the operation '{name}' is not allowed inside the trunk: {why}")

    def stat_function(self, node: torch.fx.Node, fn: Any) -> None:
        """A function of statistics alone (squeeze-excitation's gate), or a running-statistics
        update (an effect)."""
        if fn in EFFECTS:
            self.effect(node)
            return
        if _name(fn).rstrip("_") in _RANDOM or self.active_dropout(node, fn):
            self.refuse(node, "random values on a statistic differ when the backward pass "
                        "recomputes it",
                        "make it deterministic (call eval() on dropout)")  # fmt: skip
        if fn in (operator.matmul, torch.matmul, torch.bmm):
            self.positions_product(node)
        if _name(fn) == "scaled_dot_product_attention" and any(
            isinstance(v, Flat) for v in self.values(node)
        ):
            self.refuse(node, "attention mixes all positions")
        self.stat_value(node)

    def active_dropout(self, node: torch.fx.Node, fn: Any) -> bool:
        """Whether a dropout-like call is active (training and p > 0)."""
        dropouts = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                    F.feature_alpha_dropout)  # fmt: skip
        if fn not in dropouts:
            return False
        arg = _Args(node, node.args)
        try:
            return bool(self.concrete(arg(2, "training", True))) and (
                self.concrete(arg(1, "p", 0.5)) > 0
            )
        except NotConstantError:
            return True

    def positions_product(self, node: torch.fx.Node) -> None:
        """A product of two maps flattened to positions must sum over the positions (attention
        pooling: the result is a statistic); one that keeps them pairs every position with
        every other (self-attention), which no tile can compute."""
        a, b = (self.env.get(n) if isinstance(n, torch.fx.Node) else None for n in node.args[:2])
        if not (isinstance(a, Flat) and isinstance(b, Flat)):
            return
        if a.dim != a.rank - 1 or b.dim != b.rank - 2:
            self.refuse(node, "a product of positions with positions is attention, which mixes "
                        "all positions")  # fmt: skip

    def stat_value(self, node: torch.fx.Node) -> None:
        """A value computed from statistics: one too, unless it is given a map's spatial size
        (attention written back onto the positions), which no tile could index."""
        if any(isinstance(v, SpatialSize) for v in _flat_values(self.values(node))):
            self.refuse(node, "a value computed from whole maps is given a map's spatial size "
                        "(attention over positions written back onto them)")  # fmt: skip
        self.env[node] = Stat()

    def moments(self, node: torch.fx.Node, inputs: list[int], arg: _Args) -> None:
        """``executor.statistics``' moments of a whole map: a statistic."""
        what = _name(node.target)
        self.statistic(node, self.standard_input(node, inputs[:1], what), what)

    def normalize(self, node: torch.fx.Node, inputs: list[int], arg: _Args) -> None:
        """``executor.statistics``' normalisation with given moments: local."""
        if len(inputs) != 1:
            self.refuse(node, "a normalisation whose statistics are feature maps")
        src = self.standard_input(node, inputs, _name(node.target))
        self.check_sizes(node)  # its per-channel weights broadcast along dim 1
        self.add(node, [src], None, self.nodes[src].spatial_dims, self.nodes[src].rank)

    def call_method(self, node: torch.fx.Node, inputs: list[int]) -> None:
        method = str(node.target)
        receiver = self.env[node.args[0]] if isinstance(node.args[0], torch.fx.Node) else None
        if isinstance(receiver, int):
            self.tensor_op(node, method, receiver, inputs, _Args(node, node.args[1:]))
        elif isinstance(receiver, Stat | Flat):
            self.stat_method(node, method, inputs)
        elif (
            method.endswith("_")
            and method != "requires_grad_"
            and (
                isinstance(receiver, Const) or node.args[0].name in self.effects  # type: ignore[union-attr]
            )
        ):
            self.effect(node)  # e.g. timm's BatchNormAct2d counting batches in train mode
        elif isinstance(receiver, SizeDep) or any(
            isinstance(v, SizeDep) for v in self.values(node)
        ):
            self.env[node] = SizeDep()
        elif inputs and method.rstrip("_") in _ELEMENTWISE:  # e.g. const.mul(x)
            self.pointwise(node, inputs)
        elif inputs:
            self.refuse(node, f"the tensor method '.{method}()' of a constant with a feature "
                        "map argument is not classified yet")  # fmt: skip
        else:
            self.constant(node, lambda obj, *a, **k: getattr(obj, method)(*a, **k))

    def stat_method(self, node: torch.fx.Node, method: str, inputs: list[int]) -> None:
        """``s.method(...)`` on a statistic ``s``."""
        if method in ("size", "dim", "ndimension"):
            self.env[node] = Meta()  # the same for every tile
        elif method == "expand_as" and inputs:
            self.expanded(node, inputs[0])
        elif method == "expand" and not inputs:
            sizes = [v for v in _flat_values(self.values(node)[1:]) if isinstance(v, SizeDep)]
            sources = {v.source for v in sizes if isinstance(v, SpatialSize)}
            if not sizes:
                self.env[node] = Stat()
            elif len(sources) == 1 and min(sources) >= 0 and all(
                isinstance(v, SpatialSize) for v in sizes
            ):  # fmt: skip
                self.expanded(node, sources.pop())  # to the size of the map it was read from
            else:
                self.refuse(node, "a statistic expanded to sizes computed from several maps")
        elif inputs and method.rstrip("_") in _ELEMENTWISE:
            self.pointwise(node, inputs)
        elif inputs:
            self.refuse(node, f"'.{method}()' of a statistic with a feature map argument is "
                        "not classified yet")  # fmt: skip
        elif method.rstrip("_") in _RANDOM:
            self.refuse(node, "random values on a statistic differ when the backward pass "
                        "recomputes it", "make it deterministic")  # fmt: skip
        else:
            self.stat_value(node)

    def tensor_op(
        self, node: torch.fx.Node, name: str, src: int, inputs: list[int], arg: _Args
    ) -> None:
        """``x.name(...)`` or ``torch.name(x, ...)`` on a map ``x`` (node ``src``)."""
        handler = self.tensor_ops.get(name)
        if handler is not None:
            handler(node, name, src, inputs, arg)
        elif name in _IDENTITY_METHODS or name.rstrip("_") in _ELEMENTWISE:
            self.pointwise(node, inputs)
        else:
            why = _REFUSED_FUNCTIONS.get(name, "it is not a supported streaming operation")
            self.refuse(node, f"the operation '{name}' is not allowed inside the trunk: {why}")

    # -- tables of handlers -------------------------------------------------------------------

    @functools.cached_property
    def functions(self) -> dict[Any, Callable[[torch.fx.Node, list[int], _Args], None]]:
        """Handlers of functions whose arguments are not ``(map, *rest)`` like a method's."""
        table: dict[Any, Callable[[torch.fx.Node, list[int], _Args], None]] = {}
        for fn in (F.conv1d, F.conv2d, F.conv3d):
            table[fn] = self.functional_conv
        for fn in (F.max_pool1d, F.max_pool2d, F.max_pool3d):
            table[fn] = self.functional_max_pool
        for fn in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d):
            table[fn] = self.functional_avg_pool
        for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout):
            table[fn] = lambda node, inputs, arg: self.inactive(
                node, inputs, "dropout", arg(2, "training", True), arg(1, "p", 0.5)
            )
        table[F.batch_norm] = self.functional_batch_norm
        for fn in MOMENTS:
            table[fn] = self.moments
        for fn in NORMALIZERS:
            table[fn] = self.normalize
        for fn in (
            F.adaptive_avg_pool1d,
            F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d,
            F.adaptive_max_pool1d,
            F.adaptive_max_pool2d,
            F.adaptive_max_pool3d,
        ):
            table[fn] = lambda node, inputs, arg: self.adaptive_pool(
                node, inputs[:1], arg(1, "output_size", None), _name(node.target)
            )
        table[F.pixel_unshuffle] = lambda node, inputs, arg: self.space_to_depth(
            node, inputs, self.concrete(arg(1, "downscale_factor", None))
        )
        table[F.pad] = lambda node, inputs, arg: self.padding(
            node, inputs[:1], arg(1, "pad", None), arg(2, "mode", "constant")
        )
        for fn in (torch.cat, torch.concat, torch.concatenate):
            table[fn] = lambda node, inputs, arg: self.cat(node, inputs, arg(1, "dim", 0))
        table[torch.stack] = lambda node, inputs, arg: self.cat(
            node, inputs, arg(1, "dim", 0), stack=True
        )
        table[F.layer_norm] = lambda node, inputs, arg: self.channel_op(
            node,
            inputs[:1],
            len(_as_tuple(self.concrete(arg(1, "normalized_shape", ())))),
            "layer_norm",
        )
        table[F.linear] = lambda node, inputs, arg: self.channel_op(node, inputs[:1], 1, "linear")
        for fn in (F.softmax, F.log_softmax):
            table[fn] = lambda node, inputs, arg: self.softmax(node, inputs, arg(1, "dim", None))
        return table  # fmt: skip

    @functools.cached_property
    def tensor_ops(self) -> dict[str, Callable[[torch.fx.Node, str, int, list[int], _Args], None]]:
        """Handlers of ``x.name(...)`` / ``torch.name(x, ...)`` by name."""
        table: dict[str, Callable[[torch.fx.Node, str, int, list[int], _Args], None]] = {
            "size": self.size,
            "dim": lambda node, name, src, inputs, arg: self.set_const(node, self.nodes[src].rank),
            "narrow": lambda node, name, src, inputs, arg: self.narrow(node, src, arg(0, "dim", 0)),
        }
        table["ndimension"] = table["dim"]
        for name in ("numel", "nelement", "tolist", "item"):
            table[name] = lambda node, name, src, inputs, arg: self.refuse(
                node, f"'.{name}()' reads the whole map or its size"
            )
        for name in _PERMUTES:
            table[name] = lambda node, name, src, inputs, arg: self.permute(
                node, src, name, arg.rest()
            )
        reshapes = {"view": self.reshape, "reshape": self.reshape, "flatten": self.flatten,
                    "squeeze": self.squeeze, "unsqueeze": self.squeeze}  # fmt: skip
        for name, handler in reshapes.items():
            table[name] = lambda node, name, src, inputs, arg, h=handler: h(
                node, src, name, arg.rest(), dict(node.kwargs)
            )
        for name in _SPLITS:
            table[name] = lambda node, name, src, inputs, arg: self.split(
                node, src, name, arg(0 if name == "unbind" else 1, "dim", 0)
            )
        for name in ("softmax", "log_softmax"):
            table[name] = lambda node, name, src, inputs, arg: self.softmax(
                node, inputs, arg(0, "dim", None)
            )
        for name in _REDUCTIONS:
            table[name] = lambda node, name, src, inputs, arg: self.reduce(
                node, src, name, arg(0, "dim", None), arg(1, "keepdim", False)
            )
        table["norm"] = lambda node, name, src, inputs, arg: self.reduce(
            node, src, name, arg(1, "dim", None), arg(2, "keepdim", False)
        )
        for name in ("expand_as", "view_as", "reshape_as"):
            table[name] = self.as_other
        return table  # fmt: skip

    # -- handlers -----------------------------------------------------------------------------

    def set_const(self, node: torch.fx.Node, value: Any) -> None:
        self.env[node] = Const(value)

    def size(self, node: torch.fx.Node, name: str, src: int, inputs: list[int], arg: _Args) -> None:
        dim = arg(0, "dim", None)
        shape = self.shape_of(src)
        self.env[node] = shape if dim is None else shape[int(self.concrete(dim))]

    def as_other(self, node: torch.fx.Node, name: str, src: int, inputs: list[int],
                 arg: _Args) -> None:  # fmt: skip
        a, b = (self.nodes[i] for i in inputs[:2]) if len(inputs) > 1 else (None, None)
        if a is None or b is None or (a.spatial_dims, a.rank) != (b.spatial_dims, b.rank):
            self.refuse(node, f"'.{name}()' of a map to another layout")
        self.pointwise(node, inputs)

    def functional_conv(self, node: torch.fx.Node, inputs: list[int], arg: _Args) -> None:
        weight = self.env[arg(1, "weight", None)]
        if not isinstance(weight, Const) or not isinstance(weight.value, torch.Tensor):
            self.refuse(node, "the convolution's weight is computed from the feature map")
        windows = conv_windows(
            tuple(weight.value.shape[2:]), self.concrete(arg(3, "stride", 1)),
            self.concrete(arg(4, "padding", 0)), self.concrete(arg(5, "dilation", 1)),
        )  # fmt: skip
        self.window(node, inputs[:1], windows, _name(node.target))

    def functional_max_pool(self, node: torch.fx.Node, inputs: list[int], arg: _Args) -> None:
        if self.concrete(arg(6, "return_indices", False)):
            self.refuse(node, "max_pool with return_indices", "set return_indices=False")
        windows = pool_windows(
            self.concrete(arg(1, "kernel_size", None)), self.concrete(arg(2, "stride", None)),
            self.concrete(arg(3, "padding", 0)), self.concrete(arg(4, "dilation", 1)),
            bool(self.concrete(arg(5, "ceil_mode", False))), self.n_axes,
        )  # fmt: skip
        self.window(node, inputs[:1], windows, _name(node.target))

    def functional_avg_pool(self, node: torch.fx.Node, inputs: list[int], arg: _Args) -> None:
        windows = pool_windows(
            self.concrete(arg(1, "kernel_size", None)), self.concrete(arg(2, "stride", None)),
            self.concrete(arg(3, "padding", 0)), 1,
            bool(self.concrete(arg(4, "ceil_mode", False))), self.n_axes,
        )  # fmt: skip
        self.window(node, inputs[:1], windows, _name(node.target))

    def functional_batch_norm(self, node: torch.fx.Node, inputs: list[int], arg: _Args) -> None:
        if self.concrete(arg(5, "training", False)):
            self.refuse(
                node,
                f"batch_norm with training=True normalises with statistics over all positions: "
                f"{GLOBAL}",
                "call trunk.eval() to freeze its statistics (its affine weights still train)",
            )
        # Per-channel statistics and affine weights (along dim 1): a per-position affine map.
        self.check_sizes(node)
        source = self.nodes[inputs[0]]
        if 1 in source.spatial_dims:
            self.refuse(node, "batch_norm along a spatial dim", "apply it in (N, C, ...) layout")
        self.add(node, inputs[:1], None, source.spatial_dims, source.rank)

    def inactive(self, node: torch.fx.Node, inputs: list[int], what: str, training: Any,
                 p: Any) -> None:  # fmt: skip
        """Dropout-like ops are the identity when inactive; active ones differ per tile."""
        if self.concrete(training) and self.concrete(p) > 0:
            self.refuse(node, f"active {what} differs per tile", "call trunk.eval()")
        self.pointwise(node, inputs[:1])

    def build(self) -> SpatialGraph:
        output_seen = False
        placeholders = 0
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                if placeholders >= len(self.inputs):
                    self.refuse(node, "the trunk takes more than one input", "take one image")
                kind = self.inputs[placeholders]
                placeholders += 1
                if isinstance(kind, StatInput):
                    self.env[node] = Stat()
                else:
                    self.add(node, [], None, kind.spatial_dims, kind.rank)
            elif node.op == "get_attr":
                self.env[node] = Const(operator.attrgetter(str(node.target))(self.gm))
            elif node.op == "output":
                self.finish(node)
                output_seen = True
            else:
                inputs = self.spatial_args(node)
                handler: Callable[[torch.fx.Node, list[int]], None] = getattr(self, node.op)
                try:
                    handler(node, inputs)
                except NotConstantError:
                    self.refuse(node, "an argument that must be fixed is computed at run time")
        assert output_seen
        return SpatialGraph(tuple(self.nodes), self.n_axes)

    def finish(self, node: torch.fx.Node) -> None:
        result = node.args[0]
        value = self.env.get(result) if isinstance(result, torch.fx.Node) else None
        if isinstance(value, Stat | Flat):
            origin = self._origin(result)
            what = self.reductions[origin.name][0] if origin is not None else "a reduction"
            how = (
                "merges spatial positions (attention or pooling over positions)"
                if "positions" in what
                else "pools every position of the map (adaptive/global pooling)"
            )
            self.refuse(origin or node, f"'{what}' {how}, and a trunk must end in a feature map",
                        _MOVE_SPLIT)  # fmt: skip
        if not isinstance(value, int):
            self.refuse(node, "the trunk must return one feature map tensor", "return a tensor")
        out = self.nodes[value]
        if out.spatial_dims != tuple(range(2, 2 + self.n_axes)) or out.rank != 2 + self.n_axes:
            self.refuse(node, "the trunk's output is not in (N, C, *spatial) layout",
                        "permute back before returning")  # fmt: skip
        if value != len(self.nodes) - 1:
            # Keep the output last so that topological order ends at it; nodes after it
            # (dead code) are dropped by re-adding the output as an alias.
            self.add(node, [value], None, out.spatial_dims, out.rank)

    def _origin(self, node: Any) -> torch.fx.Node | None:
        """The last reduction that a statistic ``node`` comes from (walking back)."""
        seen: set[torch.fx.Node] = set()
        todo = [node] if isinstance(node, torch.fx.Node) else []
        found: list[torch.fx.Node] = []
        while todo:
            current = todo.pop()
            if current in seen:
                continue
            seen.add(current)
            if current.name in self.reductions:
                found.append(current)
                continue
            todo.extend(current.all_input_nodes)
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        return max(found, key=order.get) if found else None


def _keeps_size(window: Window) -> bool:
    """Whether a window's output has its input's length, whatever that is."""
    total = window.pad_lo + window.pad_hi
    return (
        window.stride == 1 and not window.whole and window.same is None
        and total == window.dilation * (window.kernel - 1)
    )  # fmt: skip


def _flat_values(values: Sequence[Value]) -> list[Value]:
    """``values`` with tuples (shapes) unpacked."""
    found: list[Value] = []
    for v in values:
        found += _flat_values(v) if isinstance(v, tuple) else [v]
    return found


def _position_count(node: torch.fx.Node, values: list[Value]) -> PositionCount | None:
    """``H * W`` of one map's spatial sizes: the number of its positions along those axes."""
    if node.target not in (operator.mul, operator.imul) or len(node.args) != 2:
        return None
    if len(values) != 2 or not all(isinstance(v, SpatialSize | PositionCount) for v in values):
        return None
    axes = [frozenset({v.axis}) if isinstance(v, SpatialSize) else v.axes for v in values]
    grids = {v.grid for v in values}  # type: ignore[union-attr]
    if len(grids) != 1 or axes[0] & axes[1]:
        return None
    return PositionCount(grids.pop(), axes[0] | axes[1])


class _Args:
    """Positional-or-keyword access to a call's arguments (those after the map, for methods)."""

    def __init__(self, node: torch.fx.Node, args: Sequence[Any]) -> None:
        self.kwargs = node.kwargs
        self.args = tuple(args)

    def __call__(self, index: int, key: str, default: Any) -> Any:
        return self.kwargs.get(key, self.args[index] if len(self.args) > index else default)

    def rest(self) -> tuple[Any, ...]:
        return self.args


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, list | tuple | torch.Size) else (value,)


def _is_torch(fn: Any) -> bool:
    """A function of torch, torch.nn.functional or torch.Tensor (not the user's own)."""
    module = getattr(fn, "__module__", None) or ""
    return module.startswith("torch") or module == "" or getattr(fn, "__self__", None) is torch


def traced_trunk(trunk: nn.Module) -> Traced:
    """``trunk`` traced (``executor.trace``), its in-place changes of computed values made
    out-of-place (``executor.trace.functionalize``) and its norms over whole maps decomposed
    (``executor.statistics.decompose_norms``): the graph every part of the engine reads."""
    traced = trace_leaves(trunk)
    return Traced(decompose_norms(functionalize(traced.gm)), traced.opaque)


def classify(traced: Traced, n_axes: int, inputs: Sequence[Input] | None = None) -> Classified:
    """Classify every node of a traced trunk (see the module docstring).

    Args:
        traced: the trunk's graph (``traced_trunk``).
        n_axes: spatial axes of its maps.
        inputs: what each graph input is; default one image in (N, C, *spatial) layout.

    Raises:
        UnsupportedLayerError: an op cannot be streamed, not even with statistics.
    """
    builder = _Builder(traced, n_axes, inputs)
    graph = builder.build()
    return Classified(
        traced.gm, graph, {node.name: value for node, value in builder.env.items()},
        dict(builder.reductions), frozenset(builder.effects),
    )  # fmt: skip


def map_nodes(traced: Traced, n_axes: int) -> set[str]:
    """Names of the traced trunk's nodes whose value is one feature map in (N, C, *spatial)
    layout (not a tuple of maps, not permuted, not a constant).

    Raises:
        UnsupportedLayerError: as ``trace_trunk``.
    """
    found = classify(traced, n_axes)
    layout = tuple(range(2, 2 + n_axes))
    return {
        name
        for name, value in found.values.items()
        if isinstance(value, int)
        and found.graph.nodes[value].name == name
        and found.graph.nodes[value].spatial_dims == layout
        and found.graph.nodes[value].rank == 2 + n_axes
    }


def trace_trunk(trunk: nn.Module, n_axes: int) -> SpatialGraph:
    """Trace ``trunk`` and reduce it to a SpatialGraph over ``n_axes`` spatial axes.

    Statistics of whole maps (``Stat`` values) are constants to this graph: it is the
    geometry of the trunk's local operations, which the engine streams between them.

    Args:
        trunk: the streamable part of the network. It is traced, never modified.
        n_axes: number of spatial axes of its input (2 for images, 3 for volumes).

    Raises:
        UnsupportedLayerError: an op inside the trunk cannot be streamed, or the trunk cannot
            be traced by torch.fx.
    """
    return classify(traced_trunk(trunk), n_axes).graph
