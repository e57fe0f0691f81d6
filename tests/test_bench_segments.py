"""``bench/bench_segments.py`` runs end to end at toy sizes (its full cases take ~40 min), so
the numbers in the README can be reproduced with the script as it is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_segments_runs_a_case_and_a_sweep(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_segments.py"), "--cases",
           "resnet18:768:256", "--sweep", "resnet18:1024:0.5GiB", "--repeats", "1",
           "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = [line for line in done.stdout.splitlines() if line.startswith("| resnet18 768²")]
    assert len(table) == 1, done.stdout
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[5] == "no tile that small"  # 256 px is below ResNet-18's smallest tile
    assert float(cells[4]) > 0  # the segmented step ran
    assert "planner's choice" in done.stdout
    assert (tmp_path / "out" / "resnet18_768_256.yaml").exists()
