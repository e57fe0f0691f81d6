"""The CPU allocator setting that the planner measures under and training runs under: what it
changes (freed buffers go back to the system instead of staying in glibc's heap), that plans
record it and that training says when a plan was measured under another."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from executor import load_plan, save_plan
from tileplan.cli import cli
from tileplan.host_allocator import HOST_ALLOCATOR, OPT_OUT_ENV, host_allocator

pytestmark = pytest.mark.skipif(
    not host_allocator(), reason="the setting is glibc's (Linux); elsewhere nothing changes"
)

# A fresh process: a 30 MiB buffer freed (glibc's default then serves buffers below 30 MiB from
# its heap), then 40 buffers of 8 MiB with a small one kept between each (as a step's tensors
# interleave), the large ones freed: the RSS they leave behind (MiB).
_RETAINED = """
import json, sys, psutil, torch
from tileplan.host_allocator import use_host_allocator
setting = use_host_allocator() if sys.argv[1] == "set" else ""
rss = lambda: psutil.Process().memory_info().rss / 2**20
big = torch.ones(30 << 18)  # 30 MiB of float32
del big
before = rss()
large, small = [], []
for _ in range(40):
    large.append(torch.ones(2 << 20))  # 8 MiB, every page touched
    small.append(torch.ones(16 << 10))  # 64 KiB, kept
held = rss() - before
del large
print(json.dumps({"setting": setting, "held": held, "retained": rss() - before}))
"""


def _retained(mode: str, **extra: str) -> dict[str, object]:
    kept = ("THP_MEM_ALLOC_ENABLE", OPT_OUT_ENV)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in kept}
    env.update(extra)
    done = subprocess.run([sys.executable, "-c", _RETAINED, mode], capture_output=True,
                          text=True, env=env, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_setting_returns_freed_buffers_to_the_system() -> None:
    default, fixed = _retained("default"), _retained("set")
    assert fixed["setting"] == HOST_ALLOCATOR
    assert default["held"] >= 300
    assert fixed["held"] >= 300
    # The default keeps the freed 8 MiB buffers resident in its heap; the setting unmaps them.
    assert default["retained"] >= 250, default
    assert fixed["retained"] <= 32, fixed
    # TILEPLAN_HOST_ALLOCATOR=default leaves glibc as it is.
    kept = _retained("set", **{OPT_OUT_ENV: "default"})
    assert kept["setting"] == ""
    assert kept["retained"] >= 250, kept


def test_plans_record_the_setting_and_training_names_a_different_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.tileplan.conftest import TINY_MODEL

    (tmp_path / "tiny.py").write_text(TINY_MODEL)
    runner = CliRunner()
    for args in (
        ["demo-data", tmp_path / "demo", "--n", 4, "--size", 64, "--seed", 1],
        ["profile", tmp_path / "tiny.py", "--image", 64, "--tile", 32, "--no-measure",
         "--budget", "1GiB", "--out", tmp_path / "plan.yaml"],
    ):  # fmt: skip
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    plan = load_plan(tmp_path / "plan.yaml")
    assert plan.provenance.device == "cpu"
    assert plan.provenance.host_allocator == HOST_ALLOCATOR

    other = dataclasses.replace(
        plan, provenance=dataclasses.replace(plan.provenance, host_allocator="jemalloc 5")
    )
    save_plan(other, tmp_path / "other.yaml")
    train = ["train", tmp_path / "tiny.py", "--data", tmp_path / "demo" / "train.csv",
             "--epochs", 1, "--num-workers", 0]  # fmt: skip
    for plan_file, out in (("plan.yaml", "same"), ("other.yaml", "other")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tileplan.run.launch"):
            result = runner.invoke(cli, [str(a) for a in (*train, "--plan", tmp_path / plan_file,
                                                          "--out", tmp_path / out)])  # fmt: skip
        assert result.exit_code == 0, result.output
        warned = [r.getMessage() for r in caplog.records if "allocator" in r.getMessage()]
        if out == "same":
            assert warned == []
        else:
            assert len(warned) == 1
            assert "'jemalloc 5'" in warned[0]
            assert f"'{HOST_ALLOCATOR}'" in warned[0]
            assert "profile again" in warned[0]


def test_an_opted_out_environment_plans_with_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan made with TILEPLAN_HOST_ALLOCATOR=default records no setting: its measuring
    child ran under glibc's default (whose peaks bound a run under the shared setting)."""
    monkeypatch.setenv(OPT_OUT_ENV, "default")
    assert host_allocator() == ""
    monkeypatch.delenv(OPT_OUT_ENV)
    assert host_allocator() == HOST_ALLOCATOR
