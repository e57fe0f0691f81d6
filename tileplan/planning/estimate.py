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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

from executor import MemoryBreakdown, StreamingError
from tileplan.settings import OPTIMIZERS

__all__ = [
    "Conventional",
    "EstimateError",
    "LiveBytes",
    "ModelState",
    "estimate_conventional",
    "estimate_fixed",
    "estimate_streaming",
    "pass_flops",
    "pass_peak",
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
