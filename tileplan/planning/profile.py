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
    LayerMemory,
    MemoryBreakdown,
    ModelIdentity,
    Plan,
    Precision,
    Provenance,
    StreamingError,
    TileGrid,
    TimeFit,
    TrunkGeometry,
    Verification,
    VerifyStatus,
    analyze_trunk,
    trunk_fingerprint,
)
from tileplan.planning.estimate import (
    Conventional,
    ModelState,
    estimate_conventional,
    estimate_fixed,
    with_tiles,
)
from tileplan.planning.layers import layer_memory
from tileplan.planning.measure import (
    DeviceInfo,
    MeasureSpec,
    device_info,
    measure_peak,
    measure_time_model,
)
from tileplan.planning.model_file import LoadedModel, load_model_file
from tileplan.planning.search import Scored, candidate_tiles, choose, proxy_cost
from tileplan.settings import OPTIMIZERS
from tileplan.text import shallow_trunk_note
from tileplan.units import format_bytes

__all__ = ["NoFeasiblePlanError", "ProfileRequest", "profile"]

log = logging.getLogger(__name__)

# Below this, a measured tile peak is dominated by one-off kernel allocations, not activations.
_MIN_CALIBRATION_BYTES = 64 * 1024**2
_MIN_TIMING_PX = 512
_VERIFY_TRIES = 3


class NoFeasiblePlanError(StreamingError):
    """No candidate fits the budget; ``candidates`` holds them all, for display."""

    def __init__(self, message: str, candidates: tuple[Candidate, ...]) -> None:
        super().__init__(message)
        self.candidates = candidates


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
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {list(OPTIMIZERS)}")
        Precision.of(self.dtype)

    @property
    def precision(self) -> Precision:
        return Precision.of(self.dtype)


@dataclass
class _Row:
    """Working state of one candidate during profiling."""

    tile: tuple[int, ...]
    grid: TileGrid
    estimate: MemoryBreakdown
    time_s: float | None = None  # predicted seconds per image (None: not timed)
    cost: float = math.nan  # what the choice minimises: time_s, else the proxy
    measured_tile: int | None = None
    measured_step: int | None = None
    step_error: str | None = None


@dataclass(frozen=True)
class _Context:
    """What every step of one profiling run shares."""

    req: ProfileRequest
    info: DeviceInfo
    usable: int
    time_fit: TimeFit | None = None
    factor: float | None = None  # calibration: measured ÷ estimated tile activations

    def memory(self, row: _Row) -> MemoryBreakdown:
        return row.estimate.scaled(self.factor) if self.factor else row.estimate

    def peak(self, row: _Row) -> int:
        """The row's peak: measured when a real step was measured, else the estimate."""
        if row.measured_step is not None:
            return row.measured_step
        return self.memory(row).total_bytes

    def predict(self, forward: TileGrid, backward: TileGrid) -> tuple[float | None, float]:
        """(seconds per image or None, cost to minimise) for these grids."""
        if self.time_fit is None:
            return None, float(proxy_cost(forward, backward, self.req.batch))
        seconds = self.time_fit.predict(forward, backward, self.req.batch)
        return seconds, seconds


