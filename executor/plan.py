"""The plan file: the YAML contract between the planner (``tileplan``) and the executor.

A plan says how to stream one model on one image shape and dtype: which tiles, and what that
was predicted (and measured) to cost. It records where it came from (tool, torch, device, date)
and a fingerprint of the trunk's architecture, so a plan made for another model, image shape or
dtype is refused with a clear message rather than silently mis-used.

Every record here is a frozen dataclass with typed fields whose keys carry units (``_px``,
``_bytes``, ``_s``); each checks its invariants when it is built, in code or from a file (see
``executor.serde``), so a plan whose numbers contradict each other cannot exist. The tile grids
a plan states are re-derived from its own geometry when it is built, and from the model by
``check_plan_matches`` (``tileplan validate``, ``StreamingCNN.from_plan``), so an edited or
stale plan is refused.

``save_plan`` writes atomically and ``load_plan(save_plan(p))`` returns a plan equal to ``p``.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from torch import nn

from executor.errors import ContractError, GeometryError
from executor.fileio import atomic_write
from executor.geometry import (
    AxisGeometry,
    TileGrid,
    TrunkGeometry,
    analyze_trunk,
    build_tile_grid,
)
from executor.precision import DtypeName, Precision
from executor.program import Program, build_program
from executor.segments import map_cut_points
from executor.serde import from_data, to_data, to_yaml

__all__ = [
    "BATCH_NORM_MODES",
    "OPTIMIZER_NAMES",
    "SCHEMA_VERSION",
    "BatchNormMode",
    "Candidate",
    "FrozenPhase",
    "LayerMemory",
    "MemoryBreakdown",
    "ModelIdentity",
    "OptimizerName",
    "Plan",
    "PlanError",
    "Provenance",
    "Statistic",
    "TimeFit",
    "TimeSample",
    "Verification",
    "VerifyStatus",
    "check_plan_matches",
    "check_same_model",
    "load_plan",
    "save_plan",
    "trunk_fingerprint",
]

SCHEMA_VERSION = 2

OptimizerName = Literal["adam", "adamw", "sgd"]
OPTIMIZER_NAMES: tuple[str, ...] = get_args(OptimizerName)
BatchNormMode = Literal["frozen", "train"]
BATCH_NORM_MODES: tuple[str, ...] = get_args(BatchNormMode)


class PlanError(ContractError):
    """A plan file is unreadable, malformed, inconsistent, or made for something else."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(message)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(v) for v in shape)


def _check_numbers(
    label: str, stated: Any, geometry: TrunkGeometry, input_shape: Sequence[int]
) -> None:
    """The stride, halos, alignment and output shape ``stated`` must be the trunk's."""
    try:
        output_shape = geometry.output_shape(input_shape)
    except GeometryError as err:
        raise PlanError(f"{label}'s input does not fit this trunk: {err}") from None
    derived = {
        "output_stride_px": geometry.output_stride,
        "halo_lo_px": geometry.halo_lo,
        "halo_hi_px": geometry.halo_hi,
        "align_px": geometry.align,
        "output_shape": output_shape,
    }
    for name, value in derived.items():
        value_stated = getattr(stated, name)
        if tuple(value_stated) != tuple(value):
            raise PlanError(
                f"{label} states {name} {list(value_stated)} but the model gives {list(value)} "
                f"for {_shape_text(input_shape)} px; the plan is stale or edited: re-run "
                "`tileplan profile`"
            )


