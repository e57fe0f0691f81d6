"""The streamed trunk as one autograd node: ``loss.backward()`` runs the streaming backward.

``stream_trunk(scnn, image)`` returns the trunk's output map like ``trunk(image)`` would, but
computed tile by tile, and connected to autograd by one ``torch.autograd.Function`` whose
inputs are the image and the trunk's parameters. Its backward runs ``StreamingCNN``'s
streamed backward pass and *returns* every parameter gradient (and the image's) to autograd,
which accumulates them into ``.grad`` as it does for any other node: so DDP's reducer hooks,
``GradScaler``, clipping, gradient accumulation and ``retain_graph`` behave as they do for an
ordinary model.

Memory is the engine's: between the passes the node holds what the streamed backward needs
(the cut maps and statistics, the last tile's graph), a reference to the image (not a copy)
and nothing of the trunk's autograd graph.

Note: [Autograd node]
    The tiles run with stand-ins of the trainable parameters (detached leaves on the same
    storage, ``torch.func.functional_call``), and their graphs are differentiated with
    ``torch.autograd.grad`` with respect to the stand-ins: returned, never accumulated into
    ``.grad``. So no hook registered on a parameter (``Parameter.register_hook``, DDP's
    gradient-accumulator hooks) sees one tile's share: each runs once per backward call, on
    the total this node returns, as for a conventional module.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from executor.errors import StreamingError
from executor.sources import ImageSource
from executor.streaming import ForwardState, StreamingCNN

__all__ = ["stream_trunk"]

Image = torch.Tensor | ImageSource


def stream_trunk(scnn: StreamingCNN, image: Image) -> torch.Tensor:
    """``scnn.trunk(image)``, streamed, as a differentiable tensor.

    With grad mode on and a trunk parameter that trains (or an image that requires grad),
    the result has a ``grad_fn`` whose backward is the exact streamed backward pass; under
    ``torch.no_grad()``/``inference_mode`` (or with nothing to differentiate) only the streamed
    forward runs and nothing is kept.

    Args:
        scnn: the engine (``StreamingCNN`` or ``StreamingCNN.from_plan``).
        image: (N, C, *spatial) tensor on any device (e.g. the host with the trunk on a GPU),
            or an ``ImageSource`` read region by region (no input gradient then).

    Returns:
        (N, C_out, *out_spatial) on the trunk's device (or the engine's ``output_device``).

    Example:
        >>> features = stream_trunk(scnn, image)
        >>> loss = criterion(head(features), target)
        >>> loss.backward()  # trunk parameters' .grad filled by autograd
    """
    params = tuple(p for p in scnn.trunk.parameters() if p.requires_grad)
    image_grad = isinstance(image, torch.Tensor) and image.requires_grad
    if image_grad and torch.is_grad_enabled() and scnn.preprocess is not None:
        raise StreamingError(
            "the image requires grad but the engine preprocesses its crops, so the gradient "
            "would be the preprocessed image's; preprocess the image before streaming it, or "
            "pass an image that does not require grad"
        )
    if not (torch.is_grad_enabled() and (params or image_grad)):
        output, _ = scnn.forward_pass(image, keep=False)
        return output
    if isinstance(image, torch.Tensor):
        return _StreamedTrunk.apply(scnn, None, image, *params)
    return _StreamedTrunk.apply(scnn, image, None, *params)


def _autocast_states(device_type: str) -> dict[str, tuple[bool, torch.dtype]]:
    """The autocast state of the trunk's device type and of the CPU (which a CUDA trunk's
    host-side work runs under), to run the backward pass's tiles as the forward's ran."""
    return {kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
            for kind in dict.fromkeys((device_type, "cpu"))}  # fmt: skip


def _autocast(states: dict[str, tuple[bool, torch.dtype]]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for kind, (enabled, dtype) in states.items():
        stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
    return stack


class _StreamedTrunk(torch.autograd.Function):
    """inputs: (engine, source or None, image tensor or None, *trainable trunk parameters)."""

    @staticmethod
    def forward(ctx: Any, scnn: StreamingCNN, source: ImageSource | None,
                tensor: torch.Tensor | None, *params: nn.Parameter) -> torch.Tensor:  # fmt: skip
        image = source if source is not None else tensor
        assert image is not None
        input_grad = tensor is not None and tensor.requires_grad
        output, state = scnn.forward_pass(image, keep=True, input_grad=input_grad)
        device = scnn.device or output.device
        ctx.scnn = scnn
        # The backward pass reads the image's tiles again: a tensor is saved (a reference that
        # autograd checks was not changed in place, and frees after the backward pass), a
        # source is kept as it is.
        if tensor is not None:
            ctx.save_for_backward(tensor)
        ctx.source = source
        ctx.state = state
        ctx.params = params
        # Parameters changed in place before backward (an optimizer step) would give another
        # function's gradients: refused, as autograd refuses a saved tensor that changed.
        ctx.versions = tuple(p._version for p in params)
        # The backward pass recomputes tiles: under the autocast the forward ran under.
        ctx.autocast = _autocast_states(device.type)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        params: tuple[nn.Parameter, ...] = ctx.params
        changed = [i for i, (p, v) in enumerate(zip(params, ctx.versions, strict=True))
                   if p._version != v]  # fmt: skip
        if changed:
            raise StreamingError(
                f"{len(changed)} trunk parameter(s) were changed in place between the streamed "
                "forward and its backward (e.g. an optimizer step); call backward before "
                "optimizer.step(), or run the forward again"
            )
        # The kept maps are consumed by the pass; a second backward through the same graph
        # (retain_graph=True) recomputes them from the image, as the first would have.
        state: ForwardState | None = ctx.state
        ctx.state = None
        scnn: StreamingCNN = ctx.scnn
        input_grad = bool(ctx.needs_input_grad[2])
        image = ctx.source if ctx.source is not None else ctx.saved_tensors[0]
        with torch.enable_grad(), _autocast(ctx.autocast):
            grads = scnn.backward_pass(image, state, grad_output, input_grad=input_grad)
        found = {id(p): g for p, g in grads.params}
        return (None, None, grads.image if input_grad else None,
                *(found.get(id(p)) for p in params))  # fmt: skip
