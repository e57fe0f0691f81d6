"""Streaming inference on whole images, with exact saliency maps (input gradients)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from executor.streaming import StreamingCNN

__all__ = ["Prediction", "predict_image", "saliency_to_uint8"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Head outputs for one image, and its saliency map when asked for."""

    outputs: tuple[float, ...]  # raw head outputs (logits or values)
    label: float  # argmax class, 1 for a positive single logit, or the regressed value
    score: float  # probability of the predicted class (or the value for regression)
    saliency: torch.Tensor | None = None  # (C, *spatial) d output / d image, on the host


def _decide(outputs: torch.Tensor, regression: bool) -> tuple[float, float, int]:
    """(label, score, index of the output whose gradient is the saliency)."""
    if regression:
        return float(outputs[0]), float(outputs[0]), 0
    if outputs.numel() == 1:
        p = float(torch.sigmoid(outputs[0]))
        return float(p >= 0.5), max(p, 1 - p), 0
    k = int(torch.argmax(outputs))
    return float(k), float(torch.softmax(outputs, 0)[k]), k


def predict_image(
    scnn: StreamingCNN,
    head: nn.Module,
    image: torch.Tensor,
    *,
    regression: bool = False,
    saliency: bool = False,
) -> Prediction:
    """Stream ``image`` (C, *spatial) forward only; optionally its exact saliency map.

    Without saliency no autograd memory is used at all. With it, the predicted class's logit
    (or the regressed value) is backpropagated tile by tile to the image: the same exact
    streaming backward as in training, with ``scnn.input_grad`` on.
    """
    batch = image.unsqueeze(0)
    if not saliency:
        with torch.no_grad():
            outputs = head(scnn.forward(batch)).reshape(-1).float()
        label, score, _ = _decide(outputs, regression)
        return Prediction(tuple(map(float, outputs)), label, score)
    if not scnn.input_grad:
        raise ValueError("saliency needs a StreamingCNN built with input_grad=True")
    features = scnn.forward(batch).requires_grad_()
    outputs = head(features).reshape(-1)
    label, score, index = _decide(outputs.detach().float(), regression)
    (features_grad,) = torch.autograd.grad(outputs[index], features)  # head grads untouched
    params = [p for p in scnn.trunk.parameters() if p.requires_grad]
    saved = [p.requires_grad for p in params]
    try:  # parameter gradients are not wanted here: do not accumulate them
        for p in params:
            p.requires_grad_(False)
        grad = scnn.backward(batch, features_grad)
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)
    assert grad is not None
    return Prediction(tuple(map(float, outputs.detach())), label, score, grad[0].cpu())


def saliency_to_uint8(saliency: torch.Tensor, reduce: Callable[..., torch.Tensor] | None = None
                      ) -> np.ndarray:  # fmt: skip
    """(C, H, W) gradient -> (H, W) uint8 image of its magnitude (max over channels), scaled to
    the map's own maximum."""
    magnitude = (reduce or (lambda t: t.abs().amax(0)))(saliency.float())
    top = float(magnitude.max())
    scaled = magnitude / top if top > 0 else magnitude
    return (scaled * 255).round().to(torch.uint8).numpy()
