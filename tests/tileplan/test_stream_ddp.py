"""``tileplan.stream`` under DistributedDataParallel: two real processes (torchrun, gloo) with
``find_unused_parameters=False`` train the same weights as one process training the whole
model conventionally on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import tileplan
from tests.oracle import RTOL_FLOAT64, rel_error
from tests.tileplan.conftest import TINY_GLOBAL_MODEL
from tests.tileplan.workers.ddp_stream import GLOBAL_BATCH, batches, build

SIZE = 64


def test_ddp_two_processes_equal_one_conventional(tmp_path: Path) -> None:
    # Squeeze-excitation and GroupNorm are statistics of each image (segments of their own);
    # BatchNorm stays frozen, so a rank's half batch normalises as the whole batch does.
    (tmp_path / "model.py").write_text(TINY_GLOBAL_MODEL)
    plan = tileplan.profile(build(TINY_GLOBAL_MODEL), image=SIZE, budget="2GiB", measure=False,
                            dtype="float64", max_tile=32)  # fmt: skip
    assert len(plan.segments) >= 2
    plan.save(tmp_path / "plan.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--tee", "3", "-m", "tests.tileplan.workers.ddp_stream", str(tmp_path / "model.py"),
         str(tmp_path / "plan.yaml"), str(tmp_path / "ddp.pt")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]

    model = build(TINY_GLOBAL_MODEL)
    model.eval()  # frozen BatchNorm, as the plan says
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for image, target in batches(SIZE):
        assert image.shape[0] == GLOBAL_BATCH
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(image), target).backward()
        optimizer.step()
    trained = torch.load(tmp_path / "ddp.pt", weights_only=True)
    initial = build(TINY_GLOBAL_MODEL).state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            assert not torch.equal(value, initial[name]) or "running" in name, name
            assert rel_error(trained[name], value) <= RTOL_FLOAT64, name
