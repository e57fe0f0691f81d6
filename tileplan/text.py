"""Plans, verification and run reports in words: what the CLI prints and the HTML page states.

Pure formatting of typed records; nothing here computes a number.
"""

from __future__ import annotations

from collections.abc import Sequence

from executor import Candidate, Plan, Segmentation, VerifyStatus
from tileplan.run.report import RunReport
from tileplan.units import format_bytes, format_shape

__all__ = [
    "describe_segmentations",
    "describe_segments",
    "describe_statistics",
    "describe_time",
    "describe_trunk",
    "shallow_trunk_note",
    "describe_verification",
    "render_report",
    "render_table",
    "summary",
]


def render_table(candidates: Sequence[Candidate], chosen: Sequence[int] | None = None) -> str:
    """The candidates as a fixed-width table, the chosen tile's row marked with '>'.

    The time column is seconds per image when tiles were timed on the device, else '-'.
    """
    head = (f"  {'tile':>11} {'tiles':>7} {'overlap':>7} {'est. peak':>10} {'meas. tile':>10} "
            f"{'meas. step':>10} {'s/image':>9} {'fits':>4}")  # fmt: skip
    lines = [head]
    for c in candidates:
        mark = ">" if chosen is not None and tuple(c.tile_px) == tuple(chosen) else " "
        seconds = "-" if c.predicted_time_s is None else f"{c.predicted_time_s:.1f}"
        lines.append(
            f"{mark} {format_shape(c.tile_px):>11} {format_shape(c.grid):>7} "
            f"{c.overlap_factor:>7.2f} {format_bytes(c.estimated_peak_bytes):>10} "
            f"{format_bytes(c.measured_tile_bytes):>10} {format_bytes(c.measured_peak_bytes):>10} "
            f"{seconds:>9} {'yes' if c.fits else 'no':>4}"
        )
    return "\n".join(lines)


# A trunk is shallow below this share of a conventional step's activation memory, or below
# this output stride when the head holds a noticeable share too (a small network whose whole
# body streams is not shallow, whatever its stride).
SHALLOW_SHARE = 0.5
SHALLOW_STRIDE = 8
NOTICEABLE_HEAD = 0.25


def shallow_trunk_note(
    *, split: str, stride: Sequence[int], stopped_by: str | None, trunk_bytes: int,
    head_bytes: int,
) -> str | None:  # fmt: skip
    """One line saying that little of the model streams and why, or None when the trunk is
    deep enough to matter."""
    total = trunk_bytes + head_bytes
    share = trunk_bytes / total if total else 1.0
    strided = min(stride) >= SHALLOW_STRIDE or share >= 1.0 - NOTICEABLE_HEAD
    if strided and share >= SHALLOW_SHARE:
        return None
    why = f", stopped by {stopped_by}" if stopped_by else ""
    return (
        f"only a shallow part of the model streams: {split} (output stride "
        f"{format_shape(stride)}){why}. The trunk holds {share:.0%} of a conventional step's "
        f"activation memory ({format_bytes(trunk_bytes)} of {format_bytes(total)}): that is the "
        "most streaming can save"
    )


def describe_trunk(plan: Plan) -> list[str]:
    """Where the trunk ends and its output stride, and first a warning when it is shallow."""
    note = shallow_trunk_note(
        split=plan.model.split, stride=plan.output_stride_px, stopped_by=plan.model.stopped_by,
        trunk_bytes=plan.trunk_activation_bytes, head_bytes=plan.head_activation_bytes,
    )  # fmt: skip
    lines = [f"warning: {note}"] if note else []
    lines.append(f"trunk: {plan.model.split}, output stride {format_shape(plan.output_stride_px)}")
    lines += describe_statistics(plan)
    return lines


def describe_statistics(plan: Plan) -> list[str]:
    """The statistics of whole maps that end segments, and what the plan does about them
    (nothing for a trunk of local layers)."""
    if not plan.statistics:
        return []
    kinds: dict[str, int] = {}
    for stat in plan.statistics:
        kinds[stat.kind] = kinds.get(stat.kind, 0) + 1
    listed = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    bn = " (BatchNorm with batch statistics)" if plan.batch_norm == "train" else ""
    first = plan.statistics[0].where
    return [
        f"statistics of whole maps{bn}: {len(plan.statistics)} ({listed}; the first at "
        f"{first}): each ends a segment, and the maps it reduces are kept whole until the "
        "backward pass (stored; recomputing them instead is not implemented)"
    ]


def describe_time(plan: Plan) -> str:
    """The predicted time per image and where it comes from."""
    if plan.predicted_time_s is None or plan.time_fit is None:
        return "not predicted (tiles were not timed: --no-measure)"
    fit = plan.time_fit
    return (
        f"{plan.predicted_time_s:.3g} s (tile timings on {fit.device_name}: "
        f"{len(fit.samples)} crop sizes, a + b*px fit)"
    )


def describe_verification(plan: Plan) -> str:
    """How the chosen plan was checked, in one line."""
    v = plan.verification
    if v.status == VerifyStatus.VERIFIED:
        assert v.peak_bytes is not None
        assert v.step_s is not None
        delta = v.peak_bytes / plan.predicted_peak_bytes - 1.0
        return (
            f"verified: one real streaming step on {v.device} peaked at "
            f"{format_bytes(v.peak_bytes)} (predicted {format_bytes(plan.predicted_peak_bytes)}, "
            f"{delta:+.0%}) in {v.step_s:.1f} s"
        )
    if v.status == VerifyStatus.TOO_SLOW:
        return (
            f"not verified: a step is predicted to take longer than --verify-limit "
            f"{v.limit_s:.0f} s; run with --verify to check it"
        )
    if v.status == VerifyStatus.FAILED:
        return f"not verified: candidates failed their real step ({v.error}); run with --verify"
    return "not verified (turned off); run with --verify to check it"


