"""The plan file: YAML round trip, atomic writes, and every refusal."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from torch import nn

from executor import (
    Candidate,
    MemoryBreakdown,
    Plan,
    PlanError,
    StreamingCNN,
    check_plan_matches,
    load_plan,
    save_plan,
    trunk_fingerprint,
)


def _trunk() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def _plan(trunk: nn.Module, **overrides: object) -> Plan:
    memory = MemoryBreakdown(
        params_bytes=448, grads_bytes=448, optimizer_bytes=896, image_bytes=786432,
        output_bytes=262144, output_grad_bytes=262144, head_bytes=1024,
        tile_forward_bytes=100000, tile_backward_bytes=400000,
    )  # fmt: skip
    values: dict[str, object] = {
        "provenance": {"tool": "tileplan test", "torch": "2.x", "device": "cpu"},
        "model": {"file": "m.py", "trunk_fingerprint": trunk_fingerprint(trunk), "split": "x"},
        "image_shape_px": (256, 256), "channels": 3, "dtype": "float32", "optimizer": "adam",
        "output_stride_px": (2, 2), "halo_lo_px": (1, 1), "halo_hi_px": (2, 2),
        "output_shape": (128, 128), "budget_bytes": 10**9, "margin": 0.1,
        "tile_px": (64, 64), "forward_tile_px": (128, 128), "predicted_peak_bytes": 1713048,
        "predicted_time_s": 0.123, "conventional_peak_bytes": 5 * 10**6,
        "candidates": (
            Candidate(tile_px=(64, 64), grid=(4, 4), n_tiles=16, overlap_factor=1.1, memory=memory,
                      estimated_peak_bytes=memory.total_bytes, measured_tile_bytes=390000,
                      predicted_time_s=0.123, fits=True),
        ),
    }  # fmt: skip
    values.update(overrides)
    return Plan(**values)  # type: ignore[arg-type]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    plan = _plan(_trunk())
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(path) == plan
    text = path.read_text()
    assert "schema_version: 1" in text
    assert "budget_bytes" in text  # units in key names
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]  # no temp files left


def test_failed_write_keeps_the_old_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_plan(_plan(_trunk()), tmp_path / "plan.yaml")
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_plan(_plan(_trunk(), tile_px=(32, 32)), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


CORRUPT = {
    "not_yaml": ("tile_px: [1, 2\n  - ]]", "not valid YAML"),
    "not_a_mapping": ("- 1\n- 2\n", "does not hold a mapping"),
    "wrong_schema": ("schema_version: 99\n", "schema_version is 99"),
    "missing_keys": ("schema_version: 1\ntile_px: [64, 64]\n", "malformed"),
    "binary": ("\udcff\udcfe", "cannot read plan file"),
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_plans_are_errors_not_crashes(tmp_path: Path, name: str) -> None:
    text, words = CORRUPT[name]
    path = tmp_path / "plan.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(PlanError, match=words):
        load_plan(path)


def test_unknown_key_and_missing_file(tmp_path: Path) -> None:
    data = _plan(_trunk()).to_dict()
    data["tile_size"] = 3
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match="unknown keys"):
        load_plan(path)
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "missing.yaml")


def test_plan_refused_for_other_model_shape_or_dtype(tmp_path: Path) -> None:
    trunk = _trunk()
    plan = _plan(trunk)
    check_plan_matches(plan, trunk, image_shape=(256, 256), dtype="float32")
    other = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(PlanError, match="different model"):
        check_plan_matches(plan, other)
    with pytest.raises(PlanError, match="512x512"):
        check_plan_matches(plan, trunk, image_shape=(512, 512))
    with pytest.raises(PlanError, match="dtype float32, not bfloat16"):
        check_plan_matches(plan, trunk, dtype="bfloat16")


def test_executor_uses_and_enforces_the_plan(tmp_path: Path) -> None:
    import torch

    trunk = _trunk()
    path = save_plan(_plan(trunk), tmp_path / "plan.yaml")
    scnn = StreamingCNN.from_plan(trunk, path)
    assert scnn.tile_shape == (64, 64)
    assert scnn.forward_tile_shape == (128, 128)
    out = scnn.forward(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 4, 128, 128)
    with pytest.raises(PlanError, match="does not match the plan's 256x256"):
        scnn.forward(torch.randn(1, 3, 128, 256))
    with pytest.raises(PlanError, match="different model"):
        StreamingCNN.from_plan(nn.Sequential(nn.Conv2d(3, 8, 3)), path)
