"""``tileplan train``: from a model file, a plan and data on disk to a trained run folder with a
memory-savings report.

Every input is checked before training starts (the plan against the model, every CSV row, the
run folder), then the ``Trainer`` runs, and rank 0 measures the report.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from executor import Plan, check_plan_matches, load_plan, save_plan
from tileplan.host_allocator import use_host_allocator
from tileplan.planning.measure_child import state_bytes
from tileplan.planning.model_file import load_model_file
from tileplan.run.csv_out import write_csv
from tileplan.run.data import DataError, Dataset, load_csv
from tileplan.run.policy import RunPolicy
from tileplan.run.recipe import RecipeError, parse_class_weights
from tileplan.run.report import EpochMetrics, RunReport, measure_run_report, save_report
from tileplan.run.trainer import Trainer, TrainError
from tileplan.settings import OPTIMIZERS, RunSpec, resolve_device
from tileplan.units import format_bytes

__all__ = ["TrainRequest", "checkpoint_bytes", "check_space", "run_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    """A training run: where everything is, and its settings."""

    model_file: Path
    plan_file: Path
    data: Path
    val: Path | None
    out: Path
    options: dict[str, object]  # RunSpec options besides the plan's (lr, batch, mean, ...)
    resume: bool = False
    device: str = "auto"
    report: bool = True  # measure the memory-savings report at the end
    require_mixed_precision: bool = False  # --amp: refuse a float32/float64 plan
    policy: RunPolicy = RunPolicy()  # checkpoint cadence, unreadable images
    class_weights: str | None = None  # auto or W0,W1,... (the recipe's, once labels are read)


def _seed_everything(seed: int) -> None:
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


def checkpoint_bytes(model: torch.nn.Module, spec: RunSpec) -> int:
    """Bytes of one ``last.pt`` of ``model``: its state, and the optimizer's per byte of
    trainable parameters (``OptimizerSpec.state_factor``); pickling adds little."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return state_bytes(model) + OPTIMIZERS[spec.optimizer].state_factor * trainable


def check_space(out: Path, need: int) -> None:
    """Refuse to start a run whose folder's file system cannot hold a checkpoint of ``need``
    bytes (its atomic write holds the new file beside the old one until it replaces it).

    Raises:
        TrainError: naming the folder, the space free and the space needed.
    """
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None:
        return
    free = shutil.disk_usage(existing).free
    margin = need // 10 + (16 << 20)  # metrics, report, pickling
    if free < need + margin:
        raise TrainError(
            f"'{out}' has {format_bytes(free)} free, and a checkpoint of this model needs "
            f"{format_bytes(need + margin)}; free space there or choose another --out"
        )


def save_regions(path: Path, datasets: list[Dataset | None]) -> None:
    """Write what was streamed of every image (level, resolution, box) as a CSV: the data
    settings of a run, image by image."""
    header = ["csv", "row", "image", "level", "scaled_h", "scaled_w", "y0", "x0", "h", "w"]
    rows = [
        [data.csv_path, sample.row, sample.path, region.level, *region.scaled, *region.box]
        for data in datasets
        if data is not None and data.regions is not None
        for sample, region in zip(data.samples, data.regions, strict=True)
    ]
    write_csv(path, header, rows)


def save_volumes(path: Path, datasets: list[Dataset | None]) -> None:
    """Write what was streamed of every volume as a CSV: its spacing as read (mm, D x H x W;
    the file's or the one stated for it), its size at the run's spacing and the box
    streamed (a centre crop of a volume larger than the plan)."""
    header = ["csv", "row", "image", "spacing_mm", "scaled_d", "scaled_h", "scaled_w",
              "d0", "h0", "w0", "d", "h", "w", "intensity"]  # fmt: skip
    rows = [
        [
            data.csv_path,
            sample.row,
            sample.path,
            _spacing_text(region.spacing),
            *region.scaled,
            *region.box,
            region.intensity,
        ]  # fmt: skip
        for data in datasets
        if data is not None
        for sample, region in zip(data.samples, getattr(data, "volumes", None) or (), strict=True)
    ]
    write_csv(path, header, rows)


def _spacing_text(spacing: tuple[float, ...] | None) -> str:
    return "x".join(f"{v:g}" for v in spacing) if spacing else ""


def _use_planned_allocator(plan: Plan, plan_file: Path) -> None:
    """Train on CPU under the allocator setting the planner measured with, so that the run's
    peak is the plan's (``tileplan.host_allocator``); say so when the plan's differs."""
    setting = use_host_allocator()
    planned = plan.provenance.host_allocator
    if plan.provenance.device == "cpu" and planned and planned != setting:
        log.warning(
            "'%s' was measured under the CPU allocator setting '%s' and this run has '%s': its "
            "peak may differ from the plan's; profile again on this machine",
            plan_file, planned, setting or "the platform's default",
        )  # fmt: skip


