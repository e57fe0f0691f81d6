"""``tileplan profile``: estimate, measure and choose a streaming plan.

    estimate every candidate on meta tensors  ->  time tiles on the device
    ->  calibrate the estimates with real tile peaks  ->  choose  ->  verify with a real step

Everything is returned as a typed ``Plan``; the CLI only presents it.
"""

from __future__ import annotations

import datetime
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

import tileplan
from executor import (
    Candidate,
    MemoryBreakdown,
    Plan,
    StreamingError,
    TileGrid,
    TrunkGeometry,
    analyze_trunk,
    dtype_of,
    trunk_fingerprint,
)
from tileplan.estimate import ModelState, estimate_conventional, estimate_fixed, with_tiles
from tileplan.layers import layer_memory
from tileplan.measure import (
    DeviceInfo,
    Measured,
    MeasureSpec,
    TimeModel,
    device_info,
    measure_peak,
    measure_time_model,
)
from tileplan.model_file import LoadedModel, load_model_file
from tileplan.search import Scored, candidate_tiles, choose
from tileplan.units import format_bytes

__all__ = ["NoFeasiblePlanError", "ProfileRequest", "profile", "summary"]

log = logging.getLogger(__name__)

# Below this, a measured tile peak is dominated by one-off kernel allocations, not activations.
_MIN_CALIBRATION_BYTES = 64 * 1024**2
_MIN_TIMING_PX = 512


class NoFeasiblePlanError(StreamingError):
    """No candidate fits the budget; ``plan`` holds the candidates for display."""

    def __init__(self, message: str, plan: Plan) -> None:
        super().__init__(message)
        self.plan = plan


@dataclass(frozen=True, kw_only=True)
class ProfileRequest:
    """What to plan for. Sizes in px, memory in bytes."""

    model_file: Path
    image_shape: tuple[int, ...]
    channels: int = 3
    batch: int = 1
    device: str = "auto"
    budget_bytes: int | None = None  # default: CUDA total memory, CPU available RAM
    margin: float = 0.1
    dtype: str = "float32"
    tile: tuple[int, ...] | None = None  # evaluate only this tile
    split: str = "auto"
    optimizer: str = "adam"
    measure: bool = True  # time tiles and calibrate memory on the device
    verify: bool | None = None  # None: verify when one step is predicted within the limit
    verify_limit_s: float = 60.0
    measure_limit_s: float = 20.0  # skip tile measurements predicted to take longer

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin {self.margin} must be in [0, 1), e.g. 0.1 for 10%")
        if self.channels < 1 or self.batch < 1:
            raise ValueError("channels and batch must be positive")
        dtype_of(self.dtype)


@dataclass
class _Row:
    """Working state of one candidate during profiling."""

    tile: tuple[int, ...]
    grid: TileGrid
    estimate: MemoryBreakdown
    time_s: float = math.nan
    measured_tile: int | None = None
    measured_step: int | None = None
    step_error: str | None = None


