"""``tileplan profile``: estimate, measure and choose a streaming plan.

    estimate every candidate on meta tensors  ->  time tiles on the device
    ->  calibrate the estimates with real tile peaks  ->  price segmentations
    ->  choose  ->  verify with a real step

The options are one tile shape for the whole trunk, or a segmentation (``planning.segments``):
the trunk cut into parts streamed one after the other, each with its own tiles. The fastest
predicted option that fits wins; a segmentation is only priced when the best single tile does
not cover the whole image (then nothing can be faster). Everything is returned as a typed
``Plan``; the CLI only presents it.
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import tileplan
from executor import (
    BATCH_NORM_MODES,
    Candidate,
    FrozenPhase,
    LayerMemory,
    MemoryBreakdown,
    ModelIdentity,
    Plan,
    Precision,
    Program,
    Provenance,
    Segmentation,
    Statistic,
    StreamingError,
    TileGrid,
    TimeFit,
    TrunkGeometry,
    Verification,
    VerifyStatus,
    analyze_trunk,
    build_program,
    map_cut_points,
    trunk_fingerprint,
)
from tileplan.host_allocator import host_allocator
from tileplan.planning.estimate import (
    Conventional,
    ModelState,
    estimate_conventional,
    estimate_fixed,
    with_tiles,
)
from tileplan.planning.layers import layer_memory, layer_shapes
from tileplan.planning.measure import (
    DeviceInfo,
    MeasureSpec,
    device_info,
    measure_peak,
    measure_time_model,
)
from tileplan.planning.model_file import LoadedModel, load_model_file, load_module
from tileplan.planning.search import Scored, candidate_tiles, choose, proxy_cost
from tileplan.planning.segments import Costs, SegmentSearch, candidate_cuts, resolve_cuts
from tileplan.settings import OPTIMIZERS
from tileplan.text import shallow_trunk_note
from tileplan.units import broadcast_shape, format_bytes

__all__ = ["NoFeasiblePlanError", "ProfileRequest", "profile"]

log = logging.getLogger(__name__)

# Below this, a measured tile peak is dominated by one-off kernel allocations, not activations.
_MIN_CALIBRATION_BYTES = 64 * 1024**2
_MIN_TIMING_PX = 512
_VERIFY_TRIES = 3
# Segmentations kept in a plan for display (the cheapest ones; the chosen one always).
_KEPT_SEGMENTATIONS = 8
# Most segments the automatic search tries (each more multiplies the cuts to combine).
_AUTO_SEGMENTS = (2, 3)


class NoFeasiblePlanError(StreamingError):
    """No candidate fits the budget; ``candidates`` holds them all, for display."""

    def __init__(self, message: str, candidates: tuple[Candidate, ...]) -> None:
        super().__init__(message)
        self.candidates = candidates


@dataclass(frozen=True, kw_only=True)
class ProfileRequest:
    """What to plan for. Sizes in px, memory in bytes."""

    model_file: Path | None
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
    segments: int | None = None  # None: choose (1 or more); 1: one tile shape; N: N segments
    cuts: tuple[str, ...] = ()  # cut the trunk here (node or module names), nothing else
    freeze: str | None = None  # staged fine-tuning: also cut here and price the frozen phase
    max_tile: int | None = None  # largest backward tile side (px of each segment's input)
    batch_norm: str = "frozen"  # BatchNorm with running ("frozen") or batch ("train") stats
    model_label: str | None = None  # the plan's model file entry when it is not a file's path
    # A module given in Python, planned in this process (a copy; model_file is then only
    # for measuring children, and may be None when nothing is measured).
    module: nn.Module | None = None
    split_fn: Callable[[nn.Module], tuple[nn.Module, nn.Module]] | None = None

    @property
    def cut_names(self) -> tuple[str, ...]:
        """``--cut``'s names and ``--freeze``'s (a frozen prefix is a segment of its own)."""
        if self.freeze is None or self.freeze in self.cuts:
            return self.cuts
        return (*self.cuts, self.freeze)

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"margin {self.margin} must be in [0, 1), e.g. 0.1 for 10%")
        if self.channels < 1 or self.batch < 1:
            raise ValueError("channels and batch must be positive")
        if self.segments is not None and self.segments < 1:
            raise ValueError(f"--segments {self.segments}: give auto or a count of at least 1")
        cuts = self.cut_names
        if cuts and self.segments not in (None, len(cuts) + 1):
            named = "--cut and --freeze name" if self.freeze else "--cut names"
            raise ValueError(
                f"{named} {len(cuts)} cut(s), i.e. {len(cuts) + 1} segments, but --segments "
                f"is {self.segments}; give one or make them agree"
            )
        if cuts and self.tile:
            raise ValueError("--tile sets one tile for the whole trunk; it cannot go with --cut "
                             "or --freeze")  # fmt: skip
        if self.max_tile is not None and self.max_tile < 1:
            raise ValueError(f"--max-tile {self.max_tile} must be a positive size in px")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {list(OPTIMIZERS)}")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"--bn {self.batch_norm}: use one of {', '.join(BATCH_NORM_MODES)}")
        if self.freeze is not None and self.batch_norm == "train":
            raise ValueError(f"--freeze {self.freeze} keeps the frozen layers' BatchNorm "
                             "statistics fixed, which --bn train does not; plan with --bn "
                             "frozen")  # fmt: skip
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


@dataclass
class _Chain:
    """Working state of one segmentation during profiling."""

    option: Segmentation
    cost: float  # predicted seconds per image, else the proxy (as ``_Row.cost``)
    measured_step: int | None = None
    step_error: str | None = None

    @property
    def peak(self) -> int:
        if self.measured_step is not None:
            return self.measured_step
        return self.option.estimated_peak_bytes

    def recorded(self) -> Segmentation:
        return replace(self.option, measured_peak_bytes=self.measured_step,
                       fits=self.option.fits and self.step_error is None)  # fmt: skip


@dataclass
class _Single:
    """The single-segment option: one backward tile, and its forward tile."""

    row: _Row
    forward: _Row
    cost: float


_Option = _Single | _Chain


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
        ValueError: a --cut that is not a cut point, a --max-tile below the smallest tile.
        NoFeasiblePlanError: nothing fits the budget (all candidates are attached).
    """
    bar = tqdm(total=7, desc="profile", disable=not progress, leave=False)
    loaded = _load(req)
    req = _with_axes(req, loaded.n_axes)
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
    geometry = analyze_trunk(loaded.trunk, loaded.n_axes)
    program = build_program(loaded.trunk, loaded.n_axes)
    forced = len(program.streams)  # statistics of whole maps end segments: at least this many
    _check_forced(req, forced)
    image = (req.batch, req.channels, *req.image_shape)
    state = ModelState.of(loaded.model, req.optimizer, precision.param_dtype)
    cuts = _cuts(req, loaded)
    bar.update()

    # One tile shape for the whole trunk, unless statistics end segments (then it would be
    # none of the shapes the engine runs).
    tiles = [req.tile] if req.tile else candidate_tiles(geometry, req.image_shape)
    fixed = estimate_fixed(trunk=loaded.trunk, head=loaded.head, state=state, image_shape=image,
                           dtype=precision.dtype,
                           image_on_device=info.device == "cpu")  # fmt: skip
    rows = [] if forced > 1 else [
        _estimate_row(loaded, geometry, fixed, image, t, precision.dtype) for t in tiles
    ]  # fmt: skip
    conventional = estimate_conventional(
        trunk=loaded.trunk, head=loaded.head, state=state, image_shape=image,
        dtype=precision.dtype,
    )  # fmt: skip
    bar.update()

    if req.measure:
        ctx = replace(ctx, time_fit=_time_fit(loaded, rows, image, ctx, program))
    for row in rows:
        row.time_s, row.cost = ctx.predict(row.grid, row.grid)
    bar.update()

    if req.measure and rows:
        ctx = replace(ctx, factor=_calibrate(ctx, rows))
    bar.update()

    # Every candidate served to time and calibrate; beyond --max-tile none is a choice.
    single_allowed = req.segments in (None, 1) and not cuts and forced == 1
    rows = _limited(rows, geometry, req.max_tile, needed=req.segments == 1)
    chains = _segmentations(ctx, loaded, rows, fixed, image, cuts, forced)
    if req.measure and forced > 1 and chains:  # calibrate on a segment's tiles, price again
        factor = _calibrate_segments(ctx, chains)
        if factor is not None:
            ctx = replace(ctx, factor=factor)
            chains = _segmentations(ctx, loaded, rows, fixed, image, cuts, forced)
    bar.update()
    shallow = shallow_trunk_note(
        split=loaded.split, stride=geometry.output_stride, stopped_by=loaded.stopped_by,
        trunk_bytes=conventional.trunk_bytes, head_bytes=conventional.head_bytes,
    )  # fmt: skip
    chosen = _pick(ctx, rows, chains, single_allowed)
    if chosen is None:
        floor = None
        if forced > 1:  # the segments statistics force, with their smallest tiles
            floor = SegmentSearch(loaded.trunk, image, [], _costs(ctx, fixed)).smallest_peak()
        raise _no_fit(ctx, rows, chains, state, budget, shallow=shallow, floor=floor)
    bar.update()
    chosen, verification = _verify(ctx, rows, chains, chosen, single_allowed)
    if chosen is None:
        raise _no_fit(ctx, rows, chains, state, budget, verification.error, shallow=shallow)
    bar.update()
    bar.close()
    layers = _layers(loaded, geometry, image, chosen, precision.dtype)
    frozen = _frozen_phase(ctx, loaded, fixed, image, cuts, chosen)
    plan = _plan(ctx, loaded, geometry, rows, chains, chosen, budget, verification,
                 conventional, layers, program)  # fmt: skip
    return replace(plan, frozen_phase=frozen) if frozen is not None else plan