def trunk_fingerprint(trunk: nn.Module) -> str:
    """Fingerprint of the trunk's architecture and parameter shapes (not its weights).

    Two trunks get the same fingerprint when they have the same module tree (types and their
    configuration, e.g. kernel sizes and strides) and the same parameter and buffer shapes.
    """
    digest = hashlib.sha256()
    for name, module in trunk.named_modules():
        digest.update(f"{name}|{type(module).__qualname__}|{module.extra_repr()}\n".encode())
    for name, tensor in (*trunk.named_parameters(), *trunk.named_buffers()):
        digest.update(f"{name}|{tuple(tensor.shape)}\n".encode())
    return "sha256:" + digest.hexdigest()[:32]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """Where a plan came from."""

    tool: str  # e.g. "tileplan 0.2.0"
    torch: str  # torch version
    device: str  # "cpu" or "cuda:N"
    device_name: str
    device_total_bytes: int  # 0 when planned for a device that was not present
    created: str  # ISO 8601, UTC
    # CPU plans: the host allocator setting the measurements ran under, which a run must
    # share for its peak to be the plan's ("" when unknown or the platform's default).
    host_allocator: str = ""


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """Which model and split a plan is for."""

    file: str  # the model file as given to `tileplan profile`
    entry: str  # "build_model()" or "model"
    split: str  # where the trunk ends, in words
    split_option: str  # the --split option ("auto" or a module name), to split it again
    trunk_class: str
    model_class: str
    parameter_count: int
    trunk_fingerprint: str  # see trunk_fingerprint()
    stopped_by: str | None = None  # why an automatic split ends there (the refused layer after)


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Peak memory of one streaming step, by category (bytes)."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    image_bytes: int  # the whole image, when it lives in the device's memory (CPU)
    output_bytes: int  # the trunk's full output map ...
    output_grad_bytes: int  # ... and its gradient
    head_bytes: int  # the head's activations and transients
    tile_forward_bytes: int  # one no-grad forward tile's transient peak
    tile_backward_bytes: int  # one tile's forward-with-grad + backward peak
    maps_bytes: int = 0  # segmented: the cut maps and their gradients alive at the peak

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _require(value >= 0, f"{f.name} is {value}; memory cannot be negative")

    @property
    def total_bytes(self) -> int:
        """Predicted peak: state and maps plus the larger of the two tile phases."""
        return sum(self.categories().values())

    def categories(self) -> dict[str, int]:
        """The peak by category, named for people, in display order; sums to the total."""
        return {
            "parameters": self.params_bytes,
            "gradients": self.grads_bytes,
            "optimizer state": self.optimizer_bytes,
            "image": self.image_bytes,
            "trunk output + gradient": self.output_bytes + self.output_grad_bytes,
            "cut maps": self.maps_bytes,
            "head": self.head_bytes,
            "tile activations": max(self.tile_forward_bytes, self.tile_backward_bytes),
        }

    def scaled(self, factor: float) -> MemoryBreakdown:
        """Tile activations scaled by a calibration ``factor`` (measured ÷ estimated)."""
        return replace(
            self,
            tile_forward_bytes=round(self.tile_forward_bytes * factor),
            tile_backward_bytes=round(self.tile_backward_bytes * factor),
        )


@dataclass(frozen=True, kw_only=True)
class TimeSample:
    """One timed crop: input pixels (batch x spatial; channels are not counted) and seconds
    per pass."""

    crop_px: int
    forward_s: float  # no-grad forward
    step_s: float  # forward with grad + backward


@dataclass(frozen=True, kw_only=True)
class TimeFit:
    """Seconds per tile as ``a + b * pixels``, fitted to timings on the device.

    ``forward``: a no-grad forward tile; ``step``: a backward-pass tile (forward with grad,
    then backward).
    """

    device_name: str
    forward_a_s: float
    forward_b_s_per_px: float
    step_a_s: float
    step_b_s_per_px: float
    samples: tuple[TimeSample, ...]

    def __post_init__(self) -> None:
        coefficients = (
            self.forward_a_s, self.forward_b_s_per_px, self.step_a_s, self.step_b_s_per_px,
        )  # fmt: skip
        _require(min(coefficients) >= 0, "time fit coefficients must be >= 0")
        _require(bool(self.samples), "a time fit needs at least one timed crop")

    @staticmethod
    def pixels(crop_shape: Sequence[int]) -> int:
        """Pixels of an (N, C, *spatial) crop as the fit counts them: batch x spatial (the
        image's channels are part of the network, like its width)."""
        return crop_shape[0] * math.prod(crop_shape[2:])

    def forward_s(self, pixels: float) -> float:
        return self.forward_a_s + self.forward_b_s_per_px * pixels

    def step_s(self, pixels: float) -> float:
        return self.step_a_s + self.step_b_s_per_px * pixels

    def predict(self, forward: TileGrid, backward: TileGrid, batch: int = 1) -> float:
        """Seconds per image: every forward tile, every backward tile (forward again with grad
        + backward), less the forward of the last tile when its graph is cached (the
        executor's ``cache_last_tile``: same grid in both passes)."""
        f = [math.prod(t.input_shape) * batch for t in forward]
        b = [math.prod(t.input_shape) * batch for t in backward]
        total = sum(map(self.forward_s, f)) + sum(map(self.step_s, b))
        if forward.tile_shape == backward.tile_shape:
            total -= self.forward_s(f[-1])
        return total


class VerifyStatus(str, enum.Enum):
    """How the chosen plan was checked on the device."""

    VERIFIED = "verified"  # one real training step ran within the usable budget
    TOO_SLOW = "too_slow"  # not run: predicted to take longer than the verify limit
    OFF = "off"  # not run: turned off (--no-verify, or --no-measure)
    FAILED = "failed"  # candidates failed their real step; this one was not checked


