"""Plans and run reports for tests, consistent by construction: real geometry from a real trunk,
synthetic memory and times. A plan's invariants are checked when it is built, so a fixture
cannot state numbers that contradict each other."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from torch import nn

from executor import (
    Candidate,
    LayerMemory,
    MemoryBreakdown,
    ModelIdentity,
    Plan,
    Provenance,
    TimeFit,
    TimeSample,
    Verification,
    VerifyStatus,
    analyze_trunk,
    trunk_fingerprint,
)

GIB = 1024**3
IMAGE = (6000, 9000)
TILES = (1024, 1536, 2048, 3072, 4096, 6016)
LAYERS = (
    LayerMemory(name="conv1", channels=64, full_bytes=64 * 3000 * 4500 * 4,
                tile_bytes=64 * 1536 * 1536 * 4),
    LayerMemory(name="relu", channels=64, full_bytes=64 * 3000 * 4500 * 4,
                tile_bytes=64 * 1536 * 1536 * 4),
    LayerMemory(name="layer1.0.relu", channels=64, full_bytes=64 * 1500 * 2250 * 4,
                tile_bytes=64 * 768 * 768 * 4),
    LayerMemory(name="layer1.0.relu", channels=64, full_bytes=64 * 1500 * 2250 * 4,
                tile_bytes=64 * 768 * 768 * 4),
    LayerMemory(name="layer4.1.relu", channels=512, full_bytes=512 * 188 * 282 * 4,
                tile_bytes=512 * 96 * 96 * 4),
)  # fmt: skip
# Rows of metrics.jsonl (tileplan.run.report.EpochMetrics), one with a missing validation loss.
METRICS = (
    {"epoch": 1, "train_loss": 0.71, "train_accuracy": 0.52, "val_loss": 0.69,
     "val_accuracy": 0.55, "val_auc": 0.58, "seconds": 120.0, "seconds_per_image": 1.9},
    {"epoch": 2, "train_loss": 0.60, "train_accuracy": 0.66, "val_loss": None,
     "val_accuracy": 0.61, "val_auc": 0.67, "seconds": 118.0, "seconds_per_image": 1.8},
    {"epoch": 3, "train_loss": 0.48, "train_accuracy": 0.77, "val_loss": 0.52,
     "val_accuracy": 0.72, "val_auc": 0.79, "seconds": 119.0, "seconds_per_image": 1.85},
)  # fmt: skip
TIME_FIT = TimeFit(
    device_name="test CPU", forward_a_s=0.01, forward_b_s_per_px=1e-8, step_a_s=0.03,
    step_b_s_per_px=3e-8,
    samples=(TimeSample(crop_px=512 * 512, forward_s=0.02, step_s=0.05),
             TimeSample(crop_px=768 * 768, forward_s=0.03, step_s=0.08)),
)  # fmt: skip


@functools.cache
def resnet18_trunk() -> nn.Module:
    """The ResNet-18 trunk (random weights, frozen norms)."""
    import torchvision

    net = torchvision.models.resnet18().eval()
    return nn.Sequential(*list(net.children())[:-2]).eval()


def _memory(image: tuple[int, ...], tile: int, channels: int) -> MemoryBreakdown:
    """Synthetic memory: a ResNet-18-sized state, the image, and 600 B/px backward tiles."""
    pixels = math.prod(image)
    return MemoryBreakdown(
        params_bytes=46_758_912, grads_bytes=46_758_912, optimizer_bytes=93_517_824,
        image_bytes=channels * pixels * 4, output_bytes=512 * pixels // 1024 * 4,
        output_grad_bytes=512 * pixels // 1024 * 4, head_bytes=1_049_600,
        tile_forward_bytes=150 * tile * tile, tile_backward_bytes=600 * tile * tile,
    )  # fmt: skip


def make_plan(
    *,
    trunk: nn.Module | None = None,
    image: tuple[int, ...] = IMAGE,
    tiles: tuple[int, ...] = TILES,
    chosen: int = 3072,
    forward: int | None = 4096,
    measured: tuple[int, ...] = (2048, 3072),
    timed: bool = True,
    budget: int = 8 * GIB,
    channels: int = 3,
    dtype: str = "float32",
    layers: tuple[LayerMemory, ...] = LAYERS,
    **overrides: Any,
) -> Plan:
    """A plan for ``trunk`` (default ResNet-18) at ``image`` px over square ``tiles``.

    ``measured`` tiles get a measured tile peak (and the chosen one, if among them, a measured
    step 100 MB over its estimate, which verifies the plan); ``timed`` gives every candidate a
    predicted time. Other fields can be overridden.
    """
    trunk = resnet18_trunk() if trunk is None else trunk
    geometry = analyze_trunk(trunk, len(image))
    margin = 0.1
    usable = math.floor(budget * (1 - margin))
    candidates = []
    for t in tiles:
        grid = geometry.tile_grid(image, (t,) * len(image))
        memory = _memory(image, t, channels)
        step = memory.total_bytes + 10**8 if t == chosen and t in measured else None
        candidates.append(
            Candidate(
                tile_px=grid.tile_shape, grid=grid.counts, n_tiles=grid.n_tiles,
                overlap_factor=round(grid.overlap_factor, 4), memory=memory,
                estimated_peak_bytes=memory.total_bytes, measured_peak_bytes=step,
                measured_tile_bytes=round(memory.tile_backward_bytes * 1.05)
                if t in measured else None,
                predicted_time_s=round(grid.n_tiles * 0.5 + grid.overlap_factor * 10, 3)
                if timed else None,
                fits=(step or memory.total_bytes) <= usable,
            )
        )  # fmt: skip
    index = tiles.index(chosen)
    pick = candidates[index]
    forward_tile = candidates[tiles.index(forward)].tile_px if forward else pick.tile_px
    verification = (
        Verification(status=VerifyStatus.VERIFIED, device="cpu",
                     peak_bytes=pick.measured_peak_bytes, step_s=12.5)
        if pick.measured_peak_bytes is not None else Verification(status=VerifyStatus.OFF)
    )  # fmt: skip
    plan = Plan(
        provenance=Provenance(tool="tileplan test", torch=torch.__version__, device="cpu",
                              device_name="test CPU", device_total_bytes=budget,
                              created="2026-01-01T00:00:00+00:00"),
        model=ModelIdentity(file="examples/resnet18.py", entry="build_model()",
                            split="auto: trunk ends after 'layer4.1.relu'", split_option="auto",
                            trunk_class=type(trunk).__name__, model_class="ResNet",
                            parameter_count=sum(p.numel() for p in trunk.parameters()),
                            trunk_fingerprint=trunk_fingerprint(trunk)),
        image_shape_px=tuple(image), channels=channels, dtype=dtype, optimizer="adam",
        output_stride_px=geometry.output_stride, halo_lo_px=geometry.halo_lo,
        halo_hi_px=geometry.halo_hi, align_px=geometry.align,
        output_shape=geometry.output_shape(image), budget_bytes=budget, margin=margin,
        tile_px=pick.tile_px, forward_tile_px=forward_tile,
        predicted_peak_bytes=pick.estimated_peak_bytes,
        predicted_time_s=pick.predicted_time_s, measured_peak_bytes=pick.measured_peak_bytes,
        verification=verification, calibration_factor=1.05 if measured else None,
        time_fit=TIME_FIT if timed else None, conventional_peak_bytes=40 * GIB,
        candidates=tuple(candidates), layers=layers,
    )  # fmt: skip
    return dataclasses.replace(plan, **overrides) if overrides else plan


def make_report(**overrides: Any) -> Any:
    """A run of the default plan (a ``tileplan.run.report.RunReport``): a sampled streaming
    step, the conventional peak estimated."""
    from tileplan.run.report import RunReport

    plan = make_plan()
    timeline = tuple((i * 0.5, int((1.0 + 4.0 * abs(math.sin(i / 3))) * GIB)) for i in range(40))
    values: dict[str, Any] = {
        "run": "demo", "device": "cpu", "measurement": "cpu_rss",
        "image_shape_px": plan.image_shape_px, "tile_px": plan.tile_px,
        "n_tiles": plan.tile_grid().n_tiles,
        "streaming_peak_bytes": max(b for _, b in timeline), "conventional_peak_bytes": 40 * GIB,
        "conventional_measured": False, "streaming_time_per_image_s": 19.5,
        "breakdown": plan.chosen.memory if plan.chosen else None, "timeline": timeline,
    }  # fmt: skip
    values.update(overrides)
    return RunReport(**values)


@functools.cache
def segmented_plan() -> Plan:
    """A real segmented plan: the planner on examples/resnet18.py at 768² with every backward
    tile at most 256 px (one segment cannot), from estimates only (deterministic, ~5 s)."""
    from pathlib import Path

    from tileplan.planning.profile import ProfileRequest, profile

    example = Path(__file__).resolve().parents[1] / "examples" / "resnet18.py"
    return profile(ProfileRequest(model_file=example, image_shape=(768, 768), max_tile=256,
                                  measure=False))  # fmt: skip