def _cuts(req: ProfileRequest, loaded: LoadedModel) -> list[tuple[str, str]]:
    """``--cut``'s cut points and ``--freeze``'s (each named by its own option in errors), in
    the trunk's order."""
    cuts = resolve_cuts(loaded.trunk, req.cuts, loaded.n_axes) if req.cuts else []
    if req.freeze is None:
        return cuts
    (frozen,) = resolve_cuts(loaded.trunk, [req.freeze], loaded.n_axes, "--freeze")
    return cuts if frozen in cuts else resolve_cuts(loaded.trunk, req.cut_names, loaded.n_axes)


def _frozen_phase(ctx: _Context, loaded: LoadedModel, fixed: MemoryBreakdown,
                  image: tuple[int, ...], cuts: Sequence[tuple[str, str]], chosen: _Option
                  ) -> FrozenPhase | None:  # fmt: skip
    """``--freeze``: the chosen segmentation's peak and time while the trunk up to the freeze
    module is frozen (``SegmentSearch.price_frozen``): its segments stream forward only, and
    its parameters have no gradient and no optimizer state (both are per element, so they
    shrink in proportion)."""
    from tileplan.run.freeze import frozen_parameters

    req = ctx.req
    if req.freeze is None:
        return None
    assert isinstance(chosen, _Chain), "a freeze module is a cut: the plan has segments"
    node = resolve_cuts(loaded.trunk, [req.freeze], loaded.n_axes, "--freeze")[0][0]
    search = SegmentSearch(loaded.trunk, image, list(cuts), _costs(ctx, fixed))
    names = [c for c, _ in cuts]
    parts = search.parts(names)
    frozen = 1 + next(k for k, p in enumerate(parts) if node in (p.end or "").split(","))
    held = sum(p.numel() for p in frozen_parameters(loaded.trunk, req.freeze))
    total = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad) or 1
    keep = 1.0 - held / total
    mine = replace(fixed, grads_bytes=round(fixed.grads_bytes * keep),
                   optimizer_bytes=round(fixed.optimizer_bytes * keep))  # fmt: skip
    on_host = any(s.map_on_host for s in chosen.option.segments)
    priced = search.price_frozen(names, frozen, mine, on_host=on_host)
    assert priced is not None, "the chosen segmentation has tiles"
    cost, memory = priced
    both = search.price(names, on_host=on_host)
    assert both is not None
    timed = ctx.time_fit is not None
    return FrozenPhase(freeze=req.freeze, frozen_segments=frozen, memory=memory,
                       estimated_peak_bytes=memory.total_bytes,
                       predicted_time_s=round(cost, 3) if timed else None,
                       cost_ratio=round(cost / both[0], 4))  # fmt: skip


