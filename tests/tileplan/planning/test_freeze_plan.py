"""``tileplan profile --freeze MODULE``: the plan is cut at the freeze module and prices the
frozen phase (its segments forward only, no gradient or optimizer state for the frozen
parameters) besides the phase where everything trains, with the same tiles."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

import tileplan
from executor import load_plan
from tests.tileplan.run.tiny_runs import run_cli


def _resnet18() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=2).eval()


def test_the_frozen_phase_streams_its_prefix_forward_only(tmp_path: Path) -> None:
    model = _resnet18()
    frozen = tileplan.profile(model, image=1024, budget="1GiB", measure=False, freeze="layer3")
    cut = tileplan.profile(model, image=1024, budget="1GiB", measure=False, cut="layer3")
    # The same segments and tiles as a plan cut there: one plan serves both phases.
    assert frozen.segments == cut.segments
    assert frozen.predicted_peak_bytes == cut.predicted_peak_bytes
    phase = frozen.frozen_phase
    assert phase is not None
    assert cut.frozen_phase is None
    assert (phase.freeze, phase.frozen_segments) == ("layer3", 1)
    both = frozen.segmentations[0].memory if frozen.segmentations else None
    assert both is not None
    # No backward tile of the frozen segment: the larger backward tile is the second's.
    assert phase.memory.tile_backward_bytes <= frozen.segments[1].tile_backward_bytes
    # Gradients and optimizer state only for the parameters that train (per element).
    prefix = {"conv1", "bn1", "layer1", "layer2", "layer3"}
    held = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in prefix)
    total = sum(p.numel() for p in model.parameters())
    assert phase.memory.grads_bytes == round(both.grads_bytes * (1 - held / total))
    assert phase.memory.optimizer_bytes == round(both.optimizer_bytes * (1 - held / total))
    # The cut map's gradient is never made: the maps alive are at most the cut map itself.
    assert phase.memory.maps_bytes <= frozen.segments[0].map_bytes
    assert phase.estimated_peak_bytes <= frozen.predicted_peak_bytes
    # Forward only through conv1-layer3 (most of ResNet-18's computation at this size).
    assert 0.1 < phase.cost_ratio < 0.6
    report = str(tileplan.memory_report(frozen))
    assert "frozen phase (train --freeze layer3): segment 1 streams forward only" in report
    # The plan file holds it.
    path = frozen.save(tmp_path / "plan.yaml")
    assert load_plan(path).frozen_phase == phase


def test_profile_freeze_through_the_cli_and_its_refusals(tmp_path: Path) -> None:
    from tests.tileplan.conftest import TINY_MODEL

    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    base = ["profile", tmp_path / "tiny.py", "--image", 96, "--max-tile", 64, "--dtype",
            "float64", "--no-measure", "--budget", "2GiB"]  # fmt: skip
    code, text = run_cli(*base, "--freeze", "features.2", "--out", tmp_path / "p.yaml")
    assert code == 0, text
    assert "frozen phase (train --freeze features.2)" in text
    assert load_plan(tmp_path / "p.yaml").frozen_phase.frozen_segments == 1
    code, text = run_cli(*base, "--freeze", "feature.2", "--out", tmp_path / "q.yaml")
    assert code != 0
    assert "feature.2" in text
    assert not (tmp_path / "q.yaml").exists()
    code, text = run_cli("profile", tmp_path / "tiny.py", "--image", 96, "--tile", 64,
                         "--no-measure", "--freeze", "features.2",
                         "--out", tmp_path / "r.yaml")  # fmt: skip
    assert code != 0
    assert "cannot go with --cut or --freeze" in text


def test_freeze_refusals_name_freeze() -> None:
    with pytest.raises(ValueError, match="freeze='fc': no module or node"):
        tileplan.profile(_resnet18(), image=512, budget="1GiB", measure=False, freeze="fc")
    with pytest.raises(ValueError, match="freeze='layer4': it makes the trunk's output"):
        tileplan.profile(_resnet18(), image=512, budget="1GiB", measure=False, freeze="layer4")
    with pytest.raises(ValueError, match="which bn='train' does not"):
        tileplan.profile(_resnet18(), image=512, budget="1GiB", measure=False, freeze="layer3",
                         bn="train")  # fmt: skip


def test_freeze_counts_as_a_cut() -> None:
    with pytest.raises(ValueError, match="cut= and freeze= name 1 cut"):
        tileplan.profile(_resnet18(), image=512, budget="1GiB", measure=False, freeze="layer3",
                         segments=3)  # fmt: skip