def profile(req: ProfileRequest, *, progress: bool = False) -> Plan:
    """Plan a streaming run; see the module docstring.

    Raises:
        ModelFileError, UnsupportedLayerError, GeometryError: bad model or sizes.
        NoFeasiblePlanError: nothing fits the budget (all candidates are attached).
    """
    bar = tqdm(total=6, desc="profile", disable=not progress, leave=False)
    loaded = load_model_file(req.model_file, req.split)
    info = device_info(req.device, assume=not req.measure)
    budget = req.budget_bytes or (
        info.total_bytes if info.device != "cpu" else info.available_bytes
    )
    if not budget:
        raise ValueError(f"{info.name}: give --budget (e.g. 80GiB) to plan for it")
    if req.verify and not info.total_bytes:
        raise ValueError(f"--verify needs the device itself, and {info.device} is not here")
    ctx = _Context(req, info, math.floor(budget * (1.0 - req.margin)))
    precision = req.precision
    if req.measure:
        loaded.model.to(device=torch.device(info.device), dtype=precision.param_dtype)
    geometry = analyze_trunk(loaded.trunk)
    image = (req.batch, req.channels, *req.image_shape)
    state = ModelState.of(loaded.model, req.optimizer, precision.param_dtype)
    bar.update()

    tiles = [req.tile] if req.tile else candidate_tiles(geometry, req.image_shape)
    fixed = estimate_fixed(trunk=loaded.trunk, head=loaded.head, state=state, image_shape=image,
                           dtype=precision.dtype,
                           image_on_device=info.device == "cpu")  # fmt: skip
    rows = [_estimate_row(loaded, geometry, fixed, image, t, precision.dtype) for t in tiles]
    conventional = estimate_conventional(
        trunk=loaded.trunk, head=loaded.head, state=state, image_shape=image,
        dtype=precision.dtype,
    )  # fmt: skip
    bar.update()

    if req.measure:
        ctx = replace(ctx, time_fit=_time_fit(loaded, rows, image, ctx))
    for row in rows:
        row.time_s, row.cost = ctx.predict(row.grid, row.grid)
    bar.update()

    if req.measure:
        ctx = replace(ctx, factor=_calibrate(ctx, rows))
    bar.update()

    chosen = _choose(ctx, rows)
    shallow = shallow_trunk_note(
        split=loaded.split, stride=geometry.output_stride, stopped_by=loaded.stopped_by,
        trunk_bytes=conventional.trunk_bytes, head_bytes=conventional.head_bytes,
    )  # fmt: skip
    if chosen is None:
        raise _no_fit(ctx, rows, state, budget, shallow=shallow)
    forward = _forward_tile(ctx, rows, chosen)
    bar.update()
    chosen, forward, verification = _verify(ctx, rows, chosen, forward)
    if chosen is None:
        raise _no_fit(ctx, rows, state, budget, verification.error, shallow=shallow)
    bar.update()
    bar.close()
    crop = (*image[:2], *chosen.grid.largest_crop)
    layers = layer_memory(loaded.trunk, geometry, image, crop, precision.dtype)
    return _plan(ctx, loaded, geometry, rows, chosen, forward, budget, verification,
                 conventional, layers)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------


def _estimate_row(
    loaded: LoadedModel,
    geometry: TrunkGeometry,
    fixed: MemoryBreakdown,
    image: tuple[int, ...],
    tile: tuple[int, ...],
    dtype: torch.dtype,
) -> _Row:
    grid = geometry.tile_grid(image[2:], tile)
    crop = (*image[:2], *grid.largest_crop)
    return _Row(grid.tile_shape, grid, with_tiles(fixed, loaded.trunk, crop, crop, dtype))


def _choose(ctx: _Context, rows: Sequence[_Row]) -> _Row | None:
    scored = [
        Scored(r.tile, ctx.peak(r), r.cost if r.step_error is None else math.inf) for r in rows
    ]
    index = choose(scored, ctx.usable)
    if index is None or rows[index].step_error is not None:
        return None
    return rows[index]


def _no_fit(
    ctx: _Context, rows: Sequence[_Row], state: ModelState, budget: int, why: str | None = None,
    *, shallow: str | None = None,
) -> NoFeasiblePlanError:  # fmt: skip
    """No tile fits; a shallow trunk is said first, since then the model is the problem."""
    smallest = min(rows, key=ctx.peak)
    fixed = state.params_bytes + state.grads_bytes + state.optimizer_bytes
    failed = f"; every verified candidate failed ({why})" if why else ""
    lower = " or --dtype bfloat16" if ctx.req.dtype in ("float32", "float64") else ""
    first = f"{shallow}; so " if shallow else ""
    return NoFeasiblePlanError(
        f"{first}no tile fits in {format_bytes(ctx.usable)} ({format_bytes(budget)} budget less "
        f"{ctx.req.margin:.0%} margin): the smallest needs {format_bytes(ctx.peak(smallest))} "
        f"(model and optimizer state {format_bytes(fixed)}){failed}; raise --budget, lower "
        f"--margin{lower}",
        _candidates(ctx, rows),
    )


