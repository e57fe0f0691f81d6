"""The planner's segmented streaming: where it cuts, each segment's tiles, what the plan holds.

The search (``tileplan.planning.segments``) is checked against brute force over the same cost
model; whole profiles run on the real ResNet-18 example without device timing (``measure``
off: FLOP-proxy costs, estimated memory), so they are fast and deterministic. The engine side
of a segmented plan (``from_plan``) is exact by ``tests/executor/test_chain.py``; here the plan
must round-trip, check itself and drive the engine with the tiles it states.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from executor import (
    MemoryBreakdown,
    PlanError,
    StreamingCNN,
    check_plan_matches,
    load_plan,
    save_plan,
)
from tileplan.planning.model_file import load_model_file
from tileplan.planning.profile import NoFeasiblePlanError, ProfileRequest, profile
from tileplan.planning.segments import Costs, SegmentSearch, candidate_cuts, resolve_cuts

RESNET18 = Path(__file__).resolve().parents[3] / "examples" / "resnet18.py"
IMAGE = (768, 768)
GIB = 2**30


@pytest.fixture(scope="module")
def resnet18() -> object:
    return load_model_file(RESNET18, "auto")


def _profile(**kwargs: object) -> object:
    fields = {"model_file": RESNET18, "image_shape": IMAGE, "measure": False, **kwargs}
    return profile(ProfileRequest(**fields))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def segmented_plan() -> object:
    """ResNet-18 at 768² with every backward tile at most 256 px: one segment cannot (its
    smallest tile is larger), so the planner must cut."""
    return _profile(max_tile=256)


# -- where it may cut ------------------------------------------------------------------------------


def test_candidate_cuts_are_stage_ends_of_rising_stride(resnet18: object) -> None:
    cuts = candidate_cuts(resnet18.trunk)  # type: ignore[attr-defined]
    wheres = [w for _, w in cuts]
    # The stem's ReLU (stride 2), then the end of layer1, layer2, layer3 (stride 4, 8, 16);
    # never the trunk's own output (layer4).
    assert wheres == ["relu", "layer1.1.relu", "layer2.1.relu", "layer3.1.relu"], wheres


def test_resolve_cuts_by_module_or_node_name(resnet18: object) -> None:
    trunk = resnet18.trunk  # type: ignore[attr-defined]
    by_module = resolve_cuts(trunk, ["layer2", "layer1"])
    assert [w for _, w in by_module] == ["layer1.1.relu", "layer2.1.relu"]  # graph order
    node = by_module[0][0]
    assert resolve_cuts(trunk, [node]) == by_module[:1]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("layer9", "no module or node of that name"),
        ("layer1.0.conv1", "more than one value flows past it"),
    ],
)
def test_resolve_cuts_refuses_with_the_reason(resnet18: object, name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_cuts(resnet18.trunk, [name])  # type: ignore[attr-defined]


# -- the search --------------------------------------------------------------------------------


def _costs(usable: int, max_tile: int | None = None) -> Costs:
    fixed = MemoryBreakdown(
        params_bytes=44_000_000, grads_bytes=44_000_000, optimizer_bytes=88_000_000,
        image_bytes=3 * 768 * 768 * 4, output_bytes=512 * 24 * 24 * 4,
        output_grad_bytes=512 * 24 * 24 * 4, head_bytes=0,
        tile_forward_bytes=0, tile_backward_bytes=0,
    )  # fmt: skip
    return Costs(fixed=fixed, usable_bytes=usable, dtype=torch.float32,
                 time_fit=None, max_tile=max_tile)  # fmt: skip


def _brute_force(search: SegmentSearch, cuts: tuple[str, ...]) -> float | None:
    """The cheapest cost of a segmentation at ``cuts``: every combination of every segment's
    backward and forward grids, each checked against its own phases' memory."""
    bounds = [None, *cuts, None]
    parts = [search.part(a, b) for a, b in itertools.pairwise(bounds)]
    k = len(parts)
    room = search.costs.usable_bytes - search.costs.fixed.total_bytes
    limit = search.costs.max_tile
    per_part = []
    for i, part in enumerate(parts):
        made = sum(p.map_bytes for p in parts[:i])
        fwd_phase = made + (part.map_bytes if i < k - 1 else 0)
        bwd_phase = fwd_phase + (parts[i - 1].map_bytes if i else 0)
        options = []
        for g, f in itertools.product(part.grids(), repeat=2):
            if limit is not None and max(g.tile_shape) > limit:
                continue
            if f.tile_shape[0] * f.tile_shape[1] < g.tile_shape[0] * g.tile_shape[1]:
                continue
            if bwd_phase + part.tile_bytes(g.largest_crop, grad=True) > room:
                continue
            if fwd_phase + part.tile_bytes(f.largest_crop, grad=False) > room:
                continue
            options.append(part.grid_cost(g, step=True) + part.grid_cost(f, step=False))
        if not options:
            return None
        per_part.append(min(options))
    return sum(per_part)


