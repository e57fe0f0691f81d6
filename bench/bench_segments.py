"""Benchmark: segmented streaming of deep trunks against one segment and conventional steps.

A training step is trunk + head (global average pool + linear) + cross-entropy + backward, in
float32 on this machine's CPU. Each case asks the planner (``tileplan.planning.profile``, tiles
timed on this machine, verification off) for a plan with every backward tile at most
``max_tile`` px (with ``:same-peak``, under a budget whose usable part is the single-segment
plan's estimated peak, so that segments may not use more memory), then:

* time: the planner's segmented step, the conventional step and a single-segment step
  alternate in one process; medians of ``--repeats``. A single segment with small tiles at
  these sizes takes tens of minutes per step on a CPU, so it is timed on a sub-image of 3x3 of
  its tiles (the same tile shape and crops) and scaled by its full grid's tile count: the
  table says "extrapolated". A conventional step that does not fit in this machine's RAM is
  not run; its time is then scaled by pixels from the largest size that ran, and said so.
* memory: each step that runs runs once more in a fresh child process; the peak is the RSS
  high-water mark above the process's baseline after setup (torch, model, image). Steps that
  are not run show the planner's estimate, marked "est.".
* the planner under ``--budget`` (``--sweep``): every segmentation the planner priced (its
  cheapest few, each with its own per-segment tiles) and its best single tile are timed as
  real steps, and the planner's choice is compared with the fastest measured.

    python bench/bench_segments.py                      # the issue's cases (about 40 min)
    python bench/bench_segments.py --cases resnet34:4096:1024:same-peak --sweep
    python bench/bench_segments.py --cases --sweep resnet18:2048:0.6GiB
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from torch import nn

from tileplan.host_allocator import HOST_ALLOCATOR_ENV

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3


def _load(name: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of examples/<name>.py, or torchvision's DenseNet-121 (features | head)."""
    from tileplan.planning.model_file import load_model_file

    torch.manual_seed(0)
    loaded = load_model_file(_model_file(name), "auto")
    return loaded.trunk, loaded.head


def _model_file(name: str) -> Path:
    path = ROOT / "examples" / f"{name}.py"
    if path.exists():
        return path
    generated = Path(os.environ.get("TMPDIR", "/tmp")) / f"tileplan_bench_{name}.py"
    generated.write_text(
        f"import torchvision\n\n\ndef build_model():\n"
        f"    return torchvision.models.{name}(num_classes=2)\n"
    )
    return generated


def _plan(name: str, size: int, max_tile: int | None, budget: int | None,
          measure: bool, segments: int | None = None) -> Any:  # fmt: skip
    from tileplan.planning.profile import ProfileRequest, profile

    request = ProfileRequest(model_file=_model_file(name), image_shape=(size, size),
                             max_tile=max_tile, budget_bytes=budget, measure=measure,
                             verify=False, segments=segments)  # fmt: skip
    start = time.perf_counter()
    plan = profile(request)
    return plan, time.perf_counter() - start


def _engine(trunk: nn.Module, plan: Any, segmentation: Any = None) -> Any:
    """The plan's engine, or one for another of its segmentations (same tiles as priced)."""
    from executor import SegmentedStreamingCNN, SegmentSpec, StreamingCNN

    if segmentation is None:
        return StreamingCNN.from_plan(trunk, plan)
    specs = [SegmentSpec(s.end, s.tile_px, s.forward_tile_px, s.map_on_host)
             for s in segmentation.segments]  # fmt: skip
    return SegmentedStreamingCNN(trunk, specs)


def _step(engine: Any, trunk: nn.Module, head: nn.Module, image: torch.Tensor) -> None:
    target = torch.tensor([1])
    if engine is None:  # conventional
        nn.functional.cross_entropy(head(trunk(image)), target).backward()
        return
    out = engine.forward(image)
    out.requires_grad_()
    nn.functional.cross_entropy(head(out), target).backward()
    engine.backward(image, out.grad)


