"""Streamed training equals conventional training; two processes equal one (gloo, torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from executor import load_plan
from tests.oracle import RTOL_FLOAT64, rel_error
from tests.tileplan.run.conventional import assert_same_weights, train_conventionally
from tileplan.cli import cli
from tileplan.planning.model_file import load_model_file
from tileplan.run.data import load_csv
from tileplan.run.trainer import Trainer
from tileplan.settings import RunSpec

SIZE = 160


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.tileplan.conftest import TINY_MODEL

    root = tmp_path_factory.mktemp("eq")
    (root / "tiny.py").write_text(TINY_MODEL)
    runner = CliRunner()
    for args in (
        ["demo-data", root / "demo", "--n", 8, "--size", SIZE, "--seed", 3],
        ["profile", root / "tiny.py", "--image", SIZE, "--tile", 64, "--dtype", "float64",
         "--no-measure", "--budget", "2GiB", "--out", root / "plan.yaml"],
        # Two segments cut after the first ReLU, every tile at most 48 px of its input.
        ["profile", root / "tiny.py", "--image", SIZE, "--cut", "features.2", "--max-tile", 48,
         "--dtype", "float64", "--no-measure", "--budget", "2GiB",
         "--out", root / "segmented.yaml"],
    ):  # fmt: skip
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return root


@pytest.mark.parametrize("plan_file", ["plan.yaml", "segmented.yaml"])
def test_streamed_training_equals_conventional(setup: Path, tmp_path: Path, plan_file: str) -> None:
    plan = load_plan(setup / plan_file)
    assert bool(plan.segments) == (plan_file == "segmented.yaml")
    data = load_csv(setup / "demo" / "train.csv", target_shape=plan.image_shape_px)
    # SGD: the update is linear in the gradient, so weights compare as tightly as gradients
    # (Adam divides by the gradient's running RMS, which magnifies noise in near-zero ones).
    spec = RunSpec.from_plan(plan, epochs=2, batch=3, lr=1e-2, optimizer="sgd", num_workers=0,
                             seed=5)  # fmt: skip

    torch.manual_seed(0)
    streamed = load_model_file(setup / "tiny.py")
    trainer = Trainer(model=streamed.model, trunk=streamed.trunk, head=streamed.head, plan=plan,
                      spec=spec, train_data=data, val_data=None, out_dir=tmp_path / "s",
                      device=torch.device("cpu"))  # fmt: skip
    assert all(g.n_tiles > 1 for g in plan.tile_grids())
    assert trainer.scnn.tile_grid(plan.image_shape_px).n_tiles > 1
    trainer.fit(progress=False)

    # The oracle: the same model, data order, normalisation, loss scaling and optimizer, with
    # conventional backprop on whole images.
    ref = train_conventionally(setup / "tiny.py", spec, trainer, data)
    assert_same_weights(streamed.model, ref)


def test_two_processes_equal_one(setup: Path, tmp_path: Path) -> None:
    common = [str(setup / "tiny.py"), "--plan", str(setup / "plan.yaml"), "--data",
              str(setup / "demo" / "train.csv"), "--epochs", "1", "--batch", "4",
              "--num-workers", "0", "--no-report", "--lr", "1e-2", "--optimizer", "sgd",
              "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "tileplan", "train", *common, "--out",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", "-m", "tileplan", "train", *common, "--out",
                          str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    a = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "last.pt", weights_only=True)["model"]
    for key, value in a.items():
        if value.is_floating_point():
            assert rel_error(b[key], value) <= RTOL_FLOAT64, key
    changed = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["meta"]["epoch"]
    assert changed == 1


def test_saliency_from_a_segmented_plan_is_the_exact_input_gradient(setup: Path) -> None:
    """``predict --saliency`` backpropagates the predicted logit through every segment to the
    image, parameters untouched: it must equal conventional autograd's input gradient."""
    from executor import StreamingCNN
    from tileplan.run.predict import predict_image

    plan = load_plan(setup / "segmented.yaml")
    loaded = load_model_file(setup / "tiny.py")
    model = loaded.model.double().eval()
    scnn = StreamingCNN.from_plan(loaded.trunk, plan, input_grad=True)
    assert len(scnn.program.streams) == len(plan.segments) > 1
    image = torch.randn(3, SIZE, SIZE, dtype=torch.float64)
    got = predict_image(scnn, loaded.head, image, task="multiclass", saliency=True)
    assert got.saliency is not None
    assert all(p.grad is None for p in loaded.trunk.parameters())
    x = image.unsqueeze(0).requires_grad_()
    logits = model(x).reshape(-1)
    logits[int(got.label)].backward()
    assert x.grad is not None
    assert rel_error(got.saliency, x.grad[0]) <= RTOL_FLOAT64
