"""Normalisations over whole maps, split into a statistic and a local use of it.

Note: [Statistics]
    A global-context layer computes a small statistic ``s = reduce(x)`` over every position of
    a map and then acts on each position with it, ``y = f(x, s)``. A tile cannot compute ``s``,
    but given ``s`` it computes ``f`` exactly. So the engine (``executor.program``) ends a
    segment at ``x``, keeps ``x`` whole, computes ``s`` from it once, and streams what follows
    with ``s`` as a constant input. Backward, ``s`` is an input of the next segment like a
    parameter: its gradient is summed over that segment's tiles (exact by [Output ownership]),
    and ``dL/ds`` is then chain-ruled onto the whole ``x`` through the reduction by autograd:
    ``dL/dx = dL/dx|s fixed + (ds/dx)^T dL/ds``.

    Squeeze-excitation, ECA, GRN and the like are written as such reductions in their own code
    (``x.mean((2, 3))``). Normalisation layers hide theirs inside one kernel, so
    ``decompose_norms`` rewrites a traced trunk's batch norm with batch statistics (train
    mode), group norm and instance norm into the three steps below: the moments of the whole
    map (a statistic), the running-statistics update (a side effect, run once per forward
    call as conventional training does), and the normalisation with given moments (local).
    The moments are computed in float32 or better; the normalised map has the dtype the
    layer itself would give (under autocast too).

Everything here works on whole maps except the ``*_normalize`` functions, which tiles run.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = [
    "EFFECTS",
    "MOMENTS",
    "NORMALIZERS",
    "batch_moments",
    "batch_normalize",
    "decompose_norms",
    "group_moments",
    "group_normalize",
    "instance_moments",
    "instance_normalize",
    "update_batch_norm",
    "update_instance_norm",
]


# --------------------------------------------------------------------------------------------
# Moments of whole maps (statistics) and normalisation with them (local)
# --------------------------------------------------------------------------------------------


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 or better: statistics and normalisation are computed there."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def batch_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance over the batch and every position of ``x``
    (N, C, *spatial): what batch norm in train mode normalises with. Shapes (C,)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(_wide(x), dim=dims, correction=0)
    return mean, var


def group_moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of each sample's channel group over every position of
    ``x`` (N, C, *spatial). Shapes (N, groups)."""
    var, mean = torch.var_mean(_wide(x).reshape(x.shape[0], groups, -1), dim=2, correction=0)
    return mean, var