def _timed(steps: dict[str, Any], trunk: nn.Module, head: nn.Module, repeats: int
           ) -> dict[str, float]:  # fmt: skip
    """Median seconds of each step; steps alternate (no warm-up step: these are long)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            trunk.zero_grad(set_to_none=True)
            head.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
            print(f"    {name}: {times[name][-1]:.1f} s", file=sys.stderr, flush=True)
    return {name: statistics.median(v) for name, v in times.items()}


# -- peaks in child processes ------------------------------------------------------------------


def child(job: dict[str, Any]) -> dict[str, float]:
    """One step in a fresh process: its RSS high-water mark above the baseline after setup."""
    from executor import load_plan
    from tileplan.planning.measure_child import peak_rss, reset_peak_rss

    trunk, head = _load(job["name"])
    image = torch.randn(1, 3, job["size"], job["size"])
    engine = _engine(trunk, load_plan(job["plan"])) if job["plan"] else None
    _step(engine, trunk, head, torch.randn(1, 3, 256, 256)) if engine is None else None
    base = reset_peak_rss()
    start = time.perf_counter()
    _step(engine, trunk, head, image)
    return {"peak_bytes": peak_rss() - base, "seconds": time.perf_counter() - start}


def run_child(name: str, size: int, plan_path: Path | None) -> dict[str, float]:
    job = {"name": name, "size": size, "plan": str(plan_path) if plan_path else None}
    env = {**os.environ, **HOST_ALLOCATOR_ENV}  # as training and the planner run
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], check=True,
                          capture_output=True, text=True, env=env)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the cases -----------------------------------------------------------------------------------


def _single_tile(plan: Any, trunk: nn.Module, max_tile: int) -> tuple[int, ...] | None:
    """The fastest-looking single-segment tile within ``max_tile``: the largest allowed."""
    from executor import analyze_trunk

    geometry = analyze_trunk(trunk)
    tile = max_tile - max_tile % geometry.align[0]
    return (tile, tile) if tile >= geometry.min_tile(0) else None


def _sub_image(trunk: nn.Module, tile: tuple[int, ...]) -> tuple[int, ...]:
    """An image of 3x3 tiles of ``tile`` (interior tiles like those of a large image)."""
    from executor import analyze_trunk

    geometry = analyze_trunk(trunk)
    sizes = []
    for ax, t in enumerate(tile):
        n = t
        while geometry.tile_grid((n, n), tile).counts[ax] < 3:
            n += geometry.align[ax]
        sizes.append(n)
    return tuple(sizes)


def case(name: str, size: int, max_tile: int, repeats: int, out: Path, conventional: bool,
         conventional_s: float | None, same_peak: bool = False) -> dict[str, Any]:  # fmt: skip
    """One case; with ``same_peak`` the planner's budget is the single-segment plan's
    estimated peak (its usable part, after the margin): segments may not use more."""
    from executor import StreamingCNN, save_plan
    from tileplan.text import describe_segments

    budget = None
    if same_peak:
        single_plan, _ = _plan(name, size, max_tile, None, measure=False, segments=1)
        budget = math.ceil(single_plan.predicted_peak_bytes / (1 - single_plan.margin))
    plan, planning_s = _plan(name, size, max_tile, budget, measure=True)
    print(f"{name} {size}² tiles <= {max_tile}"
          + (f", budget {budget / GIB:.2f} GiB (usable = one segment's peak)" if budget else "")
          + f": planned in {planning_s:.0f} s", flush=True)  # fmt: skip
    for line in describe_segments(plan):
        print(line, flush=True)
    trunk, head = _load(name)
    image = torch.randn(1, 3, size, size)
    engine = _engine(trunk, plan)
    steps: dict[str, Any] = {"segmented": lambda: _step(engine, trunk, head, image)}
    single = _single_tile(plan, trunk, max_tile)
    if single is not None:
        sub = _sub_image(trunk, single)
        single_engine = StreamingCNN(trunk, single)
        sub_image = torch.randn(1, 3, *sub)
        steps["single (sub-image)"] = lambda: _step(single_engine, trunk, head, sub_image)
        full_tiles = single_engine.tile_grid((size, size)).n_tiles
        sub_tiles = single_engine.tile_grid(sub).n_tiles
        overlap = single_engine.tile_grid((size, size)).overlap_factor
    if conventional:
        steps["conventional"] = lambda: _step(None, trunk, head, image)
    times = _timed(steps, trunk, head, repeats)
    plan_path = out / f"{name}_{size}_{max_tile}.yaml"
    save_plan(plan, plan_path)
    peaks = {"segmented": run_child(name, size, plan_path)["peak_bytes"]}
    if conventional:
        peaks["conventional"] = run_child(name, size, None)["peak_bytes"]
    result: dict[str, Any] = {
        "case": f"{name} {size}² tiles <= {max_tile}"
        + (f", budget {budget / GIB:.2f} GiB" if budget else ""),
        "segments": ", ".join(s.where for s in plan.segments[:-1]) or "(one segment)",
        "tiles": [s.tile_px[0] for s in plan.segments] or [plan.tile_px[0]],
        "overlaps": [s.overlap_factor for s in plan.segments],
        "segmented_s": times["segmented"],
        "segmented_peak": peaks["segmented"],
        "segmented_est": _step_bytes(plan.chosen.memory if plan.segments else None, plan),
        "planning_s": planning_s,
    }
    if single is not None:
        result["single_tile"] = single[0]
        result["single_overlap"] = overlap
        result["single_s"] = times["single (sub-image)"] / sub_tiles * full_tiles
        result["single_tiles"] = full_tiles
        chosen = [c for c in plan.candidates if c.tile_px == single]
        result["single_est"] = _step_bytes(chosen[0].memory, plan) if chosen else None
    if conventional:
        result["conventional_s"] = times["conventional"]
        result["conventional_peak"] = peaks["conventional"]
    else:
        result["conventional_s"] = conventional_s
        memory = plan.candidates[0].memory if plan.candidates else plan.chosen.memory
        result["conventional_est"] = (
            plan.conventional_peak_bytes
            - memory.params_bytes
            - memory.optimizer_bytes
            - memory.image_bytes
        )
    return result


def sweep(name: str, size: int, budget: int, repeats: int) -> None:
    """Every segmentation the planner priced, timed for real, against the planner's pick."""
    plan, _ = _plan(name, size, None, budget, measure=True)
    trunk, head = _load(name)
    image = torch.randn(1, 3, size, size)
    options = {" | ".join(s.where for s in g.segments[:-1]): g for g in plan.segmentations}
    singles: dict[str, Any] = {}
    chosen = " | ".join(s.where for s in plan.segments[:-1]) or "(one segment)"
    engines = {k: _engine(trunk, plan, g) for k, g in options.items()}
    if not plan.segments:  # the planner kept one segment
        engines[chosen] = _engine(trunk, plan)
    else:  # the fastest single tile that fits, as the planner predicted it
        from executor import StreamingCNN

        fitting = [c for c in plan.candidates if c.fits and c.predicted_time_s is not None]
        if fitting:
            best_single = min(fitting, key=lambda c: c.predicted_time_s)
            single_key = f"(one segment, tile {best_single.tile_px[0]})"
            engines[single_key] = StreamingCNN(trunk, best_single.tile_px)
            singles[single_key] = best_single
    steps = {k: functools.partial(_step, e, trunk, head, image) for k, e in engines.items()}
    times = _timed(steps, trunk, head, repeats)
    best = min(times, key=times.__getitem__)
    print(f"\nplanner sweep: {name} {size}², budget {budget / GIB:.2f} GiB "
          f"(median of {repeats} steps each)")  # fmt: skip
    print(f"  {'segmentation':<40} {'tiles':<24} {'predicted s':>11} {'measured s':>10}")
    for key, seconds in sorted(times.items(), key=lambda kv: kv[1]):
        g = options.get(key)
        if g is not None:
            tiles, pred = " | ".join(str(s.tile_px[0]) for s in g.segments), g.predicted_time_s
        elif key in singles:
            tiles, pred = str(singles[key].tile_px[0]), singles[key].predicted_time_s
        else:
            tiles, pred = str(plan.tile_px[0]), plan.predicted_time_s
        mark = "*" if key == chosen else " "
        print(f"{mark} {key[:40]:<40} {tiles:<24} {pred or math.nan:>11.1f} {seconds:>10.2f}")
    print(
        f"  planner's choice ({chosen}) measured {times[chosen]:.2f} s; fastest ({best}) "
        f"{times[best]:.2f} s: {times[chosen] / times[best]:.3f}x",
        flush=True,
    )