def summary(plan: Plan) -> str:
    """One line: the chosen tile (or segmentation), its peak, and what conventional backprop
    would need."""
    kind = "measured" if plan.measured_peak_bytes is not None else "predicted"
    conventional = "measured" if plan.conventional_measured else "estimate"
    n = sum(grid.n_tiles for grid in plan.tile_grids())
    if plan.segments:
        chosen = f"{len(plan.segments)} segments, {n} tiles in all"
    else:
        forward = ""
        if plan.forward_tile_px != plan.tile_px:
            forward = f" (forward pass {format_shape(plan.forward_tile_px)})"
        chosen = f"tile {format_shape(plan.tile_px)}{forward}, {n} tiles"
    return (
        f"{chosen}, {kind} peak {format_bytes(plan.peak_bytes)} of "
        f"{format_bytes(plan.budget_bytes)}, conventional would need "
        f"{format_bytes(plan.conventional_peak_bytes)} ({conventional})"
    )


def describe_frozen_phase(plan: Plan) -> list[str]:
    """``profile --freeze``: the frozen phase's peak and time beside the plan's (nothing
    without one)."""
    phase = plan.frozen_phase
    if phase is None:
        return []
    n = phase.frozen_segments
    what = "segment 1 streams" if n == 1 else f"segments 1-{n} stream"
    if phase.predicted_time_s is not None and plan.predicted_time_s:
        time = f"{phase.predicted_time_s:.2f} s/image vs {plan.predicted_time_s:.2f} s"
    else:
        time = f"{phase.cost_ratio:.2f}x the computation"
    return [
        f"frozen phase (train --freeze {phase.freeze}): {what} forward only; predicted peak "
        f"{format_bytes(phase.estimated_peak_bytes)} vs {format_bytes(plan.peak_bytes)} with "
        f"everything training, {time}"
    ]


def describe_segments(plan: Plan) -> list[str]:
    """The chosen segmentation as a table, one row per segment (nothing for one segment)."""
    if not plan.segments:
        return []
    lines = [
        f"streamed in {len(plan.segments)} segments (cut maps kept whole between them):",
        f"  {'#':>2} {'ends at':<34} {'input':>11} {'tile':>11} {'forward':>11} {'tiles':>7} "
        f"{'overlap':>7} {'map':>9} {'s/image':>8}",
    ]
    for i, s in enumerate(plan.segments, 1):
        seconds = "-" if s.predicted_time_s is None else f"{s.predicted_time_s:.1f}"
        where = "the trunk's output" if s.end is None else s.where
        place = " (host)" if s.map_on_host else ""
        lines.append(
            f"  {i:>2} {where[:34]:<34} {format_shape(s.input_shape_px):>11} "
            f"{format_shape(s.tile_px):>11} {format_shape(s.forward_tile_px):>11} "
            f"{format_shape(s.grid):>7} {s.overlap_factor:>7.2f} "
            f"{format_bytes(s.map_bytes) + place:>9} {seconds:>8}"
        )
    return lines


def describe_segmentations(plan: Plan) -> list[str]:
    """The segmentations the planner priced (the cheapest few and the chosen one), fastest
    first; the chosen one marked with ``*``."""
    if not plan.segmentations:
        return []
    chosen = plan.chosen
    lines = [
        "segmentations considered (cut after | backward tile per segment):",
        f"  {'':1} {'cuts':<34} {'tiles':<34} {'est. peak':>10} {'s/image':>8} fits",
    ]
    for g in plan.ranked_segmentations():
        mark = "*" if g == chosen else " "
        tiles = " | ".join(format_shape(s.tile_px) for s in g.segments)
        seconds = "-" if g.predicted_time_s is None else f"{g.predicted_time_s:.1f}"
        lines.append(
            f"  {mark} {_label(g)[:34]:<34} {tiles[:34]:<34} {format_bytes(g.peak_bytes):>10} "
            f"{seconds:>8} {'yes' if g.fits else 'no'}"
        )
    return lines


def _label(option: Segmentation) -> str:
    """Where a segmentation cuts: the cuts chosen, after those that statistics make."""
    forced = sum(s.where.startswith("before ") for s in option.segments[:-1])
    cuts = [s.where for s in option.segments[:-1] if not s.where.startswith("before ")]
    if not forced:
        return option.label
    extra = " | ".join(cuts) if cuts else "no other cut"
    return f"{forced} statistics + {extra}"


def render_report(r: RunReport) -> str:
    """The memory-savings report as text."""
    kind = "measured" if r.conventional_measured else "estimated"
    lines = [
        f"run {r.run} on {r.device}: image {format_shape(r.image_shape_px)} "
        f"{'voxels' if len(r.image_shape_px) == 3 else 'px'}, tile "
        f"{format_shape(r.tile_px)} ({r.n_tiles} tiles)",
        f"  streaming step peak    {format_bytes(r.streaming_peak_bytes):>10}  (measured: "
        f"{r.describe_measurement()})",
        f"  conventional step peak {format_bytes(r.conventional_peak_bytes):>10}  ({kind})",
        f"  saved per image        {format_bytes(r.saved_bytes):>10}  (streaming = {r.ratio:.1%} "
        "of conventional)",
        f"  time per image         {r.streaming_time_per_image_s:>8.2f} s"
        + (f" (conventional step {r.conventional_time_per_image_s:.2f} s)"
           if r.conventional_time_per_image_s else ""),
    ]  # fmt: skip
    if r.breakdown is not None:
        lines.append("  breakdown of the streaming step (the plan's estimate):")
        for name, value in r.breakdown.categories().items():
            lines.append(f"    {name:<24} {format_bytes(value):>10}")
    return "\n".join(lines)
