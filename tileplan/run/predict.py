"""Streaming inference on whole images, with exact saliency maps (input gradients).

``predict_files`` runs a trained checkpoint on image files: each image is streamed forward only
(no autograd memory), normalised exactly as in training (the checkpoint records how), and with
``saliency_dir`` the predicted output's exact gradient with respect to the image is written as
a PNG (magnitude, max over channels) and a raw ``.npy`` per image, and as an overlay on the
whole slide's thumbnail (``<name>.overlay.png``: heat where the gradient is large, the streamed
box outlined). Images are read as in training (the run's recorded ``DataSettings``:
resolution, tissue crop, oversize policy), slides region by region from disk.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from executor import (
    ImageSource,
    Plan,
    StreamingCNN,
    TensorSource,
    atomic_write,
    check_plan_matches,
    load_plan,
)
from tileplan.planning.model_file import load_model_file
from tileplan.run.checkpoint import CheckpointError, load_checkpoint
from tileplan.run.csv_out import csv_text
from tileplan.run.data import DataError, Task, describe_error
from tileplan.run.file_source import FileSource
from tileplan.run.sizes import too_small
from tileplan.run.slides import Region, SlideSource, resolve, thumbnail
from tileplan.run.trainer import decide, inference_engine
from tileplan.settings import DataSettings, resolve_device

__all__ = [
    "Prediction", "predict_files", "predict_image", "predictions_csv", "saliency_overlay",
    "saliency_to_uint8",
]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Head outputs for one image, and its saliency map when asked for."""

    outputs: tuple[float, ...]  # raw head outputs (logits or values)
    label: float  # argmax class, 1 for a positive single logit, or the regressed value
    score: float  # probability of the predicted label (the value for regression)
    saliency: torch.Tensor | None = None  # (C, *spatial) d output / d image, on the host


def predict_image(
    scnn: StreamingCNN, head: nn.Module,
    image: torch.Tensor | ImageSource, *, task: Task, saliency: bool = False,
    tta: bool = False, max_shape: Sequence[int] | None = None,
) -> Prediction:  # fmt: skip
    """Stream ``image`` (a (C, *spatial) tensor, or an ``ImageSource`` of (1, C, *spatial))
    forward only; optionally its exact saliency map.

    Without saliency no autograd memory is used at all. With it, the predicted class's logit
    (or the regressed value) is backpropagated tile by tile to the image: the same exact
    streaming backward as in training, with ``scnn.input_grad`` on.

    With ``tta`` the image is streamed under each of the 8 symmetries of the square (the 4
    transposed ones only where the transposed image fits ``max_shape``, the plan's) and the
    prediction is their mean: of the probabilities for classes (then ``outputs`` are the mean
    logits), of the values for regression. Saliency is of the image as read, not with ``tta``.
    """
    batch = image.unsqueeze(0) if isinstance(image, torch.Tensor) else image
    if tta:
        if saliency:
            raise ValueError("saliency maps are of the image as read; predict them without "
                             "--tta")  # fmt: skip
        return _mean_prediction(scnn, head, batch, task=task, max_shape=max_shape)
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