@dataclass(frozen=True, kw_only=True)
class Verification:
    """The outcome of verifying the chosen plan with a real step.

    Attributes:
        status: what happened.
        device: where the step ran (VERIFIED).
        peak_bytes: the step's measured peak (VERIFIED).
        step_s: the step's time (VERIFIED).
        limit_s: the verify limit that a predicted step exceeded (TOO_SLOW).
        error: why the last tried candidate failed (FAILED).
    """

    status: VerifyStatus
    device: str | None = None
    peak_bytes: int | None = None
    step_s: float | None = None
    limit_s: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        needs = {
            VerifyStatus.VERIFIED: ("device", "peak_bytes", "step_s"),
            VerifyStatus.TOO_SLOW: ("limit_s",),
            VerifyStatus.FAILED: ("error",),
            VerifyStatus.OFF: (),
        }[self.status]
        for name in needs:
            _require(
                getattr(self, name) is not None, f"verification '{self.status.value}' needs {name}"
            )


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One tile shape the planner considered (its forward pass uses the same tile)."""

    tile_px: tuple[int, ...]  # aligned tile, px per axis
    grid: tuple[int, ...]  # tiles per axis
    n_tiles: int
    overlap_factor: float  # pixels processed ÷ image pixels, per pass (4 decimals)
    memory: MemoryBreakdown  # estimate (calibrated when a calibration was measured)
    estimated_peak_bytes: int  # == memory.total_bytes
    measured_peak_bytes: int | None = None  # a whole real streaming step
    measured_tile_bytes: int | None = None  # one real backward tile (activations)
    predicted_time_s: float | None  # None when no time fit was measured
    fits: bool  # predicted (or measured) peak within the usable budget, and not failed

    def __post_init__(self) -> None:
        label = _shape_text(self.tile_px)
        _require(len(self.grid) == len(self.tile_px), f"candidate {label}: grid rank differs")
        _require(
            self.n_tiles == math.prod(self.grid),
            f"candidate {label}: n_tiles {self.n_tiles} != product of grid "
            f"{_shape_text(self.grid)}",
        )
        _require(
            self.estimated_peak_bytes == self.memory.total_bytes,
            f"candidate {label}: estimated_peak_bytes {self.estimated_peak_bytes} != the "
            f"sum of its memory categories {self.memory.total_bytes}",
        )
        _require(
            self.overlap_factor >= 1.0,
            f"candidate {label}: overlap_factor {self.overlap_factor} < 1",
        )

    @property
    def peak_bytes(self) -> int:
        """The peak to plan with: measured when a real step was measured, else estimated."""
        if self.measured_peak_bytes is not None:
            return self.measured_peak_bytes
        return self.estimated_peak_bytes


def _axes(
    stride: Sequence[int], halo_lo: Sequence[int], halo_hi: Sequence[int], align: Sequence[int]
) -> tuple[AxisGeometry, ...]:
    numbers = zip(stride, halo_lo, halo_hi, align, strict=True)
    return tuple(AxisGeometry(s, lo, hi, a) for s, lo, hi, a in numbers)


def _check_grid(
    label: str, grid: Callable[[Sequence[int]], TileGrid], tile: Sequence[int],
    counts: Sequence[int], overlap: float,
) -> None:  # fmt: skip
    """A stated tile grid must be the one its geometry gives (aligned, same counts/overlap)."""
    try:
        derived = grid(tile)
    except GeometryError as err:
        raise PlanError(f"{label}: {err}") from None
    _require(
        derived.tile_shape == tuple(tile),
        f"{label} is not aligned (the grid's tile is {_shape_text(derived.tile_shape)})",
    )
    _require(
        derived.counts == tuple(counts),
        f"{label} states {_shape_text(counts)} tiles, its geometry gives "
        f"{_shape_text(derived.counts)}",
    )
    _require(
        round(derived.overlap_factor, 4) == overlap,
        f"{label} states overlap {overlap}, its geometry gives {round(derived.overlap_factor, 4)}",
    )


@dataclass(frozen=True, kw_only=True)
class Statistic:
    """A statistic of whole maps that the trunk's program computes between segments (see
    [Statistics] in ``executor.statistics``): ``kind`` over the map ``source``, at node
    ``node`` of the traced trunk (``where``: the module, for people)."""

    node: str
    kind: str
    source: str
    where: str


@dataclass(frozen=True, kw_only=True)
class Segment:
    """One segment of a segmented plan (see [Segments] in ``executor.streaming``).

    Its geometry and tiles are in positions of its own input maps: the image for the first
    segment, maps kept whole by segments before it for the others (the previous segment's
    output, a cut map; or, after a statistic, every map its part of the trunk reads).
    """

    end: str | None  # where it ends (``executor.StreamingCNN.ends``); None: the last
    where: str  # the module where it ends, for people
    input_shape_px: tuple[int, ...]  # its input map, positions per axis
    output_shape: tuple[int, ...]  # its output map
    output_stride_px: tuple[int, ...]
    halo_lo_px: tuple[int, ...]
    halo_hi_px: tuple[int, ...]
    align_px: tuple[int, ...]
    tile_px: tuple[int, ...]
    forward_tile_px: tuple[int, ...]
    grid: tuple[int, ...]  # tiles per axis of its backward pass
    n_tiles: int
    overlap_factor: float  # of its backward grid (4 decimals)
    tile_forward_bytes: int  # one forward tile's activations (calibrated estimate)
    tile_backward_bytes: int  # one backward tile's activations (calibrated estimate)
    map_bytes: int  # its output maps (cut maps, or the trunk's output for the last)
    map_on_host: bool = False  # the cut maps are kept in host memory
    predicted_time_s: float | None = None
    # What it reads (empty: the previous segment's output) and their stride (image px per
    # position; empty: the product of the strides before it).
    inputs: tuple[str, ...] = ()
    input_stride_px: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        label = f"segment ending at {self.where}"
        n = len(self.input_shape_px)
        for name in ("output_shape", "output_stride_px", "halo_lo_px", "halo_hi_px", "align_px",
                     "tile_px", "forward_tile_px", "grid"):  # fmt: skip
            _require(len(getattr(self, name)) == n, f"{label}: {name} has the wrong rank")
        _require(self.n_tiles == math.prod(self.grid), f"{label}: n_tiles != product of grid")
        _check_grid(f"{label}, tile {_shape_text(self.tile_px)}", self.tile_grid, self.tile_px,
                    self.grid, self.overlap_factor)  # fmt: skip
        try:
            self.tile_grid(self.forward_tile_px)
        except GeometryError as err:
            raise PlanError(f"{label}: forward tile: {err}") from None
        _require(min(self.tile_forward_bytes, self.tile_backward_bytes, self.map_bytes) >= 0,
                 f"{label}: memory cannot be negative")  # fmt: skip

    def tile_grid(self, tile: Sequence[int] | None = None) -> TileGrid:
        """A grid over the segment's input map from its recorded geometry."""
        axes = _axes(self.output_stride_px, self.halo_lo_px, self.halo_hi_px, self.align_px)
        return build_tile_grid(axes, self.input_shape_px, self.output_shape, tile or self.tile_px)


