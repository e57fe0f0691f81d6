"""Chart construction: the figures hold exactly the plan's and the run's numbers."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
import pytest
import torch
import torchvision
from torch import nn

from executor import GeometryError, LayerMemory, PlanError, analyze_trunk
from tests.plans import GIB, IMAGE, LAYERS, METRICS, make_plan, make_report, segmented_plan
from tileplan.run.report import ReportError
from tileplan.view.charts import (
    MAX_DRAWN_TILES,
    layers_figure,
    memory_time_figure,
    metrics_figure,
    plan_charts,
    run_charts,
    tile_grid_figure,
    tile_label,
    timeline_figure,
)


def _trace(fig: go.Figure, name: str) -> Any:
    matches = [t for t in fig.data if t.name == name]
    assert len(matches) == 1, [t.name for t in fig.data]
    return matches[0]


def _shape_named(fig: go.Figure, start: str) -> Any:
    matches = [s for s in fig.layout.shapes if (s.name or "").startswith(start)]
    assert len(matches) == 1, [s.name for s in fig.layout.shapes]
    return matches[0]


def _annotations(fig: go.Figure) -> str:
    return " | ".join(a.text for a in fig.layout.annotations)


def _rects(trace: Any) -> list[tuple[float, float, float, float]]:
    """(x0, x1, y0, y1) of each closed rectangle in a None-separated path."""
    xs, ys = list(trace.x), list(trace.y)
    assert xs.count(None) == ys.count(None)
    out = []
    for k in range(0, len(xs), 6):
        x, y = xs[k : k + 5], ys[k : k + 5]
        assert xs[k + 5] is None
        assert (x[0], y[0]) == (x[4], y[4])  # closed
        out.append((min(x), max(x), min(y), max(y)))
    return out


# -- chart 1 + 2 -----------------------------------------------------------------------------


def test_stacked_memory_bars_are_the_candidates_bytes_in_gib() -> None:
    plan = make_plan()
    fig = memory_time_figure(plan)
    labels = [tile_label(c.tile_px) for c in plan.candidates]
    assert labels == ["1024", "1536", "2048", "3072", "4096", "6000x6016"]
    categories = plan.candidates[0].memory.categories()
    assert list(categories) == [
        "parameters", "gradients", "optimizer state", "image", "trunk output + gradient",
        "cut maps", "head", "tile activations",
    ]  # fmt: skip
    totals = [0.0] * len(labels)
    for name in categories:
        bar = _trace(fig, name)
        assert isinstance(bar, go.Bar)
        assert list(bar.x) == labels
        expected = [c.memory.categories()[name] / GIB for c in plan.candidates]
        assert list(bar.y) == expected
        totals = [a + b for a, b in zip(totals, bar.y, strict=True)]
    assert fig.layout.barmode == "stack"
    for total, cand in zip(totals, plan.candidates, strict=True):
        assert total == pytest.approx(cand.memory.total_bytes / GIB, rel=1e-12)
    tile_acts = _trace(fig, "tile activations").y
    assert tile_acts[2] == 600 * 2048 * 2048 / GIB  # max(forward, backward)


def test_measured_points_chosen_marker_and_reference_lines() -> None:
    plan = make_plan()
    fig = memory_time_figure(plan)
    peak = _trace(fig, "measured step peak")
    assert list(peak.x) == ["3072"]
    assert list(peak.y) == [(plan.candidates[3].estimated_peak_bytes + 10**8) / GIB]
    tile = _trace(fig, "measured tile activations")
    assert list(tile.x) == ["2048", "3072"]
    assert list(tile.y) == [round(600 * t * t * 1.05) / GIB for t in (2048, 3072)]
    chosen = [t for t in fig.data if (t.name or "").startswith("chosen tile")]
    assert [list(t.x) for t in chosen] == [["3072"], ["3072"]]
    assert chosen[0].y == (plan.predicted_peak_bytes / GIB,)
    assert chosen[1].y == (plan.predicted_time_s,)
    assert _shape_named(fig, "budget 8.00 GiB").y0 == 8.0
    assert _shape_named(fig, "usable").y0 == plan.usable_bytes / GIB
    assert "10% margin" in _shape_named(fig, "usable").name
    conventional = _shape_named(fig, "conventional step")
    assert conventional.y0 == 40.0
    assert conventional.name == "conventional step 40.00 GiB (estimate)"
    assert conventional.visible is True  # comparable to the tallest bar (20 GiB): shown
    far = memory_time_figure(make_plan(conventional_peak_bytes=400 * GIB))
    assert _shape_named(far, "conventional step").visible == "legendonly"  # click to show
    assert "no measured points" not in _annotations(fig)


def test_time_axis_shares_tiles_and_overlap_is_secondary() -> None:
    plan = make_plan()
    fig = memory_time_figure(plan)
    time = _trace(fig, "predicted time per image")
    assert list(time.y) == [c.predicted_time_s for c in plan.candidates]
    overlap = next(t for t in fig.data if (t.name or "").startswith("overlap factor"))
    assert list(overlap.y) == [c.overlap_factor for c in plan.candidates]
    assert overlap.yaxis != time.yaxis
    assert fig.layout.xaxis.matches == "x2" or fig.layout.xaxis2.matches == "x"
    assert fig.layout.hovermode == "x unified"
    assert fig.layout[time.yaxis.replace("y", "yaxis")].title.text == "time per image, s"
    untimed = memory_time_figure(make_plan(timed=False))
    assert not [t for t in untimed.data if t.name == "predicted time per image"]
    assert "tiles were not timed" in _annotations(untimed)
    assert any(t.name.startswith("overlap factor") for t in untimed.data)


def test_measured_conventional_and_non_square_image() -> None:
    plan = make_plan(image=(3000, 5000), tiles=(1024, 2048), chosen=2048, forward=None,
                     conventional_measured=True, conventional_peak_bytes=9 * GIB)  # fmt: skip
    fig = memory_time_figure(plan)
    assert list(_trace(fig, "parameters").x) == ["1024", "2048"]
    assert [t.x for t in fig.data if (t.name or "").startswith("chosen")][0] == ("2048",)
    conventional = _shape_named(fig, "conventional step")
    assert conventional.name.endswith("(measured)")
    assert conventional.visible is True  # comparable to the budget: shown


def test_missing_measurements_and_empty_plan_still_render() -> None:
    plan = make_plan()
    fig = memory_time_figure(make_plan(measured=()))
    assert _trace(fig, "measured step peak").x == ()
    assert "no measured points" in _annotations(fig)
    empty = dataclasses.replace(plan, candidates=(), layers=())
    charts = plan_charts(empty)
    assert "no candidate tiles" in _annotations(charts.memory_time)
    assert "no per-layer table" in _annotations(charts.layers)
    for figure in charts.figures():
        figure.to_json()  # serialisable


# -- chart 3: the tile grid --------------------------------------------------------------------


def test_fixture_geometry_is_resnet18() -> None:
    with torch.device("meta"):
        net = torchvision.models.resnet18()
    geometry = analyze_trunk(nn.Sequential(*list(net.children())[:-2]).eval())
    plan = make_plan()
    assert geometry.output_stride == plan.output_stride_px
    assert (geometry.halo_lo, geometry.halo_hi) == (plan.halo_lo_px, plan.halo_hi_px)
    assert geometry.output_shape(IMAGE) == plan.output_shape


def _trunks() -> dict[str, nn.Module]:
    with torch.device("meta"):
        r18 = torchvision.models.resnet18()
        mobilenet = torchvision.models.mobilenet_v2()
        vgg = torchvision.models.vgg11()
    odd = nn.Sequential(  # asymmetric halos, even kernels, stride 6
        nn.Conv2d(3, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=1),
        nn.MaxPool2d(3, stride=3), nn.Conv2d(4, 4, 3, dilation=2, padding=2),
    )  # fmt: skip
    return {
        "resnet18": nn.Sequential(*list(r18.children())[:-2]),
        "mobilenet_v2": mobilenet.features,
        "vgg11": vgg.features,
        "odd": odd,
    }


IMAGES = ((512, 512), (1000, 1400), (2048, 777), (4096, 3000))
TILE_SHAPES = ((256, 256), (600, 900), (1000, 1000), (1536, 1024), (8192, 8192))


def _whole_image_plan(trunk: nn.Module, image: tuple[int, ...]) -> Any:
    """A plan whose one candidate is the whole image (valid for any trunk and image)."""
    return make_plan(trunk=trunk, image=image, tiles=(max(image),), chosen=max(image),
                     forward=None, measured=(), budget=10**13, layers=())  # fmt: skip


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11", "odd"])
def test_plan_grid_equals_executor_geometry(name: str) -> None:
    trunk = _trunks()[name].eval()
    geometry = analyze_trunk(trunk)
    compared = 0
    for image in IMAGES:
        plan = _whole_image_plan(trunk, image)
        for tile in TILE_SHAPES:
            try:
                expected = geometry.tile_grid(image, tile)
            except GeometryError:
                with pytest.raises(GeometryError):
                    plan.tile_grid(tile)
                continue
            assert plan.tile_grid(tile) == expected, (image, tile)
            compared += 1
    assert compared >= 12


def test_plan_grid_for_a_volume() -> None:
    trunk = nn.Sequential(nn.Conv3d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool3d(2))
    geometry = analyze_trunk(trunk, n_axes=3)
    image = (40, 96, 130)
    plan = make_plan(trunk=trunk, image=image, tiles=(48,), chosen=48, forward=None,
                     measured=(), budget=10**12, layers=())  # fmt: skip
    grid = plan.tile_grid()
    assert grid == geometry.tile_grid(image, (48, 48, 48))
    fig = tile_grid_figure(plan)
    # Three orthogonal views: y x across depth, then depth x and depth y through the volume.
    panels = [t for t in fig.data if t.name == "backward-pass crop (owned region + halo)"]
    assert [t.xaxis for t in panels] == ["x", "x2", "x3"]
    counts = [len(_rects(t)) for t in panels]
    assert counts == [grid.counts[1] * grid.counts[2], grid.counts[0] * grid.counts[2],
                      grid.counts[0] * grid.counts[1]]  # fmt: skip
    depth_x = _rects(panels[1])
    assert depth_x[0] == (grid.axes[2][0].in_start, grid.axes[2][0].in_stop,
                          grid.axes[0][0].in_start, grid.axes[0][0].in_stop)  # fmt: skip
    titles = _annotations(fig)
    assert "depth x (through y)" in titles
    assert fig.layout.yaxis2.scaleanchor == "x2"


def test_tile_grid_rectangles_match_the_grid() -> None:
    plan = make_plan()
    grid = plan.tile_grid()
    fig = tile_grid_figure(plan)
    crops = _rects(_trace(fig, "backward-pass crop (owned region + halo)"))
    owned = _rects(_trace(fig, "owned region (outputs this tile computes)"))
    assert len(crops) == len(owned) == grid.n_tiles == 3 * 4
    expected = [(c.in_start, c.in_stop, r.in_start, r.in_stop) for r in grid.axes[0]
                for c in grid.axes[1]]  # fmt: skip
    assert crops == expected
    # Owned regions partition the image; each lies inside its crop, the rest is halo.
    assert sum((x1 - x0) * (y1 - y0) for x0, x1, y0, y1 in owned) == IMAGE[0] * IMAGE[1]
    for (cx0, cx1, cy0, cy1), (ox0, ox1, oy0, oy1) in zip(crops, owned, strict=True):
        assert cx0 <= ox0 < ox1 <= cx1
        assert cy0 <= oy0 < oy1 <= cy1
        assert (cx1 - cx0) * (cy1 - cy0) > (ox1 - ox0) * (oy1 - oy0)  # a visible halo
    image = _rects(_trace(fig, f"image {IMAGE[0]}x{IMAGE[1]} px"))
    assert image == [(0, IMAGE[1], 0, IMAGE[0])]
    hover = _trace(fig, "tile details (hover)")
    assert len(hover.x) == grid.n_tiles
    assert "crop rows 0–" in hover.text[0]
    forward = next(t for t in fig.data if (t.name or "").startswith("forward-pass crop"))
    assert forward.visible == "legendonly"
    assert len(_rects(forward)) == plan.tile_grid(forward=True).n_tiles
    assert fig.layout.yaxis.autorange == "reversed"
    assert (fig.layout.yaxis.scaleanchor, fig.layout.yaxis.scaleratio) == ("x", 1)
    assert f"{grid.n_tiles} tiles" in fig.layout.title.text


def test_same_forward_tile_draws_no_forward_grid() -> None:
    plan = make_plan(forward_tile_px=(3072, 3072))
    names = [t.name for t in tile_grid_figure(plan).data]
    assert not any(n.startswith("forward") for n in names)


def test_huge_grid_is_capped_with_a_note() -> None:
    plan = make_plan(image=(65536, 65536), tiles=(640,), chosen=640, forward=None, measured=(),
                     budget=10**13)  # fmt: skip
    grid = plan.tile_grid()
    assert grid.n_tiles > MAX_DRAWN_TILES
    fig = tile_grid_figure(plan)
    side = math.isqrt(MAX_DRAWN_TILES)
    assert len(_rects(_trace(fig, "backward-pass crop (owned region + halo)"))) == side * side
    assert f"top-left {side * side} of {grid.n_tiles} tiles" in _annotations(fig)


def test_a_tile_smaller_than_the_receptive_field_cannot_be_planned() -> None:
    with pytest.raises(PlanError, match="receptive field"):
        make_plan(tile_px=(256, 256))


# -- chart 4: the run ----------------------------------------------------------------------------


def test_run_timeline_and_peaks() -> None:
    report = make_report(conventional_timeline=((0.0, GIB), (1.0, 30 * GIB), (2.0, GIB)),
                         conventional_measured=True)  # fmt: skip
    fig = timeline_figure(report)
    streaming = _trace(fig, "streaming step")
    assert list(streaming.x) == [t for t, _ in report.timeline]
    assert list(streaming.y) == [b / GIB for _, b in report.timeline]
    conventional = _trace(fig, "conventional step")
    assert list(conventional.y) == [1.0, 30.0, 1.0]
    assert _shape_named(fig, "streaming peak").y0 == report.streaming_peak_bytes / GIB
    peak = _shape_named(fig, "conventional peak")
    assert (peak.y0, peak.name) == (40.0, "conventional peak 40.00 GiB (measured)")
    assert fig.layout.xaxis.title.text == "time into the step, s"
    assert fig.layout.yaxis.title.text == "memory in use, GiB"
    measured = timeline_figure(make_report(conventional_measured=True))
    assert "no conventional step timeline" in _annotations(measured)
    estimated = timeline_figure(make_report())
    assert _shape_named(estimated, "conventional peak").name.endswith("(estimate)")
    with pytest.raises(ReportError, match="conventional step was measured"):
        make_report(conventional_timeline=((0.0, GIB),))
    small = timeline_figure(make_report(timeline=((0.0, 2**20), (0.1, 3 * 2**20)),
                                        streaming_peak_bytes=3 * 2**20,
                                        conventional_peak_bytes=9 * 2**20))  # fmt: skip
    assert list(_trace(small, "streaming step").y) == [1.0, 3.0]  # MiB when all under 1 GiB
    assert small.layout.yaxis.title.text == "memory in use, MiB"
    assert _shape_named(small, "conventional peak").y0 == 9.0


def test_run_without_timeline_or_metrics_renders_with_notes() -> None:
    charts = run_charts(make_report(timeline=()), ())
    assert "no memory timeline" in _annotations(charts.timeline)
    assert "no per-epoch metrics" in _annotations(charts.metrics)
    assert "no numeric metrics" in _annotations(metrics_figure([{"epoch": 1, "note": "x"}]))


def test_metrics_losses_left_scores_right() -> None:
    fig = metrics_figure(METRICS)
    names = {t.name: t for t in fig.data}
    # Timings ("seconds", "seconds_per_image") are not plotted as scores.
    assert set(names) == {"train loss", "train accuracy", "val loss", "val accuracy", "val auc"}
    assert list(names["train loss"].x) == [1, 2, 3]
    assert list(names["val loss"].y) == [0.69, None, 0.52]  # a gap, not a crash
    assert list(names["val auc"].y) == [0.58, 0.67, 0.79]
    loss_axis, score_axis = names["train loss"].yaxis, names["val auc"].yaxis
    assert names["val loss"].yaxis == loss_axis
    assert names["train accuracy"].yaxis == score_axis
    assert loss_axis != score_axis
    assert fig.layout[score_axis.replace("y", "yaxis")].title.text == "accuracy / AUC"


# -- chart 5: layers -------------------------------------------------------------------------


def test_layer_bars_full_vs_tile_log_scale() -> None:
    plan = make_plan()
    fig = layers_figure(plan)
    full, tile = fig.data
    assert list(full.x) == ["conv1", "relu", "layer1.0.relu", "layer1.0.relu (2)", "layer4.1.relu"]
    assert list(full.y) == [layer.full_bytes / GIB for layer in LAYERS]  # >= 1 GiB: GiB
    assert list(tile.y) == [layer.tile_bytes / GIB for layer in LAYERS]
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.yaxis.title.text.startswith("output size, GiB")
    assert fig.layout.barmode == "group"
    layer = LayerMemory(name="c", channels=4, full_bytes=2**20, tile_bytes=2**18)
    small = layers_figure(make_plan(layers=(layer,)))
    assert (small.data[0].y, small.data[1].y) == ((1.0,), (0.25,))
    assert small.layout.yaxis.title.text.startswith("output size, MiB")


def test_profiled_plan_charts(tiny_model: Path) -> None:
    from tileplan.planning.profile import ProfileRequest, profile

    plan = profile(ProfileRequest(model_file=tiny_model, image_shape=(512, 512), measure=False,
                                  budget_bytes=2**30))  # fmt: skip
    charts = plan_charts(plan)
    assert len(charts.layers.data[0].x) == len(plan.layers) > 0
    grid = plan.tile_grid()
    crops = _rects(_trace(charts.tile_grid, "backward-pass crop (owned region + halo)"))
    assert len(crops) == grid.n_tiles
    assert "tiles were not timed" in _annotations(charts.memory_time)


# -- segmented plans ----------------------------------------------------------------------------


def test_a_segmented_plan_gets_a_segmentations_chart_and_one_grid_per_segment() -> None:
    plan = segmented_plan()
    charts = plan_charts(plan)
    assert charts.segments is not None
    assert len(charts.segment_grids) == len(plan.segments) - 1
    assert len(charts.figures()) == 4 + len(plan.segments) - 1
    # Bars: one slot per segmentation, the cut maps a category of their own, in GiB.
    maps = _trace(charts.segments, "cut maps")
    assert len(maps.x) == len(plan.segmentations)
    by_label = dict(zip(maps.x, maps.y, strict=True))
    for g in plan.segmentations:
        assert by_label[f"cut after {g.label}"] == g.memory.maps_bytes / GIB
    assert any(y > 0 for y in maps.y)
    # Each later grid is drawn over its segment's input map, from the plan's own geometry.
    for k, fig in enumerate(charts.segment_grids, start=1):
        seg = plan.segments[k]
        grid = seg.tile_grid()
        title = fig.layout.title.text
        assert f"segment {k + 1} of {len(plan.segments)}" in title
        assert f"{grid.n_tiles} tiles" in title
        assert f"over {seg.input_shape_px[0]}x{seg.input_shape_px[1]} px" in title


def test_a_segmented_plan_shows_each_layer_at_its_own_segments_tile() -> None:
    plan = segmented_plan()
    fig = layers_figure(plan)
    tiles = [t for t in fig.data if str(t.name).startswith("one tile of segment")]
    assert len(tiles) == len(plan.segments)
    for k, trace in enumerate(tiles):
        shown = [y is not None for y in trace.y]
        assert shown == [layer.segment == k for layer in plan.layers]
    assert all(any(y is not None for y in t.y) for t in tiles)  # every segment has layers
