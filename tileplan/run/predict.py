"""Streaming inference on whole images, with exact saliency maps (input gradients).

``predict_files`` runs a trained checkpoint on image files: each image is streamed forward only
(no autograd memory), normalised exactly as in training (the checkpoint records how), and with
``saliency_dir`` the predicted output's exact gradient with respect to the image is written as
a PNG (magnitude, max over channels) and a raw ``.npy`` per image.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from executor import (
    SegmentedStreamingCNN,
    StreamingCNN,
    atomic_write,
    check_plan_matches,
    load_plan,
)
from tileplan.planning.model_file import load_model_file
from tileplan.run.checkpoint import CheckpointError, load_checkpoint
from tileplan.run.data import Task, read_image
from tileplan.run.trainer import decide
from tileplan.settings import resolve_device

__all__ = ["Prediction", "predict_files", "predict_image", "predictions_csv", "saliency_to_uint8"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Head outputs for one image, and its saliency map when asked for."""

    outputs: tuple[float, ...]  # raw head outputs (logits or values)
    label: float  # argmax class, 1 for a positive single logit, or the regressed value
    score: float  # probability of the predicted label (the value for regression)
    saliency: torch.Tensor | None = None  # (C, *spatial) d output / d image, on the host


def predict_image(
    scnn: StreamingCNN | SegmentedStreamingCNN, head: nn.Module, image: torch.Tensor, *, task: Task,
    saliency: bool = False,
) -> Prediction:  # fmt: skip
    """Stream ``image`` (C, *spatial) forward only; optionally its exact saliency map.

    Without saliency no autograd memory is used at all. With it, the predicted class's logit
    (or the regressed value) is backpropagated tile by tile to the image: the same exact
    streaming backward as in training, with ``scnn.input_grad`` on.
    """
    batch = image.unsqueeze(0)
    if not saliency:
        with torch.no_grad():
            features = scnn.forward(batch)
            with scnn.autocast():
                outputs = head(features).reshape(-1).float()
        d = decide(outputs, task)
        return Prediction(tuple(map(float, outputs)), d.label, d.probability)
    if not scnn.input_grad:
        raise ValueError("saliency needs a StreamingCNN built with input_grad=True")
    features = scnn.forward(batch).requires_grad_()
    with scnn.autocast():
        outputs = head(features).reshape(-1)
    d = decide(outputs.detach(), task)
    (features_grad,) = torch.autograd.grad(outputs[d.index], features)  # head grads untouched
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
    values = tuple(map(float, outputs.detach().float()))
    return Prediction(values, d.label, d.probability, grad[0].cpu())


def saliency_to_uint8(saliency: torch.Tensor) -> np.ndarray:
    """(C, H, W) gradient -> (H, W) uint8 image of its magnitude (max over channels), scaled to
    the map's own maximum."""
    magnitude = saliency.float().abs().amax(0)
    top = float(magnitude.max())
    scaled = magnitude / top if top > 0 else magnitude
    return (scaled * 255).round().to(torch.uint8).numpy()


def predict_files(
    *,
    model_file: Path,
    plan_file: Path,
    checkpoint: Path,
    images: Sequence[Path],
    saliency_dir: Path | None,
    device: str = "auto",
) -> list[tuple[Path, Prediction]]:
    """Predict whole images by streaming; write saliency maps (PNG + .npy) if asked.

    Raises:
        PlanError, CheckpointError, ModelFileError, DataError: one line each, before any image
            is predicted when the inputs do not fit together.
    """
    plan = load_plan(plan_file)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.meta.plan.model.trunk_fingerprint != plan.model.trunk_fingerprint:
        raise CheckpointError(f"checkpoint '{checkpoint}' was trained for another model")
    loaded = load_model_file(model_file, plan.model.split_option)
    check_plan_matches(plan, loaded.trunk)
    try:
        loaded.model.load_state_dict(ckpt.model)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint '{checkpoint}' does not fit this model ({err})") from err
    spec = ckpt.meta.spec
    if spec.dtype != plan.dtype:
        log.warning("predicting in the plan's %s; the run trained in %s", plan.dtype, spec.dtype)
    loaded.model.to(resolve_device(device), dtype=plan.precision.param_dtype).eval()
    normalization = spec.normalization
    dtype = plan.precision.param_dtype
    scnn = StreamingCNN.from_plan(
        loaded.trunk, plan, input_grad=saliency_dir is not None,
        preprocess=lambda crop: normalization.apply(crop, dtype),
    )  # fmt: skip
    results = []
    for path in images:
        image = read_image(path, plan.image_shape_px)
        pred = predict_image(scnn, loaded.head, image, task=ckpt.meta.task,
                             saliency=saliency_dir is not None)  # fmt: skip
        if saliency_dir is not None and pred.saliency is not None:
            _write_saliency(saliency_dir, path, pred.saliency)
        results.append((path, pred))
    return results


def _write_saliency(out_dir: Path, image_path: Path, saliency: torch.Tensor) -> None:
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(saliency_to_uint8(saliency)).save(png, format="PNG")
    atomic_write(out_dir / f"{image_path.stem}.saliency.png", lambda f: f.write(png.getvalue()))
    raw = io.BytesIO()
    np.save(raw, saliency.numpy().astype(np.float32))
    atomic_write(out_dir / f"{image_path.stem}.saliency.npy", lambda f: f.write(raw.getvalue()))


def predictions_csv(results: Sequence[tuple[Path, Prediction]]) -> str:
    """CSV text: image, label, score, outputs (space-separated)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["image", "label", "score", "outputs"])
    for path, p in results:
        writer.writerow([str(path), f"{p.label:g}", f"{p.score:.6f}",
                         " ".join(f"{v:.6g}" for v in p.outputs)])  # fmt: skip
    return out.getvalue()