@dataclass(frozen=True, kw_only=True)
class FrozenPhase:
    """The first phase of staged fine-tuning (``tileplan train --freeze``): the trunk's
    parameters up to ``freeze`` fixed. The plan's segments serve both phases; in this one its
    first ``frozen_segments`` stream forward only (no backward tile, no gradient of the maps
    they make) and only the other parameters have gradients and optimizer state, so it needs
    ``memory`` at its peak and ``predicted_time_s`` per step.
    """

    freeze: str  # the module (or node) the frozen prefix ends with: a cut of the plan
    frozen_segments: int
    memory: MemoryBreakdown
    estimated_peak_bytes: int  # == memory.total_bytes
    predicted_time_s: float | None
    cost_ratio: float  # its step's cost / the step's where everything trains (planner's unit)

    def __post_init__(self) -> None:
        _require(bool(self.freeze), "frozen_phase.freeze names no module")
        _require(self.cost_ratio > 0, "frozen_phase.cost_ratio must be positive")
        _require(self.frozen_segments >= 1, "frozen_phase.frozen_segments must be at least 1")
        _require(
            self.estimated_peak_bytes == self.memory.total_bytes,
            "frozen_phase: estimated_peak_bytes != the sum of its memory categories",
        )


@dataclass(frozen=True, kw_only=True)
class Segmentation:
    """A way to stream the trunk in segments, with each segment's tiles chosen, and its cost.

    ``memory`` is the breakdown at the step's peak (the phase whose live maps and tile are
    largest), so its total is the predicted peak.
    """

    segments: tuple[Segment, ...]
    memory: MemoryBreakdown
    estimated_peak_bytes: int  # == memory.total_bytes
    measured_peak_bytes: int | None = None  # a whole real segmented streaming step
    predicted_time_s: float | None
    fits: bool

    def __post_init__(self) -> None:
        label = f"segmentation {self.label}"
        _require(len(self.segments) >= 2, f"{label}: a segmentation has two segments or more")
        _require(
            self.estimated_peak_bytes == self.memory.total_bytes,
            f"{label}: estimated_peak_bytes != the sum of its memory categories",
        )
        for before, after in zip(self.segments, self.segments[1:], strict=False):
            _require(
                bool(after.inputs) or after.input_shape_px == before.output_shape,
                f"{label}: a segment's input is not the previous one's output",
            )
        _require(
            self.segments[-1].end is None and all(s.end for s in self.segments[:-1]),
            f"{label}: every segment but the last ends at a cut",
        )

    @property
    def cuts(self) -> tuple[str, ...]:
        return tuple(s.end for s in self.segments[:-1] if s.end)

    def stride(self) -> tuple[int, ...]:
        """The trunk's output stride as its segments make it."""
        last = self.segments[-1]
        if last.input_stride_px:
            return tuple(a * b for a, b in zip(last.input_stride_px, last.output_stride_px,
                                               strict=True))  # fmt: skip
        return tuple(
            math.prod(axis) for axis in zip(*(s.output_stride_px for s in self.segments),
                                            strict=True)
        )  # fmt: skip

    @property
    def label(self) -> str:
        return " | ".join(s.where for s in self.segments[:-1])

    @property
    def peak_bytes(self) -> int:
        if self.measured_peak_bytes is not None:
            return self.measured_peak_bytes
        return self.estimated_peak_bytes


