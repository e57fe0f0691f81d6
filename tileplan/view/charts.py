"""Interactive memory charts of a plan and of a run: pure figure construction, no I/O.

Every function takes the typed ``Plan`` / ``RunReport`` (and metrics rows) and returns plotly
figures; ``tileplan.html_report`` writes them to a page. Bytes are shown in GiB (1024**3) unless
a chart says otherwise. Missing data (no measurements, no per-layer table, no metrics) never
raises: the chart is still drawn, with an annotation that says what is missing.

The tile-size axis of the memory and time charts is *categorical*: one slot per candidate,
ordered by tile area, labelled with the tile's side in px (``2048``) or ``HxW`` (``2048x1536``)
when it is not square. Candidates are spaced evenly, so the many small tiles stay readable
next to the few large ones, and non-square shapes get their own slot.

The tile grid comes from the engine: ``Plan.tile_grid`` rebuilds it from the plan's recorded
geometry with the executor's own rule (``executor.build_tile_grid``), so the chart draws
exactly the tiles that run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from executor import AxisTile, Candidate, GeometryError, Plan, TileGrid, to_data
from tileplan.run.report import EpochMetrics, RunReport
from tileplan.units import GIB, MIB, format_shape

__all__ = [
    "MAX_DRAWN_TILES",
    "PlanCharts",
    "RunCharts",
    "layers_figure",
    "memory_time_figure",
    "metrics_figure",
    "plan_charts",
    "run_charts",
    "tile_grid_figure",
    "tile_label",
    "timeline_figure",
]

MAX_DRAWN_TILES = 2500  # larger grids are drawn as their top-left block (about 50 x 50)

_TEMPLATE = "plotly_white"
_FONT = {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 13}
# One per MemoryBreakdown category, in its order (the cut maps pink, the tile red).
_CATEGORY_COLORS = (
    "#4c78a8", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d", "#e45756",
)  # fmt: skip
# One per segment of a segmented plan's per-layer chart.
_SEGMENT_COLORS = ("#4c78a8", "#54a24b", "#b279a2", "#9d755d", "#17becf")
_MISSING = {"size": 13, "color": "#8a5a00"}


@dataclass(frozen=True)
class PlanCharts:
    """The charts of one plan.

    Attributes:
        memory_time: peak memory by category (top) and predicted time (bottom) per candidate
            tile, sharing the tile axis.
        tile_grid: the chosen tile grid over the image.
        layers: per-layer activation memory, whole image vs one tile.
        segments: a segmented plan's segmentations (memory with the cut maps, time).
        segment_grids: a segmented plan's grids over segments 2, 3... (their input maps).
    """

    memory_time: go.Figure
    tile_grid: go.Figure
    layers: go.Figure
    segments: go.Figure | None = None
    segment_grids: tuple[go.Figure, ...] = ()

    def figures(self) -> tuple[go.Figure, ...]:
        extra = (self.segments,) if self.segments is not None else ()
        return (self.memory_time, *extra, self.tile_grid, *self.segment_grids, self.layers)


@dataclass(frozen=True)
class RunCharts:
    """The charts of one run.

    Attributes:
        timeline: memory over one streaming step vs one conventional step.
        metrics: per-epoch loss and accuracy/AUC.
    """

    timeline: go.Figure
    metrics: go.Figure

    def figures(self) -> tuple[go.Figure, ...]:
        return (self.timeline, self.metrics)


def plan_charts(plan: Plan) -> PlanCharts:
    """All charts of a plan."""
    return PlanCharts(
        memory_time=memory_time_figure(plan),
        tile_grid=tile_grid_figure(plan),
        layers=layers_figure(plan),
        segments=segments_figure(plan) if plan.segmentations else None,
        segment_grids=tuple(tile_grid_figure(plan, k) for k in range(1, len(plan.segments))),
    )


def run_charts(report: RunReport, metrics: Sequence[EpochMetrics]) -> RunCharts:
    """All charts of a run (``metrics``: the rows of ``metrics.jsonl``)."""
    rows = [to_data(row) for row in metrics]
    return RunCharts(timeline=timeline_figure(report), metrics=metrics_figure(rows))


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def tile_label(tile: Sequence[int]) -> str:
    """``(2048, 2048)`` -> ``'2048'``; ``(2048, 1536)`` -> ``'2048x1536'``."""
    if len(set(tile)) == 1:
        return str(tile[0])
    return "x".join(str(v) for v in tile)


def _gib(n: float | None) -> float | None:
    return None if n is None else n / GIB


def _fmt_gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.01 * GIB else f"{n / MIB:.1f} MiB"


def _base_layout(fig: go.Figure, title: str, height: int) -> None:
    fig.update_layout(
        template=_TEMPLATE,
        title={
            "text": title,
            "x": 0.01,
            "xanchor": "left",
            "yref": "container",
            "y": 1.0,
            "yanchor": "top",
            "pad": {"t": 14},
        },
        font=_FONT,
        height=height,
        margin={"l": 70, "r": 30, "t": 125, "b": 60},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0.0},
        hoverlabel={"namelength": -1},
    )


def _note(fig: go.Figure, text: str, *, y: float = 0.5) -> None:
    """An annotation in the middle of the plot area saying what is missing."""
    fig.add_annotation(
        text=text, xref="paper", yref="paper", x=0.5, y=y, showarrow=False, font=_MISSING,
        bgcolor="rgba(255,248,230,0.9)", bordercolor="#e0c080", borderpad=6,
    )  # fmt: skip


def _hline(fig: go.Figure, y: float, name: str, color: str, dash: str, **where: Any) -> None:
    """A horizontal reference line that has a legend entry (click to hide) and a label."""
    fig.add_hline(
        y=y, line={"color": color, "dash": dash, "width": 2}, name=name, showlegend=True,
        label={"text": name, "textposition": "end", "font": {"size": 11, "color": color}},
        **where,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# 1 + 2: memory and time per candidate tile
# --------------------------------------------------------------------------------------------


def _sorted_candidates(plan: Plan) -> list[Candidate]:
    return sorted(plan.candidates, key=lambda c: math.prod(c.tile_px))


def _memory_traces(fig: go.Figure, cands: Sequence[Candidate], labels: list[str]) -> None:
    per_category = [c.memory.categories() for c in cands]
    names = list(per_category[0]) if per_category else []
    for name, color in zip(names, _CATEGORY_COLORS[: len(names)], strict=True):
        fig.add_trace(
            go.Bar(
                x=labels, y=[row[name] / GIB for row in per_category], name=name,
                marker_color=color, legendgroup="categories",
                hovertemplate=f"{name}: %{{y:.3f}} GiB<extra></extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
    fits = ["yes" if c.fits else "no" for c in cands]
    fig.add_trace(
        go.Scatter(
            x=labels, y=[c.estimated_peak_bytes / GIB for c in cands], name="estimated peak",
            mode="markers", marker={"symbol": "line-ew-open", "size": 18, "color": "#333"},
            customdata=[
                [f, format_shape(c.grid), c.n_tiles] for f, c in zip(fits, cands, strict=True)
            ],
            hovertemplate="estimated peak: %{y:.3f} GiB, fits: %{customdata[0]}, "
            "grid %{customdata[1]} = %{customdata[2]} tiles<extra></extra>",
        ),
        row=1, col=1,
    )  # fmt: skip


def _measured_traces(fig: go.Figure, cands: Sequence[Candidate], labels: list[str]) -> None:
    series = (
        ("measured step peak", "measured_peak_bytes", "diamond", "#111"),
        ("measured tile activations", "measured_tile_bytes", "x", "#d62728"),
    )
    any_measured = False
    for name, key, symbol, color in series:
        points = [(lbl, getattr(c, key)) for lbl, c in zip(labels, cands, strict=True)]
        points = [(lbl, v) for lbl, v in points if v is not None]
        any_measured = any_measured or bool(points)
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points], y=[p[1] / GIB for p in points], name=name,
                mode="markers", marker={"symbol": symbol, "size": 11, "color": color,
                                        "line": {"width": 1.5, "color": color}},
                hovertemplate=f"{name}: %{{y:.3f}} GiB<extra></extra>",
            ),
            row=1, col=1,
        )  # fmt: skip
    if cands and not any_measured:
        _note(fig, "no measured points: planned from estimates only (--no-measure)", y=0.97)


def _reference_lines(fig: go.Figure, plan: Plan, cands: Sequence[Candidate]) -> None:
    where = {"row": 1, "col": 1}
    _hline(fig, plan.budget_bytes / GIB, f"budget {_fmt_gib(plan.budget_bytes)}", "#444",
           "solid", **where)  # fmt: skip
    _hline(fig, plan.usable_bytes / GIB,
           f"usable {_fmt_gib(plan.usable_bytes)} (budget − {plan.margin:.0%} margin)",
           "#e45756", "dash", **where)  # fmt: skip
    kind = "measured" if plan.conventional_measured else "estimate"
    name = f"conventional step {_fmt_gib(plan.conventional_peak_bytes)} ({kind})"
    tallest = max((c.estimated_peak_bytes for c in cands), default=0)
    tallest = max(tallest, plan.budget_bytes)
    # Far above everything else: start hidden so the bars stay readable (click to show).
    hidden = plan.conventional_peak_bytes > 4 * tallest
    _hline(fig, plan.conventional_peak_bytes / GIB, name, "#7f3c8d", "dot", **where,
           visible="legendonly" if hidden else True)  # fmt: skip


def _chosen_traces(fig: go.Figure, plan: Plan, labels: list[str]) -> None:
    if plan.segments:  # the choice is a segmentation: starred in its own chart
        return
    label = tile_label(plan.tile_px)
    name = f"chosen tile {label}"
    star = {"symbol": "star", "size": 18, "color": "#f58518", "line": {"width": 1, "color": "#000"}}
    fig.add_trace(
        go.Scatter(
            x=[label], y=[plan.predicted_peak_bytes / GIB], name=name, mode="markers",
            marker=star, legendgroup="chosen",
            hovertemplate="chosen: predicted peak %{y:.3f} GiB<extra></extra>",
        ),
        row=1, col=1,
    )  # fmt: skip
    if plan.predicted_time_s is not None:
        fig.add_trace(
            go.Scatter(
                x=[label], y=[plan.predicted_time_s], name=name, mode="markers", marker=star,
                legendgroup="chosen", showlegend=False,
                hovertemplate="chosen: predicted time %{y:.3g} s<extra></extra>",
            ),
            row=2, col=1, secondary_y=False,
        )  # fmt: skip
    if label in labels:
        i = labels.index(label)
        fig.add_vrect(x0=i - 0.45, x1=i + 0.45, row="all", col=1, fillcolor="#f58518",
                      opacity=0.10, line_width=0, layer="below")  # fmt: skip


def _time_traces(fig: go.Figure, plan: Plan, cands: Sequence[Candidate], labels: list[str]) -> str:
    timed = plan.time_fit is not None
    if timed:
        fig.add_trace(
            go.Scatter(
                x=labels, y=[c.predicted_time_s for c in cands], name="predicted time per image",
                mode="lines+markers", line={"color": "#1f77b4", "width": 2},
                hovertemplate="predicted time: %{y:.3g} s<extra></extra>",
            ),
            row=2, col=1, secondary_y=False,
        )  # fmt: skip
    else:
        _note(fig, "no predicted times: tiles were not timed (--no-measure)", y=0.3)
    fig.add_trace(
        go.Scatter(
            x=labels, y=[c.overlap_factor for c in cands], name="overlap factor (px processed ÷ "
            "image px)", mode="lines+markers", line={"color": "#8c8c8c", "dash": "dot"},
            hovertemplate="overlap factor: %{y:.2f}×<extra></extra>",
        ),
        row=2, col=1, secondary_y=True,
    )  # fmt: skip
    return "time per image, s" if timed else "time per image (not measured)"


def memory_time_figure(plan: Plan) -> go.Figure:
    """Charts 1 and 2: peak memory by category and predicted time, per candidate tile.

    Top: stacked bars of each candidate's estimated peak by category (GiB), the measured step
    peaks and measured tile activations as markers, the budget, the usable budget and the
    conventional step's peak as lines, the chosen tile as a star. Bottom: predicted time per
    image and the overlap factor (secondary axis). Both share the categorical tile axis (one
    slot per candidate, by area) and a unified hover.
    """
    cands = _sorted_candidates(plan)
    labels = [tile_label(c.tile_px) for c in cands]
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08, row_heights=[0.62, 0.38],
        specs=[[{}], [{"secondary_y": True}]],
        subplot_titles=("Peak memory of one streaming step, by category",
                        "Predicted time per image and halo overhead"),
    )  # fmt: skip
    _memory_traces(fig, cands, labels)
    _measured_traces(fig, cands, labels)
    _reference_lines(fig, plan, cands)
    unit = _time_traces(fig, plan, cands, labels)
    _chosen_traces(fig, plan, labels)
    if not cands:
        _note(fig, "no single tile was priced (none within --max-tile): see the segmentations"
              if plan.segments else "this plan holds no candidate tiles")  # fmt: skip
    elif plan.segments:
        _note(fig, f"chosen: {len(plan.segments)} segments (next chart), faster than any single "
              "tile here", y=0.97)  # fmt: skip
    _base_layout(
        fig, f"Memory and time vs tile size: {format_shape(plan.image_shape_px)} px, {plan.dtype}, "
        f"budget {_fmt_gib(plan.budget_bytes)}", 820,
    )  # fmt: skip
    fig.update_layout(
        barmode="stack", hovermode="x unified", margin={"t": 80, "r": 20},
        legend={"orientation": "v", "x": 1.06, "xanchor": "left", "y": 1.0, "yanchor": "top",
                "tracegroupgap": 6},
    )  # fmt: skip
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=labels)
    fig.update_xaxes(title_text="tile, px per side (HxW when not square), ordered by area",
                     row=2, col=1)  # fmt: skip
    fig.update_yaxes(title_text="peak memory, GiB", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text=unit, rangemode="tozero", row=2, col=1, secondary_y=False)
    fig.update_yaxes(title_text="overlap factor, ×", rangemode="tozero", showgrid=False,
                     tickmode="auto", row=2, col=1, secondary_y=True)  # fmt: skip
    return fig


# --------------------------------------------------------------------------------------------
# 3: the tile grid, recomputed from the plan
# --------------------------------------------------------------------------------------------


def _rects(boxes: Iterable[tuple[float, float, float, float]]) -> tuple[list, list]:
    """Closed rectangles ``(x0, x1, y0, y1)`` as one path with ``None`` between them."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    for x0, x1, y0, y1 in boxes:
        xs += [x0, x1, x1, x0, x0, None]
        ys += [y0, y0, y1, y1, y0, None]
    return xs, ys