def _mean_prediction(scnn: StreamingCNN, head: nn.Module, batch: torch.Tensor | ImageSource,
                     *, task: Task, max_shape: Sequence[int] | None) -> Prediction:  # fmt: skip
    """Test-time augmentation over the symmetries of the square (see ``predict_image``)."""
    from tileplan.augment import symmetric_views

    source = TensorSource(batch) if isinstance(batch, torch.Tensor) else batch
    logits = []
    with torch.no_grad():
        for view in symmetric_views(source, max_shape):
            features = scnn.forward(view)
            with scnn.autocast():
                logits.append(head(features).reshape(-1).float())
    stacked = torch.stack(logits)  # (views, outputs)
    mean = stacked.mean(0)
    if task == "regression":
        return Prediction(tuple(map(float, mean)), float(mean[0]), float(mean[0]))
    if stacked.shape[1] == 1:  # one logit: the mean probability of class 1
        p = float(torch.sigmoid(stacked[:, 0]).mean())
        return Prediction(tuple(map(float, mean)), float(p >= 0.5), max(p, 1.0 - p))
    probs = torch.softmax(stacked, 1).mean(0)
    k = int(torch.argmax(probs))
    return Prediction(tuple(map(float, mean)), float(k), float(probs[k]))


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
    assume_mpp: float | None = None,
    assume_spacing: tuple[float, ...] | None = None,
    tta: bool = False,
) -> list[tuple[Path, Prediction]]:
    """Predict whole images by streaming; write saliency maps (PNG + .npy) if asked.

    Raises:
        PlanError, CheckpointError, ModelFileError, DataError: one line each, before any image
            is predicted when the inputs do not fit together.
    """
    if tta and saliency_dir is not None:
        raise ValueError("--tta and --saliency: saliency maps are of the image as read; "
                         "predict them in a run without --tta")  # fmt: skip
    plan = load_plan(plan_file)
    if tta and plan.n_axes == 3:
        raise ValueError("--tta averages the symmetries of 2D images; predict volumes "
                         "without it")  # fmt: skip
    ckpt = load_checkpoint(checkpoint)
    if ckpt.meta.plan.model.trunk_fingerprint != plan.model.trunk_fingerprint:
        raise CheckpointError(f"checkpoint '{checkpoint}' was trained for another model")
    # Inference normalises with running statistics: the plan is checked against the model in
    # its own BatchNorm mode, and a plan for batch statistics streams the frozen trunk with
    # its forward tile (``inference_engine``).
    loaded = load_model_file(
        model_file, plan.model.split_option, batch_norm=plan.batch_norm, n_axes=plan.n_axes
    )
    check_plan_matches(plan, loaded.trunk)
    loaded = loaded.resplit("frozen")
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
    scnn = inference_engine(
        loaded.trunk, plan, input_grad=saliency_dir is not None,
        preprocess=lambda crop: normalization.apply(crop, dtype),
    )  # fmt: skip
    data = spec.data  # read as the run read its images; what files do not record, stated here
    if assume_mpp is not None or assume_spacing is not None:
        data = replace(data, assume_mpp=assume_mpp or data.assume_mpp,
                       assume_spacing=assume_spacing or data.assume_spacing)  # fmt: skip
    sources = _checked_sources(images, scnn, plan, data)
    results = []
    for path, source in zip(images, sources, strict=True):
        try:
            pred = predict_image(scnn, loaded.head, source, task=ckpt.meta.task,
                                 saliency=saliency_dir is not None, tta=tta,
                                 max_shape=plan.image_shape_px)  # fmt: skip
        finally:
            source.close()
        if saliency_dir is not None and pred.saliency is not None:
            _write_maps(saliency_dir, path, source, pred.saliency)
        results.append((path, pred))
    return results


def _checked_sources(images: Sequence[Path], scnn: StreamingCNN, plan: Plan,
                     data: DataSettings) -> list[FileSource]:  # fmt: skip
    """A source for every image, read as the run read its images (slides: mpp, level,
    tissue; volumes: spacing, intensity), each checked before any is predicted (their files
    are opened when read).

    Raises:
        DataError: one line naming the image, what it has and what the model needs.
    """
    volumes = plan.n_axes == 3
    if volumes:
        from tileplan.run.volumes import VolumeSource, resolve_volume

        def source_of(path: Path) -> FileSource:
            return VolumeSource(resolve_volume(path, data, max_shape=plan.image_shape_px))

        reading = data.describe_volumes()
    else:

        def source_of(path: Path) -> FileSource:
            found = resolve(path, level=data.level, mpp=data.mpp, tissue=data.tissue,
                            max_shape=plan.image_shape_px, oversize=data.oversize,
                            assume_mpp=data.assume_mpp)  # fmt: skip
            return SlideSource(found.pyramid, found.region)

        reading = data.describe_reading()
    sources = []
    for path in images:
        try:
            source = source_of(Path(path))
            small = too_small(scnn, source.shape[2:], volumes=volumes, reading=reading,
                              resampled=data.spacing is not None)  # fmt: skip
            if small is not None:
                raise small
        except Exception as exc:  # any reader failure becomes one clear line
            raise DataError(f"cannot predict '{path}': {describe_error(exc, 'predict')}") from exc
        sources.append(source)
    return sources