@dataclass(frozen=True, kw_only=True)
class LayerMemory:
    """One trunk layer's output memory: for the whole image and for one tile (of its
    segment's input map, in a segmented plan)."""

    name: str
    channels: int
    full_bytes: int
    tile_bytes: int
    segment: int = 0  # index of the segment it is in


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A streaming plan for one model, image shape and dtype.

    Geometry (``output_stride_px``, halos, ``align_px``, ``output_shape``) is the trunk's, as
    ``executor.analyze_trunk`` derives it; ``tile_grid`` rebuilds any of its grids from these
    numbers alone.
    """

    schema_version: int = SCHEMA_VERSION
    provenance: Provenance
    model: ModelIdentity
    image_shape_px: tuple[int, ...]
    channels: int
    batch: int = 1
    dtype: DtypeName
    optimizer: OptimizerName
    output_stride_px: tuple[int, ...]
    halo_lo_px: tuple[int, ...]
    halo_hi_px: tuple[int, ...]
    align_px: tuple[int, ...]  # crop origins are multiples of this
    output_shape: tuple[int, ...]  # the trunk's output for the image, positions per axis
    budget_bytes: int
    margin: float  # fraction of the budget kept free
    tile_px: tuple[int, ...]  # backward-pass tile (aligned)
    forward_tile_px: tuple[int, ...]  # no-grad forward-pass tile (aligned)
    predicted_peak_bytes: int  # the chosen candidate's estimated peak
    predicted_time_s: float | None  # None when no time fit was measured
    measured_peak_bytes: int | None = None  # the chosen candidate's measured step peak
    verification: Verification
    calibration_factor: float | None = None  # measured ÷ estimated tile activations, >= 1
    time_fit: TimeFit | None = None
    conventional_peak_bytes: int
    conventional_measured: bool = False
    # A conventional step's activation memory, whole image: the trunk's and the head's.
    trunk_activation_bytes: int = 0
    head_activation_bytes: int = 0
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)
    layers: tuple[LayerMemory, ...] = field(default_factory=tuple)
    # Segmented streaming: the chosen chain (empty: one segment, the whole trunk) and the
    # segmentations considered. With segments, tile_px/forward_tile_px are the first one's.
    segments: tuple[Segment, ...] = field(default_factory=tuple)
    segmentations: tuple[Segmentation, ...] = field(default_factory=tuple)
    # Statistics of whole maps the trunk computes between its segments (global-context
    # layers), and whether its BatchNorm layers use batch statistics (``train``) or their
    # running ones (``frozen``): each changes where the trunk's segments end.
    statistics: tuple[Statistic, ...] = field(default_factory=tuple)
    batch_norm: BatchNormMode = "frozen"
    # Staged fine-tuning (``tileplan profile --freeze``): the frozen phase's own peak and time;
    # the plan's own numbers are those of the phase where everything trains.
    frozen_phase: FrozenPhase | None = None

    def __post_init__(self) -> None:
        _require(
            self.schema_version == SCHEMA_VERSION,
            f"schema_version {self.schema_version} is not {SCHEMA_VERSION}",
        )
        self._check_shapes()
        _require(
            self.frozen_phase is None
            or self.frozen_phase.frozen_segments < max(len(self.segments), 1),
            "frozen_phase: a frozen prefix ends before the last segment (plan with --freeze)",
        )
        _require(self.budget_bytes > 0, "budget_bytes must be positive")
        _require(0.0 <= self.margin < 1.0, f"margin {self.margin} must be in [0, 1)")
        _require(self.conventional_peak_bytes > 0, "conventional_peak_bytes must be positive")
        _require(
            self.calibration_factor is None or self.calibration_factor >= 1.0,
            "calibration_factor must be >= 1 (estimates count every live tensor)",
        )
        timed = [c.predicted_time_s is not None for c in self.candidates]
        timed.append(self.predicted_time_s is not None)
        _require(
            all(t == (self.time_fit is not None) for t in timed),
            "predicted times need a time_fit, and a time_fit needs predicted times",
        )
        self._check_candidates()
        self._check_chosen()

    # -- invariants ---------------------------------------------------------------------------

    def _check_shapes(self) -> None:
        n = len(self.image_shape_px)
        _require(n >= 1, "image_shape_px is empty")
        per_axis = (
            "image_shape_px", "output_stride_px", "halo_lo_px", "halo_hi_px", "align_px",
            "output_shape", "tile_px", "forward_tile_px",
        )  # fmt: skip
        for name in per_axis:
            value = getattr(self, name)
            _require(len(value) == n, f"{name} has {len(value)} axes, image_shape_px {n}")
            low = 0 if name.startswith("halo") else 1
            _require(min(value) >= low, f"{name} {list(value)} must be >= {low}")
        _require(self.channels >= 1 and self.batch >= 1, "channels and batch must be >= 1")
        for stride, align in zip(self.output_stride_px, self.align_px, strict=True):
            _require(align % stride == 0, f"align_px {align} is not a multiple of the stride")

    def _check_candidates(self) -> None:
        usable = self.usable_bytes
        for c in self.candidates:
            label = f"candidate {_shape_text(c.tile_px)}"
            _require(len(c.tile_px) == len(self.image_shape_px), f"{label}: rank")
            _check_grid(label, self.tile_grid, c.tile_px, c.grid, c.overlap_factor)
            _require(
                not c.fits or c.peak_bytes <= usable,
                f"{label} is marked as fitting but its peak {c.peak_bytes} exceeds the usable "
                f"{usable} bytes",
            )
        for option in self.segmentations:
            _require(option.segments[0].input_shape_px == self.image_shape_px,
                     f"segmentation {option.label} starts on another image")  # fmt: skip
            _require(option.segments[-1].output_shape == self.output_shape,
                     f"segmentation {option.label} ends on another output")  # fmt: skip
            _require(
                option.stride() == self.output_stride_px,
                f"segmentation {option.label}: its strides do not make the trunk's",
            )
            _require(not option.fits or option.peak_bytes <= usable,
                     f"segmentation {option.label} is marked as fitting but exceeds the usable "
                     "budget")  # fmt: skip

    def _check_chosen(self) -> None:
        if self.segments:
            chosen_tile = (self.segments[0].tile_px, self.segments[0].forward_tile_px)
            _require(
                chosen_tile == (self.tile_px, self.forward_tile_px),
                "tile_px/forward_tile_px of a segmented plan are its first segment's",
            )
        else:
            try:
                self.tile_grid(self.tile_px)
                self.tile_grid(self.forward_tile_px, forward=True)
            except GeometryError as err:
                raise PlanError(f"the chosen tiles do not fit the geometry: {err}") from None
        chosen = self.chosen
        if self.candidates or self.segments:
            what = "segmentation" if self.segments else f"tile {_shape_text(self.tile_px)}"
            _require(chosen is not None, f"the chosen {what} is not one of those considered")
            assert chosen is not None
            _require(chosen.fits, f"the chosen {what} does not fit")
            _require(
                self.predicted_peak_bytes == chosen.estimated_peak_bytes,
                f"predicted_peak_bytes {self.predicted_peak_bytes} != the chosen "
                f"{what}'s estimate {chosen.estimated_peak_bytes}",
            )
            _require(
                self.measured_peak_bytes == chosen.measured_peak_bytes,
                f"measured_peak_bytes differs from the chosen {what}'s",
            )
        if self.verification.status == VerifyStatus.VERIFIED:
            _require(
                self.measured_peak_bytes == self.verification.peak_bytes,
                "a verified plan's measured_peak_bytes is the verification's peak",
            )

    # -- derived values -----------------------------------------------------------------------

    @property
    def n_axes(self) -> int:
        return len(self.image_shape_px)

    @property
    def usable_bytes(self) -> int:
        """The budget less the margin: what a plan's peak must stay under."""
        return math.floor(self.budget_bytes * (1.0 - self.margin))

    @property
    def precision(self) -> Precision:
        return Precision.of(self.dtype)

    @property
    def trunk_share(self) -> float | None:
        """The trunk's share of a conventional step's activation memory (what streaming can
        save at best), or None when it was not estimated."""
        total = self.trunk_activation_bytes + self.head_activation_bytes
        return self.trunk_activation_bytes / total if total else None

    @property
    def chosen(self) -> Candidate | Segmentation | None:
        """The chosen candidate tile, or the chosen segmentation of a segmented plan (None for
        a plan without any)."""
        if self.segments:
            return next((s for s in self.segmentations if s.segments == self.segments), None)
        return next((c for c in self.candidates if c.tile_px == self.tile_px), None)

    def ranked_segmentations(self) -> tuple[Segmentation, ...]:
        """The segmentations priced, those that fit first, then fastest first (untimed ones in
        their stored order)."""

        def rank(g: Segmentation) -> tuple[bool, float]:
            return not g.fits, math.inf if g.predicted_time_s is None else g.predicted_time_s

        return tuple(sorted(self.segmentations, key=rank))

    def tile_grids(self) -> tuple[TileGrid, ...]:
        """The backward-pass grid of each segment (one for an unsegmented plan)."""
        if self.segments:
            return tuple(s.tile_grid() for s in self.segments)
        return (self.tile_grid(),)

    @property
    def peak_bytes(self) -> int:
        """The chosen plan's peak: measured when verified, else the (calibrated) estimate."""
        if self.measured_peak_bytes is not None:
            return self.measured_peak_bytes
        return self.predicted_peak_bytes

    def axes(self) -> tuple[AxisGeometry, ...]:
        """The recorded tiling numbers per axis (of the whole trunk)."""
        return _axes(self.output_stride_px, self.halo_lo_px, self.halo_hi_px, self.align_px)

    def tile_grid(self, tile: Sequence[int] | None = None, *, forward: bool = False) -> TileGrid:
        """A tile grid over the plan's image from its recorded geometry (no model needed).

        Args:
            tile: the tile (px); default the plan's backward tile, or its forward tile with
                ``forward=True``.

        Raises:
            GeometryError: the tile does not fit the geometry.
        """
        if tile is None:
            tile = self.forward_tile_px if forward else self.tile_px
        return build_tile_grid(self.axes(), self.image_shape_px, self.output_shape, tile)

    def check_geometry(self, geometry: TrunkGeometry) -> None:
        """Refuse a plan whose geometry is not the trunk's (an edited or stale plan).

        Re-derives the output stride, halos, alignment and output shape from the trunk; the
        candidates' grids and overlaps were checked against those numbers when the plan was
        built, so they follow.

        Raises:
            PlanError: one line naming the first number that differs.
        """
        _check_numbers("the plan", self, geometry, self.image_shape_px)
        if self.segments:
            return
        for tile in (self.tile_px, self.forward_tile_px):
            try:
                geometry.tile_grid(self.image_shape_px, tile)
            except GeometryError as err:
                raise PlanError(
                    f"tile {_shape_text(tile)} does not fit this trunk: {err}"
                ) from None

    def check_segments(self, geometries: Sequence[TrunkGeometry]) -> None:
        """Refuse segments whose geometry is not that of the trunk's parts (one per segment)."""
        _require(len(geometries) == len(self.segments), "the plan's segments do not match")
        for segment, geometry in zip(self.segments, geometries, strict=True):
            label = f"the plan's segment ending at {segment.where}"
            _check_numbers(label, segment, geometry, segment.input_shape_px)
            for tile in (segment.tile_px, segment.forward_tile_px):
                try:
                    geometry.tile_grid(segment.input_shape_px, tile)
                except GeometryError as err:
                    raise PlanError(f"{label}: tile {_shape_text(tile)}: {err}") from None

    # -- (de)serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict, keys in field order."""
        return to_data(self)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the plan as YAML, atomically (``save_plan``); returns the path."""
        return save_plan(self, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of ``to_dict``; raises ``PlanError`` naming the first bad key."""
        if not isinstance(data, Mapping):
            raise PlanError("plan file does not hold a mapping; it is not a tileplan plan")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema_version is {version!r}, this tileplan reads {SCHEMA_VERSION}; "
                "re-run `tileplan profile` to make a new plan"
            )
        try:
            return from_data(cls, data, where="plan")
        except ContractError as err:
            raise PlanError(f"plan is invalid ({err}); re-run `tileplan profile`") from None