def _owned(t: AxisTile, stride: int, length: int) -> tuple[int, int]:
    return min(t.out_start * stride, length), min(t.out_stop * stride, length)


# Which two axes a panel draws (rows, columns) and where: one panel for an image; three
# orthogonal views for a volume (across depth, and the two through it).
_Pair = tuple[int, int]
_AXIS_NAMES = {2: ("y", "x"), 3: ("depth", "y", "x")}  # axis titles
_HOVER_NAMES = {2: ("rows", "cols"), 3: ("slices", "rows", "cols")}  # ranges in hover texts


def _drawn_axes(grid: TileGrid, pair: _Pair) -> tuple[Sequence[AxisTile], Sequence[AxisTile]]:
    """Row and column tiles to draw: all, or the top-left block of about MAX_DRAWN_TILES."""
    rows, cols = grid.axes[pair[0]], grid.axes[pair[1]]
    if len(rows) * len(cols) <= MAX_DRAWN_TILES:
        return rows, cols
    side = max(1, math.isqrt(MAX_DRAWN_TILES))
    return rows[:side], cols[:side]


def _grid_traces(fig: go.Figure, grid: TileGrid, name: str, style: dict[str, Any],
                 pair: _Pair = (-2, -1), **where: Any) -> int:  # fmt: skip
    """The crops of ``grid`` as one trace of rectangles; returns how many were drawn."""
    rows, cols = _drawn_axes(grid, pair)
    pairs = [(r, c) for r in rows for c in cols]
    xs, ys = _rects((c.in_start, c.in_stop, r.in_start, r.in_stop) for r, c in pairs)
    fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines", hoverinfo="skip",
                             legendgroup=name, **style), **where)  # fmt: skip
    return len(pairs)


