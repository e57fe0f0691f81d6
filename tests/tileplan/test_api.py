"""The Python planning API: ``tileplan.profile`` plans what ``tileplan profile`` plans, from a
module or a file, with the command's options as keywords; ``memory_report`` is what it prints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import tileplan
from tests.tileplan.conftest import TINY_GLOBAL_MODEL
from tileplan.cli import cli


def _module(source: str) -> nn.Module:
    namespace: dict[str, object] = {}
    exec(source, namespace)
    return namespace["build_model"]()  # type: ignore[operator,no-any-return]


def _comparable(plan: tileplan.Plan) -> dict[str, object]:
    data = plan.to_dict()
    data.pop("provenance")  # when it was made; below, how the model was given
    data["model"] = {k: v for k, v in data["model"].items() if k not in ("file", "entry")}  # type: ignore[union-attr]
    return data


def test_a_module_plans_as_its_model_file_does_on_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "model.py"
    path.write_text(TINY_GLOBAL_MODEL)
    args = ["--image", "128x96", "--bn", "train", "--max-tile", "48", "--no-measure",
            "--budget", "1GiB", "--dtype", "float64", "--cut", "features.3"]  # fmt: skip
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(cli, ["profile", str(path), *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    module = _module(TINY_GLOBAL_MODEL)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    plan = tileplan.profile(module, image=(128, 96), bn="train", max_tile=48, measure=False,
                            budget="1GiB", dtype="float64", cut=["features.3"])  # fmt: skip
    assert _comparable(plan) == _comparable(tileplan.load_plan(tmp_path / "p.yaml"))
    assert plan.model.file == "<TinyGlobal module>"
    # The module was planned on a copy: its weights, dtype and mode are as they were.
    assert module.training
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    # A file works too, and the report is what the command printed.
    from_file = tileplan.profile(path, image="128x96", bn="train", max_tile=48, measure=False,
                                 budget=2**30, dtype="float64", cut="features.3")  # fmt: skip
    assert _comparable(from_file) == _comparable(plan)
    report = tileplan.memory_report(tmp_path / "p.yaml")
    assert str(report) in result.output
    assert report.peak_bytes == plan.peak_bytes
    assert report.saving == plan.conventional_peak_bytes / plan.peak_bytes
    saved = plan.save(tmp_path / "again.yaml")
    assert _comparable(tileplan.load_plan(saved)) == _comparable(plan)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image": 0}, "image"),
        ({"image": (96, -1)}, "image"),
        ({"image": 96, "segments": 0}, "segments"),
        ({"image": 96, "budget": "lots"}, "lots"),
        ({"image": 96, "bn": "sometimes"}, "^bn='sometimes': use one of frozen, train$"),
        ({"image": 96, "max_tile": 0}, "^max_tile=0 must be a positive size in px$"),
        ({}, "image="),
        ({"image": 96, "mpp": 0.5}, "data="),
        ({"image": 96, "measure": True}, "__main__"),
    ],
)
def test_bad_options_name_the_keyword(options: dict[str, object], message: str) -> None:
    model = _module(TINY_GLOBAL_MODEL)  # classes made by exec: no module to import them from
    options = {"measure": False, "budget": "1GiB", **options}
    with pytest.raises(ValueError, match=message):
        tileplan.profile(model, **options)  # type: ignore[arg-type]