# --------------------------------------------------------------------------------------------
# Files and matching
# --------------------------------------------------------------------------------------------

_HEADER = "# tileplan streaming plan: see `tileplan validate` and `tileplan view`\n"


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write ``plan`` as YAML atomically (a crash never leaves a half-written plan)."""
    text = to_yaml(plan.to_dict(), header=_HEADER)
    return atomic_write(path, lambda f: f.write(text.encode()))


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan file; every problem is a one-line ``PlanError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(
            f"plan file '{path}' does not exist; make one with `tileplan profile`"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"cannot read plan file '{path}': {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise PlanError(f"plan file '{path}' is not valid YAML ({first})") from err
    try:
        return Plan.from_dict(data)
    except PlanError as err:
        raise PlanError(f"'{path}': {err}") from None


def _check_statistics(plan: Plan, program: Program) -> None:
    """The plan's statistics must be the ones the model computes (kind and source)."""
    derived = [(r.kind, r.source) for r in program.reductions]
    stated = [(s.kind, s.source) for s in plan.statistics]
    if derived != stated:
        first = next(
            (f"{a[0]} of {a[1]}" for a, b in zip(derived + [("", "")] * len(stated),
                                                  stated + [("", "")] * len(derived),
                                                  strict=False) if a != b),
            "",
        )  # fmt: skip
        raise PlanError(
            f"the plan states {len(stated)} statistic(s) of whole maps but this model computes "
            f"{len(derived)} (first difference: {first or 'none stated'}); re-run "
            f"`tileplan profile`{_bn_hint(plan)}"
        )