def _owned_traces(fig: go.Figure, grid: TileGrid, pair: _Pair = (-2, -1), **where: Any) -> None:
    (sr, sc) = grid.stride[pair[0]], grid.stride[pair[1]]
    (hr, wc) = grid.image_shape[pair[0]], grid.image_shape[pair[1]]
    names = _HOVER_NAMES.get(len(grid.axes), ("rows", "cols"))
    rname, cname = names[pair[0]], names[pair[1]]
    rows_ax, cols_ax = _drawn_axes(grid, pair)
    boxes, centres, texts = [], [], []
    for i, r in enumerate(rows_ax):
        for j, c in enumerate(cols_ax):
            (y0, y1), (x0, x1) = _owned(r, sr, hr), _owned(c, sc, wc)
            boxes.append((x0, x1, y0, y1))
            centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
            texts.append(
                f"tile ({i}, {j})<br>crop {rname} {r.in_start}–{r.in_stop}, {cname} "
                f"{c.in_start}–{c.in_stop} ({r.in_len}x{c.in_len} px)<br>owns {rname} {y0}–{y1},"
                f" {cname} {x0}–{x1}<br>(output positions {r.out_start}–{r.out_stop} x "
                f"{c.out_start}–{c.out_stop})"
            )
    xs, ys = _rects(boxes)
    legend = where.pop("showlegend", True)
    name = "owned region (outputs this tile computes)"
    fig.add_trace(go.Scatter(
        x=xs, y=ys, name=name, mode="lines", legendgroup=name, showlegend=legend,
        hoverinfo="skip", line={"color": "#2f7d32", "width": 1.5, "dash": "dash"},
    ), **where)  # fmt: skip
    fig.add_trace(go.Scatter(
        x=[p[0] for p in centres], y=[p[1] for p in centres], text=texts, mode="markers",
        name="tile details (hover)", legendgroup="details", showlegend=legend,
        marker={"size": 7, "color": "#2f7d32", "opacity": 0.5},
        hovertemplate="%{text}<extra></extra>",
    ), **where)  # fmt: skip


