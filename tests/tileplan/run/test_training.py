"""`tileplan train/predict/report/demo-data` end to end on generated data, resume, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from executor import load_plan
from tileplan.cli import cli
from tileplan.run.checkpoint import load_checkpoint
from tileplan.run.data import load_csv
from tileplan.run.report import load_metrics, load_report
from tileplan.settings import Normalization

SIZE = 192  # px: small images keep CI fast; the tiny model's receptive field is ~30 px


def _run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo data and a plan that streams the tiny model over several tiles."""
    root = tmp_path_factory.mktemp("run")
    model = root / "tiny.py"
    from tests.tileplan.conftest import TINY_MODEL

    model.write_text(TINY_MODEL)
    code, out = _run("demo-data", root / "demo", "--n", 8, "--size", SIZE, "--seed", 1)
    assert code == 0, out
    code, out = _run("profile", model, "--image", SIZE, "--tile", 96, "--no-measure",
                     "--budget", "2GiB", "--out", root / "plan.yaml")  # fmt: skip
    assert code == 0, out
    assert load_plan(root / "plan.yaml").tile_px == (96, 96)
    return root


def _train(ws: Path, out: Path, *extra: object) -> tuple[int, str]:
    return _run("train", ws / "tiny.py", "--plan", ws / "plan.yaml", "--data",
                ws / "demo" / "train.csv", "--val", ws / "demo" / "val.csv", "--out", out,
                "--batch", 2, "--num-workers", 0, "--lr", 1e-3, *extra)  # fmt: skip


