"""Memory estimates without allocating: run the real module code on meta tensors and count
the bytes of every live tensor storage (exact live-tensor accounting).

A meta tensor has a shape and a dtype but no data, so a CPU laptop can estimate a 65536² step
for an 80 GB GPU in well under a second. What it cannot see are allocations that happen inside
kernels (cuDNN workspaces, oneDNN weight reorders, the caching allocator's rounding): measurement
on the device calibrates those (``tileplan.measure``).

Note: [What a tile estimate counts]
    The crop itself, every activation saved for backward, and the transients of the backward
    pass (gradients of activations, per-tile parameter-gradient contributions before they are
    accumulated). Parameter gradients already exist at a tile's start (they are model state,
    counted once in ``MemoryBreakdown.grads_bytes``), so they are allocated before counting.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from executor import EFFECTS, MemoryBreakdown, Program, StreamingError, StreamPart, traced_trunk
from tileplan.settings import OPTIMIZERS

__all__ = [
    "Conventional",
    "EstimateError",
    "LiveBytes",
    "ModelState",
    "estimate_conventional",
    "estimate_fixed",
    "estimate_streaming",
    "node_shapes",
    "part_flops",
    "part_peak",
    "pass_flops",
    "pass_peak",
    "value_shapes",
    "with_tiles",
]


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created while active that are still alive.

    ``peak`` is the high-water mark of ``live`` during the block. Storages are identified by
    identity (views and in-place results add nothing); a storage's bytes are released when
    Python frees it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._seen:
            return
        nbytes = storage.nbytes()
        self._seen[storage] = nbytes
        weakref.finalize(storage, self._release, nbytes)
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


@contextmanager
def _meta_state(module: nn.Module, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """Meta copies of ``module``'s parameters (with zero grads) and buffers."""
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        meta = torch.empty(p.shape, device="meta", dtype=dtype).requires_grad_(p.requires_grad)
        if p.requires_grad:
            meta.grad = torch.empty_like(meta)  # model state: exists before a tile starts
        state[name] = meta
    for name, b in module.named_buffers():
        kind = dtype if b.is_floating_point() else b.dtype
        state[name] = torch.empty(b.shape, device="meta", dtype=kind)
    yield state


class EstimateError(StreamingError):
    """The model's own code failed on the shapes being estimated (one line, with the shape)."""


@contextmanager
def _model_code(what: str, shape: tuple[int, ...]) -> Iterator[None]:
    """Turn a failure of the user's code on a shape into a one-line EstimateError."""
    try:
        yield
    except StreamingError:
        raise
    except Exception as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise EstimateError(
            f"the {what} fails on an input of shape {tuple(shape)} ({type(err).__name__}"
            f"{': ' + text if text else ''}); the model may need another image size (e.g. "
            "one it was built for) or its own split(model)"
        ) from err


def pass_peak(
    module: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype, *, grad: bool
) -> tuple[int, tuple[int, ...]]:
    """Peak bytes of one pass of ``module`` on an input of ``input_shape``, on meta tensors.

    Args:
        module: the real module; its code runs, its parameters are never touched.
        input_shape: (N, C, *spatial) of the input, which is counted.
        dtype: compute dtype of activations and parameters.
        grad: forward with autograd then backward with a dense output gradient (a tile of the
            backward pass, or a conventional step); else a no-grad forward.

    Returns:
        ``(peak_bytes, output_shape)``.

    Raises:
        EstimateError: the module's code fails on this shape.
    """
    with (
        _meta_state(module, dtype) as state,
        torch.set_grad_enabled(grad),
        _model_code("model's trunk" if grad else "model", input_shape),
    ):
        counter = LiveBytes()
        with counter:
            x = torch.empty(input_shape, device="meta", dtype=dtype)
            y = functional_call(module, state, (x,))
            shape = tuple(y.shape)
            if grad and y.requires_grad:
                y.backward(torch.empty_like(y))
            del x, y
        return counter.peak, shape