def instance_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (biased) variance of each sample's channel over every position of ``x``
    (N, C, *spatial). Shapes (N, C)."""
    var, mean = torch.var_mean(_wide(x).flatten(2), dim=2, correction=0)
    return mean, var


@functools.lru_cache(maxsize=64)
def _output_dtype(kind: str, device: str, dtype: torch.dtype, autocast: tuple[Any, ...]
                  ) -> torch.dtype:  # fmt: skip
    """The dtype the whole layer would give for an input of ``dtype`` under the current
    autocast state (``autocast`` is part of the cache key): asked of the layer itself on a
    one-element input, so that its autocast policy is followed whatever it is."""
    probe = torch.ones(2, 2, 2, device=device, dtype=dtype)
    if kind == "batch":
        return F.batch_norm(probe, None, None, training=True).dtype
    if kind == "group":
        return F.group_norm(probe, 1).dtype
    return F.instance_norm(probe).dtype


def _finish(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    device = x.device.type
    try:
        state = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    except RuntimeError:  # a device without autocast (meta tensors of an estimate)
        return y.to(x.dtype)
    return y.to(_output_dtype(kind, device, x.dtype, state))


def _normalized(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                per_sample: bool) -> torch.Tensor:  # fmt: skip
    """``(x - mean) / sqrt(var + eps) * weight + bias`` as one pass over the map,
    ``x * scale + shift`` with per-channel ``scale = weight / sqrt(var + eps)`` and
    ``shift = bias - mean * scale`` (torch's own norm kernels compute it so), in float32 or
    better. ``mean``/``var``: (C,), or (N, C) when ``per_sample``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    shape = (*((x.shape[0],) if per_sample else (1,)), x.shape[1], *(1,) * (x.dim() - 2))
    return torch.addcmul(shift.reshape(shape), _wide(x), scale.reshape(shape))


def batch_normalize(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:  # fmt: skip
    """Batch norm of ``x`` (N, C, *spatial) with given per-channel moments (C,): local."""
    return _finish("batch", x, _normalized(x, mean, var, weight, bias, eps, per_sample=False))


def group_normalize(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, groups: int, eps: float,
) -> torch.Tensor:  # fmt: skip
    """Group norm of ``x`` (N, C, *spatial) with given moments (N, groups): local."""
    per_channel = x.shape[1] // groups  # each group's moments, repeated over its channels
    mean = mean.repeat_interleave(per_channel, dim=1)
    var = var.repeat_interleave(per_channel, dim=1)
    return _finish("group", x, _normalized(x, mean, var, weight, bias, eps, per_sample=True))


def instance_normalize(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, eps: float,
) -> torch.Tensor:  # fmt: skip
    """Instance norm of ``x`` (N, C, *spatial) with given moments (N, C): local."""
    return _finish("instance", x, _normalized(x, mean, var, weight, bias, eps,
                                              per_sample=True))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Running statistics: side effects, run once per forward call
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def update_batch_norm(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, num_batches_tracked: torch.Tensor | None, momentum: float | None,
    increment: bool,
) -> None:  # fmt: skip
    """What batch norm in train mode does to its buffers: count the batch (``increment``,
    when the layer's own code does not) and move the running moments towards the batch's,
    the variance unbiased over the ``N * positions`` values of each channel."""
    if increment and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    if momentum is None:  # a cumulative average
        factor = 1.0 / float(num_batches_tracked) if num_batches_tracked is not None else 0.0
    else:
        factor = float(momentum)
    n = x.numel() // x.shape[1]
    unbiased = var * (n / max(n - 1, 1))
    running_mean.mul_(1.0 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
    running_var.mul_(1.0 - factor).add_(unbiased.to(running_var.dtype), alpha=factor)


@torch.no_grad()
def update_instance_norm(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, running_mean: torch.Tensor,
    running_var: torch.Tensor, momentum: float,
) -> None:  # fmt: skip
    """What instance norm with tracked statistics does to its buffers: the running moments
    move towards the batch average of the instances' moments (variances unbiased over
    positions)."""
    n = x[0, 0].numel()
    unbiased = var * (n / max(n - 1, 1))
    factor = float(momentum)
    running_mean.mul_(1.0 - factor).add_(mean.mean(0).to(running_mean.dtype), alpha=factor)
    running_var.mul_(1.0 - factor).add_(unbiased.mean(0).to(running_var.dtype), alpha=factor)


MOMENTS: frozenset[Callable[..., Any]] = frozenset({batch_moments, group_moments,
                                                     instance_moments})  # fmt: skip
NORMALIZERS: frozenset[Callable[..., Any]] = frozenset({batch_normalize, group_normalize,
                                                         instance_normalize})  # fmt: skip
EFFECTS: frozenset[Callable[..., Any]] = frozenset({update_batch_norm, update_instance_norm})


# --------------------------------------------------------------------------------------------
# Rewriting a traced trunk
# --------------------------------------------------------------------------------------------


class _Emit:
    """Adds the nodes of one decomposition to a new graph, in place of ``node``."""

    def __init__(self, graph: torch.fx.Graph, node: torch.fx.Node,
                 env: Callable[[Any], Any]) -> None:  # fmt: skip
        self.graph, self.node, self.env = graph, node, env

    def attr(self, target: str | None) -> torch.fx.Node | None:
        return None if target is None else self.graph.get_attr(target)

    def call(self, fn: Callable[..., Any], args: tuple[Any, ...], suffix: str | None
             ) -> torch.fx.Node:  # fmt: skip
        name = self.node.name if suffix is None else f"{self.node.name}_{suffix}"
        created = self.graph.create_node("call_function", fn, args, {}, name=name)
        created.meta = dict(self.node.meta)
        return created

    def moments(self, fn: Callable[..., Any], x: Any, *extra: Any
                ) -> tuple[torch.fx.Node, torch.fx.Node]:  # fmt: skip
        stats = self.call(fn, (x, *extra), "moments")
        mean = self.call(operator.getitem, (stats, 0), "mean")
        var = self.call(operator.getitem, (stats, 1), "var")
        return mean, var


def _module_batch_norm(emit: _Emit, module: nn.Module, path: str, x: Any) -> torch.fx.Node:
    """``nn.BatchNorm*`` using batch statistics (train mode, or no running statistics)."""
    mean, var = emit.moments(batch_moments, x)
    if module.training and module.track_running_stats:
        emit.call(update_batch_norm, (
            x, mean, var, emit.attr(f"{path}.running_mean"), emit.attr(f"{path}.running_var"),
            emit.attr(f"{path}.num_batches_tracked"), module.momentum, True,
        ), "update")  # fmt: skip
    weight = emit.attr(f"{path}.weight") if module.affine else None
    bias = emit.attr(f"{path}.bias") if module.affine else None
    return emit.call(batch_normalize, (x, mean, var, weight, bias, module.eps), None)


def _module_instance_norm(emit: _Emit, module: nn.Module, path: str, x: Any) -> torch.fx.Node:
    """``nn.InstanceNorm*``: instance statistics, or its running ones (eval mode)."""
    weight = emit.attr(f"{path}.weight") if module.affine else None
    bias = emit.attr(f"{path}.bias") if module.affine else None
    running = module.track_running_stats
    if running and not module.training:  # a per-channel affine map: local
        mean, var = emit.attr(f"{path}.running_mean"), emit.attr(f"{path}.running_var")
        return emit.call(batch_normalize, (x, mean, var, weight, bias, module.eps), None)
    mean, var = emit.moments(instance_moments, x)
    if running:
        momentum = module.momentum if module.momentum is not None else 0.0
        emit.call(update_instance_norm, (
            x, mean, var, emit.attr(f"{path}.running_mean"), emit.attr(f"{path}.running_var"),
            momentum,
        ), "update")  # fmt: skip
    return emit.call(instance_normalize, (x, mean, var, weight, bias, module.eps), None)


def _call_args(node: torch.fx.Node, names: tuple[str, ...], defaults: dict[str, Any]
               ) -> dict[str, Any]:  # fmt: skip
    """A call's arguments by name (positional or keyword), with defaults."""
    found = dict(defaults)
    found.update(zip(names, node.args, strict=False))
    found.update(node.kwargs)
    return found


_BATCH_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias", "training",
                    "momentum", "eps")  # fmt: skip
_INSTANCE_NORM_ARGS = ("input", "running_mean", "running_var", "weight", "bias",
                       "use_input_stats", "momentum", "eps")  # fmt: skip


def _functional(emit: _Emit, node: torch.fx.Node) -> torch.fx.Node | None:
    """``F.batch_norm`` with batch statistics, ``F.group_norm``, ``F.instance_norm``."""
    env = emit.env
    if node.target is F.batch_norm:
        a = _call_args(node, _BATCH_NORM_ARGS, {"running_mean": None, "running_var": None,
                       "weight": None, "bias": None, "training": False, "momentum": 0.1,
                       "eps": 1e-5})  # fmt: skip
        batch_stats = a["training"] or (a["running_mean"] is None and a["running_var"] is None)
        if not isinstance(batch_stats, bool) or not batch_stats:
            return None  # running statistics: a per-channel affine map, classified as is
        x = env(a["input"])
        mean, var = emit.moments(batch_moments, x)
        if a["training"] and a["running_mean"] is not None:
            emit.call(update_batch_norm, (
                x, mean, var, env(a["running_mean"]), env(a["running_var"]), None,
                a["momentum"], False,
            ), "update")  # fmt: skip
        return emit.call(batch_normalize, (x, mean, var, env(a["weight"]), env(a["bias"]),
                                           a["eps"]), None)  # fmt: skip
    if node.target is F.group_norm:
        a = _call_args(node, ("input", "num_groups", "weight", "bias", "eps"),
                       {"weight": None, "bias": None, "eps": 1e-5})  # fmt: skip
        x = env(a["input"])
        mean, var = emit.moments(group_moments, x, a["num_groups"])
        return emit.call(group_normalize, (x, mean, var, env(a["weight"]), env(a["bias"]),
                                           a["num_groups"], a["eps"]), None)  # fmt: skip
    if node.target is F.instance_norm:
        a = _call_args(node, _INSTANCE_NORM_ARGS, {"running_mean": None, "running_var": None,
                       "weight": None, "bias": None, "use_input_stats": True,
                       "momentum": 0.1, "eps": 1e-5})  # fmt: skip
        x = env(a["input"])
        if not a["use_input_stats"]:
            return emit.call(batch_normalize, (x, env(a["running_mean"]), env(a["running_var"]),
                                               env(a["weight"]), env(a["bias"]), a["eps"]),
                             None)  # fmt: skip
        mean, var = emit.moments(instance_moments, x)
        if a["running_mean"] is not None:
            emit.call(update_instance_norm, (x, mean, var, env(a["running_mean"]),
                                             env(a["running_var"]), a["momentum"]),
                      "update")  # fmt: skip
        return emit.call(instance_normalize, (x, mean, var, env(a["weight"]), env(a["bias"]),
                                              a["eps"]), None)  # fmt: skip
    return None


def _decompose(gm: torch.fx.GraphModule, graph: torch.fx.Graph, node: torch.fx.Node,
               env: Callable[[Any], Any]) -> torch.fx.Node | None:  # fmt: skip
    """The decomposition of ``node`` added to ``graph``, or None to copy it as it is."""
    emit = _Emit(graph, node, env)
    if node.op == "call_function":
        return _functional(emit, node)
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    path = str(node.target)
    module = gm.get_submodule(path)
    x = env(node.args[0])
    if not _plain(module):
        # A subclass with its own forward (timm's BatchNormAct2d adds an activation) is a
        # module call only when torch.fx could not trace into it: refused by name later.
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training or not module.track_running_stats:
            return _module_batch_norm(emit, module, path, x)
        return None
    if isinstance(module, nn.GroupNorm):
        mean, var = emit.moments(group_moments, x, module.num_groups)
        weight = emit.attr(f"{path}.weight") if module.affine else None
        bias = emit.attr(f"{path}.bias") if module.affine else None
        return emit.call(group_normalize, (x, mean, var, weight, bias, module.num_groups,
                                           module.eps), None)  # fmt: skip
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return _module_instance_norm(emit, module, path, x)
    return None


def _plain(module: nn.Module) -> bool:
    """Whether a norm module computes what torch's own class does (its forward not
    overridden), so that its decomposition is what it computes."""
    forward = type(module).forward
    return any(
        isinstance(module, base) and forward is base.forward
        for base in (nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                     nn.modules.instancenorm._InstanceNorm)
    )  # fmt: skip


def decompose_norms(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` with every normalisation over whole maps written as moments, running-statistics
    update and local normalisation (see [Statistics]); ``gm`` itself when it has none.

    The new graph module shares ``gm``'s parameters and buffers (updates of running
    statistics happen in place in the user's buffers); the normalised map keeps the name of
    the layer's node, so cut points and messages are unchanged.
    """
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, Any] = {}

    def mapped(value: Any) -> Any:
        return torch.fx.node.map_arg(value, lambda n: env[n])

    changed = False
    for node in gm.graph.nodes:
        replaced = _decompose(gm, graph, node, mapped)
        if replaced is None:
            env[node] = graph.node_copy(node, lambda n: env[n])
        else:
            env[node] = replaced
            changed = True
    if not changed:
        return gm
    return torch.fx.GraphModule(gm, graph, class_name=type(gm).__name__)