def _image_trace(fig: go.Figure, shape: Sequence[int], pair: _Pair = (-2, -1),
                 **where: Any) -> None:  # fmt: skip
    h, w = shape[pair[0]], shape[pair[1]]
    legend = where.pop("showlegend", True)
    xs, ys = _rects([(0, w, 0, h)])
    fig.add_trace(go.Scatter(
        x=xs, y=ys, name=f"image {format_shape(shape)} px", mode="lines", hoverinfo="skip",
        legendgroup="image", showlegend=legend, line={"color": "#000", "width": 2.5},
    ), **where)  # fmt: skip


@dataclass(frozen=True)
class _Tiled:
    """What one grid tiles: the image (one segment) or one segment's input map."""

    what: str  # "image" or "segment 2's input map (the cut map after layer1.1.relu)"
    shape: tuple[int, ...]  # px of what is tiled
    halo_lo: tuple[int, ...]
    halo_hi: tuple[int, ...]
    stride: tuple[int, ...]
    tile: tuple[int, ...]
    forward_tile: tuple[int, ...]
    grid: Callable[[Sequence[int] | None], TileGrid]  # a tile -> its grid (None: ``tile``)


def _tiled(plan: Plan) -> list[_Tiled]:
    """The image for an unsegmented plan; each segment's input map for a segmented one."""
    if not plan.segments:
        return [_Tiled("the image", plan.image_shape_px, plan.halo_lo_px, plan.halo_hi_px,
                       plan.output_stride_px, plan.tile_px, plan.forward_tile_px,
                       lambda t: plan.tile_grid(t))]  # fmt: skip
    out = []
    for i, seg in enumerate(plan.segments):
        what = "the image" if i == 0 else (
            f"the cut map after {plan.segments[i - 1].where}"
            f"{' (host memory)' if plan.segments[i - 1].map_on_host else ''}")  # fmt: skip
        out.append(_Tiled(f"segment {i + 1} of {len(plan.segments)}: {what}",
                          seg.input_shape_px, seg.halo_lo_px, seg.halo_hi_px,
                          seg.output_stride_px, seg.tile_px, seg.forward_tile_px,
                          seg.tile_grid))  # fmt: skip
    return out