def profile(req: ProfileRequest, *, progress: bool = False) -> Plan:
    """Plan a streaming run; see the module docstring.

    Raises:
        ModelFileError, UnsupportedLayerError, GeometryError: bad model or sizes.
        NoFeasiblePlanError: nothing fits the budget (the plan with all candidates is attached).
    """
    bar = tqdm(total=6, desc="profile", disable=not progress, leave=False)
    loaded = load_model_file(req.model_file, req.split)
    info = device_info(req.device, assume=not req.measure)
    budget = req.budget_bytes or (
        info.total_bytes if info.device != "cpu" else info.available_bytes
    )
    if not budget:
        raise ValueError(f"{info.name}: give --budget (e.g. 80GiB) to plan for it")
    usable = math.floor(budget * (1.0 - req.margin))
    dtype = dtype_of(req.dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    device = torch.device(info.device)
    if req.measure:
        loaded.model.to(device=device, dtype=compute)
    geometry = analyze_trunk(loaded.trunk)
    image = (req.batch, req.channels, *req.image_shape)
    state = ModelState.of(loaded.model, req.optimizer)
    on_host = info.device == "cpu"
    bar.update()

    tiles = [req.tile] if req.tile else candidate_tiles(geometry, req.image_shape)
    fixed = estimate_fixed(trunk=loaded.trunk, head=loaded.head, state=state, image_shape=image,
                           dtype=dtype, image_on_device=on_host)  # fmt: skip
    rows = [_estimate_row(loaded, geometry, fixed, image, t, dtype) for t in tiles]
    conventional = estimate_conventional(
        trunk=loaded.trunk, head=loaded.head, state=state, image_shape=image, dtype=dtype
    )
    bar.update()

    time_model = None
    if req.measure:
        time_model = _time_model(loaded, rows, image, dtype, device, usable)
    time_source = (
        f"measured on {info.name}: {len(time_model.samples)} crop sizes, a + b*px fit"
        if time_model else "proxy: input pixels processed, relative units (not seconds)"
    )  # fmt: skip
    for row in rows:
        row.time_s = _predict_time(time_model, row.grid, row.grid, req.batch)
    bar.update()

    factor = None
    if req.measure:
        factor = _calibrate(req, info, rows, usable, time_model)
    bar.update()

    chosen = _choose(rows, usable, factor)
    forward_tile = chosen.tile if chosen else None
    verified = "no candidate fits the budget"
    if chosen is not None:
        forward_tile = _forward_tile(rows, chosen, usable, factor, time_model, req.batch)
        bar.update()
        chosen, forward_tile, verified = _verify(
            req, info, rows, chosen, forward_tile, usable, factor, time_model
        )
    bar.update()
    bar.close()

    plan = _plan(req, info, loaded, geometry, rows, chosen, forward_tile, budget, factor,
                 time_source, verified, conventional)  # fmt: skip
    crop = _crop_shape(image, (chosen or rows[0]).grid)
    plan = replace(plan, layers=layer_memory(loaded.trunk, geometry, image, crop, dtype))
    if chosen is None:
        smallest = min(rows, key=lambda r: _peak(r, factor))
        fixed = state.params_bytes + state.grads_bytes + state.optimizer_bytes
        raise NoFeasiblePlanError(
            f"no tile fits in {format_bytes(usable)} ({format_bytes(budget)} budget less "
            f"{req.margin:.0%} margin): the smallest needs {format_bytes(_peak(smallest, factor))} "
            f"(model and optimizer state {format_bytes(fixed)}); "
            "raise --budget, lower --margin, or use --dtype bfloat16",
            plan,
        )
    return plan


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _crop_shape(image: tuple[int, ...], grid: TileGrid) -> tuple[int, ...]:
    return (*image[:2], *grid.largest_crop)


def _estimate_row(
    loaded: LoadedModel,
    geometry: TrunkGeometry,
    fixed: MemoryBreakdown,
    image: tuple[int, ...],
    tile: tuple[int, ...],
    dtype: torch.dtype,
) -> _Row:
    grid = geometry.tile_grid(image[2:], tile)
    crop = _crop_shape(image, grid)
    return _Row(grid.tile_shape, grid, with_tiles(fixed, loaded.trunk, crop, crop, dtype))


def _predict_time(
    model: TimeModel | None, forward: TileGrid, backward: TileGrid, batch: int
) -> float:
    if model is not None:
        return model.predict(forward, backward, batch)
    # Proxy: pixels processed by both passes (relative units).
    pixels = math.prod(forward.image_shape)
    return (forward.overlap_factor + 3 * backward.overlap_factor) * pixels * 1e-9


def _peak(row: _Row, factor: float | None) -> int:
    if row.measured_step is not None:
        return row.measured_step
    return (row.estimate.scaled(factor) if factor else row.estimate).total_bytes


def _choose(rows: Sequence[_Row], usable: int, factor: float | None) -> _Row | None:
    scored = [Scored(r.tile, _peak(r, factor), r.time_s) for r in rows]
    index = choose(scored, usable)
    return None if index is None else rows[index]


def _time_model(
    loaded: LoadedModel,
    rows: Sequence[_Row],
    image: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    usable: int,
) -> TimeModel:
    """Time two crop sizes: the smallest candidate's (at least 512 px per side, so that the
    per-pixel cost is not lost in per-call overhead) and one about 1.5x (CPU) or 2x larger per
    side, both within memory."""
    smallest = min(rows, key=lambda r: math.prod(r.grid.largest_crop))
    small = tuple(
        max(s, min(_MIN_TIMING_PX, n))
        for s, n in zip(smallest.grid.largest_crop, image[2:], strict=True)
    )
    scale = 1.5 if device.type == "cpu" else 2.0
    large = tuple(min(n, round(s * scale)) for s, n in zip(small, image[2:], strict=True))
    fixed = smallest.estimate.total_bytes - smallest.estimate.tile_backward_bytes
    grow = math.prod(large) / math.prod(small)
    crops = [(*image[:2], *small)]
    if large != small and fixed + smallest.estimate.tile_backward_bytes * grow <= usable:
        crops.append((*image[:2], *large))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    amp = dtype if dtype in (torch.bfloat16, torch.float16) else None
    try:
        return measure_time_model(loaded.trunk, crops, dtype=compute, device=device, amp_dtype=amp)
    finally:
        loaded.model.zero_grad(set_to_none=True)


def _measure_spec(
    req: ProfileRequest,
    info: DeviceInfo,
    mode: str,
    shape: tuple[int, ...],
    tile: tuple[int, ...] = (),
    forward_tile: tuple[int, ...] = (),
) -> MeasureSpec:
    return MeasureSpec(
        model_file=str(req.model_file), split=req.split, mode=mode, shape=shape,
        dtype=req.dtype, device=info.device, tile=tile, forward_tile=forward_tile,
        optimizer=req.optimizer,
    )  # fmt: skip


def _calibrate(
    req: ProfileRequest,
    info: DeviceInfo,
    rows: Sequence[_Row],
    usable: int,
    time_model: TimeModel | None,
) -> float | None:
    """Measure real backward-tile peaks; return measured ÷ estimated tile activations.

    Measures the candidates around the provisional choice, and the smallest one, skipping
    those predicted to take longer than ``measure_limit_s`` or not to fit; all in one child
    process on CPU. The factor comes from the largest measured tile (the most representative:
    fixed one-off allocations weigh least there).
    """
    provisional = _choose(rows, usable, None) or rows[0]
    i = rows.index(provisional)
    picks = []
    for j in sorted({0, max(i - 1, 0), i, min(i + 1, len(rows) - 1)}):
        crop = (req.batch, req.channels, *rows[j].grid.largest_crop)
        cost = time_model.step_s(math.prod(crop)) if time_model else 0.0
        if rows[j].estimate.total_bytes <= usable and cost <= req.measure_limit_s:
            picks.append(j)
    if not picks:
        return None
    crops = tuple((req.batch, req.channels, *rows[j].grid.largest_crop) for j in picks)
    spec = replace(_measure_spec(req, info, "tiles", crops[0]), shapes=crops)
    measured = measure_peak(spec)
    if not measured.ok:
        log.warning("measuring tiles failed: %s", measured.error)
        return None
    by_crop = dict(measured.tiles)
    best: tuple[int, int] | None = None  # (estimated, measured) of the largest tile
    for j, crop in zip(picks, crops, strict=True):
        row = rows[j]
        row.measured_tile = by_crop.get(crop)
        log.info("tile %s: measured %s, estimated %s", row.tile, format_bytes(row.measured_tile),
                 format_bytes(row.estimate.tile_backward_bytes))  # fmt: skip
        if row.measured_tile is not None and (
            best is None or row.estimate.tile_backward_bytes > best[0]
        ):
            best = (row.estimate.tile_backward_bytes, row.measured_tile)
    if best is None or best[0] < _MIN_CALIBRATION_BYTES:
        return None  # too small to tell kernel overheads from activations
    # Never below the exact live-tensor count: a lower RSS only means some pages were not
    # touched yet at the peak, which a later step cannot rely on.
    return max(1.0, best[1] / best[0])


def _forward_tile(
    rows: Sequence[_Row],
    chosen: _Row,
    usable: int,
    factor: float | None,
    time_model: TimeModel | None,
    batch: int,
) -> tuple[int, ...]:
    """A larger tile for the no-grad forward pass if it is predicted faster and fits."""
    best, best_time = chosen.tile, chosen.time_s
    fixed = _peak(chosen, factor) - max(
        chosen.estimate.tile_forward_bytes, chosen.estimate.tile_backward_bytes
    ) * (factor or 1.0)
    for row in rows:
        if math.prod(row.tile) <= math.prod(chosen.tile):
            continue
        if fixed + row.estimate.tile_forward_bytes * (factor or 1.0) > usable:
            continue
        t = _predict_time(time_model, row.grid, chosen.grid, batch)
        if t < best_time:
            best, best_time = row.tile, t
    if best != chosen.tile:
        chosen.time_s = best_time
    return best


def _verify(
    req: ProfileRequest,
    info: DeviceInfo,
    rows: list[_Row],
    chosen: _Row,
    forward_tile: tuple[int, ...],
    usable: int,
    factor: float | None,
    time_model: TimeModel | None,
) -> tuple[_Row | None, tuple[int, ...] | None, str]:
    """One real streaming step for the chosen plan; re-choose if it does not fit."""
    do = req.verify if req.verify is not None else (
        req.measure and time_model is not None and chosen.time_s <= req.verify_limit_s
    )  # fmt: skip
    if not do:
        why = (
            f"predicted step {chosen.time_s:.0f} s exceeds --verify-limit "
            f"{req.verify_limit_s:.0f} s"
            if req.verify is None and req.measure else "verification turned off"
        )  # fmt: skip
        return chosen, forward_tile, f"not verified ({why}); run with --verify to check it"
    for _ in range(3):
        image = (req.batch, req.channels, *req.image_shape)
        spec = _measure_spec(req, info, "step", image, chosen.tile, forward_tile)
        measured: Measured = measure_peak(spec, timeout_s=max(600.0, 5 * chosen.time_s))
        if measured.ok and measured.peak_bytes <= usable:
            chosen.measured_step = measured.peak_bytes
            predicted = (chosen.estimate.scaled(factor) if factor else chosen.estimate).total_bytes
            delta = measured.peak_bytes / predicted - 1.0
            return (
                chosen,
                forward_tile,
                (
                    f"one real streaming step on {info.device}: peak "
                    f"{format_bytes(measured.peak_bytes)} (predicted {format_bytes(predicted)}, "
                    f"{delta:+.0%}), {measured.seconds:.1f} s"
                ),
            )
        chosen.measured_step = measured.peak_bytes
        chosen.step_error = measured.error or "measured peak exceeds the usable budget"
        log.warning("tile %s failed verification: %s", chosen.tile, chosen.step_error)
        nxt = _choose(rows, usable, factor)
        if nxt is None or nxt is chosen:
            return None, None, f"every verified candidate failed ({chosen.step_error})"
        chosen, forward_tile = nxt, nxt.tile
    return chosen, forward_tile, "not verified (three candidates failed verification)"


def _plan(
    req: ProfileRequest,
    info: DeviceInfo,
    loaded: LoadedModel,
    geometry: TrunkGeometry,
    rows: Sequence[_Row],
    chosen: _Row | None,
    forward_tile: tuple[int, ...] | None,
    budget: int,
    factor: float | None,
    time_source: str,
    verified: str,
    conventional: int,
) -> Plan:
    usable = math.floor(budget * (1.0 - req.margin))
    candidates = tuple(
        Candidate(
            tile_px=r.tile,
            grid=r.grid.counts,
            n_tiles=r.grid.n_tiles,
            overlap_factor=round(r.grid.overlap_factor, 4),
            memory=r.estimate.scaled(factor) if factor else r.estimate,
            estimated_peak_bytes=(r.estimate.scaled(factor) if factor else r.estimate).total_bytes,
            measured_peak_bytes=r.measured_step,
            measured_tile_bytes=r.measured_tile,
            predicted_time_s=round(r.time_s, 3),
            fits=_peak(r, factor) <= usable and r.step_error is None,
        )
        for r in rows
    )
    target = chosen or rows[0]
    return Plan(
        provenance={
            "tool": f"tileplan {tileplan.__version__}",
            "torch": torch.__version__,
            "device": info.device,
            "device_name": info.name,
            "device_total_bytes": info.total_bytes,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        model={
            "file": str(req.model_file),
            "entry": loaded.entry,
            "split": loaded.split,
            "split_option": req.split,
            "trunk_class": type(loaded.trunk).__name__,
            "model_class": type(loaded.model).__name__,
            "parameter_count": loaded.parameter_count,
            "trunk_fingerprint": trunk_fingerprint(loaded.trunk),
        },
        image_shape_px=tuple(req.image_shape),
        channels=req.channels,
        batch=req.batch,
        dtype=req.dtype,
        optimizer=req.optimizer,
        output_stride_px=geometry.output_stride,
        halo_lo_px=geometry.halo_lo,
        halo_hi_px=geometry.halo_hi,
        align_px=geometry.align,
        output_shape=target.grid.output_shape,
        budget_bytes=budget,
        margin=req.margin,
        tile_px=target.tile,
        forward_tile_px=forward_tile or target.tile,
        predicted_peak_bytes=_peak(target, factor) if chosen else 0,
        predicted_time_s=round(target.time_s, 3),
        measured_peak_bytes=chosen.measured_step if chosen else None,
        verified=verified,
        calibration_factor=round(factor, 4) if factor else None,
        time_source=time_source,
        conventional_peak_bytes=conventional,
        conventional_measured=False,
        candidates=candidates,
    )


def summary(plan: Plan) -> str:
    """One line: the chosen tile, its peak, and what conventional backprop would need."""
    tile = "x".join(map(str, plan.tile_px))
    n = next((c.n_tiles for c in plan.candidates if c.tile_px == plan.tile_px), 0)
    peak = plan.measured_peak_bytes or plan.predicted_peak_bytes
    kind = "measured" if plan.measured_peak_bytes else "predicted"
    forward = ""
    if plan.forward_tile_px != plan.tile_px:
        forward = f" (forward pass {'x'.join(map(str, plan.forward_tile_px))})"
    return (
        f"tile {tile}{forward}, {n} tiles, {kind} peak {format_bytes(peak)} of "
        f"{format_bytes(plan.budget_bytes)}, conventional would need "
        f"{format_bytes(plan.conventional_peak_bytes)} (estimate)"
    )
