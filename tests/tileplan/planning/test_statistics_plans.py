"""Plans of trunks with statistics of whole maps (global-context layers): the segments the
statistics force, the statistics and BatchNorm mode a plan records, what is refused, and a
verified peak against the estimate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from executor import (
    Plan,
    PlanError,
    StreamingCNN,
    build_program,
    check_plan_matches,
    load_plan,
    save_plan,
)
from tests.oracle import assert_exact
from tests.tileplan.conftest import TINY_GLOBAL_MODEL
from tileplan.cli import cli
from tileplan.planning.model_file import load_model_file
from tileplan.planning.profile import ProfileRequest, profile

GIB = 1024**3


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("global") / "global.py"
    path.write_text(TINY_GLOBAL_MODEL)
    return path


def _profile(model_file: Path, **options: object) -> Plan:
    request = ProfileRequest(model_file=model_file, image_shape=(160, 160), measure=False,
                             budget_bytes=2 * GIB, **options)  # type: ignore[arg-type]  # fmt: skip
    return profile(request)


def test_statistics_end_segments_and_the_plan_records_them(model_file: Path,
                                                           tmp_path: Path) -> None:  # fmt: skip
    plan = _profile(model_file, max_tile=48, dtype="float64")
    loaded = load_model_file(model_file)
    program = build_program(loaded.trunk)
    assert [(s.kind, s.source) for s in plan.statistics] == [
        (r.kind, r.source) for r in program.reductions
    ]
    assert [s.kind for s in plan.statistics] == ["mean", "group_moments"]
    assert plan.batch_norm == "frozen"
    # Every end a statistic forces is among the plan's; no single tile is offered.
    forced = [p.end for p in program.streams[:-1]]
    assert set(forced) <= {s.end for s in plan.segments}
    assert not plan.candidates
    assert all(max(s.tile_px) <= 48 for s in plan.segments)
    assert plan.segments[0].tile_grid().n_tiles > 1
    # The contract: round trip, re-derived from the model, and the engine it drives.
    save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml") == plan
    check_plan_matches(plan, loaded.trunk)
    trunk = loaded.trunk.double()
    engine = StreamingCNN.from_plan(trunk, tmp_path / "plan.yaml")
    image = torch.randn(1, 3, 160, 160, dtype=torch.float64)
    assert_exact(engine.forward(image), trunk(image), "output")


def test_a_plan_is_for_one_batch_norm_mode(model_file: Path) -> None:
    """BatchNorm with batch statistics ends a segment of its own: a plan for it is refused
    for the frozen model and the other way round, naming the option."""
    trained = _profile(model_file, batch_norm="train")
    assert trained.batch_norm == "train"
    assert [s.kind for s in trained.statistics] == ["batch_moments", "mean", "group_moments"]
    frozen = _profile(model_file)
    with pytest.raises(PlanError, match="--bn train"):
        check_plan_matches(trained, load_model_file(model_file).trunk)
    with pytest.raises(PlanError, match="--bn frozen"):
        check_plan_matches(frozen, load_model_file(model_file, batch_norm="train").trunk)


def test_an_edited_statistic_is_refused(model_file: Path) -> None:
    plan = _profile(model_file)
    data = plan.to_dict()
    data["statistics"][0]["source"] = "features_2"
    edited = Plan.from_dict(data)  # consistent in itself
    with pytest.raises(PlanError, match="first difference: mean of"):
        check_plan_matches(edited, load_model_file(model_file).trunk)


@pytest.mark.parametrize(
    ("options", "words"),
    [({"tile": (64, 64)}, "--tile sets one tile"), ({"segments": 1}, "--segments 1"),
     ({"segments": 2}, "--segments 2")],
)  # fmt: skip
def test_one_tile_options_are_refused(model_file: Path, options: dict[str, object],
                                      words: str) -> None:  # fmt: skip
    with pytest.raises(ValueError, match=f"{words}.*statistics of whole maps"):
        _profile(model_file, **options)


def test_profile_says_which_cuts_the_statistics_force(model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    done = CliRunner().invoke(cli, ["profile", str(model_file), "--image", "160", "--no-measure",
                                    "--budget", "2GiB", "--max-tile", "48", "--bn", "train",
                                    "--out", str(out)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "statistics of whole maps (BatchNorm with batch statistics): 3" in done.output
    assert "each ends a segment, and the maps it reduces are kept whole" in done.output
    assert "3 statistics + " in done.output
    assert "before features.4 (mean)" in done.output
    done = CliRunner().invoke(cli, ["validate", str(out)])
    assert done.exit_code == 0, done.output
    refused = CliRunner().invoke(cli, ["profile", str(model_file), "--image", "160",
                                       "--no-measure", "--segments", "1", "--out",
                                       str(tmp_path / "q.yaml")])  # fmt: skip
    assert refused.exit_code == 1
    assert refused.output.count("\n") == 1
    assert "streams in at least" in refused.output
    assert not (tmp_path / "q.yaml").exists()


def test_verified_peak_of_efficientnet_is_the_estimate(tmp_path: Path) -> None:
    """EfficientNet-B0 (squeeze-excitation in every block) at 768²: the planner calibrates
    on one real segment tile, and one real streaming step (RSS of a fresh process) peaks
    within 10% of the plan's prediction."""
    pytest.importorskip("timm")
    path = tmp_path / "effnet.py"
    path.write_text("import timm\n\ndef build_model():\n"
                    "    return timm.create_model('efficientnet_b0', num_classes=2)\n")  # fmt: skip
    request = ProfileRequest(model_file=path, image_shape=(768, 768), budget_bytes=3 * GIB,
                             verify=True)  # fmt: skip
    plan = profile(request)
    assert len(plan.segments) >= 17
    assert plan.calibration_factor is not None
    assert plan.measured_peak_bytes is not None
    error = plan.measured_peak_bytes / plan.predicted_peak_bytes - 1
    assert abs(error) <= 0.1, (plan.measured_peak_bytes, plan.predicted_peak_bytes)
    assert math.isfinite(plan.predicted_time_s or math.nan)


def test_a_plan_is_checked_again_when_the_trunk_changes_mode(model_file: Path) -> None:
    """A frozen plan drives an engine; switching the trunk's BatchNorm to train mode makes
    its statistics other ones: the next pass refuses the plan instead of running unplanned
    segments."""
    plan = _profile(model_file, max_tile=48)
    loaded = load_model_file(model_file)
    engine = StreamingCNN.from_plan(loaded.trunk, plan)
    image = torch.randn(1, 3, 160, 160)
    engine.forward(image)
    loaded.model.train()
    with pytest.raises(PlanError, match="--bn frozen"):
        engine.forward(image)
