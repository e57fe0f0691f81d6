"""Benchmark: trunks with global-context layers, streamed with their statistics, against
conventional training steps.

Each case is a model file and an image size. The planner (``tileplan profile``: tiles timed
and calibrated on this machine, verification off) plans the streamed step under a budget of
``--share`` of the conventional step's estimated peak (the budget less the planner's 10%
margin is what a plan may use). Then every step runs in fresh child processes, each method in
its own process repeating its own step (``tileplan.planning.measure``: warm-up on a small
image, one step that allocates gradients and optimizer state, then the measured steady-state
step: its time and its RSS high-water mark above the process's baseline, model state
included). Times are medians over ``--repeats`` processes. A conventional step that does not
fit this machine's RAM is not run: its peak is the planner's estimate and its time is scaled
by pixels from the largest size of the same model that ran, both marked "est.".

    python bench/bench_statistics.py          # EfficientNet-B0 at 2048² and 4096², GN-ResNet-18
    python bench/bench_statistics.py --cases gn_resnet18:4096 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3

MODELS = {
    "efficientnet_b0": (
        "import timm\n\n\ndef build_model():\n"
        "    return timm.create_model('efficientnet_b0', pretrained=False, num_classes=2)\n"
    ),
    # ResNet-18 with GroupNorm (32 groups) in place of BatchNorm: the norm of BiT-style models.
    "gn_resnet18": (
        "import torch\nimport torchvision\n\n\ndef build_model():\n"
        "    return torchvision.models.resnet18(\n"
        "        num_classes=2, norm_layer=lambda c: torch.nn.GroupNorm(32, c))\n"
    ),
}


def _model_file(name: str) -> Path:
    path = Path("/tmp") / f"tileplan_bench_{name}.py"
    path.write_text(MODELS[name])
    return path


def _steps(spec: object, repeats: int) -> tuple[list[float], list[int], str | None]:
    """Seconds and peaks of ``repeats`` measured steps, each in a fresh process."""
    from tileplan.planning.measure import measure_peak

    seconds, peaks = [], []
    for _ in range(repeats):
        measured = measure_peak(spec, timeout_s=7200)  # type: ignore[arg-type]
        if not measured.ok or measured.seconds is None or measured.peak_bytes is None:
            return seconds, peaks, measured.error
        seconds.append(measured.seconds)
        peaks.append(measured.peak_bytes)
        print(f"    {spec.mode}: {measured.seconds:.1f} s, "  # type: ignore[attr-defined]
              f"{measured.peak_bytes / GIB:.2f} GiB", file=sys.stderr, flush=True)  # fmt: skip
    return seconds, peaks, None


def run_case(name: str, size: int, share: float, repeats: int,
             scale_from: dict[str, tuple[int, float]]) -> None:  # fmt: skip
    import torch

    from tileplan.planning.estimate import ModelState, estimate_conventional
    from tileplan.planning.measure import MeasureSpec
    from tileplan.planning.model_file import load_model_file
    from tileplan.planning.profile import ProfileRequest, profile

    path = _model_file(name)
    image = (1, 3, size, size)
    loaded = load_model_file(path)
    conventional = estimate_conventional(trunk=loaded.trunk, head=loaded.head,
                                         state=ModelState.of(loaded.model, "adam"),
                                         image_shape=image, dtype=torch.float32)  # fmt: skip
    budget = round(conventional.peak_bytes * share)
    start = time.perf_counter()
    plan = profile(ProfileRequest(model_file=path, image_shape=(size, size), budget_bytes=budget,
                                  verify=False))  # fmt: skip
    planning_s = time.perf_counter() - start
    tiles = sum(g.n_tiles for g in plan.tile_grids())
    print(f"{name} {size}²: {len(plan.statistics)} statistics, {len(plan.segments)} segments, "
          f"{tiles} tiles; planned in {planning_s:.0f} s; predicted peak "
          f"{plan.predicted_peak_bytes / GIB:.2f} GiB under a budget of {budget / GIB:.2f} GiB "
          f"({share:.0%} of the conventional estimate {conventional.peak_bytes / GIB:.2f} GiB)",
          flush=True)  # fmt: skip
    spec = MeasureSpec(model_file=str(path), split="auto", mode="step", shape=image,
                       dtype="float32", device="cpu", tile=plan.tile_px,
                       forward_tile=plan.forward_tile_px, optimizer=plan.optimizer,
                       segments=MeasureSpec.chain_of(plan.segments))  # fmt: skip
    s_times, s_peaks, error = _steps(spec, repeats)
    if error:
        print(f"  streamed step failed: {error}", flush=True)
        return
    streamed_s, streamed_peak = statistics.median(s_times), max(s_peaks)
    room = psutil.virtual_memory().available
    if conventional.peak_bytes <= 0.75 * room:
        c_times, c_peaks, error = _steps(replace(spec, mode="conventional", segments=()),
                                         repeats)  # fmt: skip
        if error:
            print(f"  conventional step failed: {error}", flush=True)
            return
        conv_s, conv_peak, kind = statistics.median(c_times), max(c_peaks), "measured"
        scale_from[name] = (size, conv_s)
    elif name in scale_from:
        ran, seconds = scale_from[name]
        conv_s, conv_peak = seconds * (size / ran) ** 2, conventional.peak_bytes
        kind = f"est.: peak the planner's estimate, time scaled by pixels from {ran}²"
    else:
        print("  conventional step does not fit and no smaller size ran", flush=True)
        return
    print(f"  streamed {streamed_s:.1f} s, {streamed_peak / GIB:.2f} GiB (predicted "
          f"{plan.predicted_peak_bytes / GIB:.2f}); conventional {conv_s:.1f} s, "
          f"{conv_peak / GIB:.2f} GiB ({kind}); time ratio {streamed_s / conv_s:.2f}, "
          f"peak ratio {streamed_peak / conv_peak:.3f}", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*",
                        default=["efficientnet_b0:2048", "efficientnet_b0:4096",
                                 "gn_resnet18:4096:1.0"],
                        help="MODEL:SIZE[:SHARE] (SHARE overrides --share)")  # fmt: skip
    parser.add_argument(
        "--share",
        type=float,
        default=0.35,
        help="budget as a share of the conventional step's estimated peak",
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    scale_from: dict[str, tuple[int, float]] = {}
    for case in args.cases:
        name, size, *share = case.split(":")
        run_case(name, int(size), float(share[0]) if share else args.share, args.repeats,
                 scale_from)  # fmt: skip


if __name__ == "__main__":
    main()