def _grid_title(tiled: _Tiled, grid: TileGrid) -> str:
    halo = "/".join(f"{lo}+{hi}" for lo, hi in zip(tiled.halo_lo, tiled.halo_hi, strict=True))
    return (
        f"Tile grid of {tiled.what}: {grid.n_tiles} tiles ({format_shape(grid.counts)}) of up "
        f"to {format_shape(grid.largest_crop)} px over {format_shape(tiled.shape)} px"
        f"<br><sup>overlap factor {grid.overlap_factor:.2f}×, halo {halo} px (before+after, "
        f"per axis), output stride {format_shape(tiled.stride)} px</sup>"
    )


def _draw_grid(fig: go.Figure, tiled: _Tiled, grid: TileGrid, pair: _Pair = (-2, -1),
               **where: Any) -> None:  # fmt: skip
    """One panel: the crops and owned regions of ``grid`` on axes ``pair`` (a volume's tiles
    along the third axis repeat the same rectangles)."""
    legend = where.get("showlegend", True)
    _image_trace(fig, tiled.shape, pair, **where)
    crop = {"fill": "toself", "fillcolor": "rgba(76,120,168,0.16)",
            "line": {"color": "#4c78a8", "width": 1.2}, "showlegend": legend}  # fmt: skip
    where = {k: v for k, v in where.items() if k != "showlegend"}
    drawn = _grid_traces(fig, grid, "backward-pass crop (owned region + halo)", crop, pair,
                         **where)  # fmt: skip
    _owned_traces(fig, grid, pair, showlegend=legend, **where)
    if tuple(tiled.forward_tile) != tuple(tiled.tile):
        try:
            forward = tiled.grid(tiled.forward_tile)
        except GeometryError as err:
            _note(fig, f"forward-pass grid not drawn: {err}", y=0.1)
        else:
            _grid_traces(
                fig, forward, f"forward-pass crop ({forward.n_tiles} tiles, click to show)",
                {"visible": "legendonly", "showlegend": legend,
                 "line": {"color": "#e45756", "width": 2, "dash": "dot"}}, pair, **where,
            )  # fmt: skip
    total = grid.counts[pair[0]] * grid.counts[pair[1]]
    if drawn < total and legend:
        _note(fig, f"showing the top-left {drawn} of {total} tiles; the rest repeat the pattern",
              y=1.0)  # fmt: skip


