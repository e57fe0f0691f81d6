"""examples/lightning_train.py: a LightningModule wrapping its network with ``tileplan.stream``
trains with automatic optimization, in real processes (Lightning launches its own for DDP).

Oracle: the same example with ``--conventional`` (the network unstreamed), same seed, data
and settings: in float64 (``64-true``) the weights must be equal to 1e-10, with gradient
accumulation and clipping on, and under DDP with two processes."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.oracle import RTOL_FLOAT64, assert_as_accurate, rel_error
from tileplan.cli import cli

pytest.importorskip("lightning")

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "lightning_train.py"
MODEL = ROOT / "examples" / "small_cnn.py"


@pytest.fixture(scope="module")
def plans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from click.testing import CliRunner

    root = tmp_path_factory.mktemp("lightning")
    for dtype in ("float64", "float32"):
        result = CliRunner().invoke(cli, [
            "profile", str(MODEL), "--image", "160", "--tile", "96", "--dtype", dtype,
            "--no-measure", "--budget", "2GiB", "--out", str(root / f"{dtype}.yaml"),
        ])  # fmt: skip
        assert result.exit_code == 0, result.output
    return root


def _train(plans: Path, out: Path, *args: str) -> dict[int, dict[str, torch.Tensor]]:
    """Run the example; the weights of every rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, str(EXAMPLE), str(MODEL), *args, "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=600,
                         cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    found = sorted(out.parent.glob(f"{out.stem}.rank*.pt"))
    return {int(p.suffixes[-2][5:]): torch.load(p, weights_only=True) for p in found}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, value in b.items():
        if value.is_floating_point():
            assert rel_error(a[name], value) <= RTOL_FLOAT64, name


def test_float64_with_accumulation_and_clipping_equals_conventional(
    plans: Path, tmp_path: Path
) -> None:
    options = [str(plans / "float64.yaml"), "--precision", "64-true", "--images", "8",
               "--batch", "2", "--accumulate", "2", "--clip", "0.5"]  # fmt: skip
    streamed = _train(plans, tmp_path / "s.pt", *options)
    conventional = _train(plans, tmp_path / "c.pt", *options, "--conventional")
    initial = torch.load(tmp_path / "c.rank0.pt", weights_only=True)
    assert list(streamed) == [0]
    _assert_equal(streamed[0], conventional[0])
    assert initial.keys() == streamed[0].keys()


def test_bf16_mixed_with_accumulation_and_clipping_trains(plans: Path, tmp_path: Path) -> None:
    """The issue's recipe: bf16-mixed autocast, accumulate_grad_batches=4, clipping at 1.0.
    By the oracle's low-precision rule: the streamed run's update is as close to the float64
    run's (same images, weights and settings) as the conventional bf16-mixed run's is."""
    settings = ["--images", "8", "--batch", "1", "--accumulate", "4", "--clip", "1.0"]
    bf16 = [str(plans / "float32.yaml"), "--precision", "bf16-mixed", *settings]
    streamed = _train(plans, tmp_path / "b.pt", *bf16)[0]
    conventional = _train(plans, tmp_path / "bc.pt", *bf16, "--conventional")[0]
    reference = _train(plans, tmp_path / "r.pt", str(plans / "float64.yaml"), "--precision",
                       "64-true", *settings, "--conventional")[0]  # fmt: skip
    spec = importlib.util.spec_from_file_location("small_cnn", MODEL)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)  # the example's seed: its initial weights
    initial = module.build_model().state_dict()
    names = [n for n, v in initial.items() if v.is_floating_point() and "running" not in n]

    def moved(weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([(weights[n].double() - initial[n].double()).flatten() for n in names])

    assert torch.isfinite(moved(streamed)).all()
    assert moved(reference).abs().max() > 0
    assert_as_accurate(moved(streamed), moved(conventional), moved(reference), torch.bfloat16,
                       "weight update")  # fmt: skip


def test_ddp_two_processes_agree_and_equal_conventional_ddp(plans: Path, tmp_path: Path) -> None:
    options = [str(plans / "float64.yaml"), "--precision", "64-true", "--images", "8",
               "--batch", "2", "--devices", "2", "--strategy", "ddp"]  # fmt: skip
    streamed = _train(plans, tmp_path / "d.pt", *options)
    assert sorted(streamed) == [0, 1]
    _assert_equal(streamed[1], streamed[0])
    conventional = _train(plans, tmp_path / "dc.pt", *options, "--conventional")
    _assert_equal(streamed[0], conventional[0])