def _load(req: ProfileRequest) -> LoadedModel:
    """The model to plan, split: a copy of a module given in Python, or the model file's.
    Its spatial axes come from its layers; a model without convolution or pooling layers
    takes as many as the image size has."""
    axes = len(req.image_shape) if len(req.image_shape) > 1 else None
    if req.module is not None:
        return load_module(copy.deepcopy(req.module), req.split_fn or req.split,
                           batch_norm=req.batch_norm, label=req.model_label or "<module>",
                           n_axes=axes)  # fmt: skip
    if req.model_file is None:
        raise ValueError("give a model file or a module to plan for")
    return load_model_file(req.model_file, req.split, batch_norm=req.batch_norm, n_axes=axes)


def _with_axes(req: ProfileRequest, n_axes: int) -> ProfileRequest:
    """The request with one size per spatial axis of the model in the image and tile shapes.

    Raises:
        ValueError: ``--image`` or ``--tile`` has another number of axes than the model.
    """
    image = broadcast_shape(req.image_shape, n_axes)
    tile = None if req.tile is None else broadcast_shape(req.tile, n_axes)
    return replace(req, image_shape=image, tile=tile)


def _check_forced(req: ProfileRequest, forced: int) -> None:
    """Options that ask for one segment, for a trunk whose statistics make several.

    Raises:
        ValueError: ``--tile`` or ``--segments`` asks for fewer segments than it has.
    """
    if forced == 1:
        return
    why = (f"this trunk computes statistics of whole maps (global-context layers) that end "
           f"{forced - 1} segment(s), so it streams in at least {forced} segments")  # fmt: skip
    if req.tile:
        raise ValueError(f"--tile sets one tile for the whole trunk, but {why}; use "
                         "--max-tile to cap every segment's tile")  # fmt: skip
    if req.segments is not None:
        raise ValueError(f"--segments {req.segments}: {why}; use --segments auto, and --cut "
                         "to cut it in more places")  # fmt: skip