def _write_maps(folder: Path, path: Path, source: FileSource, saliency: torch.Tensor) -> None:
    """The saliency of one image: its ``.npy`` and magnitude PNG, and for a slide the overlay
    on its thumbnail (a volume's PNG is the magnitude's maximum over depth)."""
    magnitude = saliency_to_uint8(saliency)  # (*spatial)
    if isinstance(source, SlideSource):
        _write_saliency(folder, path, saliency, magnitude)
        overlay = saliency_overlay(thumbnail(source.pyramid), magnitude, source.region)
        _write_png(folder / f"{path.stem}.overlay.png", overlay)
    else:
        _write_saliency(folder, path, saliency, magnitude.max(axis=0))


def saliency_overlay(thumb: np.ndarray, magnitude: np.ndarray, region: Region) -> np.ndarray:
    """The saliency magnitude of a streamed region drawn over the whole slide's thumbnail.

    Args:
        thumb: ``(th, tw, C)`` uint8 thumbnail of the whole slide (C = 1 or 3).
        magnitude: ``(h, w)`` uint8 saliency magnitude of ``region.box``.
        region: what was streamed: its box in px of ``region.scaled`` (the whole slide).

    Returns:
        ``(th, tw, 3)`` uint8: heat (red to yellow, opaque where the gradient is large) over
        the thumbnail, the streamed box outlined in blue.
    """
    from PIL import Image

    base = thumb if thumb.shape[2] == 3 else np.repeat(thumb[..., :1], 3, axis=2)
    out = base.astype(np.float32)
    (th, tw), (sh, sw) = base.shape[:2], region.scaled
    y0, x0, h, w = region.box
    # The box in thumbnail px: floor the start, ceil the end, at least one px.
    ty0, tx0 = (y0 * th) // sh, (x0 * tw) // sw
    ty1 = max(ty0 + 1, min(th, -((-(y0 + h) * th) // sh)))
    tx1 = max(tx0 + 1, min(tw, -((-(x0 + w) * tw) // sw)))
    heat = (
        np.asarray(
            Image.fromarray(magnitude).resize((tx1 - tx0, ty1 - ty0), Image.Resampling.BOX),
            dtype=np.float32,
        )
        / 255.0
    )  # (bh, bw) in [0, 1]
    colour = np.stack([np.full_like(heat, 255.0), 255.0 * heat, np.zeros_like(heat)], axis=-1)
    alpha = (0.75 * heat)[..., None]
    patch = out[ty0:ty1, tx0:tx1]
    out[ty0:ty1, tx0:tx1] = patch * (1 - alpha) + colour * alpha
    blue = np.array([40.0, 90.0, 255.0], dtype=np.float32)
    out[ty0, tx0:tx1] = out[ty1 - 1, tx0:tx1] = blue
    out[ty0:ty1, tx0] = out[ty0:ty1, tx1 - 1] = blue
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    atomic_write(path, lambda f: f.write(png.getvalue()))


def _write_saliency(out_dir: Path, image_path: Path, saliency: torch.Tensor,
                    magnitude: np.ndarray) -> None:  # fmt: skip
    """The raw gradient (``.npy``) and its magnitude (``saliency_to_uint8``) as a PNG."""
    _write_png(out_dir / f"{image_path.stem}.saliency.png", magnitude)
    raw = io.BytesIO()
    np.save(raw, saliency.numpy().astype(np.float32))
    atomic_write(out_dir / f"{image_path.stem}.saliency.npy", lambda f: f.write(raw.getvalue()))


def predictions_csv(results: Sequence[tuple[Path, Prediction]]) -> str:
    """CSV text: image, label, score, outputs (space-separated)."""
    rows = [
        [str(path), f"{p.label:g}", f"{p.score:.6f}", " ".join(f"{v:.6g}" for v in p.outputs)]
        for path, p in results
    ]
    return csv_text(["image", "label", "score", "outputs"], rows)
