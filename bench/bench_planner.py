"""Benchmark the planner on this machine (CPU unless CUDA is present).

1. Estimated (meta tensors) vs measured (fresh child process) peak of backward tiles of the
   ResNet-18 and ResNet-34 trunks, and of whole streaming steps: error in %.
2. Exhaustive sweep at 2048²: the real streaming step time of the ResNet-18 trunk for every
   aligned tile from the smallest to the image (step ``--sweep-step`` px), against the
   planner's choice under a budget that excludes the largest tiles: chosen ÷ best feasible.
3. Wall time of ``tileplan profile examples/resnet34.py --image 8192``.

    python bench/bench_planner.py            # all three (about 15 min on 2 CPU cores)
    python bench/bench_planner.py --only 1
    python bench/bench_planner.py --device cuda --only 2 3 --sweep-step 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from executor import StreamingCNN, analyze_trunk, streaming_step
from tileplan.planning.estimate import ModelState, estimate_streaming, pass_peak
from tileplan.planning.measure import MeasureSpec, device_info, measure_peak
from tileplan.planning.model_file import load_model_file
from tileplan.planning.profile import ProfileRequest, profile

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024**2


def estimate_vs_measured(device: str) -> None:
    print("\n1. estimated vs measured peak")
    print(f"{'model':<10} {'what':<22} {'estimated':>10} {'measured':>10} {'error':>7}")
    crops = {"resnet18": (512, 1024, 1536, 2048), "resnet34": (960, 1440, 1920)}
    for name, sides in crops.items():
        path = ROOT / "examples" / f"{name}.py"
        trunk = load_model_file(path).trunk
        shapes = tuple((1, 3, s, s) for s in sides)
        spec = MeasureSpec(model_file=str(path), split="auto", mode="tiles", shape=shapes[0],
                           dtype="float32", device=device, shapes=shapes)  # fmt: skip
        measured = dict(measure_peak(spec).tiles)
        for shape in shapes:
            est = pass_peak(trunk, shape, torch.float32, grad=True)[0]
            got = measured[shape]
            print(f"{name:<10} {'tile ' + str(shape[2]) + ' px':<22} {est / MIB:>8.0f}Mi "
                  f"{got / MIB:>8.0f}Mi {100 * (est - got) / got:>+6.1f}%")  # fmt: skip
    path = ROOT / "examples" / "resnet18.py"
    loaded = load_model_file(path)
    state = ModelState.of(loaded.model, "adam")
    for tile in (1024, 1536):
        grid = analyze_trunk(loaded.trunk).tile_grid((2048, 2048), (tile, tile))
        crop = (1, 3, *grid.largest_crop)
        est = estimate_streaming(trunk=loaded.trunk, head=loaded.head, state=state,
                                 image_shape=(1, 3, 2048, 2048), backward_crop=crop,
                                 forward_crop=crop, dtype=torch.float32).total_bytes  # fmt: skip
        spec = MeasureSpec(model_file=str(path), split="auto", mode="step",
                           shape=(1, 3, 2048, 2048), dtype="float32", device=device,
                           tile=(tile, tile), forward_tile=(tile, tile))  # fmt: skip
        got = measure_peak(spec).peak_bytes or 0
        print(f"{'resnet18':<10} {f'step 2048², tile {tile}':<22} {est / MIB:>8.0f}Mi "
              f"{got / MIB:>8.0f}Mi {100 * (est - got) / got:>+6.1f}%")  # fmt: skip


def _step_time(trunk: torch.nn.Module, head: torch.nn.Module, image: torch.Tensor,
               tile: int, repeats: int) -> float:  # fmt: skip
    scnn = StreamingCNN(trunk, (tile, tile))
    target = torch.tensor([1])
    device = next(trunk.parameters()).device
    times = []
    for _ in range(repeats):
        trunk.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        streaming_step(scnn, head, image, target, torch.nn.functional.cross_entropy)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sweep(device: str, step: int, repeats: int, size: int = 2048) -> None:
    print(f"\n2. exhaustive sweep at {size}², ResNet-18 trunk")
    path = ROOT / "examples" / "resnet18.py"
    loaded = load_model_file(path)
    loaded.model.to(device)
    geometry = analyze_trunk(loaded.trunk)
    state = ModelState.of(loaded.model, "adam")
    image = torch.randn(1, 3, size, size)  # on the host: crops move to the device
    shape = (size, size)

    def peak(tile: int) -> int:
        grid = geometry.tile_grid(shape, (tile, tile))
        crop = (1, 3, *grid.largest_crop)
        return estimate_streaming(trunk=loaded.trunk, head=loaded.head, state=state,
                                  image_shape=(1, 3, *shape), backward_crop=crop,
                                  forward_crop=crop, dtype=torch.float32).total_bytes  # fmt: skip

    # A budget that excludes the largest tiles: what a half-image tile needs (or the smallest
    # tile, for images under two receptive fields), plus a 10% margin.
    half = max(size // 2, -(-geometry.min_tile(0) // 32) * 32)
    budget = round(peak(half) / 0.9)
    plan = profile(ProfileRequest(model_file=path, image_shape=shape, device=device,
                                  budget_bytes=budget, verify=False))  # fmt: skip
    chosen = plan.tile_px[0]
    # Tiles whose crops are mostly halo (overlap > 4x) take minutes per step and cannot win.
    smallest = next(
        (t for t in range(-(-geometry.min_tile(0) // 32) * 32, size + 1, 32)
         if geometry.tile_grid(shape, (t, t)).overlap_factor <= 4.0),
        size,
    )  # fmt: skip
    tiles = sorted({*range(smallest, size + 1, step), chosen})
    _step_time(loaded.trunk, loaded.head, image, chosen, 1)  # warm-up
    print(
        f"budget {budget / MIB:.0f} MiB (usable {0.9 * budget / MIB:.0f} MiB); "
        f"planner chose {chosen} px (predicted {plan.predicted_time_s or math.nan:.2f} s)"
    )
    print(f"{'tile':>6} {'tiles':>6} {'est. peak':>10} {'fits':>5} {'step s':>8}")
    measured = {}
    for tile in tiles:
        fits = peak(tile) <= 0.9 * budget
        seconds = _step_time(loaded.trunk, loaded.head, image, tile, repeats)
        measured[tile] = (seconds, fits)
        n = geometry.tile_grid(shape, (tile, tile)).n_tiles
        mark = " <- chosen" if tile == chosen else ""
        print(f"{tile:>6} {n:>6} {peak(tile) / MIB:>8.0f}Mi {'yes' if fits else 'no':>5} "
              f"{seconds:>8.2f}{mark}", flush=True)  # fmt: skip
    best = min((s for s, fits in measured.values() if fits), default=math.nan)
    print(f"chosen ÷ best feasible (measured): {measured[chosen][0] / best:.3f}")


def profile_wall_time(device: str, model: str, size: int) -> None:
    command = f"tileplan profile {model} --image {size} --device {device}"
    print(f"\n3. wall time of `{command}`")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tileplan", "profile", str(ROOT / model),
                           "--image", str(size), "--device", device, "--out",
                           "/tmp/bench_plan.yaml"], capture_output=True, text=True)  # fmt: skip
    print(done.stdout.strip().splitlines()[-3] if done.returncode == 0 else done.stderr[-500:])
    print(f"wall time {time.perf_counter() - start:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=int, nargs="+", choices=[1, 2, 3], default=[1, 2, 3])
    parser.add_argument("--sweep-step", type=int, default=128, help="px between swept tiles")
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per swept tile")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--sweep-image", type=int, default=2048, help="px per side of part 2")
    parser.add_argument("--profile-model", default="examples/resnet34.py", help="part 3")
    parser.add_argument("--profile-image", type=int, default=8192, help="px per side of part 3")
    args = parser.parse_args()
    info = device_info(args.device)
    device = info.device
    print(f"device {info.name}, torch {torch.__version__}")
    if 1 in args.only:
        estimate_vs_measured(device)
    if 2 in args.only:
        sweep(device, args.sweep_step, args.repeats, args.sweep_image)
    if 3 in args.only:
        profile_wall_time(device, args.profile_model, args.profile_image)


if __name__ == "__main__":
    main()