def _limited(rows: list[_Row], geometry: TrunkGeometry, max_tile: int | None, *, needed: bool
             ) -> list[_Row]:  # fmt: skip
    """The candidates no larger than ``max_tile`` per side (all without a limit).

    Raises:
        ValueError: none is that small and a single segment is all that may be used.
    """
    if max_tile is None:
        return rows
    kept = [r for r in rows if max(r.tile) <= max_tile]
    if not kept and needed:
        smallest = max(geometry.min_tile(ax) for ax in range(geometry.n_axes))
        raise ValueError(
            f"--max-tile {max_tile}: the trunk's smallest tile is {smallest} px (its receptive "
            f"field); raise --max-tile, or allow segments (--segments auto), which cut the halo"
        )
    return kept


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
    ctx: _Context, rows: Sequence[_Row], chains: Sequence[_Chain], state: ModelState,
    budget: int, why: str | None = None, *, shallow: str | None = None,
    floor: int | None = None,
) -> NoFeasiblePlanError:  # fmt: skip
    """Nothing fits; a shallow trunk is said first, since then the model is the problem.
    ``floor``: the smallest peak of the segments statistics force, when none fits."""
    peaks = [ctx.peak(r) for r in rows] + [c.peak for c in chains]
    peaks += [floor] if floor is not None else []
    fixed = state.params_bytes + state.grads_bytes + state.optimizer_bytes
    failed = f"; every verified candidate failed ({why})" if why else ""
    lower = " or --dtype bfloat16" if ctx.req.dtype in ("float32", "float64") else ""
    first = f"{shallow}; so " if shallow else ""
    smallest = f"the smallest needs {format_bytes(min(peaks))}" if peaks else "no tile qualifies"
    return NoFeasiblePlanError(
        f"{first}no tile fits in {format_bytes(ctx.usable)} ({format_bytes(budget)} budget less "
        f"{ctx.req.margin:.0%} margin): {smallest} "
        f"(model and optimizer state {format_bytes(fixed)}){failed}; raise --budget, lower "
        f"--margin{lower}",
        _candidates(ctx, rows),
    )


