"""``bench/bench_freeze.py`` runs end to end at a toy size, so that its README numbers can be
reproduced with the script as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_freeze_runs_its_three_methods(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_freeze.py"), "--image", "512",
           "--budget", "1GiB", "--repeats", "1"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    methods = ("trainable", "trainable-cut", "frozen")
    rows: dict[str, list[str]] = {}
    for line in done.stdout.splitlines():  # the table's rows come before the ratio lines
        words = line.split()
        if words and words[0] in methods:
            rows.setdefault(words[0], words[1:])
    for method in methods:
        seconds, peak = map(float, rows[method][:2])
        assert seconds > 0, done.stdout
        assert peak >= 0, done.stdout
    assert "frozen prefix / all trainable" in done.stdout
    assert "plan cut: 2 segment(s)" in done.stdout
