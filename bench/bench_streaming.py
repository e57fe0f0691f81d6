"""Benchmark: streaming vs conventional training steps of the ResNet-18 trunk on this machine.

A training step is trunk + head (global average pool + linear) + cross-entropy + backward.
Time: streaming and conventional steps alternate in one process; medians of ``--repeats``.
Memory on CPU: each configuration runs in its own child process; the peak is the RSS
high-water mark (VmHWM, reset once set up) minus the RSS after torch, the model and the image
are set up. The streaming child also records the peak after its setup phase (geometry and tile
grid), which must stay below the peak of the step.
On CUDA (``--device cuda``): the caching allocator's peak allocated bytes of each step above
what was allocated before it (model, gradients); the image stays on the host for streaming
(crops move one at a time) and is on the GPU for the conventional step, as in training.

    python bench/bench_streaming.py                     # the issue's three configurations
    python bench/bench_streaming.py --sizes 2048:1536 --repeats 5
    python bench/bench_streaming.py --device cuda --sizes 4096:1536 8192:2048 --memory 8192:2048
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from tileplan.host_allocator import HOST_ALLOCATOR_ENV
from tileplan.planning.measure_child import peak_rss, reset_peak_rss

GIB = 1024**3


def _maxrss_bytes() -> int:
    return peak_rss()


def build(seed: int = 0, device: str = "cpu") -> tuple[nn.Module, nn.Module]:
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=2).eval()  # BN frozen (eval) for streaming
    trunk = nn.Sequential(*list(net.children())[:-2]).to(device)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc).to(device)
    return trunk, head


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def conventional_step(trunk: nn.Module, head: nn.Module, image: torch.Tensor) -> None:
    device = next(trunk.parameters()).device
    logits = head(trunk(image.to(device)))
    loss = nn.functional.cross_entropy(logits, torch.tensor([1], device=device))
    loss.backward()


def streaming_step(scnn: object, head: nn.Module, image: torch.Tensor) -> None:
    out = scnn.forward(image)  # type: ignore[attr-defined]
    out.requires_grad_()
    loss = nn.functional.cross_entropy(head(out), torch.tensor([1], device=out.device))
    loss.backward()
    scnn.backward(image, out.grad)  # type: ignore[attr-defined]


def child(mode: str, size: int, tile: int) -> dict[str, float]:
    """One step in a fresh process: peak RSS above the baseline, per phase."""
    from executor import StreamingCNN

    trunk, head = build()
    image = torch.randn(1, 3, size, size)
    conventional_step(*build(), torch.randn(1, 3, 64, 64))  # load kernels before the baseline
    base = reset_peak_rss()
    result: dict[str, float] = {"baseline_bytes": base}
    if mode == "streaming":
        scnn = StreamingCNN(trunk, (tile, tile))
        scnn.tile_grid((size, size))
        result["setup_peak_bytes"] = _maxrss_bytes() - base
        streaming_step(scnn, head, image)
    else:
        conventional_step(trunk, head, image)
    result["step_peak_bytes"] = _maxrss_bytes() - base
    return result


def run_child(mode: str, size: int, tile: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, str(size), str(tile)]
    env = {**os.environ, **HOST_ALLOCATOR_ENV}  # as training and the planner run
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def cuda_peaks(size: int, tile: int, device: str) -> dict[str, float]:
    """Peak allocated bytes of each step above what was allocated before it (model, grads)."""
    from executor import StreamingCNN

    trunk, head = build(device=device)
    image = torch.randn(1, 3, size, size)  # on the host: streaming moves crops
    result: dict[str, float] = {}
    steps = {
        "streaming": lambda: streaming_step(StreamingCNN(trunk, (tile, tile)), head, image),
        "conventional": lambda: conventional_step(trunk, head, image),
    }
    for name, step in steps.items():
        step()  # gradients exist from here on, as in training
        _sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        try:
            step()
            _sync(device)
            result[f"{name}_peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
        except torch.OutOfMemoryError:
            result[f"{name}_peak_bytes"] = float("nan")
        torch.cuda.empty_cache()
    return result


def time_steps(size: int, tile: int, repeats: int, device: str = "cpu") -> dict[str, float]:
    from executor import StreamingCNN

    trunk, head = build(device=device)
    scnn = StreamingCNN(trunk, (tile, tile))
    image = torch.randn(1, 3, size, size)
    times: dict[str, list[float]] = {"streaming": [], "conventional": []}
    steps = {
        "streaming": lambda: streaming_step(scnn, head, image),
        "conventional": lambda: conventional_step(trunk, head, image),
    }
    for step in steps.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            trunk.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    grid = scnn.tile_grid((size, size))
    return {
        "tiles": grid.n_tiles,
        "overlap": grid.overlap_factor,
        "streaming_s": statistics.median(times["streaming"]),
        "conventional_s": statistics.median(times["conventional"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=["1024:1024", "2048:1536", "4096:1536"],
                        help="IMAGE:TILE pairs (px)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--memory",
        nargs="*",
        default=["4096:1536"],
        help="IMAGE:TILE pairs whose peak memory is measured in child processes",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, size, tile = args.child
        print(json.dumps(child(mode, int(size), int(tile))))
        return
    device = "cuda:0" if args.device == "cuda" else args.device
    where = (torch.cuda.get_device_name(device) if device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"torch {torch.__version__}, {where}, float32, ResNet-18 trunk")
    print(f"{'image':>6} {'tile':>5} {'tiles':>5} {'overlap':>7} {'stream s':>9} "
          f"{'conv s':>8} {'time ratio':>10}")  # fmt: skip
    for pair in args.sizes:
        size, tile = (int(v) for v in pair.split(":"))
        r = time_steps(size, tile, args.repeats, device)
        ratio = r["streaming_s"] / r["conventional_s"]
        print(
            f"{size:>6} {tile:>5} {r['tiles']:>5} {r['overlap']:>7.2f} "
            f"{r['streaming_s']:>9.2f} {r['conventional_s']:>8.2f} {ratio:>10.2f}",
            flush=True,
        )
    for pair in args.memory:
        size, tile = (int(v) for v in pair.split(":"))
        if device.startswith("cuda"):
            p = cuda_peaks(size, tile, device)
            s_peak, c_peak = p["streaming_peak_bytes"], p["conventional_peak_bytes"]
            print(f"memory {size}² tile {tile} (CUDA allocated, above model and grads): "
                  f"streaming {s_peak / GIB:.2f} GiB, conventional {c_peak / GIB:.2f} GiB, "
                  f"ratio {s_peak / c_peak:.3f}", flush=True)  # fmt: skip
            continue
        s = run_child("streaming", size, tile)
        c = run_child("conventional", size, tile)
        if min(s["step_peak_bytes"], c["step_peak_bytes"]) <= 0:
            print(f"memory {size}² tile {tile}: no growth above baseline measured: {s} {c}")
            continue
        print(
            f"memory {size}² tile {tile}: streaming peak {s['step_peak_bytes'] / GIB:.2f} GiB "
            f"(setup phase {s['setup_peak_bytes'] / GIB:.3f} GiB), conventional "
            f"{c['step_peak_bytes'] / GIB:.2f} GiB, ratio "
            f"{s['step_peak_bytes'] / c['step_peak_bytes']:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