def _time_fit(
    loaded: LoadedModel, rows: Sequence[_Row], image: tuple[int, ...], ctx: _Context,
    program: Program,
) -> TimeFit:  # fmt: skip
    """Time two crop sizes: the smallest candidate's (at least 512 px per side, so that the
    per-pixel cost is not lost in per-call overhead) and one about 1.5x (CPU) or 2x larger per
    side, both within memory. A trunk whose statistics end segments has no single-tile
    candidates: the crops start at its first segment's smallest tile."""
    if rows:
        smallest = min(rows, key=lambda r: math.prod(r.grid.largest_crop))
        first = smallest.grid.largest_crop
    else:
        geometry = program.streams[0].geometry
        first = tuple(min(geometry.min_tile(ax), n) for ax, n in enumerate(image[2:]))
    small = tuple(max(s, min(_MIN_TIMING_PX, n)) for s, n in zip(first, image[2:], strict=True))
    device = torch.device(ctx.info.device)
    scale = 1.5 if device.type == "cpu" else 2.0
    large = tuple(min(n, round(s * scale)) for s, n in zip(small, image[2:], strict=True))
    crops = [(*image[:2], *small)]
    grow = math.prod(large) / math.prod(small)
    fits = not rows or (
        smallest.estimate.total_bytes + smallest.estimate.tile_backward_bytes * (grow - 1)
        <= ctx.usable
    )  # fmt: skip
    if large != small and fits:
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
        forward_tile=forward_tile, optimizer=req.optimizer, batch_norm=req.batch_norm,
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
        cost = ctx.time_fit.step_s(TimeFit.pixels(crop)) if ctx.time_fit else 0.0
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


def _calibrate_segments(ctx: _Context, chains: Sequence[_Chain]) -> float | None:
    """Measured ÷ estimated activations of the largest backward tile of the cheapest
    segmentation (a trunk whose statistics end segments has no single-tile rows to calibrate
    on): one real tile of that segment in a child process (CPU) or with the allocator's
    counters, its maps and statistics as the engine gives them."""
    req = ctx.req
    option = min(chains, key=lambda c: (c.cost, c.peak)).option
    index, segment = max(enumerate(option.segments), key=lambda p: p[1].tile_backward_bytes)
    if segment.tile_backward_bytes < _MIN_CALIBRATION_BYTES:
        return None
    crop = (req.batch, req.channels, *segment.tile_grid().largest_crop)
    image = (req.batch, req.channels, *req.image_shape)
    ends = tuple(s.end for s in option.segments[:-1] if s.end)
    spec = replace(_measure_spec(ctx, "tiles", image), shapes=(crop,), part=index, ends=ends)
    measured = measure_peak(spec)
    if not measured.ok or not measured.tiles:
        log.warning("measuring a segment's tile failed: %s", measured.error)
        return None
    tile = measured.tiles[0][1]
    log.info("segment %d tile %s: measured %s, estimated %s", index + 1, crop,
             format_bytes(tile), format_bytes(segment.tile_backward_bytes))  # fmt: skip
    return round(max(1.0, tile / segment.tile_backward_bytes), 4)


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


def _segmentations(
    ctx: _Context, loaded: LoadedModel, rows: Sequence[_Row], fixed: MemoryBreakdown,
    image: tuple[int, ...], cuts: Sequence[tuple[str, str]], forced: int,
) -> list[_Chain]:  # fmt: skip
    """Every segmentation that fits, priced (see ``planning.segments``); none when only one
    segment is asked for, or when the best single tile covers the whole image (no
    segmentation computes less than that). A trunk whose statistics end segments always
    has some: where they end them, and maybe cut further."""
    req = ctx.req
    if forced == 1 and (req.segments == 1 or req.tile):
        return []
    best = _choose(ctx, rows)
    if forced == 1 and not cuts and req.segments is None and best is not None and (
        best.grid.n_tiles == 1
    ):  # fmt: skip
        return []
    costs = _costs(ctx, fixed)
    if cuts:
        search = SegmentSearch(loaded.trunk, image, cuts, costs)
        priced = search.price([c for c, _ in cuts])
        if priced is None and costs.host_allowed:
            priced = search.price([c for c, _ in cuts], on_host=True)
        found = [priced] if priced is not None else []
    elif forced > 1:  # where statistics end segments, and up to two more cuts
        search = SegmentSearch(loaded.trunk, image, [], costs)
        ends = {e for part in search.program(()).streams for e in part.end.split(",")}
        options = [c for c in candidate_cuts(loaded.trunk, n_axes=loaded.n_axes)
                   if c[0] not in ends]  # fmt: skip
        search.cuts = options
        found = search.search([k for k in (1, *_AUTO_SEGMENTS) if k - 1 <= len(options)])
    else:
        options = candidate_cuts(loaded.trunk, n_axes=loaded.n_axes)
        counts = [req.segments] if req.segments else list(_AUTO_SEGMENTS)
        counts = [k for k in counts if k - 1 <= len(options)]
        if req.segments and not counts:
            raise ValueError(
                f"--segments {req.segments}: the trunk has only {len(options)} place(s) to cut "
                f"between its stages ({', '.join(w for _, w in options) or 'none'}); ask for "
                "fewer, or name cuts with --cut"
            )
        found = SegmentSearch(loaded.trunk, image, options, costs).search(counts)
    log.info("%d segmentation(s) fit", len(found))
    return [_Chain(option, cost) for cost, option in found]