def _bn_hint(plan: Plan) -> str:
    """A hint when the plan's BatchNorm mode may be why its segments do not match."""
    if plan.batch_norm == "train":
        return " (the plan is for BatchNorm with batch statistics: train with --bn train)"
    return " (or train with the BatchNorm mode the plan was made for: --bn frozen)"


def check_same_model(plan: Plan, trunk: nn.Module) -> None:
    """Refuse a plan made for another trunk architecture (``trunk_fingerprint``).

    Raises:
        PlanError: one line with both fingerprints and what to do.
    """
    fingerprint = trunk_fingerprint(trunk)
    if plan.model.trunk_fingerprint != fingerprint:
        raise PlanError(
            f"plan was made for a different model (trunk fingerprint "
            f"{plan.model.trunk_fingerprint} != {fingerprint}); re-run `tileplan profile` "
            "for this model"
        )


def check_plan_matches(
    plan: Plan,
    trunk: nn.Module,
    *,
    image_shape: Sequence[int] | None = None,
    dtype: str | Any | None = None,
) -> None:
    """Refuse a plan made for another trunk, geometry, image shape or dtype.

    Raises:
        PlanError: one line naming what differs and what to do.
        UnsupportedLayerError: the trunk cannot be streamed at all.
    """
    check_same_model(plan, trunk)
    plan.check_geometry(analyze_trunk(trunk, plan.n_axes))
    ends = [s.end for s in plan.segments[:-1] if s.end]
    points = set(map_cut_points(trunk, plan.n_axes)) if ends else set()
    program = build_program(trunk, plan.n_axes, [e for e in ends if e in points])
    _check_statistics(plan, program)
    if plan.segments:
        derived = [p.end for p in program.streams[:-1]]
        if derived != ends:
            missing = next((e for e in ends if e not in derived and e not in points), None)
            if missing is not None and not program.reductions:
                raise PlanError(
                    f"the plan cuts the trunk at {missing}, which is not a single-map point of "
                    "this model; re-run `tileplan profile`"
                )
            raise PlanError(
                f"the plan's segments end at {', '.join(ends)} but this model's at "
                f"{', '.join(derived) or 'its output only'}; re-run `tileplan profile`"
                f"{_bn_hint(plan)}"
            )
        plan.check_segments([part.geometry for part in program.streams])
    elif len(program.streams) > 1:
        raise PlanError(
            f"the plan streams the trunk as one segment, but this model computes statistics "
            f"of whole maps between {len(program.streams)} segments; re-run `tileplan profile`"
            f"{_bn_hint(plan)}"
        )
    if image_shape is not None and tuple(image_shape) != tuple(plan.image_shape_px):
        raise PlanError(
            f"plan was made for images of {_shape_text(plan.image_shape_px)} px, not "
            f"{_shape_text(image_shape)}; re-run `tileplan profile --image ...` for this size"
        )
    if dtype is not None:
        name = Precision.of(dtype).name
        if name != plan.dtype:
            raise PlanError(
                f"plan was made for dtype {plan.dtype}, not {name}; re-run `tileplan profile "
                f"--dtype {name}`"
            )