@pytest.mark.parametrize("usable_gib", [0.45, 0.6, 4.0])
def test_search_finds_the_cheapest_segmentation_brute_force_finds(
    resnet18: object, usable_gib: float
) -> None:
    trunk = resnet18.trunk  # type: ignore[attr-defined]
    cuts = candidate_cuts(trunk)
    search = SegmentSearch(trunk, (1, 3, *IMAGE), cuts, _costs(round(usable_gib * GIB), 256))
    found = search.search([2, 3])
    names = [c for c, _ in cuts]
    expected = {}
    for n in (1, 2):
        for chosen in itertools.combinations(names, n):
            cost = _brute_force(search, chosen)
            if cost is not None:
                expected[chosen] = cost
    got = {option.cuts: cost for cost, option in found}
    assert set(got) == set(expected)
    for key, cost in expected.items():
        assert got[key] == pytest.approx(cost, rel=1e-12), key
    # Cheapest first, and every one within the budget.
    assert [c for c, _ in found] == sorted(c for c, _ in found)
    assert all(o.estimated_peak_bytes <= search.costs.usable_bytes for _, o in found)
    assert all(max(s.tile_px) <= 256 for _, o in found for s in o.segments)


def test_a_tighter_budget_never_gives_a_cheaper_plan(resnet18: object) -> None:
    trunk = resnet18.trunk  # type: ignore[attr-defined]
    cuts = candidate_cuts(trunk)
    best = []
    for usable in (0.4, 0.5, 0.7, 2.0):
        found = SegmentSearch(trunk, (1, 3, *IMAGE), cuts, _costs(round(usable * GIB))).search(
            [2, 3]
        )
        best.append(found[0][0] if found else float("inf"))
    assert best == sorted(best, reverse=True)


# -- whole profiles ------------------------------------------------------------------------------


def test_the_planner_cuts_when_one_segment_cannot_meet_max_tile(segmented_plan: object) -> None:
    plan = segmented_plan
    assert len(plan.segments) >= 2  # type: ignore[attr-defined]
    assert all(max(s.tile_px) <= 256 for s in plan.segments)  # type: ignore[attr-defined]
    assert plan.segments[-1].output_shape == plan.output_shape  # type: ignore[attr-defined]
    # The plan's memory counts the cut maps, and its peak is the chosen segmentation's.
    chosen = plan.chosen  # type: ignore[attr-defined]
    assert chosen.memory.maps_bytes > 0
    assert plan.predicted_peak_bytes == chosen.estimated_peak_bytes  # type: ignore[attr-defined]
    assert chosen in plan.segmentations  # type: ignore[attr-defined]


def test_one_segment_with_a_max_tile_below_its_minimum_says_so() -> None:
    with pytest.raises(ValueError, match="--max-tile 256: the trunk's smallest tile is"):
        _profile(max_tile=256, segments=1)


def test_segments_n_and_cut_are_obeyed() -> None:
    three = _profile(max_tile=256, segments=3)
    assert len(three.segments) == 3  # type: ignore[attr-defined]
    cut = _profile(cuts=("layer2",), max_tile=512)
    assert [s.where for s in cut.segments] == [  # type: ignore[attr-defined]
        "layer2.1.relu",
        "the trunk's output",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"segments": 0}, "--segments 0"),
        ({"segments": 3, "cuts": ("layer2",)}, "--cut names 1 cut"),
        ({"cuts": ("layer2",), "tile": (512, 512)}, "cannot go with --cut"),
        ({"max_tile": 0}, "--max-tile 0"),
    ],
)
def test_bad_segment_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProfileRequest(model_file=RESNET18, image_shape=IMAGE, **kwargs)


