"""Timing one training step in a benchmark's child process (``run_child`` starts it, with the
allocator setting of tileplan's own measurements; ``time_steps`` times it there): the median
of ``repeats`` steps after a warm-up step, and the peak memory above what the warm-up left
allocated."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_steps(step: Callable[[], None], repeats: int, device: str) -> dict[str, float]:
    """Median seconds of ``step`` and its peak bytes above the baseline: peak RSS after the
    warm-up step (CPU) or the CUDA allocator's peak above what was allocated before."""
    from tileplan.planning.measure_child import peak_rss, reset_peak_rss

    cuda = device.startswith("cuda")
    step()  # warm-up: kernels loaded, gradients allocated, as in training
    base = torch.cuda.memory_allocated(device) if cuda else reset_peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else peak_rss()
    return {"seconds": statistics.median(times), "peak_bytes": peak - base}


def run_child(script: str, method: str, plan: Path, repeats: int, device: str
              ) -> dict[str, float]:  # fmt: skip
    """Run ``script --child method plan repeats device`` in a fresh process; its last stdout
    line is the JSON of ``time_steps``, or NaNs and the error's last line when it failed."""
    cmd = [sys.executable, script, "--child", method, str(plan), str(repeats), device]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"seconds": float("nan"), "peak_bytes": float("nan"),
                "error": (done.stderr.strip().splitlines() or ["?"])[-1]}  # type: ignore[dict-item]  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])
