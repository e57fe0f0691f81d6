"""A run folder's records: the memory-savings report and the per-epoch metrics.

What streaming saved for one image: the measured peak of a streaming step against the peak of a
conventional step on the same image (measured when it fits, else the plan's estimate, labelled
so), the plan's breakdown by category, time per image, and memory sampled over both steps.

A run folder holds::

    plan.yaml        the plan the run used
    report.yaml      the memory-savings report (RunReport)
    metrics.jsonl    one EpochMetrics per line
    last.pt          the latest checkpoint (see tileplan.run.checkpoint)
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from executor import (
    ContractError,
    MemoryBreakdown,
    Plan,
    atomic_write,
    from_data,
    to_data,
    to_yaml,
)
from tileplan.planning.measure import MeasureSpec, device_info, measure_peak

__all__ = [
    "REPORT_SCHEMA_VERSION",
    "EpochMetrics",
    "ReportError",
    "RunReport",
    "load_metrics",
    "load_report",
    "measure_run_report",
    "save_metrics",
    "save_report",
]

log = logging.getLogger(__name__)

REPORT_SCHEMA_VERSION = 2

Measurement = Literal["cuda_allocator", "cpu_rss"]
_MEASUREMENT_TEXT = {
    "cuda_allocator": "CUDA caching allocator, peak allocated bytes",
    "cpu_rss": "process RSS high-water mark in a fresh child process, model state included",
}


class ReportError(ContractError):
    """A run folder, report or metrics file is missing or malformed."""


@dataclass(frozen=True, kw_only=True)
class EpochMetrics:
    """One line of ``metrics.jsonl``: an epoch's scores (None where they do not apply)."""

    epoch: int
    train_loss: float  # mean over the finite losses (a float16 scaler skips the others)
    train_accuracy: float | None
    val_loss: float | None
    val_accuracy: float | None
    val_auc: float | None  # binary labels only
    seconds: float
    seconds_per_image: float
    skipped: int = 0  # training images left out because they failed to read
    peak_bytes: int | None = None  # the epoch's measured memory peak (``tileplan.run.peaks``)
    lr: float | None = None  # the learning rate the epoch trained with
    val_balanced_accuracy: float | None = None  # classification: mean recall over classes
    val_pearson: float | None = None  # regression
    val_spearman: float | None = None  # regression
    val_recall: tuple[float, ...] | None = None  # classification: per class 0, 1, ...
    val_precision: tuple[float, ...] | None = None  # classification: per class
    val_f1: tuple[float, ...] | None = None  # classification: per class


@dataclass(frozen=True, kw_only=True)
class RunReport:
    """Memory saved by streaming in one run, per image.

    Attributes:
        device: where the run measured (``cpu``, ``cuda:0``).
        measurement: how peaks were measured (``describe_measurement`` says it in words).
        streaming_peak_bytes: measured peak of one streaming training step.
        conventional_peak_bytes: peak of a conventional step on the same image.
        conventional_measured: True if measured, False if the plan's estimate (it did not fit).
        breakdown: the streaming step by category (the plan's estimate for its tile).
        timeline: ``(seconds, bytes)`` sampled over one streaming step.
        conventional_timeline: the same for a conventional step, when it was measured.
    """

    __derived__: ClassVar[tuple[str, ...]] = ("saved_bytes", "ratio")

    schema_version: int = REPORT_SCHEMA_VERSION
    run: str
    device: str
    measurement: Measurement
    image_shape_px: tuple[int, ...]
    tile_px: tuple[int, ...]
    n_tiles: int  # backward-pass tiles per image, every segment's counted
    streaming_peak_bytes: int
    conventional_peak_bytes: int
    conventional_measured: bool
    streaming_time_per_image_s: float
    conventional_time_per_image_s: float | None = None
    breakdown: MemoryBreakdown | None = None
    timeline: tuple[tuple[float, int], ...] = ()
    conventional_timeline: tuple[tuple[float, int], ...] = ()

    def __post_init__(self) -> None:
        if self.schema_version != REPORT_SCHEMA_VERSION:
            raise ReportError(
                f"schema_version {self.schema_version} is not {REPORT_SCHEMA_VERSION}"
            )
        if self.streaming_peak_bytes <= 0 or self.conventional_peak_bytes <= 0:
            raise ReportError("peaks must be positive")
        if self.n_tiles < 1 or len(self.tile_px) != len(self.image_shape_px):
            raise ReportError("n_tiles must be >= 1 and tile_px one size per image axis")
        if self.conventional_timeline and not self.conventional_measured:
            raise ReportError("a conventional timeline means the conventional step was measured")

    @property
    def saved_bytes(self) -> int:
        return self.conventional_peak_bytes - self.streaming_peak_bytes

    @property
    def ratio(self) -> float:
        """Streaming peak ÷ conventional peak (4 decimals)."""
        return round(self.streaming_peak_bytes / self.conventional_peak_bytes, 4)

    def describe_measurement(self) -> str:
        return _MEASUREMENT_TEXT[self.measurement]

    def to_dict(self) -> dict[str, Any]:
        return to_data(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        if not isinstance(data, Mapping) or data.get("schema_version") != REPORT_SCHEMA_VERSION:
            raise ReportError("report.yaml is not a tileplan run report of a known version")
        try:
            return from_data(cls, data, where="report")
        except ContractError as err:
            raise ReportError(str(err)) from None


def save_report(report: RunReport, path: str | os.PathLike[str]) -> Path:
    """Write the report as YAML, atomically."""
    text = to_yaml(report.to_dict())
    return atomic_write(path, lambda f: f.write(text.encode()))


def load_report(run_dir: str | os.PathLike[str]) -> RunReport:
    """Read ``run_dir/report.yaml`` (or a report file given directly)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "report.yaml"
    if not path.is_file():
        raise ReportError(f"no report at '{path}'; run `tileplan train ... --out RUN_DIR` first")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ReportError(f"'{path}' is not valid YAML") from err
    try:
        return RunReport.from_dict(data)
    except ReportError as err:
        raise ReportError(
            f"'{path}' is malformed ({err}); re-run `tileplan train` to write a new report"
        ) from err


def _finite(values: dict[str, object]) -> dict[str, object]:
    """Non-finite numbers as None: JSON has no NaN (``metrics.jsonl`` stays valid JSON)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()}  # fmt: skip


