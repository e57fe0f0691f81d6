"""``tileplan train`` / ``predict`` / ``report``: from a model file, a plan and data on disk to a
trained run folder with a memory-savings report. The loops themselves live in ``executor``."""

from __future__ import annotations

import csv
import io
import logging
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from executor import Plan, StreamingCNN, check_plan_matches, load_plan, save_plan
from executor.data import DataError, load_csv, normalize_tile, read_image
from executor.fileio import atomic_write
from executor.predict import Prediction, predict_image, saliency_to_uint8
from executor.report import RunReport, save_report
from executor.train import TrainConfig, Trainer, TrainError, load_checkpoint
from tileplan.measure import MeasureSpec, device_info, measure_peak
from tileplan.model_file import LoadedModel, load_model_file

__all__ = ["TrainRequest", "measure_run_report", "predict_files", "run_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    model_file: Path
    plan_file: Path
    data: Path
    val: Path | None
    out: Path
    config: TrainConfig
    resume: bool = False
    device: str = "auto"
    report: bool = True  # measure the memory-savings report at the end


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device(f"cuda:{local}")
        return torch.device("cpu")
    return torch.device(name)


def _load(model_file: Path, plan: Plan) -> LoadedModel:
    loaded = load_model_file(model_file, plan.model.get("split_option", "auto"))
    check_plan_matches(plan, loaded.trunk)
    return loaded


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)
    log.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def run_training(
    req: TrainRequest, *, progress: bool = True
) -> tuple[list[dict[str, Any]], RunReport | None]:
    """Validate everything, train, and (rank 0) write the report; returns (history, report).

    Raises:
        PlanError, DataError, ModelFileError, TrainError: one line each, before training starts
            when the inputs are at fault.
    """
    plan = load_plan(req.plan_file)
    _seed_everything(req.config.seed)  # the model's initial weights too
    loaded = _load(req.model_file, plan)
    train_data = load_csv(req.data, target_shape=plan.image_shape_px)
    val_data = load_csv(req.val, target_shape=plan.image_shape_px) if req.val else None
    for data in (train_data, val_data):
        if data is not None and data.channels != plan.channels:
            raise DataError(
                f"'{data.csv_path}' images have {data.channels} channels, the plan "
                f"{plan.channels}; re-run `tileplan profile --channels {data.channels}`"
            )
    checkpoint = req.out / "last.pt"
    if checkpoint.exists() and not req.resume:
        raise TrainError(f"'{req.out}' already holds a run (last.pt); pass --resume to continue it "
                         "or choose a new --out")  # fmt: skip
    device = _device(req.device)
    joined = _init_distributed(device)
    try:
        trainer = Trainer(
            model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan,
            train_data=train_data, val_data=val_data, config=req.config, out_dir=req.out,
            device=device,
        )  # fmt: skip
        if req.resume:
            trainer.resume()
        if trainer.rank == 0:
            req.out.mkdir(parents=True, exist_ok=True)
            save_plan(plan, req.out / "plan.yaml")
        history = trainer.fit(progress=progress)
        report = None
        if req.report and trainer.rank == 0:
            per_image = [row["seconds_per_image"] for row in history] or [float("nan")]
            report = measure_run_report(
                run=req.out.name, plan=plan, model_file=req.model_file,
                device=str(device), time_per_image_s=statistics.median(per_image),
            )  # fmt: skip
            save_report(report, req.out / "report.yaml")
        return history, report
    finally:
        if joined:
            dist.destroy_process_group()


