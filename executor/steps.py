"""One training step of a streamed trunk plus a conventional head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from executor.function import stream_trunk
from executor.streaming import StreamingCNN

__all__ = ["streaming_step"]


def streaming_step(
    scnn: StreamingCNN,
    head: nn.Module,
    image: torch.Tensor,
    target: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    loss_scale: float = 1.0,
    grad_scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the image tile by tile, run the head and loss, backpropagate exactly.

    Gradients are added into ``.grad`` of the trunk's and the head's parameters (so several
    calls accumulate, e.g. over an effective batch); the optimizer step is the caller's.

    The head and the loss run under the same autocast as the tiles (``scnn.autocast()``).

    Args:
        loss_scale: multiplies the loss before backward (``1 / accumulation steps``).
        grad_scaler: a float16 loss scaler; the loss is scaled by it before backward, and
            the caller steps the optimizer through it (``grad_scaler.step(optimizer)``).

    Returns:
        ``(loss, logits)``, both detached.
    """
    # One path with the drop-in model: the trunk is an autograd node (executor.function), so
    # one backward call gives every gradient, accumulated by autograd.
    features = stream_trunk(scnn, image)  # (N, C, *out), no trunk graph held
    with scnn.autocast():  # the head sees the map as it would under whole-model autocast
        logits = head(features)
        loss = loss_fn(logits, target.to(logits.device))
    del features  # the head's graph holds what it needs of the map; free the rest early
    logits = logits.detach()
    scaled = grad_scaler.scale(loss) if grad_scaler is not None else loss
    (scaled * loss_scale).backward()
    return loss.detach(), logits
