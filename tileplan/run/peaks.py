"""A run's own memory peak, measured as the planner measures a step, against the plan's.

* CUDA: what the caching allocator reserved (``max_memory_reserved``): what the device really
  gave the process, cached blocks included.
* CPU: the RSS high-water mark above the RSS at the start of training, plus the model's
  parameters and buffers (as ``tileplan.planning.measure_child`` counts a step's peak).

Training on CPU runs under the planner's allocator setting (``tileplan.host_allocator``), so
that the peaks compare. Each epoch's peak is recorded in the metrics and a warning names a
peak past the plan's margin.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from executor import Plan
from tileplan.planning.measure_child import peak_rss, reset_peak_rss, state_bytes
from tileplan.units import format_bytes

__all__ = ["PeakMeter", "over_plan"]

log = logging.getLogger(__name__)


class PeakMeter:
    """The peak memory of the training steps from ``reset()`` on (bytes)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.state = state_bytes(model)
        self.base = 0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.base = reset_peak_rss()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device))
        return max(0, peak_rss() - self.base) + self.state


def over_plan(peak: int, plan: Plan) -> str | None:
    """Why ``peak`` breaks the plan's promise (past its peak plus its margin), or None."""
    promised = plan.peak_bytes * (1.0 + plan.margin)
    if peak <= promised:
        return None
    return (
        f"training peaked at {format_bytes(peak)}, above the plan's {format_bytes(plan.peak_bytes)}"
        f" and its {plan.margin:.0%} margin; the run may not fit its budget of "
        f"{format_bytes(plan.budget_bytes)}: plan again with a lower --budget or measure the "
        "plan on this machine with `tileplan profile --verify`"
    )
