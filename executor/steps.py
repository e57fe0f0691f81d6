"""One training step of a streamed trunk plus a conventional head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward the image tile by tile, run the head and loss, backpropagate exactly.

    Gradients are added into ``.grad`` of the trunk's and the head's parameters (so several
    calls accumulate, e.g. over an effective batch); the optimizer step is the caller's.

    Args:
        loss_scale: multiplies the loss before backward (``1 / accumulation steps``).

    Returns:
        ``(loss, logits)``, both detached.
    """
    features = scnn.forward(image)  # (N, C, *out), no graph
    features.requires_grad_()
    logits = head(features)
    loss = loss_fn(logits, target.to(logits.device))
    (loss * loss_scale).backward()
    scnn.backward(image, features.grad)
    return loss.detach(), logits.detach()
