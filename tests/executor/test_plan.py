"""The plan file: YAML round trip, atomic writes, and every refusal."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import yaml
from torch import nn

from executor import (
    Plan,
    PlanError,
    StreamingCNN,
    check_plan_matches,
    load_plan,
    save_plan,
    trunk_fingerprint,
)
from tests.plans import make_plan


def _trunk() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))


def _plan(trunk: nn.Module, **overrides: object) -> Plan:
    return make_plan(trunk=trunk, image=(256, 256), tiles=(64, 128, 256), chosen=64,
                     forward=128, measured=(64,), budget=10**9, layers=(), **overrides)  # fmt: skip


def test_round_trip_is_exact(tmp_path: Path) -> None:
    plan = _plan(_trunk())
    path = save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(path) == plan
    text = path.read_text()
    assert "schema_version: 2" in text
    assert "image_shape_px: [256, 256]" in text
    assert "budget_bytes" in text  # units in key names
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]  # no temp files left


def test_a_plan_written_before_segments_existed_still_loads(tmp_path: Path) -> None:
    """Plans saved before segmented streaming have no segment keys (no ``segments``,
    ``segmentations``, cut-map bytes or layer segment): they load as one-segment plans."""
    plan = make_plan()
    data = yaml.safe_load(save_plan(plan, tmp_path / "new.yaml").read_text())
    data.pop("segments", None)
    data.pop("segmentations", None)
    for candidate in data["candidates"]:
        candidate["memory"].pop("maps_bytes")
    for layer in data["layers"]:
        layer.pop("segment")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(data, sort_keys=False))
    loaded = load_plan(old)
    assert loaded == plan
    assert not loaded.segments
    assert len(loaded.tile_grids()) == 1


def test_failed_write_keeps_the_old_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_plan(_plan(_trunk()), tmp_path / "plan.yaml")
    before = path.read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save_plan(_plan(_trunk(), margin=0.2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan.yaml"]


CORRUPT = {
    "not_yaml": ("tile_px: [1, 2\n  - ]]", "not valid YAML"),
    "not_a_mapping": ("- 1\n- 2\n", "does not hold a mapping"),
    "wrong_schema": ("schema_version: 99\n", "schema_version is 99"),
    "missing_keys": ("schema_version: 2\ntile_px: [64, 64]\n", "missing key"),
    "old_schema": ("schema_version: 1\ntile_px: [64, 64]\n", "schema_version is 1"),
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
    with pytest.raises(PlanError, match="unknown key"):
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
    # A smaller image (any aspect) streams at its own shape with its own grid; a larger one
    # is refused.
    assert scnn.forward(torch.randn(1, 3, 128, 200)).shape == (1, 4, 64, 100)
    with pytest.raises(PlanError, match="larger than the plan's 256x256"):
        scnn.forward(torch.randn(1, 3, 128, 260))
    with pytest.raises(PlanError, match="different model"):
        StreamingCNN.from_plan(nn.Sequential(nn.Conv2d(3, 8, 3)), path)


def _edit(data: dict, path: str, value: object) -> dict:
    """Set ``a.b[2].c`` in nested plain data."""
    import re

    keys = [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]
    node = data
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return data


# A hand edit of each kind: the plan must be refused, naming what is wrong.
EDITS = {
    "image_size": ("image_shape_px", [512, 512], "its geometry gives"),
    "tile_count": ("candidates[0].grid", [1, 25], "states 1x25 tiles, its geometry gives 5x5"),
    "n_tiles": ("candidates[0].n_tiles", 5, "n_tiles 5 != product"),
    "overlap": ("candidates[0].overlap_factor", 1.0, "states overlap 1.0"),
    "peak_vs_categories": ("candidates[0].estimated_peak_bytes", 1, "sum of its memory"),
    "chosen_peak": ("predicted_peak_bytes", 5, "!= the chosen tile 64x64's estimate"),
    "negative_memory": ("candidates[2].memory.head_bytes", -1, "cannot be negative"),
    "unaligned_tile": ("candidates[1].tile_px", [127, 127], "not aligned"),
    "chosen_not_a_candidate": ("tile_px", [32, 32], "tile 32x32 is not one of those considered"),
    "verification_status": ("verification.status", "probably", "one of 'verified'"),
    "verified_without_peak": ("verification.peak_bytes", None, "needs peak_bytes"),
    "time_without_fit": ("time_fit", None, "need a time_fit"),
    "dtype": ("dtype", "float8", "one of 'float32'"),
    "optimizer": ("optimizer", "lamb", "one of 'adam'"),
    "bool_as_int": ("candidates[0].fits", 1, "expected true or false"),
    "int_as_text": ("channels", "3", "expected an integer"),
    "margin": ("margin", 1.5, "margin 1.5 must be in"),
    "calibration": ("calibration_factor", 0.5, "calibration_factor must be >= 1"),
    "rank": ("halo_lo_px", [1, 1, 1], "halo_lo_px has 3 axes"),
}


@pytest.mark.parametrize("name", sorted(EDITS))
def test_edited_plans_are_refused(tmp_path: Path, name: str) -> None:
    key, value, words = EDITS[name]
    data = _edit(_plan(_trunk()).to_dict(), key, value)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(PlanError, match=words) as info:
        load_plan(path)
    assert "\n" not in str(info.value)
    assert "plan.yaml" in str(info.value)


class _Pooled(nn.Module):
    """A trunk whose pooling is in its forward code, so its geometry is not in its modules."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(torch.relu(self.conv(x)), self.kernel, 2, self.kernel // 2)


def test_stale_geometry_is_refused_against_the_model() -> None:
    trunk = _trunk()
    plan = _plan(trunk)
    check_plan_matches(plan, trunk)
    other = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2))
    with pytest.raises(PlanError, match="different model"):
        check_plan_matches(plan, other)
    # The model's code changed (a wider pooling window), its modules and parameters did not:
    # same fingerprint, other geometry. The plan is consistent on its own but stale.
    old, new = _Pooled(2), _Pooled(5)
    assert trunk_fingerprint(old) == trunk_fingerprint(new)
    stale = _plan(old)
    check_plan_matches(stale, old)
    with pytest.raises(PlanError, match=r"halo_lo_px \[2, 2\] but the model gives \[3, 3\]"):
        check_plan_matches(stale, new)
    with pytest.raises(PlanError, match="stale or edited"):
        StreamingCNN.from_plan(new, stale)


def test_derived_values_and_fixtures_build_only_when_consistent() -> None:
    plan = _plan(_trunk())
    chosen = plan.chosen
    assert chosen is not None
    assert chosen.tile_px == plan.tile_px
    assert plan.tile_grid().counts == chosen.grid
    assert plan.tile_grid(forward=True).tile_shape == plan.forward_tile_px
    assert plan.peak_bytes == plan.measured_peak_bytes
    with pytest.raises(PlanError, match="is not one of those considered"):
        dataclasses.replace(plan, tile_px=(32, 32))