def _costs(ctx: _Context, fixed: MemoryBreakdown) -> Costs:
    req = ctx.req
    return Costs(
        fixed=fixed, usable_bytes=ctx.usable, dtype=req.precision.dtype,
        time_fit=ctx.time_fit, factor=ctx.factor or 1.0,
        maps_in_device_memory=ctx.info.device == "cpu",
        host_allowed=ctx.info.device != "cpu", max_tile=req.max_tile,
    )  # fmt: skip


def _pick(ctx: _Context, rows: Sequence[_Row], chains: Sequence[_Chain], single: bool
          ) -> _Option | None:  # fmt: skip
    """The fastest option that fits and has not failed (ties: the smaller peak)."""
    options: list[tuple[float, int, _Option]] = []
    row = _choose(ctx, rows) if single else None
    if row is not None:
        forward = _forward_tile(ctx, rows, row)
        _, cost = ctx.predict(forward.grid, row.grid)
        options.append((cost, ctx.peak(row), _Single(row, forward, cost)))
    for option in chains:
        if option.step_error is None and option.peak <= ctx.usable:
            options.append((option.cost, option.peak, option))
    if not options:
        return None
    return min(options, key=lambda o: (o[0], o[1]))[2]


def _verify(
    ctx: _Context, rows: list[_Row], chains: list[_Chain], chosen: _Option, single: bool
) -> tuple[_Option | None, Verification]:
    """One real streaming step for the chosen option; choose again if it does not fit."""
    req = ctx.req
    time_s = _time_s(ctx, chosen)
    if req.verify is False or (req.verify is None and not req.measure):
        return chosen, Verification(status=VerifyStatus.OFF)
    if req.verify is None and (time_s is None or time_s > req.verify_limit_s):
        return chosen, Verification(status=VerifyStatus.TOO_SLOW, limit_s=req.verify_limit_s)
    error = ""
    image = (req.batch, req.channels, *req.image_shape)
    for _ in range(_VERIFY_TRIES):
        if isinstance(chosen, _Single):
            spec = _measure_spec(ctx, "step", image, chosen.row.tile, chosen.forward.tile)
        else:
            spec = replace(_measure_spec(ctx, "step", image),
                           segments=MeasureSpec.chain_of(chosen.option.segments))  # fmt: skip
        measured = measure_peak(spec, timeout_s=max(600.0, 5 * (_time_s(ctx, chosen) or 0.0)))
        target = chosen.row if isinstance(chosen, _Single) else chosen
        target.measured_step = measured.peak_bytes
        if measured.ok and measured.peak_bytes is not None and measured.peak_bytes <= ctx.usable:
            return chosen, Verification(
                status=VerifyStatus.VERIFIED, device=ctx.info.device,
                peak_bytes=measured.peak_bytes, step_s=round(measured.seconds or 0.0, 3),
            )  # fmt: skip
        error = measured.error or "measured peak exceeds the usable budget"
        target.step_error = error
        log.warning("%s failed verification: %s", _describe(chosen), error)
        nxt = _pick(ctx, rows, chains, single)
        if nxt is None:
            return None, Verification(status=VerifyStatus.FAILED, error=error)
        chosen = nxt
    return chosen, Verification(status=VerifyStatus.FAILED, error=error)