def _step_bytes(memory: Any, plan: Any) -> int:
    """The plan's estimated peak less what the child's baseline already holds or the bench's
    step never allocates (parameters, image, optimizer state: no optimizer step here)."""
    if memory is None:
        memory = next(c.memory for c in plan.candidates if c.tile_px == plan.tile_px)
    return memory.total_bytes - memory.params_bytes - memory.image_bytes - memory.optimizer_bytes


def _gib(value: float | None, estimate: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" + (" est." if estimate else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*",
                        default=["resnet34:4096:1024:same-peak", "resnet34:8192:1536",
                                 "densenet121:4096:1536"],
                        help="NET:IMAGE:MAX_TILE[:same-peak] (NET: an examples/ file or a "
                        "torchvision name; same-peak: budget = one segment's peak)")  # fmt: skip
    parser.add_argument(
        "--sweep",
        nargs="*",
        default=["resnet18:2048:0.75GiB"],
        help="NET:IMAGE:BUDGET: time every segmentation the planner priced",
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench_segments_out"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    args.out.mkdir(exist_ok=True)
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, float32")
    results = []
    conventional_per_px: dict[str, float] = {}
    for spec in args.cases:
        name, size, max_tile, *option = spec.split(":")
        n, t = int(size), int(max_tile)
        fits = _conventional_fits(name, n, psutil.virtual_memory().available)
        scaled = conventional_per_px[name] * n * n if name in conventional_per_px else None
        r = case(name, n, t, args.repeats, args.out, fits, scaled, option == ["same-peak"])
        if fits:
            conventional_per_px[name] = r["conventional_s"] / (n * n)
        else:
            r["conventional_note"] = "scaled by pixels" if scaled else "not run"
        results.append(r)
        print(json.dumps(r), flush=True)
    print(
        "\n| case | cut after | tiles | overlaps | segmented s | single s (tile, overlap) "
        "| conventional s | seg / single | seg / conv | peak seg (est.) | peak single | "
        "peak conv |"
    )
    print("|" + "---|" * 12)
    for r in results:
        print("| " + " | ".join(_row(r)) + " |")
    for spec in args.sweep:
        name, size, budget = spec.split(":")
        from tileplan.units import parse_bytes

        sweep(name, int(size), parse_bytes(budget), args.repeats)


def _row(r: dict[str, Any]) -> list[str]:
    seg, single, conv = r["segmented_s"], r.get("single_s"), r["conventional_s"]
    note = f" ({r['conventional_note']})" if "conventional_note" in r else ""
    if "conventional_peak" in r:
        conv_peak = _gib(r["conventional_peak"])
    else:
        conv_peak = _gib(r.get("conventional_est"), estimate=True)
    return [
        r["case"], r["segments"], str(r["tiles"]), str(r["overlaps"]), f"{seg:.1f}",
        f"{single:.0f} extrapolated ({r['single_tile']}, {r['single_overlap']:.1f})"
        if single else "no tile that small",
        "-" if conv is None else f"{conv:.1f}{note}",
        f"{seg / single:.3f}" if single else "-",
        f"{seg / conv:.2f}" if conv else "-",
        f"{_gib(r['segmented_peak'])} ({_gib(r['segmented_est'])})",
        _gib(r.get("single_est"), estimate=True), conv_peak,
    ]  # fmt: skip


def _conventional_fits(name: str, size: int, available: int) -> bool:
    """Whether a conventional step of ``name`` at ``size``² fits in RAM (the planner's
    estimate, with 20% to spare)."""
    from tileplan.planning.profile import ProfileRequest, profile

    plan = profile(ProfileRequest(model_file=_model_file(name), image_shape=(size, size),
                                  measure=False, verify=False, segments=1))  # fmt: skip
    return plan.conventional_peak_bytes * 1.2 < available


if __name__ == "__main__":
    main()
