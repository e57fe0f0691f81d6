"""``bench/gpu_check.sh``: it skips cleanly without a GPU, and every step it runs on a GPU works
(``--smoke`` runs the same commands on the CPU at toy sizes), so scarce GPU time is not lost to
a broken script."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPU_CHECK_OUT": str(out)}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, check=False)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_skips_cleanly_without_a_gpu(tmp_path: Path) -> None:
    done = _run(out=tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "no CUDA device here: skipped" in done.stdout
    assert not (tmp_path / "out").exists()


def test_every_step_runs_in_smoke_mode(tmp_path: Path) -> None:
    done = _run("--smoke", out=tmp_path / "out")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "out" / "summary.txt").read_text()
    for step in ("gpu_tests", "bench_streaming", "bench_planner", "profile", "bench_dropin"):
        assert f"== {step}: ok" in summary, summary
    assert "chosen ÷ best feasible" in summary
    assert "verified: one real streaming step on cpu" in summary
    assert "ratio" in summary
    assert "drop-in / manual pair: time" in summary
