"""Measurement on the real device: time per tile, and peak memory of tiles and whole steps.

* CUDA: the caching allocator's own counters (peak allocated and reserved), in this process.
* CPU: what a fresh child process really holds: its RSS high-water mark above the RSS it had
  after loading the model (``ru_maxrss``), so that nothing this process did before counts.

An out-of-memory error while measuring marks that measurement infeasible; it never ends the
search.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import psutil
import torch
from torch import nn

from executor import Precision, Segment, TimeFit, TimeSample
from tileplan.settings import resolve_device

__all__ = [
    "DeviceInfo",
    "MeasureSpec",
    "Measured",
    "device_info",
    "measure_peak",
    "measure_time_model",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceInfo:
    """The device a plan is for."""

    device: str  # "cpu" or "cuda:N"
    name: str
    total_bytes: int
    available_bytes: int  # default budget: free device memory (CPU: available RAM)


def device_info(device: str = "auto", *, assume: bool = False) -> DeviceInfo:
    """Resolve ``auto``/``cpu``/``cuda[:N]`` and read its memory.

    Args:
        assume: plan for a CUDA device that is not present (estimates only; its memory then
            comes from the budget).

    Raises:
        SettingsError: CUDA asked for but not available, or an unknown device.
    """
    if assume and device.startswith("cuda") and not torch.cuda.is_available():
        name = "cuda:0" if device == "cuda" else device
        return DeviceInfo(name, "CUDA device (assumed, not present)", 0, 0)
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        index = resolved.index or 0
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo(f"cuda:{index}", props.name, total, free)
    vm = psutil.virtual_memory()
    return DeviceInfo("cpu", _cpu_name(), vm.total, vm.available)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({psutil.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU ({psutil.cpu_count()} cores)"


# --------------------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _fit(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``t = a + b * px`` with ``a, b >= 0``."""
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    n = len(points)
    mx = sum(p for p, _ in points) / n
    my = sum(t for _, t in points) / n
    sxx = sum((p - mx) ** 2 for p, _ in points)
    b = max(sum((p - mx) * (t - my) for p, t in points) / sxx, 1e-15) if sxx else my / mx
    a = max(my - b * mx, 0.0)
    return a, b


def measure_time_model(
    trunk: nn.Module,
    crops: Sequence[tuple[int, ...]],
    *,
    precision: Precision,
    device: torch.device,
    device_name: str,
) -> TimeFit:
    """Time the trunk's no-grad forward and forward+backward on crops of the given shapes,
    and fit seconds per tile as ``a + b * pixels`` for each.

    The crops are (N, C, *spatial); the first one is also run once to warm up. Parameter
    gradients are released after each run.
    """
    dtype = precision.param_dtype

    def amp() -> contextlib.AbstractContextManager[object]:
        return precision.autocast(device)

    samples = []
    for i, shape in enumerate([crops[0], *crops]):
        x = torch.randn(shape, dtype=dtype, device=device)

        def forward(x: torch.Tensor = x) -> None:
            with torch.no_grad(), amp():
                trunk(x)

        def step(x: torch.Tensor = x) -> None:
            with amp():
                y = trunk(x)
            y.backward(torch.ones_like(y))

        t_forward, t_step = _timed(forward, device), _timed(step, device)
        trunk.zero_grad(set_to_none=True)
        if i > 0:  # the first run was the warm-up
            samples.append(TimeSample(crop_px=TimeFit.pixels(shape), forward_s=t_forward,
                                      step_s=t_step))  # fmt: skip
            log.info(
                "timed crop %s: forward %.3f s, forward+backward %.3f s", shape, t_forward, t_step
            )
    fa, fb = _fit([(t.crop_px, t.forward_s) for t in samples])
    sa, sb = _fit([(t.crop_px, t.step_s) for t in samples])
    return TimeFit(device_name=device_name, forward_a_s=fa, forward_b_s_per_px=fb, step_a_s=sa,
                   step_b_s_per_px=sb, samples=tuple(samples))  # fmt: skip


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


# One segment of a measured chain: (end, tile, forward tile, map on host).
ChainEntry = tuple[str | None, tuple[int, ...], tuple[int, ...], bool]


@dataclass(frozen=True)
class MeasureSpec:
    """What to measure: one backward tile (``mode="tile"``) or a whole streaming training step
    with an optimizer step (``mode="step"``), for a model file as the planner loaded it."""

    model_file: str
    split: str
    mode: Literal["tiles", "step", "conventional"]
    shape: tuple[int, ...]  # the image (N, C, *spatial)
    dtype: str
    device: str
    tile: tuple[int, ...] = ()
    forward_tile: tuple[int, ...] = ()
    optimizer: str = "adam"
    shapes: tuple[tuple[int, ...], ...] = ()  # tiles: crops (N, C, *spatial) to measure
    # step of a segmented plan: (end, tile, forward tile, map on host) per segment
    segments: tuple[ChainEntry, ...] = ()
    batch_norm: str = "frozen"  # the BatchNorm mode to split and run the model in
    part: int = -1  # tiles: of this segment of the trunk's program (-1: the whole trunk)
    ends: tuple[str, ...] = ()  # where the program's segments end (single-map cuts among them)

    @staticmethod
    def chain_of(segments: Sequence[Segment]) -> tuple[ChainEntry, ...]:
        """The ``segments`` entry for a plan's segments."""
        return tuple((s.end, s.tile_px, s.forward_tile_px, s.map_on_host) for s in segments)


@dataclass(frozen=True)
class Measured:
    """Measured peaks (bytes), or why there are none."""

    peak_bytes: int | None = None  # a step's whole peak, model state included
    reserved_bytes: int | None = None  # CUDA caching allocator's reserved peak
    seconds: float | None = None
    error: str | None = None
    tiles: tuple[tuple[tuple[int, ...], int], ...] = ()  # (crop, activation peak bytes)
    timeline: tuple[tuple[float, int], ...] = ()  # (seconds, bytes above the baseline)

    @property
    def ok(self) -> bool:
        return self.error is None


def measure_peak(spec: MeasureSpec, timeout_s: float = 600.0) -> Measured:
    """Measure on the spec's device: CUDA in this process, CPU in a fresh child process."""
    if spec.device.startswith("cuda"):
        from tileplan.planning.measure_child import run_measurement

        try:
            return _measured(run_measurement(spec))
        except torch.OutOfMemoryError as err:
            torch.cuda.empty_cache()
            return Measured(None, error=f"out of memory: {str(err).splitlines()[0]}")
    # The child runs under training's CPU allocator setting (tileplan.host_allocator), so that
    # its high-water mark is what a run of the plan will hold, reproducibly.
    cmd = [sys.executable, "-m", "tileplan.planning.measure_child"]
    try:
        done = subprocess.run(
            cmd, input=json.dumps(asdict(spec)), capture_output=True, text=True,
            timeout=timeout_s,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return Measured(None, error=f"measurement took over {timeout_s:.0f} s")
    if done.returncode != 0:
        # Killed by the kernel's OOM killer (-9) or failed: infeasible, say why.
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        why = "killed (out of memory)" if done.returncode == -9 else last
        return Measured(None, error=why)
    return _measured(json.loads(done.stdout.strip().splitlines()[-1]))


def _measured(data: dict[str, Any]) -> Measured:
    tiles = tuple((tuple(c), int(b)) for c, b in data.pop("tiles", ()))
    timeline = tuple((float(t), int(b)) for t, b in data.pop("timeline", ()))
    return Measured(**data, tiles=tiles, timeline=timeline)