def _time_s(ctx: _Context, option: _Option) -> float | None:
    """Predicted seconds per image (None when tiles were not timed)."""
    if isinstance(option, _Single):
        return ctx.predict(option.forward.grid, option.row.grid)[0]
    return option.option.predicted_time_s


def _describe(option: _Option) -> str:
    if isinstance(option, _Single):
        return f"tile {option.row.tile}"
    return f"segmentation at {option.option.label}"


def _layers(loaded: LoadedModel, geometry: TrunkGeometry, image: tuple[int, ...],
            chosen: _Option, dtype: torch.dtype) -> tuple[LayerMemory, ...]:  # fmt: skip
    """Per-layer memory at the whole image and at one of the chosen tiles: for a
    segmentation, each segment's layers at its own tile, numbered by segment."""
    if isinstance(chosen, _Single):
        crop = (*image[:2], *chosen.row.grid.largest_crop)
        return layer_memory(loaded.trunk, geometry, image, crop, dtype)
    segments = chosen.option.segments
    ends = [s.end for s in segments[:-1] if s.end]
    n_axes = len(image) - 2
    points = set(map_cut_points(loaded.trunk, n_axes))
    program = build_program(loaded.trunk, n_axes, [e for e in ends if e in points])
    shapes = layer_shapes(loaded.trunk, image[1], geometry)
    layers: list[LayerMemory] = []
    for index, (part, segment) in enumerate(zip(program.streams, segments, strict=True)):
        shape = (image[0], image[1], *segment.input_shape_px)
        crop = (image[0], image[1], *segment.tile_grid().largest_crop)
        found = layer_memory(part.module, part.geometry, shape, crop, dtype, shapes=shapes)
        layers += [replace(layer, segment=index) for layer in found]
    return tuple(layers)


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
    chains: Sequence[_Chain],
    chosen: _Option,
    budget: int,
    verification: Verification,
    conventional: Conventional,
    layers: tuple[LayerMemory, ...],
    program: Program,
) -> Plan:
    req, info = ctx.req, ctx.info
    time_s = _time_s(ctx, chosen)
    if isinstance(chosen, _Single):
        row = chosen.row
        tile, forward_tile = row.tile, chosen.forward.tile
        peak, measured, segments = ctx.memory(row).total_bytes, row.measured_step, ()
        output_shape = row.grid.output_shape
    else:
        first = chosen.option.segments[0]
        tile, forward_tile = first.tile_px, first.forward_tile_px
        peak, measured = chosen.option.estimated_peak_bytes, chosen.measured_step
        segments = chosen.option.segments
        output_shape = chosen.option.segments[-1].output_shape
    ranked = sorted(chains, key=lambda c: (c.cost, c.peak))[:_KEPT_SEGMENTATIONS]
    if isinstance(chosen, _Chain) and chosen not in ranked:
        ranked.append(chosen)
    return Plan(
        provenance=Provenance(
            tool=f"tileplan {tileplan.__version__}",
            torch=str(torch.__version__),
            device=info.device,
            device_name=info.name,
            device_total_bytes=info.total_bytes,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            host_allocator=host_allocator() if info.device == "cpu" else "",
        ),
        model=ModelIdentity(
            file=req.model_label or str(req.model_file),
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
        output_shape=output_shape,
        budget_bytes=budget,
        margin=req.margin,
        tile_px=tile,
        forward_tile_px=forward_tile,
        predicted_peak_bytes=peak,
        predicted_time_s=None if time_s is None else round(time_s, 3),
        measured_peak_bytes=measured,
        verification=verification,
        calibration_factor=ctx.factor,
        time_fit=ctx.time_fit,
        conventional_peak_bytes=conventional.peak_bytes,
        conventional_measured=False,
        trunk_activation_bytes=conventional.trunk_bytes,
        head_activation_bytes=conventional.head_bytes,
        candidates=_candidates(ctx, rows),
        layers=layers,
        segments=segments,
        segmentations=tuple(c.recorded() for c in ranked),
        statistics=tuple(
            Statistic(node=r.node, kind=r.kind, source=r.source, where=r.where)
            for r in program.reductions
        ),
        batch_norm=req.batch_norm,  # type: ignore[arg-type]
    )
