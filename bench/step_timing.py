"""Timing one training step in a benchmark's child process (``run_child`` starts it, with the
allocator setting of tileplan's own measurements; ``time_steps`` times it there): the median
of ``repeats`` steps after a warm-up step, and the peak memory above what the warm-up left
allocated. ``add_method_options`` and ``answer_child`` are the command line such a benchmark
shares: ``--repeats``, ``--device``, ``--methods`` and the child's own ``--child``."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tileplan.host_allocator import HOST_ALLOCATOR_ENV


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


def add_method_options(parser: argparse.ArgumentParser, methods: Sequence[str]) -> None:
    """``--repeats``, ``--device``, ``--methods`` (of ``methods``) and the hidden ``--child
    METHOD PLAN REPEATS DEVICE`` that ``run_child`` passes."""
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--methods", nargs="*", default=list(methods), choices=methods)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)


def answer_child(args: argparse.Namespace,
                 child: Callable[[str, str, int, str], dict[str, float]]) -> bool:  # fmt: skip
    """In a child process (``--child``): print ``child(method, plan, repeats, device)`` as
    the JSON line ``run_child`` reads, and return True; else False."""
    if not args.child:
        return False
    method, plan, repeats, device = args.child
    print(json.dumps(child(method, plan, int(repeats), device)))
    return True


def device_of(args: argparse.Namespace) -> str:
    """``--device`` with ``cuda`` made ``cuda:0``."""
    return "cuda:0" if args.device == "cuda" else args.device


def run_child(script: str, method: str, plan: Path, repeats: int, device: str
              ) -> dict[str, float]:  # fmt: skip
    """Run ``script --child method plan repeats device`` in a fresh process; its last stdout
    line is the JSON of ``time_steps``, or NaNs and the error's last line when it failed."""
    cmd = [sys.executable, script, "--child", method, str(plan), str(repeats), device]
    env = {**os.environ, **HOST_ALLOCATOR_ENV}  # as training and the planner run
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"seconds": float("nan"), "peak_bytes": float("nan"),
                "error": (done.stderr.strip().splitlines() or ["?"])[-1]}  # type: ignore[dict-item]  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


GIB = 1024**3


def device_words(device: str) -> str:
    """``NVIDIA H100 ...`` or ``CPU, 2 threads``: where the steps ran, for the header line."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def print_results(results: dict[str, dict[str, float]],
                  ratios: Sequence[tuple[str, str, str]]) -> None:  # fmt: skip
    """A row per method (median step seconds, peak GiB, the child's error if it failed), then
    each ``(a, b, label)`` of ``ratios`` whose methods both ran: ``a`` / ``b`` in time and peak."""
    print(f"{'method':>13} {'step s':>8} {'peak GiB':>9}")
    for method, r in results.items():
        note = f"  ({r['error']})" if "error" in r else ""
        print(f"{method:>13} {r['seconds']:>8.2f} {r['peak_bytes'] / GIB:>9.3f}{note}")
    for a, b, label in ratios:
        if {a, b} <= results.keys():
            x, y = results[a], results[b]
            print(f"{label}: time {x['seconds'] / y['seconds']:.3f}x, "
                  f"peak {x['peak_bytes'] / y['peak_bytes']:.3f}x")  # fmt: skip