def save_metrics(rows: tuple[EpochMetrics, ...], run_dir: Path) -> Path:
    """Write ``metrics.jsonl`` atomically, one epoch per line."""
    lines = "".join(json.dumps(_finite(to_data(row)), allow_nan=False) + "\n" for row in rows)
    return atomic_write(run_dir / "metrics.jsonl", lambda f: f.write(lines.encode()))


def load_metrics(run_dir: str | os.PathLike[str]) -> tuple[EpochMetrics, ...]:
    """Per-epoch metrics of a run (``metrics.jsonl``); () if there are none yet.

    Raises:
        ReportError: a line is not JSON or not an epoch's metrics, naming the line.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return ()
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(from_data(EpochMetrics, json.loads(line), where=f"line {number}"))
        except json.JSONDecodeError as err:
            raise ReportError(f"'{path}' line {number} is not JSON ({err.msg})") from err
        except ContractError as err:
            raise ReportError(f"'{path}': {err}") from err
    return tuple(rows)


def measure_run_report(
    *, run: str, plan: Plan, model_file: Path, device: str, time_per_image_s: float
) -> RunReport:
    """Measure one streaming step and (if the device can hold it) one conventional step on an
    image of the plan's shape, each in a clean process (CPU) or with the allocator's counters.

    Raises:
        ReportError: the streaming step could not be measured.
    """
    image = (plan.batch, plan.channels, *plan.image_shape_px)

    def spec(mode: Literal["step", "conventional"]) -> MeasureSpec:
        return MeasureSpec(
            model_file=str(model_file), split=plan.model.split_option, mode=mode, shape=image,
            dtype=plan.dtype, device=device, tile=plan.tile_px,
            forward_tile=plan.forward_tile_px, optimizer=plan.optimizer,
            segments=MeasureSpec.chain_of(plan.segments), batch_norm=plan.batch_norm,
        )  # fmt: skip

    streaming = measure_peak(spec("step"))
    if not streaming.ok or streaming.peak_bytes is None:
        raise ReportError(f"measuring the streaming step failed: {streaming.error}")
    conventional = None
    # Measured whenever the device can hold it (the plan's budget may be a user's choice
    # smaller than the device); otherwise the plan's estimate, labelled as such.
    info = device_info(device)
    room = info.available_bytes if info.device == "cpu" else info.total_bytes
    if plan.conventional_peak_bytes <= 0.9 * room:
        conventional = measure_peak(spec("conventional"))
        if not conventional.ok or conventional.peak_bytes is None:
            log.warning("conventional step could not be measured (%s); using the estimate",
                        conventional.error)  # fmt: skip
            conventional = None
    chosen = plan.chosen
    return RunReport(
        run=run, device=device,
        measurement="cuda_allocator" if device.startswith("cuda") else "cpu_rss",
        image_shape_px=plan.image_shape_px, tile_px=plan.tile_px,
        n_tiles=sum(grid.n_tiles for grid in plan.tile_grids()),
        streaming_peak_bytes=streaming.peak_bytes,
        conventional_peak_bytes=(
            conventional.peak_bytes if conventional else plan.conventional_peak_bytes
        ),
        conventional_measured=conventional is not None,
        streaming_time_per_image_s=round(time_per_image_s, 4),
        conventional_time_per_image_s=(
            round(conventional.seconds, 4) if conventional and conventional.seconds else None
        ),
        breakdown=chosen.memory if chosen else None,
        timeline=streaming.timeline,
        conventional_timeline=conventional.timeline if conventional else (),
    )  # fmt: skip
