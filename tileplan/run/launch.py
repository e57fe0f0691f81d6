"""``tileplan train``: from a model file, a plan and data on disk to a trained run folder with a
memory-savings report.

Every input is checked before training starts (the plan against the model, every CSV row, the
run folder), then the ``Trainer`` runs, and rank 0 measures the report.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from executor import check_plan_matches, load_plan, save_plan
from tileplan.planning.model_file import load_model_file
from tileplan.run.data import DataError, load_csv
from tileplan.run.report import EpochMetrics, RunReport, measure_run_report, save_report
from tileplan.run.trainer import Trainer, TrainError
from tileplan.settings import RunSpec, resolve_device

__all__ = ["TrainRequest", "run_training"]

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
    spec = RunSpec.from_plan(plan, **req.options)  # type: ignore[arg-type]
    _seed_everything(spec.seed)  # the model's initial weights too
    loaded = load_model_file(req.model_file, plan.model.split_option)
    check_plan_matches(plan, loaded.trunk)
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
    device = resolve_device(req.device)
    joined = _init_distributed(device)
    try:
        trainer = Trainer(
            model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan, spec=spec,
            train_data=train_data, val_data=val_data, out_dir=req.out, device=device,
        )  # fmt: skip
        if req.resume:
            trainer.resume()
        if trainer.rank == 0:
            req.out.mkdir(parents=True, exist_ok=True)
            save_plan(plan, req.out / "plan.yaml")
        history = trainer.fit(progress=progress)
        report = None
        if req.report and trainer.rank == 0 and history:
            per_image = [row.seconds_per_image for row in history]
            report = measure_run_report(
                run=req.out.name, plan=plan, model_file=req.model_file,
                device=str(device), time_per_image_s=statistics.median(per_image),
            )  # fmt: skip
            save_report(report, req.out / "report.yaml")
        return history, report
    finally:
        if joined:
            dist.destroy_process_group()