def _datasets(req: TrainRequest, plan: Plan, spec: RunSpec) -> tuple[Dataset, Dataset | None]:
    """The training and validation images, checked against the plan."""
    # Images stream at their own size up to the plan's (a plan states the largest image).
    largest = plan.image_shape_px
    train_data = load_csv(req.data, target_shape=largest, settings=spec.data, n_axes=plan.n_axes,
                          command="train")  # fmt: skip
    val_data = load_csv(req.val, target_shape=largest, settings=spec.data, n_axes=plan.n_axes,
                        command="train") if req.val else None  # fmt: skip
    for data in (train_data, val_data):
        if data is not None and data.channels != plan.channels:
            raise DataError(
                f"'{data.csv_path}' images have {data.channels} channels, the plan "
                f"{plan.channels}; re-run `tileplan profile --channels {data.channels}`"
            )
    return train_data, val_data


def run_training(
    req: TrainRequest, *, progress: bool = True
) -> tuple[tuple[EpochMetrics, ...], RunReport | None]:
    """Validate everything, train, and (rank 0) write the report; returns (history, report).

    Raises:
        PlanError, DataError, ModelFileError, TrainError, SettingsError: one line each, before
            training starts when the inputs are at fault.
    """
    plan = load_plan(req.plan_file)
    if req.require_mixed_precision and plan.precision.amp_dtype is None:
        raise TrainError(
            f"--amp: '{req.plan_file}' is a {plan.dtype} plan; make a mixed-precision one with "
            "`tileplan profile ... --dtype bfloat16` (the plan's dtype decides how a run computes)"
        )
    device = resolve_device(req.device)
    if device.type == "cpu":  # before anything is allocated: the setting the plan measured
        _use_planned_allocator(plan, req.plan_file)
    spec = RunSpec.from_plan(plan, **req.options)  # type: ignore[arg-type]
    _seed_everything(spec.seed)  # the model's initial weights too
    loaded = load_model_file(req.model_file, plan.model.split_option,
                             batch_norm=spec.batch_norm, n_axes=plan.n_axes)  # fmt: skip
    check_plan_matches(plan, loaded.trunk)
    # Validation normalises with the running statistics: a frozen trunk of the same model.
    frozen = loaded.resplit("frozen") if spec.batch_norm == "train" else loaded
    train_data, val_data = _datasets(req, plan, spec)
    if req.class_weights is not None:
        if train_data.task == "regression":
            raise RecipeError("--class-weights is for classification; this run's labels are "
                              "continuous")  # fmt: skip
        weights = parse_class_weights(req.class_weights, train_data.labels)
        recipe = dataclasses.replace(spec.recipe, class_weights=weights)
        spec = dataclasses.replace(spec, recipe=recipe)
    checkpoint = req.out / "last.pt"
    if checkpoint.exists() and not req.resume:
        raise TrainError(f"'{req.out}' already holds a run (last.pt); pass --resume to continue it "
                         "or choose a new --out")  # fmt: skip
    joined = _init_distributed(device)
    try:
        trainer = Trainer(
            model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan, spec=spec,
            train_data=train_data, val_data=val_data, out_dir=req.out, device=device,
            frozen_trunk=frozen.trunk, frozen_head=frozen.head, policy=req.policy,
        )  # fmt: skip
        check_space(req.out, checkpoint_bytes(loaded.model, spec))  # every rank: all stop
        if req.resume:
            trainer.resume()
        if trainer.rank == 0:
            req.out.mkdir(parents=True, exist_ok=True)
            save_plan(plan, req.out / "plan.yaml")
            if plan.n_axes == 3:
                save_volumes(req.out / "volumes.csv", [train_data, val_data])
            else:
                save_regions(req.out / "regions.csv", [train_data, val_data])
        history = trainer.fit(progress=progress)
        report = None
        if req.report and trainer.rank == 0 and history:
            per_image = [row.seconds_per_image for row in history]
            report = measure_run_report(
                run=req.out.name, plan=plan, model_file=req.model_file,
                device=str(device), time_per_image_s=statistics.median(per_image),
            )  # fmt: skip
            save_report(report, req.out / "report.yaml")
        if joined:
            # No rank tears its connections down while another still talks over them (rank 0
            # writes the checkpoint and report last): gloo aborts a peer whose socket closes.
            dist.barrier()
        return history, report
    finally:
        if joined:
            dist.destroy_process_group()
