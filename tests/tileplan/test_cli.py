"""The command line through click's CliRunner: presentation, files written, exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from executor import VerifyStatus, load_plan
from tileplan.cli import cli


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_profile_estimates_only_writes_a_valid_plan(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(tiny_model), "--image", "512x384", "--budget", "2GiB",
                        "--no-measure", "--out", str(out))  # fmt: skip
    assert code == 0, output
    plan = load_plan(out)
    assert plan.image_shape_px == (512, 384)
    assert plan.budget_bytes == 2 * 1024**3
    assert plan.time_fit is None
    assert plan.predicted_time_s is None
    assert plan.verification.status == VerifyStatus.OFF
    assert "not verified (turned off)" in output
    assert output.startswith("trunk: auto: trunk ends after")
    chosen = [line for line in output.splitlines() if line.startswith(">")]
    assert len(chosen) == 1
    assert "x".join(map(str, plan.tile_px)) in chosen[0]
    assert "conventional would need" in output
    code, output = _run("validate", str(out))
    assert code == 0, output
    assert "valid plan" in output


def test_profile_measures_and_verifies_on_cpu(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(tiny_model), "--image", "256", "--device", "cpu",
                        "--verify", "--out", str(out), "--json")  # fmt: skip
    assert code == 0, output
    data = json.loads(output)
    assert data["tile_px"] == list(load_plan(out).tile_px)
    assert data["measured_peak_bytes"] > 0  # one real streaming step ran
    assert data["verification"]["status"] == "verified"
    assert data["verification"]["peak_bytes"] == data["measured_peak_bytes"]
    assert data["time_fit"]["samples"]
    assert data["predicted_time_s"] > 0
    assert any(c["measured_tile_bytes"] for c in data["candidates"])


def test_profile_with_given_tile(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(tiny_model), "--image", "300", "--tile", "96x64",
                        "--no-measure", "--budget", "1GiB", "--out", str(out))  # fmt: skip
    assert code == 0, output
    assert load_plan(out).tile_px == (96, 64)


def test_planning_for_an_absent_gpu_from_estimates(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(tiny_model), "--image", "1024", "--device", "cuda",
                        "--no-measure", "--budget", "16GiB", "--out", str(out))  # fmt: skip
    assert code == 0, output
    plan = load_plan(out)
    assert plan.provenance.device_name == "CUDA device (assumed, not present)"
    assert all(c.memory.image_bytes == 0 for c in plan.candidates)  # images stay on the host


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["profile", "missing.py", "--image", "512"], "does not exist"),
        (["profile", "{model}", "--image", "12x"], "is not a size"),
        (["profile", "{model}", "--image", "512", "--budget", "lots"], "not a memory size"),
        (["profile", "{model}", "--image", "4096", "--budget", "1MiB", "--no-measure"],
         "no tile fits"),
        (["profile", "{model}", "--image", "512", "--tile", "8", "--no-measure", "--budget",
          "1GiB"], "smaller than the trunk's receptive field"),
        (["profile", "{model}", "--image", "512", "--split", "nope", "--no-measure"],
         "no module or node of that name"),
        (["validate", "{plan}"], "not valid YAML"),
        (["validate", "missing.yaml"], "does not exist"),
    ],
)  # fmt: skip
def test_bad_input_exits_non_zero_with_one_line(
    tiny_model: Path, tmp_path: Path, args: list[str], words: str
) -> None:
    bad_plan = tmp_path / "bad.yaml"
    bad_plan.write_text("tile_px: [1, 2\n")
    out = tmp_path / "never.yaml"
    args = [a.format(model=tiny_model, plan=bad_plan) for a in args]
    if args[0] == "profile":
        args += ["--out", str(out)]
    code, output = _run(*args)
    assert code != 0
    assert words in output
    assert not out.exists()  # nothing half-written
    assert "Traceback" not in output


def test_validate_refuses_a_plan_for_another_model(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(tiny_model), "--image", "256", "--no-measure",
                        "--budget", "1GiB", "--out", str(out))  # fmt: skip
    assert code == 0, output
    other = tmp_path / "other.py"
    other.write_text(tiny_model.read_text().replace("nn.Conv2d(8, 16, 3", "nn.Conv2d(8, 16, 5"))
    code, output = _run("validate", str(out), "--model", str(other))
    assert code != 0
    assert "different model" in output


def test_validate_refuses_an_edited_plan(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(tiny_model), "--image", "256", "--no-measure",
                        "--budget", "1GiB", "--out", str(out))  # fmt: skip
    assert code == 0, output
    edited = tmp_path / "edited.yaml"
    edited.write_text(out.read_text().replace("image_shape_px: [256, 256]",
                                              "image_shape_px: [384, 384]"))  # fmt: skip
    code, output = _run("validate", str(edited))
    assert code == 1
    assert output.count("\n") == 1
    assert "its geometry gives" in output


RESNET18 = Path(__file__).resolve().parents[2] / "examples" / "resnet18.py"


def test_profile_segments_a_deep_trunk_under_max_tile(tmp_path: Path) -> None:
    """ResNet-18 with every backward tile at most 256 px: one segment cannot (its smallest
    tile is larger), so the plan cuts it; the table says where, and view/validate take it."""
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(RESNET18), "--image", "768", "--max-tile", "256",
                        "--no-measure", "--out", str(out))  # fmt: skip
    assert code == 0, output
    plan = load_plan(out)
    assert len(plan.segments) >= 2
    assert "segmentations considered" in output
    assert f"streamed in {len(plan.segments)} segments" in output
    for seg in plan.segments[:-1]:
        assert seg.where in output
    assert f"{len(plan.segments)} segments, " in output  # the summary line
    code, output = _run("validate", str(out))
    assert code == 0, output
    code, output = _run("view", str(out), "--no-open")
    assert code == 0, output


def test_profile_with_cut_and_segments_one(tmp_path: Path) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(RESNET18), "--image", "1024", "--cut", "layer2",
                        "--no-measure", "--out", str(out))  # fmt: skip
    assert code == 0, output
    assert [s.where for s in load_plan(out).segments] == ["layer2.1.relu", "the trunk's output"]
    code, output = _run("profile", str(RESNET18), "--image", "1024", "--segments", "1",
                        "--no-measure", "--out", str(out))  # fmt: skip
    assert code == 0, output
    assert not load_plan(out).segments
    assert "segmentations considered" not in output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--segments", "two"], "--segments"),
        (["--segments", "0"], "--segments"),
        (["--cut", "layer9"], "--cut layer9: no module or node of that name"),
        (["--cut", "layer1.0.conv1"], "more than one value flows past it"),
        (["--segments", "1", "--max-tile", "256"], "--max-tile 256: the trunk's smallest tile"),
    ],
)
def test_bad_segment_options_exit_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "plan.yaml"
    code, output = _run("profile", str(RESNET18), "--image", "768", "--no-measure",
                        "--out", str(out), *args)  # fmt: skip
    assert code != 0
    assert message in output, output
    assert not out.exists()