# A volume's three views: (rows, columns) axes and the panel's title.
_VOLUME_VIEWS: tuple[tuple[_Pair, str], ...] = (
    ((1, 2), "y x (across depth)"),
    ((0, 2), "depth x (through y)"),
    ((0, 1), "depth y (through x)"),
)


def _volume_figure(tiled: _Tiled, grid: TileGrid) -> go.Figure:
    """Three orthogonal views of a volume's tile grid, each with equal aspect."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=[t for _, t in _VOLUME_VIEWS],
                        horizontal_spacing=0.06)  # fmt: skip
    for k, (pair, _) in enumerate(_VOLUME_VIEWS, start=1):
        _draw_grid(fig, tiled, grid, pair, row=1, col=k, showlegend=k == 1)
        names = _AXIS_NAMES[3]
        anchor = "x" if k == 1 else f"x{k}"
        fig.update_xaxes(title_text=f"{names[pair[1]]}, px", row=1, col=k)
        fig.update_yaxes(title_text=f"{names[pair[0]]}, px", scaleanchor=anchor, row=1, col=k)
    return fig


def tile_grid_figure(plan: Plan, segment: int = 0) -> go.Figure:
    """Chart 3: the chosen tile grid drawn over the image, or for a segmented plan over the
    input map of segment ``segment`` (px of that map, y down, equal aspect).

    Backward-pass crops are filled rectangles (overlaps look darker); the owned region of each
    tile is dashed, so a tile's halo is its crop minus its owned region; the forward-pass crops
    (when the plan uses a larger forward tile) can be shown from the legend. Hover the dots for
    each tile's crop and owned ranges.
    """
    fig = go.Figure()
    tiled = _tiled(plan)[segment]
    title = f"Tile grid over {tiled.what}, {format_shape(tiled.shape)} px"
    volume = len(tiled.shape) == 3
    try:
        if len(tiled.shape) not in (2, 3):
            raise GeometryError("the tile grid is drawn for images with 2 or 3 spatial axes")
        grid = tiled.grid(None)
    except GeometryError as err:
        _note(fig, f"tile grid not drawn: {err}")
        volume = False
    else:
        if volume:
            fig = _volume_figure(tiled, grid)
        else:
            _draw_grid(fig, tiled, grid)
        title = _grid_title(tiled, grid)
    _base_layout(fig, title, 760 if segment == 0 else 600)
    fig.update_layout(hovermode="closest")
    fig.update_xaxes(showgrid=False, zeroline=False, constrain="domain")
    fig.update_yaxes(autorange="reversed", scaleratio=1, showgrid=False, zeroline=False,
                     constrain="domain")  # fmt: skip
    if not volume:
        fig.update_xaxes(title_text="x, px")
        fig.update_yaxes(title_text="y, px", scaleanchor="x")
    return fig


def segments_figure(plan: Plan) -> go.Figure:
    """Chart 2b: the segmentations the planner priced (a segmented plan only).

    Stacked bars of each one's predicted peak by category (the cut maps and their gradients
    are their own category), the usable budget as a line, the predicted time per image on a
    second axis, the chosen one starred. Ordered as the planner ranked them (fastest first).
    """
    options = plan.ranked_segmentations()
    labels = [f"cut after {g.label}" for g in options]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    rows = [g.memory.categories() for g in options]
    names = list(rows[0]) if rows else []
    for name, color in zip(names, _CATEGORY_COLORS[: len(names)], strict=True):
        fig.add_trace(go.Bar(
            x=labels, y=[r[name] / GIB for r in rows], name=name, marker_color=color,
            hovertemplate=f"{name}: %{{y:.3f}} GiB<extra></extra>",
        ), secondary_y=False)  # fmt: skip
    tiles = [" | ".join(tile_label(s.tile_px) for s in g.segments) for g in options]
    fig.add_trace(go.Scatter(
        x=labels, y=[g.predicted_time_s for g in options], name="predicted time per image",
        mode="markers", marker={"symbol": "circle", "size": 11, "color": "#1f77b4"},
        customdata=tiles, hovertemplate="predicted time %{y:.3g} s, backward tiles "
        "%{customdata} px<extra></extra>",
    ), secondary_y=True)  # fmt: skip
    chosen = [i for i, g in enumerate(options) if g == plan.chosen]
    if chosen:
        i = chosen[0]
        fig.add_trace(go.Scatter(
            x=[labels[i]], y=[options[i].peak_bytes / GIB], name="chosen", mode="markers",
            marker={"symbol": "star", "size": 18, "color": "#f58518",
                    "line": {"width": 1, "color": "#000"}},
            hovertemplate="chosen: peak %{y:.3f} GiB<extra></extra>",
        ), secondary_y=False)  # fmt: skip
    _hline(fig, plan.usable_bytes / GIB, f"usable {_fmt_gib(plan.usable_bytes)}", "#e45756",
           "dash")  # fmt: skip
    if any(g.predicted_time_s is None for g in options):
        _note(fig, "no predicted times: tiles were not timed (--no-measure)", y=0.9)
    _base_layout(fig, f"Segmentations considered: {len(options)} (the trunk cut into stages, "
                 "each streamed with its own tiles)", 600)  # fmt: skip
    fig.update_layout(barmode="stack", hovermode="x unified", margin={"b": 160})
    fig.update_xaxes(type="category", tickangle=-25)
    fig.update_yaxes(title_text="peak memory, GiB", rangemode="tozero", secondary_y=False)
    fig.update_yaxes(title_text="time per image, s", rangemode="tozero", showgrid=False,
                     secondary_y=True)  # fmt: skip
    return fig


# --------------------------------------------------------------------------------------------
# 4: a run's memory timeline and metrics
# --------------------------------------------------------------------------------------------


def _unit(largest_bytes: float) -> tuple[str, int]:
    """GiB, or MiB when everything is under 1 GiB (tiny runs stay readable)."""
    return ("GiB", GIB) if largest_bytes >= GIB else ("MiB", MIB)


def timeline_figure(report: RunReport) -> go.Figure:
    """Chart 4a: memory over one streaming step vs one conventional step, with both peaks.

    In GiB, or MiB when every value is under 1 GiB.
    """
    fig = go.Figure()
    series = (
        ("streaming step", report.timeline, "#4c78a8"),
        ("conventional step", report.conventional_timeline, "#7f3c8d"),
    )
    largest = max([report.streaming_peak_bytes, report.conventional_peak_bytes]
                  + [b for _, points, _ in series for _, b in points])  # fmt: skip
    unit, scale = _unit(largest)
    for name, points, color in series:
        if points:
            fig.add_trace(go.Scatter(
                x=[t for t, _ in points], y=[b / scale for _, b in points], name=name,
                mode="lines", line={"color": color, "width": 2}, fill="tozeroy",
                hovertemplate=f"{name}: %{{y:.3f}} {unit} at %{{x:.2f}} s<extra></extra>",
            ))  # fmt: skip
    kind = "measured" if report.conventional_measured else "estimate"
    streaming, conventional = report.streaming_peak_bytes, report.conventional_peak_bytes
    _hline(fig, streaming / scale, f"streaming peak {_fmt_gib(streaming)} (measured)",
           "#4c78a8", "dash")  # fmt: skip
    _hline(fig, conventional / scale, f"conventional peak {_fmt_gib(conventional)} ({kind})",
           "#7f3c8d", "dot")  # fmt: skip
    if not report.timeline:
        _note(fig, "no memory timeline was recorded for this run")
    elif not report.conventional_timeline:
        what = "measured" if report.conventional_measured else "an estimate"
        _note(fig, f"no conventional step timeline (its peak is {what} only)", y=0.92)
    ratio = f", {report.ratio:.1%} of it" if conventional else ""
    _base_layout(
        fig, f"Memory over one training step ({report.device}): streaming "
        f"{_fmt_gib(streaming)} vs conventional {_fmt_gib(conventional)} ({kind}){ratio}", 480,
    )  # fmt: skip
    fig.update_layout(hovermode="x unified")
    fig.update_xaxes(title_text="time into the step, s", rangemode="tozero")
    fig.update_yaxes(title_text=f"memory in use, {unit}", rangemode="tozero")
    return fig


_SKIP_METRICS = {"epoch", "step"}  # and timings (keys with "seconds"): not scores


def _series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """Numeric columns of the metrics rows (gaps as None), in first-seen order."""
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            numeric = isinstance(value, int | float) and not isinstance(value, bool)
            timing = "seconds" in key
            if key not in _SKIP_METRICS and not timing and numeric and key not in keys:
                keys.append(key)
    return {k: [_number(r.get(k)) for r in rows] for k in keys}


def metrics_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """Chart 4b: per-epoch losses (left axis) and accuracy/AUC and other scores (right axis)."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    rows = [r for r in rows if isinstance(r, Mapping)]
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    series = _series(rows)
    for key, values in series.items():
        is_loss = "loss" in key
        fig.add_trace(
            go.Scatter(
                x=epochs, y=values, name=key.replace("_", " "), mode="lines+markers",
                line={"dash": "solid" if key.startswith("train") else "dash"},
                hovertemplate=f"{key}: %{{y:.4g}}<extra></extra>",
            ),
            secondary_y=not is_loss,
        )  # fmt: skip
    if not rows:
        _note(fig, "no per-epoch metrics yet (metrics.jsonl is missing or empty)")
    elif not series:
        _note(fig, "metrics.jsonl holds no numeric metrics")
    _base_layout(fig, "Training: loss and metrics per epoch", 440)
    fig.update_layout(hovermode="x unified")
    fig.update_xaxes(title_text="epoch", dtick=1 if len(rows) <= 20 else None)
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text="accuracy / AUC", showgrid=False, tickmode="auto",
                     secondary_y=True)  # fmt: skip
    return fig