def _time_fit(
    loaded: LoadedModel, rows: Sequence[_Row], image: tuple[int, ...], ctx: _Context
) -> TimeFit:
    """Time two crop sizes: the smallest candidate's (at least 512 px per side, so that the
    per-pixel cost is not lost in per-call overhead) and one about 1.5x (CPU) or 2x larger per
    side, both within memory."""
    smallest = min(rows, key=lambda r: math.prod(r.grid.largest_crop))
    small = tuple(
        max(s, min(_MIN_TIMING_PX, n))
        for s, n in zip(smallest.grid.largest_crop, image[2:], strict=True)
    )
    device = torch.device(ctx.info.device)
    scale = 1.5 if device.type == "cpu" else 2.0
    large = tuple(min(n, round(s * scale)) for s, n in zip(small, image[2:], strict=True))
    fixed = smallest.estimate.total_bytes - smallest.estimate.tile_backward_bytes
    grow = math.prod(large) / math.prod(small)
    crops = [(*image[:2], *small)]
    if large != small and fixed + smallest.estimate.tile_backward_bytes * grow <= ctx.usable:
        crops.append((*image[:2], *large))
    try:
        return measure_time_model(loaded.trunk, crops, precision=ctx.req.precision,
                                  device=device, device_name=ctx.info.name)  # fmt: skip
    finally:
        loaded.model.zero_grad(set_to_none=True)


def _measure_spec(
    ctx: _Context,
    mode: str,
    shape: tuple[int, ...],
    tile: tuple[int, ...] = (),
    forward_tile: tuple[int, ...] = (),
) -> MeasureSpec:
    req = ctx.req
    return MeasureSpec(
        model_file=str(req.model_file), split=req.split, mode=mode,  # type: ignore[arg-type]
        shape=shape, dtype=req.dtype, device=ctx.info.device, tile=tile,
        forward_tile=forward_tile, optimizer=req.optimizer,
    )  # fmt: skip


def _calibrate(ctx: _Context, rows: Sequence[_Row]) -> float | None:
    """Measure real backward-tile peaks; return measured ÷ estimated tile activations.

    Measures the candidates around the provisional choice, and the smallest one, skipping
    those predicted to take longer than ``measure_limit_s`` or not to fit; all in one child
    process on CPU. The factor comes from the largest measured tile (the most representative:
    fixed one-off allocations weigh least there).
    """
    req = ctx.req
    provisional = _choose(ctx, rows) or rows[0]
    i = rows.index(provisional)
    picks = []
    for j in sorted({0, max(i - 1, 0), i, min(i + 1, len(rows) - 1)}):
        crop = (req.batch, req.channels, *rows[j].grid.largest_crop)
        cost = ctx.time_fit.step_s(math.prod(crop)) if ctx.time_fit else 0.0
        if rows[j].estimate.total_bytes <= ctx.usable and cost <= req.measure_limit_s:
            picks.append(j)
    if not picks:
        return None
    crops = tuple((req.batch, req.channels, *rows[j].grid.largest_crop) for j in picks)
    spec = replace(_measure_spec(ctx, "tiles", crops[0]), shapes=crops)
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
    return round(max(1.0, best[1] / best[0]), 4)


def _forward_tile(ctx: _Context, rows: Sequence[_Row], chosen: _Row) -> _Row:
    """A larger tile for the no-grad forward pass if it is predicted faster and fits."""
    best, best_cost = chosen, chosen.cost
    chosen_memory = ctx.memory(chosen)
    fixed = ctx.peak(chosen) - max(chosen_memory.tile_forward_bytes,
                                   chosen_memory.tile_backward_bytes)  # fmt: skip
    for row in rows:
        if math.prod(row.tile) <= math.prod(chosen.tile):
            continue
        if fixed + ctx.memory(row).tile_forward_bytes > ctx.usable:
            continue
        _, cost = ctx.predict(row.grid, chosen.grid)
        if cost < best_cost:
            best, best_cost = row, cost
    return best