def measure_run_report(
    *, run: str, plan: Plan, model_file: Path, device: str, time_per_image_s: float
) -> RunReport:
    """Measure one streaming step and (if it is predicted to fit) one conventional step on an
    image of the plan's shape, each in a clean process (CPU) or with the allocator's counters."""
    image = (plan.batch, plan.channels, *plan.image_shape_px)

    def spec(mode: str) -> MeasureSpec:
        return MeasureSpec(
            model_file=str(model_file), split=plan.model.get("split_option", "auto"), mode=mode,
            shape=image, dtype=plan.dtype, device=device, tile=plan.tile_px,
            forward_tile=plan.forward_tile_px, optimizer=plan.optimizer,
        )  # fmt: skip

    streaming = measure_peak(spec("step"))
    if not streaming.ok:
        raise TrainError(f"measuring the streaming step failed: {streaming.error}")
    conventional = None
    # Measured whenever the device can hold it (the plan's budget may be a user's choice
    # smaller than the device); otherwise the plan's estimate, labelled as such.
    info = device_info(device)
    room = info.available_bytes if info.device == "cpu" else info.total_bytes
    if plan.conventional_peak_bytes <= 0.9 * room:
        conventional = measure_peak(spec("conventional"))
        if not conventional.ok:
            log.warning("conventional step could not be measured (%s); using the estimate",
                        conventional.error)  # fmt: skip
            conventional = None
    chosen = next((c for c in plan.candidates if c.tile_px == plan.tile_px), None)
    breakdown = {}
    if chosen is not None:
        m = chosen.memory
        breakdown = {
            "params_bytes": m.params_bytes, "grads_bytes": m.grads_bytes,
            "optimizer_bytes": m.optimizer_bytes, "image_bytes": m.image_bytes,
            "output_map_bytes": m.output_bytes, "output_grad_bytes": m.output_grad_bytes,
            "head_bytes": m.head_bytes,
            "tile_activations_bytes": max(m.tile_forward_bytes, m.tile_backward_bytes),
        }  # fmt: skip
    how = (
        "CUDA caching allocator, peak allocated bytes" if device.startswith("cuda")
        else "process RSS high-water mark in a fresh child process, model state included"
    )  # fmt: skip
    return RunReport(
        run=run, device=device, measurement=how, image_shape_px=plan.image_shape_px,
        tile_px=plan.tile_px, n_tiles=chosen.n_tiles if chosen else 0,
        streaming_peak_bytes=int(streaming.peak_bytes or 0),
        conventional_peak_bytes=int(conventional.peak_bytes if conventional and
                                    conventional.peak_bytes else plan.conventional_peak_bytes),
        conventional_measured=conventional is not None,
        streaming_time_per_image_s=round(time_per_image_s, 4),
        conventional_time_per_image_s=round(conventional.seconds, 4)
        if conventional and conventional.seconds else None,
        breakdown_bytes=breakdown, timeline=streaming.timeline,
        conventional_timeline=conventional.timeline if conventional else (),
    )  # fmt: skip


def predict_files(
    *,
    model_file: Path,
    plan_file: Path,
    checkpoint: Path,
    images: Sequence[Path],
    saliency_dir: Path | None,
    device: str = "auto",
) -> list[tuple[Path, Prediction]]:
    """Predict whole images by streaming; write saliency maps (PNG + .npy) if asked."""
    plan = load_plan(plan_file)
    loaded = _load(model_file, plan)
    ckpt = load_checkpoint(checkpoint)
    try:
        loaded.model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise TrainError(f"checkpoint '{checkpoint}' does not fit this model ({err})") from err
    dev = _device(device)
    config = ckpt.get("config", {})
    mean = torch.tensor(config.get("mean", (0.485, 0.456, 0.406))[: plan.channels], device=dev)
    std = torch.tensor(config.get("std", (0.229, 0.224, 0.225))[: plan.channels], device=dev)
    loaded.model.to(dev).eval()
    scnn = StreamingCNN.from_plan(
        loaded.trunk, plan, input_grad=saliency_dir is not None,
        preprocess=lambda crop: normalize_tile(crop, mean, std, torch.float32),
    )  # fmt: skip
    regression = ckpt.get("task") == "regression"
    results = []
    for path in images:
        try:
            image = read_image(path, plan.image_shape_px)
        except DataError:
            raise
        except Exception as err:
            raise DataError(f"cannot read '{path}': {type(err).__name__}: {err}") from err
        pred = predict_image(scnn, loaded.head, image, regression=regression,
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