def pass_flops(module: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Floating-point operations of one forward pass of ``module`` on meta tensors (torch's
    FLOP counter: convolutions and matrix products, what the time of a CNN pass is made of).

    Raises:
        EstimateError: the module's code fails on this shape.
    """
    with (
        _meta_state(module, dtype) as state,
        torch.no_grad(),
        _model_code("model's trunk", input_shape),
        FlopCounterMode(display=False) as counter,
    ):
        functional_call(module, state, (torch.empty(input_shape, device="meta", dtype=dtype),))
    return int(counter.get_total_flops())


Shape = tuple[int, ...]


def _meta(shape: Shape, dtype: torch.dtype, grad: bool = False) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype).requires_grad_(grad)


def part_peak(
    module: nn.Module, inputs: Sequence[Shape], stats: Sequence[tuple[Shape, torch.dtype]],
    dtype: torch.dtype, *, grad: bool, count_inputs: bool = True,
) -> int:  # fmt: skip
    """Peak bytes of one pass of a program part (``executor.program``) on meta tensors:
    ``module(*maps, *stats)`` returning a tuple.

    Args:
        inputs: (N, C, ...) of each input map (a tile's crops, or whole maps).
        stats: shape and dtype of each statistic it reads (alive before the pass: not
            counted).
        grad: forward with autograd then backward with dense output gradients (statistics
            get gradients too); else a no-grad forward.
        count_inputs: count the input maps (a tile's crops are made for it; whole maps that
            a statistic reads are kept anyway).

    Raises:
        EstimateError: the module's code fails on these shapes.
    """
    first = tuple(inputs[0]) if inputs else ()
    with (
        _meta_state(module, dtype) as state,
        torch.set_grad_enabled(grad),
        _model_code("model's trunk", first),
    ):
        held = [_meta(s, d, grad and d.is_floating_point) for s, d in stats]
        maps = [] if count_inputs else [_meta(s, dtype, grad) for s in inputs]
        counter = LiveBytes()
        with counter:
            if count_inputs:
                maps = [_meta(s, dtype, grad) for s in inputs]
            outputs = [o for o in functional_call(module, state, (*maps, *held))
                       if isinstance(o, torch.Tensor)]  # fmt: skip
            wanted = [o for o in outputs if o.requires_grad]
            if grad and wanted:
                torch.autograd.backward(wanted, [torch.empty_like(o) for o in wanted])
            del maps, outputs, wanted
        return counter.peak


def part_flops(module: nn.Module, inputs: Sequence[Shape],
               stats: Sequence[tuple[Shape, torch.dtype]], dtype: torch.dtype) -> int:  # fmt: skip
    """Forward FLOPs of a program part on meta tensors (see ``pass_flops``)."""
    first = tuple(inputs[0]) if inputs else ()
    with (
        _meta_state(module, dtype) as state,
        torch.no_grad(),
        _model_code("model's trunk", first),
        FlopCounterMode(display=False) as counter,
    ):
        maps = [_meta(s, dtype) for s in inputs]
        functional_call(module, state, (*maps, *(_meta(s, d) for s, d in stats)))
    return int(counter.get_total_flops())


def value_shapes(
    program: Program, image_shape: Shape, dtype: torch.dtype
) -> dict[str, tuple[Shape, torch.dtype]]:
    """Shape and dtype of every value that crosses a program's parts, for an image of
    ``image_shape`` (N, C, *spatial): its parts run whole on meta tensors, in order.

    Raises:
        EstimateError: the model's code fails on this shape.
    """
    values: dict[str, tuple[Shape, torch.dtype]] = {program.image: (tuple(image_shape), dtype)}
    for part in program.parts:
        module = part.module if isinstance(part, StreamPart) else part.grad_module
        inputs = [values[n][0] for n in part.inputs]
        with (
            _meta_state(module, dtype) as state,
            torch.no_grad(),
            _model_code("model", tuple(image_shape)),
        ):
            maps = [_meta(s, dtype) for s in inputs]
            stats = [_meta(*values[n]) for n in part.stats]
            outputs = functional_call(module, state, (*maps, *stats))
        for name, out in zip(part.outputs, outputs, strict=True):
            if isinstance(out, torch.Tensor):
                values[name] = (tuple(out.shape), out.dtype)
            else:  # a statistic that is a number (a shape read): nothing to hold
                values[name] = ((), torch.float32)
    return values


class _MetaRun(torch.fx.Interpreter):
    """Runs a traced trunk on meta tensors: its parameters and buffers as meta copies, its
    running-statistics updates skipped (the user's buffers are never touched)."""

    def __init__(self, gm: torch.fx.GraphModule, state: dict[str, torch.Tensor]) -> None:
        super().__init__(gm)
        self.state = state

    def fetch_attr(self, target: str) -> Any:
        return self.state[target] if target in self.state else super().fetch_attr(target)

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        module = super().fetch_attr(target)
        inner = {k[len(target) + 1:]: v for k, v in self.state.items()
                 if k.startswith(f"{target}.")}  # fmt: skip
        return functional_call(module, inner, args, kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target in EFFECTS:
            return None
        return super().call_function(target, args, kwargs)


def node_shapes(trunk: nn.Module, image_shape: Shape, dtype: torch.dtype) -> dict[str, Shape]:
    """The shape of every tensor node of the trunk's traced graph (``executor``'s, with its
    norms decomposed) for an image of ``image_shape``, on meta tensors.

    Raises:
        EstimateError: the model's code fails on this shape.
    """
    gm = traced_trunk(trunk).gm
    with _meta_state(gm, dtype) as state, torch.no_grad(), _model_code("model", image_shape):
        run = _MetaRun(gm, state)
        shapes: dict[str, Shape] = {}
        nodes = iter(gm.graph.nodes)
        run.env = {}
        for node in nodes:
            if node.op == "placeholder":
                run.env[node] = _meta(image_shape, dtype)
                continue
            if node.op == "output":
                break
            value = run.run_node(node)
            run.env[node] = value
            if isinstance(value, torch.Tensor):
                shapes[node.name] = tuple(value.shape)
    return shapes


def head_peak(head: nn.Module, features_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Peak bytes of the head's forward and backward on the trunk's output map.

    The map and its gradient are counted separately (``output_bytes``, ``output_grad_bytes``),
    so they exist before counting starts.

    Raises:
        EstimateError: the head's code fails on this shape.
    """
    with _meta_state(head, dtype) as state, _model_code("model's head", features_shape):
        features = torch.empty(features_shape, device="meta", dtype=dtype, requires_grad=True)
        features.grad = torch.empty_like(features)
        counter = LiveBytes()
        with counter:
            out = functional_call(head, state, (features,))
            out.float().sum().backward()
            del out
        return counter.peak


@dataclass(frozen=True)
class ModelState:
    """Bytes of the model's persistent state in a training step."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int

    @classmethod
    def of(
        cls, model: nn.Module, optimizer: str, param_dtype: torch.dtype | None = None
    ) -> ModelState:
        """The state of ``model`` trained with ``optimizer``, its floating-point parameters
        and buffers in ``param_dtype`` (default: as they are now)."""

        def nbytes(t: torch.Tensor) -> int:
            size = param_dtype.itemsize if param_dtype and t.is_floating_point() else None
            return t.numel() * (size or t.element_size())

        params = sum(map(nbytes, (*model.parameters(), *model.buffers())))
        trainable = sum(nbytes(p) for p in model.parameters() if p.requires_grad)
        return cls(params, trainable, trainable * OPTIMIZERS[optimizer].state_factor)


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def estimate_streaming(
    *,
    trunk: nn.Module,
    head: nn.Module,
    state: ModelState,
    image_shape: tuple[int, ...],
    backward_crop: tuple[int, ...],
    forward_crop: tuple[int, ...],
    dtype: torch.dtype,
    image_dtype: torch.dtype = torch.float32,
    image_on_device: bool = True,
) -> MemoryBreakdown:
    """Peak memory of one streaming training step, by category (estimate, bytes).

    Args:
        image_shape: (N, C, *spatial) of the whole image.
        backward_crop, forward_crop: (N, C, *spatial) of the largest crop of each pass.
        image_on_device: count the whole image (True on CPU, where it is in the same memory).
    """
    fixed = estimate_fixed(trunk=trunk, head=head, state=state, image_shape=image_shape,
                           dtype=dtype, image_dtype=image_dtype,
                           image_on_device=image_on_device)  # fmt: skip
    return with_tiles(fixed, trunk, backward_crop, forward_crop, dtype)


def estimate_fixed(
    *,
    trunk: nn.Module,
    head: nn.Module,
    state: ModelState,
    image_shape: tuple[int, ...],
    dtype: torch.dtype,
    image_dtype: torch.dtype = torch.float32,
    image_on_device: bool = True,
) -> MemoryBreakdown:
    """The categories that do not depend on the tile (tile fields 0): estimate them once per
    image and add each candidate's tiles with ``with_tiles``."""
    out_shape = _full_output_shape(trunk, image_shape, dtype)
    out_bytes = _nbytes(out_shape, dtype)
    return MemoryBreakdown(
        params_bytes=state.params_bytes,
        grads_bytes=state.grads_bytes,
        optimizer_bytes=state.optimizer_bytes,
        image_bytes=_nbytes(image_shape, image_dtype) if image_on_device else 0,
        output_bytes=out_bytes,
        output_grad_bytes=out_bytes,
        head_bytes=head_peak(head, out_shape, dtype),
        tile_forward_bytes=0,
        tile_backward_bytes=0,
    )


def with_tiles(
    fixed: MemoryBreakdown,
    trunk: nn.Module,
    backward_crop: tuple[int, ...],
    forward_crop: tuple[int, ...],
    dtype: torch.dtype,
) -> MemoryBreakdown:
    """``fixed`` with the tile activations of the given largest crops (N, C, *spatial)."""
    return replace(
        fixed,
        tile_forward_bytes=pass_peak(trunk, forward_crop, dtype, grad=False)[0],
        tile_backward_bytes=pass_peak(trunk, backward_crop, dtype, grad=True)[0],
    )


def _full_output_shape(
    trunk: nn.Module, image_shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[int, ...]:
    with _meta_state(trunk, dtype) as state, torch.no_grad():
        x = torch.empty(image_shape, device="meta", dtype=dtype)
        return tuple(functional_call(trunk, state, (x,)).shape)


@dataclass(frozen=True)
class Conventional:
    """A conventional training step on the whole image (estimate, bytes)."""

    state_bytes: int  # parameters, gradients, optimizer state
    trunk_bytes: int  # the trunk's pass: its input and everything saved for backward
    head_bytes: int  # the head's pass on the trunk's output map

    @property
    def peak_bytes(self) -> int:
        # The trunk's saved activations are alive while the head runs.
        return self.state_bytes + self.trunk_bytes + self.head_bytes


def estimate_conventional(
    *,
    trunk: nn.Module,
    head: nn.Module,
    state: ModelState,
    image_shape: tuple[int, ...],
    dtype: torch.dtype,
) -> Conventional:
    """A conventional training step on the whole image (estimate).

    The image is the trunk pass's input, so ``pass_peak`` already counts it once: on a GPU
    that is its device copy (the host copy is not device memory), on CPU the image itself.
    """
    trunk_peak, out_shape = pass_peak(trunk, image_shape, dtype, grad=True)
    fixed = state.params_bytes + state.grads_bytes + state.optimizer_bytes
    return Conventional(fixed, trunk_peak, head_peak(head, out_shape, dtype))
