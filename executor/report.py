"""The memory-savings report of a training run (``runs/NAME/report.yaml``).

What streaming saved for one image: the measured peak of a streaming step against the peak of a
conventional step on the same image (measured when it fits, else estimated, and labelled so), a
breakdown by category, time per image, and memory sampled over one streaming step.

A run folder holds::

    plan.yaml        the plan the run used
    report.yaml      this report
    metrics.jsonl    one JSON object per epoch: epoch, train_loss, train_accuracy, val_loss,
                     val_accuracy, val_auc (binary), seconds
    last.pt          the latest checkpoint (model, optimizer, epoch, RNG states, plan)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from executor.errors import StreamingError
from executor.fileio import atomic_write

__all__ = ["REPORT_SCHEMA_VERSION", "ReportError", "RunReport", "load_metrics", "load_report",
           "save_report"]  # fmt: skip

REPORT_SCHEMA_VERSION = 1


class ReportError(StreamingError):
    """A run folder or report is missing or malformed."""


@dataclass(frozen=True, kw_only=True)
class RunReport:
    """Memory saved by streaming in one run, per image.

    Attributes:
        device: where the run measured (``cpu``, ``cuda:0``).
        measurement: how peaks were measured, in words (allocator counters or RSS).
        streaming_peak_bytes: measured peak of one streaming training step.
        conventional_peak_bytes: peak of a conventional step on the same image.
        conventional_measured: True if measured, False if estimated (it did not fit / was skipped).
        breakdown_bytes: streaming step by category (params, grads, optimizer, image, output
            map and gradient, head, tile activations).
        timeline: ``[seconds, bytes]`` sampled over one streaming step.
        conventional_timeline: the same for a conventional step, when measured.
    """

    schema_version: int = REPORT_SCHEMA_VERSION
    run: str
    device: str
    measurement: str
    image_shape_px: tuple[int, ...]
    tile_px: tuple[int, ...]
    n_tiles: int
    streaming_peak_bytes: int
    conventional_peak_bytes: int
    conventional_measured: bool
    streaming_time_per_image_s: float
    conventional_time_per_image_s: float | None = None
    breakdown_bytes: dict[str, int] = field(default_factory=dict)
    timeline: tuple[tuple[float, int], ...] = ()
    conventional_timeline: tuple[tuple[float, int], ...] = ()

    @property
    def saved_bytes(self) -> int:
        return self.conventional_peak_bytes - self.streaming_peak_bytes

    @property
    def ratio(self) -> float:
        """Streaming peak ÷ conventional peak."""
        return self.streaming_peak_bytes / self.conventional_peak_bytes

    def to_dict(self) -> dict[str, Any]:
        data = json.loads(json.dumps(asdict(self)))  # tuples -> lists, plain types
        data["saved_bytes"] = self.saved_bytes
        data["ratio"] = round(self.ratio, 4)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunReport:
        if not isinstance(data, Mapping) or data.get("schema_version") != REPORT_SCHEMA_VERSION:
            raise ReportError("report.yaml is not a tileplan run report of a known version")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        try:
            for key in ("image_shape_px", "tile_px"):
                values[key] = tuple(values.get(key, ()))
            for key in ("timeline", "conventional_timeline"):
                values[key] = tuple((float(t), int(b)) for t, b in values.get(key) or ())
            return cls(**values)
        except (TypeError, ValueError) as err:
            raise ReportError(f"malformed run report ({err})") from err


def save_report(report: RunReport, path: str | os.PathLike[str]) -> Path:
    """Write the report as YAML, atomically."""
    text = yaml.safe_dump(report.to_dict(), sort_keys=False, width=100)
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


def load_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Per-epoch metrics of a run (``metrics.jsonl``); [] if there are none yet."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ReportError(f"'{path}' line {number} is not JSON ({err.msg})") from err
    return rows