# --------------------------------------------------------------------------------------------
# 5: per-layer activation memory
# --------------------------------------------------------------------------------------------


def _number(value: object) -> float | None:
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    return float(value) if numeric and math.isfinite(value) else None


def _unique(names: Sequence[str]) -> list[str]:
    """Layer names made unique (a module called twice, e.g. a shared ReLU, gets ' (2)')."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return out


def layers_figure(plan: Plan) -> go.Figure:
    """Chart 5: each trunk layer's output memory for the whole image vs one tile (log scale).

    The unit is MiB when the largest layer is under 1 GiB, else GiB.
    """
    fig = go.Figure()
    layers = plan.layers
    unit, scale = _unit(max((layer.full_bytes for layer in layers), default=0))
    names = _unique([layer.name for layer in layers])
    channels = [layer.channels for layer in layers]
    series: list[tuple[str, list[float | None], str]] = [
        (f"whole image {format_shape(plan.image_shape_px)} px",
         [float(layer.full_bytes) for layer in layers], "#7f3c8d"),
    ]  # fmt: skip
    if not plan.segments:
        series.append((f"one tile (crop of up to {format_shape(plan.tile_px)} px)",
                       [float(layer.tile_bytes) for layer in layers], "#4c78a8"))  # fmt: skip
    for k, seg in enumerate(plan.segments):  # each layer at its own segment's tile
        series.append((
            f"one tile of segment {k + 1} (crop of up to {format_shape(seg.tile_px)} px of its "
            "input)",
            [float(layer.tile_bytes) if layer.segment == k else None for layer in layers],
            _SEGMENT_COLORS[k % len(_SEGMENT_COLORS)],
        ))  # fmt: skip
    for name, values, color in series:
        fig.add_trace(go.Bar(
            x=names, y=[None if v is None else v / scale for v in values], name=name,
            marker_color=color, customdata=channels,
            hovertemplate=f"%{{x}}: %{{y:.4g}} {unit}, %{{customdata}} channels<extra></extra>",
        ))  # fmt: skip
    if not layers:
        _note(fig, "this plan has no per-layer table (re-run `tileplan profile` to add it)")
    _base_layout(fig, "Activation memory per trunk layer: whole image vs one tile", 560)
    fig.update_layout(barmode="group", hovermode="x unified", margin={"b": 140})
    fig.update_xaxes(title_text="layer (execution order)", tickangle=-55, type="category")
    values = [v for trace in fig.data for v in trace.y if v is not None and v > 0]
    fig.update_yaxes(title_text=f"output size, {unit} (log scale)", type="log",
                     tickvals=_log_ticks(values))  # fmt: skip
    return fig


def _log_ticks(values: Sequence[float]) -> list[float] | None:
    """Tick values for a log axis: powers of ten, plus 2 and 5 when the range is narrow."""
    if not values:
        return None
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    steps = (1, 2, 5) if hi - lo <= 3 else (1,)
    return [m * 10.0**e for e in range(lo, hi + 1) for m in steps]