def test_more_segments_than_stages_is_refused_naming_the_stages() -> None:
    with pytest.raises(ValueError, match="only 4 place"):
        _profile(segments=6, max_tile=256)


def test_a_small_image_is_not_segmented() -> None:
    """One tile covers the whole image: nothing computes less, so no cut."""
    plan = _profile(image_shape=(256, 256))
    assert not plan.segments  # type: ignore[attr-defined]
    assert not plan.segmentations  # type: ignore[attr-defined]


def test_nothing_fits_says_so() -> None:
    with pytest.raises(NoFeasiblePlanError, match="no tile fits"):
        _profile(max_tile=256, budget_bytes=200 * 2**20)


# -- the plan --------------------------------------------------------------------------------------


def test_segmented_plan_round_trips_and_drives_the_engine(
    segmented_plan: object, resnet18: object, tmp_path: Path
) -> None:
    path = tmp_path / "plan.yaml"
    save_plan(segmented_plan, path)  # type: ignore[arg-type]
    loaded = load_plan(path)
    assert loaded == segmented_plan
    trunk = resnet18.trunk  # type: ignore[attr-defined]
    check_plan_matches(loaded, trunk)
    engine = StreamingCNN.from_plan(trunk, loaded)
    assert len(engine.program.streams) == len(loaded.segments)
    grids = engine.tile_grids(IMAGE)
    assert [g.counts for g in grids] == [s.grid for s in loaded.segments]
    assert [g.tile_shape for g in grids] == [s.tile_px for s in loaded.segments]
    assert [g.counts for g in grids] == [g.counts for g in loaded.tile_grids()]


def _check_edited(plan: object, trunk: object, **changes: object) -> None:
    first = plan.segments[0]  # type: ignore[attr-defined]
    edited = (dataclasses.replace(first, **changes), *plan.segments[1:])  # type: ignore
    check_plan_matches(dataclasses.replace(plan, segments=edited), trunk)  # type: ignore


@pytest.mark.parametrize(
    "changes",
    [
        {"halo_lo_px": (1, 1)},  # its geometry is not the model's
        {"end": "layer1_0_conv1"},  # not a point where one map flows on
        {"tile_px": (96, 96), "forward_tile_px": (96, 96)},  # its grid is not this tile's
    ],
    ids=["halo", "cut", "tile"],
)
def test_an_edited_segment_is_refused(
    segmented_plan: object, resnet18: object, changes: dict
) -> None:
    with pytest.raises(PlanError):
        _check_edited(segmented_plan, resnet18.trunk, **changes)  # type: ignore[attr-defined]


# -- time units ----------------------------------------------------------------------------------


def test_time_fit_counts_batch_times_spatial_pixels(resnet18: object) -> None:
    """The fit, TimeFit.predict and segment prices share one unit: batch x spatial pixels.
    (Channels counted in the fit but not in predictions once made every time 3x too low.)"""
    from executor import Precision
    from tileplan.planning.measure import measure_time_model

    trunk = resnet18.trunk  # type: ignore[attr-defined]
    fit = measure_time_model(trunk, [(2, 3, 96, 96), (2, 3, 128, 128)],
                             precision=Precision.of("float32"), device=torch.device("cpu"),
                             device_name="cpu")  # fmt: skip
    assert [s.crop_px for s in fit.samples] == [2 * 96 * 96, 2 * 128 * 128]


def test_a_whole_trunk_segment_costs_what_the_time_fit_predicts(resnet18: object) -> None:
    """One segment spanning the trunk, one tile over the image: the segment price (FLOPs in
    trunk pixels) equals the time fit's prediction for that crop, up to border effects on
    the FLOP count."""
    from tests.plans import TIME_FIT

    trunk = resnet18.trunk  # type: ignore[attr-defined]
    costs = dataclasses.replace(_costs(4 * GIB), time_fit=TIME_FIT)
    search = SegmentSearch(trunk, (1, 3, *IMAGE), [], costs)
    part = search.part(None, None)
    whole = part.grids()[-1]
    assert whole.n_tiles == 1
    expected = TIME_FIT.step_s(IMAGE[0] * IMAGE[1])
    assert part.grid_cost(whole, step=True) == pytest.approx(expected, rel=0.05)
