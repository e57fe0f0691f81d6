"""What the training-loop tests share: the CLI in this process, the tiny model's float64 run
folder, and a stop request that turns on at a chosen look."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from tests.tileplan.conftest import TINY_MODEL
from tileplan.cli import cli
from tileplan.run.interrupts import StopRequest


def run_cli(*args: object) -> tuple[int, str]:
    """``tileplan ARGS`` in this process: (exit code, output)."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def tiny_float64_run(root: Path, *, n: int = 8, size: int = 96) -> Path:
    """``root`` with the tiny model (``tiny.py``), ``n`` demo images of ``size`` px in
    ``demo/`` (train.csv, val.csv) and a float64 plan of 64 px tiles (``plan.yaml``)."""
    (root / "tiny.py").write_text(TINY_MODEL)
    for args in (
        ["demo-data", root / "demo", "--n", n, "--size", size, "--seed", 4],
        ["profile", root / "tiny.py", "--image", size, "--tile", 64, "--dtype", "float64",
         "--no-measure", "--budget", "2GiB", "--out", root / "plan.yaml"],
    ):  # fmt: skip
        code, out = run_cli(*args)
        assert code == 0, out
    return root


class StopAt(StopRequest):
    """A stop request that turns on at its ``n``-th look: the loop looks at step starts,
    between the images of a step and after each epoch, so every ``n`` is another point."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n, self.looks = n, 0

    @property
    def requested(self) -> bool:
        self.looks += 1
        if self.looks > self.n:
            self.signal = "SIGTERM"
        return self.signal is not None