def _verify(
    ctx: _Context, rows: list[_Row], chosen: _Row, forward: _Row
) -> tuple[_Row | None, _Row, Verification]:
    """One real streaming step for the chosen plan; choose again if it does not fit."""
    req = ctx.req
    time_s, _ = ctx.predict(forward.grid, chosen.grid)
    if req.verify is False or (req.verify is None and not req.measure):
        return chosen, forward, Verification(status=VerifyStatus.OFF)
    if req.verify is None and (time_s is None or time_s > req.verify_limit_s):
        return chosen, forward, Verification(status=VerifyStatus.TOO_SLOW,
                                             limit_s=req.verify_limit_s)  # fmt: skip
    error = ""
    for _ in range(_VERIFY_TRIES):
        image = (req.batch, req.channels, *req.image_shape)
        spec = _measure_spec(ctx, "step", image, chosen.tile, forward.tile)
        time_s, _ = ctx.predict(forward.grid, chosen.grid)
        measured = measure_peak(spec, timeout_s=max(600.0, 5 * (time_s or 0.0)))
        chosen.measured_step = measured.peak_bytes
        if measured.ok and measured.peak_bytes is not None and measured.peak_bytes <= ctx.usable:
            return chosen, forward, Verification(
                status=VerifyStatus.VERIFIED, device=ctx.info.device,
                peak_bytes=measured.peak_bytes, step_s=round(measured.seconds or 0.0, 3),
            )  # fmt: skip
        error = measured.error or "measured peak exceeds the usable budget"
        chosen.step_error = error
        log.warning("tile %s failed verification: %s", chosen.tile, error)
        nxt = _choose(ctx, rows)
        if nxt is None:
            return None, forward, Verification(status=VerifyStatus.FAILED, error=error)
        chosen, forward = nxt, nxt
    return chosen, forward, Verification(status=VerifyStatus.FAILED, error=error)


def _candidates(ctx: _Context, rows: Sequence[_Row]) -> tuple[Candidate, ...]:
    return tuple(
        Candidate(
            tile_px=r.tile,
            grid=r.grid.counts,
            n_tiles=r.grid.n_tiles,
            overlap_factor=round(r.grid.overlap_factor, 4),
            memory=ctx.memory(r),
            estimated_peak_bytes=ctx.memory(r).total_bytes,
            measured_peak_bytes=r.measured_step,
            measured_tile_bytes=r.measured_tile,
            predicted_time_s=None if r.time_s is None else round(r.time_s, 3),
            fits=ctx.peak(r) <= ctx.usable and r.step_error is None,
        )
        for r in rows
    )


def _plan(
    ctx: _Context,
    loaded: LoadedModel,
    geometry: TrunkGeometry,
    rows: Sequence[_Row],
    chosen: _Row,
    forward: _Row,
    budget: int,
    verification: Verification,
    conventional: Conventional,
    layers: tuple[LayerMemory, ...],
) -> Plan:
    req, info = ctx.req, ctx.info
    time_s, _ = ctx.predict(forward.grid, chosen.grid)
    return Plan(
        provenance=Provenance(
            tool=f"tileplan {tileplan.__version__}",
            torch=str(torch.__version__),
            device=info.device,
            device_name=info.name,
            device_total_bytes=info.total_bytes,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ),
        model=ModelIdentity(
            file=str(req.model_file),
            entry=loaded.entry,
            split=loaded.split,
            split_option=req.split,
            trunk_class=type(loaded.trunk).__name__,
            model_class=type(loaded.model).__name__,
            parameter_count=loaded.parameter_count,
            trunk_fingerprint=trunk_fingerprint(loaded.trunk),
            stopped_by=loaded.stopped_by,
        ),
        image_shape_px=tuple(req.image_shape),
        channels=req.channels,
        batch=req.batch,
        dtype=req.precision.name,
        optimizer=req.optimizer,  # type: ignore[arg-type]
        output_stride_px=geometry.output_stride,
        halo_lo_px=geometry.halo_lo,
        halo_hi_px=geometry.halo_hi,
        align_px=geometry.align,
        output_shape=chosen.grid.output_shape,
        budget_bytes=budget,
        margin=req.margin,
        tile_px=chosen.tile,
        forward_tile_px=forward.tile,
        predicted_peak_bytes=ctx.memory(chosen).total_bytes,
        predicted_time_s=None if time_s is None else round(time_s, 3),
        measured_peak_bytes=chosen.measured_step,
        verification=verification,
        calibration_factor=ctx.factor,
        time_fit=ctx.time_fit,
        conventional_peak_bytes=conventional.peak_bytes,
        conventional_measured=False,
        trunk_activation_bytes=conventional.trunk_bytes,
        head_activation_bytes=conventional.head_bytes,
        candidates=_candidates(ctx, rows),
        layers=layers,
    )