def test_profile_train_report_predict(workspace: Path, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "a"
    code, out = _train(workspace, run, "--epochs", 2)
    assert code == 0, out
    metrics = load_metrics(run)
    assert [m.epoch for m in metrics] == [1, 2]
    assert all(m.val_auc is not None for m in metrics)  # binary labels: AUC reported
    report = load_report(run)
    assert report.streaming_peak_bytes > 0
    plan = load_plan(workspace / "plan.yaml")
    assert report.n_tiles == next(c.n_tiles for c in plan.candidates) > 1
    assert report.timeline  # memory sampled over a streaming step
    assert "streaming step peak" in out
    assert (run / "plan.yaml").is_file()

    code, out = _run("report", run)
    assert code == 0, out
    assert "saved per image" in out

    maps = tmp_path / "maps"
    images = sorted((workspace / "demo").glob("*.tif"))[:2]
    code, out = _run("predict", workspace / "tiny.py", *images, "--plan", workspace / "plan.yaml",
                     "--checkpoint", run / "last.pt", "--saliency", maps)  # fmt: skip
    assert code == 0, out
    rows = out.strip().splitlines()
    assert rows[0] == "image,label,score,outputs"
    assert len(rows) == 3
    saliency = __import__("numpy").load(maps / f"{images[0].stem}.saliency.npy")
    assert saliency.shape == (3, SIZE, SIZE)
    assert (maps / f"{images[0].stem}.saliency.png").is_file()


def test_a_segmented_plan_trains_reports_and_predicts(workspace: Path, tmp_path: Path) -> None:
    """`train`, `report` and `predict` run a plan that cuts the trunk, unchanged."""
    plan_file = tmp_path / "segmented.yaml"
    code, out = _run("profile", workspace / "tiny.py", "--image", SIZE, "--cut", "features.2",
                     "--max-tile", 64, "--no-measure", "--budget", "2GiB",
                     "--out", plan_file)  # fmt: skip
    assert code == 0, out
    plan = load_plan(plan_file)
    assert len(plan.segments) == 2
    run = tmp_path / "runs" / "seg"
    code, out = _run("train", workspace / "tiny.py", "--plan", plan_file, "--data",
                     workspace / "demo" / "train.csv", "--out", run, "--batch", 2,
                     "--num-workers", 0, "--epochs", 1)  # fmt: skip
    assert code == 0, out
    report = load_report(run)
    assert report.n_tiles == sum(g.n_tiles for g in plan.tile_grids()) > 2
    assert report.streaming_peak_bytes > 0
    code, out = _run("report", run)
    assert code == 0, out
    images = sorted((workspace / "demo").glob("*.tif"))[:1]
    code, out = _run("predict", workspace / "tiny.py", *images, "--plan", plan_file,
                     "--checkpoint", run / "last.pt", "--saliency", tmp_path / "maps")  # fmt: skip
    assert code == 0, out
    assert (tmp_path / "maps" / f"{images[0].stem}.saliency.npy").is_file()


def test_batch_norm_trains_with_batch_statistics_from_the_cli(workspace: Path,
                                                              tmp_path: Path) -> None:  # fmt: skip
    """`profile --bn train`, then `train` (its --bn from the plan), `report` and `predict` of a
    model with BatchNorm, squeeze-excitation and GroupNorm: the running statistics change in
    the checkpoint, validation and prediction use them, and a frozen run of the plan is
    refused naming the option."""
    from tests.tileplan.conftest import TINY_GLOBAL_MODEL

    model = tmp_path / "global.py"
    model.write_text(TINY_GLOBAL_MODEL)
    plan_file = tmp_path / "bn.yaml"
    code, out = _run("profile", model, "--image", SIZE, "--bn", "train", "--max-tile", 64,
                     "--no-measure", "--budget", "2GiB", "--out", plan_file)  # fmt: skip
    assert code == 0, out
    assert load_plan(plan_file).batch_norm == "train"
    refused = tmp_path / "runs" / "frozen"
    code, out = _run("train", model, "--plan", plan_file, "--data",
                     workspace / "demo" / "train.csv", "--out", refused, "--bn", "frozen",
                     "--num-workers", 0, "--epochs", 1)  # fmt: skip
    assert code == 1
    assert "--bn train" in out
    assert not refused.exists()
    run = tmp_path / "runs" / "bn"
    code, out = _run("train", model, "--plan", plan_file, "--data",
                     workspace / "demo" / "train.csv", "--val", workspace / "demo" / "val.csv",
                     "--out", run, "--batch", 2, "--num-workers", 0, "--epochs", 1)  # fmt: skip
    assert code == 0, out
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint.meta.spec.batch_norm == "train"
    counted = checkpoint.model["features.1.num_batches_tracked"]
    assert int(counted) == len(load_csv(workspace / "demo" / "train.csv").samples)
    assert not torch.equal(checkpoint.model["features.1.running_var"], torch.ones(8))
    assert load_metrics(run)[-1].val_loss is not None
    code, out = _run("report", run)
    assert code == 0, out
    images = sorted((workspace / "demo").glob("*.tif"))[:1]
    code, out = _run("predict", model, *images, "--plan", plan_file, "--checkpoint",
                     run / "last.pt", "--saliency", tmp_path / "maps")  # fmt: skip
    assert code == 0, out
    assert (tmp_path / "maps" / f"{images[0].stem}.saliency.npy").is_file()


def test_resume_continues_exactly(workspace: Path, tmp_path: Path) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert _train(workspace, straight, "--epochs", 2, "--no-report")[0] == 0
    assert _train(workspace, stopped, "--epochs", 1, "--no-report")[0] == 0
    code, out = _train(workspace, stopped, "--epochs", 2, "--no-report", "--resume")
    assert code == 0, out
    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(stopped / "last.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert len(load_metrics(straight)) == 2
    assert [m.train_loss for m in load_metrics(straight)] == [
        m.train_loss for m in load_metrics(stopped)
    ]
    # A resumed run must continue with the settings it started with (a lower --lr aside:
    # that is how a diverged run goes on from its last good checkpoint).
    code, out = _train(workspace, stopped, "--epochs", 3, "--no-report", "--resume", "--batch",
                       4)  # fmt: skip
    assert code == 1
    assert "started with batch 2, not 4" in out


def test_existing_run_is_not_overwritten(workspace: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(workspace, run, "--epochs", 1, "--no-report")[0] == 0
    before = (run / "last.pt").read_bytes()
    code, out = _train(workspace, run, "--epochs", 1, "--no-report")
    assert code != 0
    assert "--resume" in out
    assert (run / "last.pt").read_bytes() == before


def _csv(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_bad_inputs_fail_before_training(workspace: Path, tmp_path: Path) -> None:
    image = sorted((workspace / "demo").glob("*.tif"))[0]
    cases = {
        "missing image": (
            _csv(tmp_path, "a.csv", f"image,label\n{image},0\nnope.tif,1\n"),
            "row 2",
        ),
        "bad csv": (_csv(tmp_path, "b.csv", "path,y\na.tif,1\n"), "missing column"),
        "missing csv": (tmp_path / "absent.csv", "absent.csv"),
    }
    for name, (csv_path, words) in cases.items():
        out_dir = tmp_path / name.replace(" ", "_")
        code, out = _run("train", workspace / "tiny.py", "--plan", workspace / "plan.yaml",
                         "--data", csv_path, "--out", out_dir, "--num-workers", 0)  # fmt: skip
        assert code != 0, name
        assert words in out, (name, out)
        assert not (out_dir / "last.pt").exists()


def test_wrong_plan_and_corrupt_checkpoint(workspace: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.py"
    other.write_text(
        (workspace / "tiny.py").read_text().replace("nn.Conv2d(8, 16, 3", "nn.Conv2d(8, 16, 5")
    )
    code, out = _run("train", other, "--plan", workspace / "plan.yaml", "--data",
                     workspace / "demo" / "train.csv", "--out", tmp_path / "x")  # fmt: skip
    assert code != 0
    assert "different model" in out

    corrupt = tmp_path / "broken" / "last.pt"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a checkpoint")
    code, out = _train(workspace, corrupt.parent, "--epochs", 1, "--resume")
    assert code != 0
    assert "corrupt" in out
    image = sorted((workspace / "demo").glob("*.tif"))[0]
    code, out = _run("predict", workspace / "tiny.py", image, "--plan", workspace / "plan.yaml",
                     "--checkpoint", corrupt)  # fmt: skip
    assert code != 0
    assert "corrupt" in out
    code, out = _run("report", tmp_path / "nowhere")
    assert code != 0
    assert "no report" in out


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_every_dtype_profiles_verifies_trains_reports_and_predicts(
    workspace: Path, tmp_path: Path, dtype: str
) -> None:
    """A plan in any dtype works end to end through the CLI (each pass under the plan's
    precision: float64 weights, or float32 weights under autocast for bfloat16/float16)."""
    plan = tmp_path / "plan.yaml"
    code, out = _run("profile", workspace / "tiny.py", "--image", 128, "--tile", 64,
                     "--dtype", dtype, "--verify", "--device", "cpu", "--out", plan)  # fmt: skip
    assert code == 0, out
    assert "verified: one real streaming step on cpu" in out
    run = tmp_path / "run"
    small = _csv(tmp_path, "small.csv", "image,label\n" + "".join(
        f"{p},{i % 2}\n" for i, p in enumerate(sorted((workspace / "demo").glob("*.tif"))[:4])
    ))  # fmt: skip
    code, out = _run("train", workspace / "tiny.py", "--plan", plan, "--data", small, "--out", run,
                     "--epochs", 1, "--batch", 2, "--num-workers", 0, "--device", "cpu",
                     *(["--amp"] if dtype in ("bfloat16", "float16") else []))  # fmt: skip
    assert code == 0, out
    assert "streaming step peak" in out
    assert math.isfinite(load_metrics(run)[0].train_loss)
    code, out = _run("report", run)
    assert code == 0, out
    image = sorted((workspace / "demo").glob("*.tif"))[0]
    code, out = _run("predict", workspace / "tiny.py", image, "--plan", plan, "--checkpoint",
                     run / "last.pt", "--saliency", tmp_path / "maps")  # fmt: skip
    assert code == 0, out
    assert len(out.strip().splitlines()) == 2
    assert (tmp_path / "maps" / f"{image.stem}.saliency.npy").is_file()


def test_amp_flag_needs_a_mixed_precision_plan(workspace: Path, tmp_path: Path) -> None:
    code, out = _train(workspace, tmp_path / "run", "--amp")
    assert code == 1
    assert "is a float32 plan" in out
    assert not (tmp_path / "run").exists()


def test_normalisation_is_recorded_and_used_by_predict(workspace: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, out = _train(workspace, run, "--epochs", 1, "--no-report", "--mean", "0.6,0.5,0.4",
                       "--std", "0.2,0.2,0.3")  # fmt: skip
    assert code == 0, out
    meta = load_checkpoint(run / "last.pt").meta
    assert meta.spec.normalization == Normalization(mean=(0.6, 0.5, 0.4), std=(0.2, 0.2, 0.3))
    code, out = _train(workspace, tmp_path / "bad", "--mean", "0.5", "--std", "0.5")
    assert code == 1
    assert "1 values but the plan's images have 3 channels" in out


DIVERGING_MODEL = """
import torch
from torch import nn


class Explode(nn.Module):
    \"\"\"The classifier, until its 7th training call (with autograd: probes and validation run
    without): then NaN, a run diverging in epoch 2.\"\"\"

    def __init__(self, fc):
        super().__init__()
        self.fc = fc
        self.calls = 0

    def forward(self, x):
        self.calls += int(torch.is_grad_enabled())
        out = self.fc(x)
        return out * float("nan") if self.calls > 6 else out


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), Explode(nn.Linear(8, 2)),
    )


def split(model):
    return model[:4], model[4:]
"""


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(
    workspace: Path, tmp_path: Path
) -> None:
    """The loss turns NaN at the first image of epoch 2 (6 training images, batch 2): the run
    stops before that optimizer step naming epoch, step and image, exits 1, and last.pt is
    epoch 1's, finite; metrics.jsonl stays valid JSON."""
    import json

    model = tmp_path / "diverging.py"
    model.write_text(DIVERGING_MODEL)
    plan_file = tmp_path / "plan.yaml"
    code, out = _run("profile", model, "--image", SIZE, "--tile", 96, "--no-measure",
                     "--budget", "2GiB", "--out", plan_file)  # fmt: skip
    assert code == 0, out
    run = tmp_path / "run"
    code, out = _run("train", model, "--plan", plan_file, "--data",
                     workspace / "demo" / "train.csv", "--out", run, "--batch", 2,
                     "--num-workers", 0, "--epochs", 3, "--no-report")  # fmt: skip
    assert code == 1
    assert len(load_csv(workspace / "demo" / "train.csv").samples) == 6
    assert "epoch 2, step 1: the loss of '" in out
    assert "is nan; stopped before the optimizer step" in out
    assert "(after epoch 1) is the last good checkpoint" in out
    assert "--resume and a lower --lr" in out
    checkpoint = load_checkpoint(run / "last.pt")
    assert checkpoint.meta.epoch == 1
    assert all(bool(torch.isfinite(t).all()) for t in checkpoint.model.values()
               if t.is_floating_point())  # fmt: skip
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert math.isfinite(json.loads(lines[0])["train_loss"])
