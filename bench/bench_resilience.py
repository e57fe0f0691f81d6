"""What surviving the real world costs a training run, and whether a run keeps its plan's peak.

    python bench/bench_resilience.py checkpoint --model examples/resnet18.py --size 2048
    python bench/bench_resilience.py check-data --n 8 --size 4096
    python bench/bench_resilience.py peak --model examples/resnet18.py --size 4096 --budget 2GiB

* ``checkpoint``: the seconds one ``last.pt`` write takes (weights, Adam state, RNG states;
  median of 5) and what the loop adds to every step (the RNG snapshot a stop between images
  resumes from), against a streamed training step of the plan: the overhead at the default
  cadence (30 min) and at a checkpoint after every step.
* ``check-data``: ``tileplan check-data`` throughput on demo slides (workers = cores) against
  the rate training reads the same slides (the plan's crops, one reader thread, as the engine
  reads them), both in Mpx/s of image.
* ``peak``: three training steps of the plan in a fresh process, once under the CPU allocator
  setting ``tileplan train`` and the planner share (``tileplan.host_allocator``) and once
  under glibc's default: the peak after each step (RSS high-water above set-up, plus the
  weights, as the planner counts) against the plan's peak and margin, and the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024**3


def _plan(model: Path, size: int, budget: str | None, out: Path, measure: bool = False):  # type: ignore[no-untyped-def]
    from executor import save_plan
    from tileplan.planning.profile import ProfileRequest, profile
    from tileplan.units import parse_bytes

    limit = parse_bytes(budget) if budget else None
    plan = profile(ProfileRequest(model_file=model, image_shape=(size, size), verify=False,
                                  budget_bytes=limit, measure=measure))  # fmt: skip
    save_plan(plan, out)
    return plan


def _step(plan_file: Path, model: Path):  # type: ignore[no-untyped-def]
    """A streamed training step of the plan on a random image, as the trainer runs it."""
    from executor import StreamingCNN, load_plan, streaming_step
    from tileplan.planning.model_file import load_model_file
    from tileplan.run.trainer import loss_for
    from tileplan.settings import RunSpec

    plan = load_plan(plan_file)
    spec = RunSpec.from_plan(plan)
    loaded = load_model_file(model, plan.model.split_option)
    loaded.model.eval()
    scnn = StreamingCNN.from_plan(loaded.trunk, plan, preprocess=spec.preprocess())
    optimizer = spec.make_optimizer(loaded.model.parameters())
    image = torch.randint(0, 256, (1, plan.channels, *plan.image_shape_px), dtype=torch.uint8)
    target = torch.tensor([1.0])
    loss = loss_for("binary")

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        streaming_step(scnn, loaded.head, image, target, loss)
        optimizer.step()

    return plan, loaded.model, optimizer, step


def bench_checkpoint(args: argparse.Namespace) -> None:
    from tileplan.run.checkpoint import Checkpoint, CheckpointMeta, rng_state, save_checkpoint
    from tileplan.run.policy import DEFAULT_CHECKPOINT_EVERY
    from tileplan.settings import RunSpec

    with tempfile.TemporaryDirectory() as tmp:
        plan = _plan(args.model, args.size, args.budget, Path(tmp) / "plan.yaml")
        _, model, optimizer, step = _step(Path(tmp) / "plan.yaml", args.model)
        step()  # Adam's state exists from the first step on
        start = time.perf_counter()
        step()
        step_s = time.perf_counter() - start
        meta = CheckpointMeta(epoch=1, task="binary", spec=RunSpec.from_plan(plan), plan=plan)
        saves = []
        for _ in range(5):
            start = time.perf_counter()
            ckpt = Checkpoint(model.state_dict(), optimizer.state_dict(), {}, rng_state(), meta)
            save_checkpoint(Path(tmp) / "last.pt", ckpt)
            saves.append(time.perf_counter() - start)
        size = (Path(tmp) / "last.pt").stat().st_size
    save_s = statistics.median(saves)
    snaps = []
    for _ in range(200):
        start = time.perf_counter()
        rng_state()
        snaps.append(time.perf_counter() - start)
    snap_s = statistics.median(snaps)
    cadence = DEFAULT_CHECKPOINT_EVERY.seconds or 1800.0
    default = (save_s + cadence / step_s * snap_s) / cadence
    print(f"{args.model.name} at {args.size}² ({'x'.join(map(str, plan.tile_px))} tiles), "
          f"CPU {torch.get_num_threads()} threads")  # fmt: skip
    print(
        f"checkpoint {size / 2**20:.0f} MiB written in {save_s:.2f} s (median of 5, atomic, "
        f"fsync); RNG snapshot per step {snap_s * 1e6:.0f} µs; streamed step {step_s:.1f} s"
    )
    print(
        f"overhead at the default cadence ({DEFAULT_CHECKPOINT_EVERY}): {default:.4%}; "
        f"checkpointing after every step: {(save_s + snap_s) / step_s:.2%}"
    )


def bench_check_data(args: argparse.Namespace) -> None:
    from executor import CropReader, StreamingCNN, load_plan
    from tileplan.planning.model_file import load_model_file
    from tileplan.run.check_data import check_data
    from tileplan.run.data import load_csv
    from tileplan.run.demo_slides import demo_slide_sizes, write_demo_slides
    from tileplan.settings import DataSettings

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_slides(root / "s", n=args.n, sizes=demo_slide_sizes(args.n, args.size), seed=0)
        csv_file, plan_file = root / "s" / "train.csv", root / "plan.yaml"
        subprocess.run([sys.executable, "-m", "tileplan", "profile", str(args.model), "--data",
                        str(csv_file), "--no-measure", "--budget", args.budget or "2GiB",
                        "--out", str(plan_file)], check=True, capture_output=True)  # fmt: skip
        plan = load_plan(plan_file)
        result = check_data(csv_file, plan_file=plan_file, settings=DataSettings(),
                            workers=os.cpu_count() or 1)  # fmt: skip
        data = load_csv(csv_file, target_shape=plan.image_shape_px, settings=DataSettings())
        scnn = StreamingCNN.from_plan(load_model_file(args.model).trunk, plan)
        read_px, start = 0, time.perf_counter()
        for index in range(len(data)):  # one pass's reads: the first segment's crops
            source = data.source(index)
            grid = scnn.tile_grids(source.shape[2:])[0]
            with CropReader(source, iter(grid)) as reader:
                for _ in reader:
                    pass
            read_px += source.shape[2] * source.shape[3]
            source.close()
        train_s = time.perf_counter() - start
    print(f"{result.images} demo slides up to {args.size}², {result.pixels / 1e6:.0f} Mpx")
    print(
        f"check-data: {result.pixels / 1e6 / result.seconds:.1f} Mpx/s "
        f"({os.cpu_count()} workers, {result.seconds:.1f} s incl. start-up); one training "
        f"pass reads the plan's crops at {read_px / 1e6 / train_s:.1f} Mpx/s of image"
    )


_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from tileplan.host_allocator import use_host_allocator
if {planned!r}:
    use_host_allocator()  # as tileplan train does, before anything is allocated
from bench.bench_resilience import _step
from tileplan.planning.measure_child import peak_rss, reset_peak_rss
plan, model, optimizer, step = _step({plan!r}, {model!r})
base = reset_peak_rss()
state = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
peaks, times = [], []
for _ in range(3):  # the first allocates gradients and Adam's state, as in training
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    peaks.append(peak_rss() - base + state)
print(json.dumps({{"peaks": peaks, "seconds": sorted(times)[1]}}))
"""


def bench_peak(args: argparse.Namespace) -> None:
    # Neither child inherits an allocator setting from this shell.
    from tileplan.host_allocator import THP_ENV

    inherited = (THP_ENV, "GLIBC_TUNABLES")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in inherited
    }
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            plan_file = Path(tmp) / f"plan-{budget}.yaml"
            plan = _plan(args.model, args.size, budget, plan_file, measure=True)  # calibrated
            promised = plan.peak_bytes * (1 + plan.margin)
            print(f"{args.model.name} {args.size}² budget {budget}: plan "
                  f"{plan.peak_bytes / GIB:.2f} GiB (+{plan.margin:.0%} margin = "
                  f"{promised / GIB:.2f}), {len(plan.segments)} segment(s), allocator "
                  f"'{plan.provenance.host_allocator or 'default'}'")  # fmt: skip
            for label, planned in (("as train runs", True), ("glibc default", False)):
                code = _CHILD.format(root=str(ROOT), plan=str(plan_file), model=str(args.model),
                                     planned=planned)  # fmt: skip
                done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, env=env)  # fmt: skip
                if done.returncode != 0:
                    print(f"  {label}: failed: {done.stderr.strip().splitlines()[-1]}")
                    continue
                got = json.loads(done.stdout.strip().splitlines()[-1])
                peak = max(got["peaks"])
                print(f"  {label:>13}: peak after steps 1-3 "
                      f"{' '.join(f'{b / GIB:.2f}' for b in got['peaks'])} GiB "
                      f"({peak / plan.peak_bytes:.2f}x plan; "
                      f"{'within' if peak <= promised else 'PAST'} the margin), median step "
                      f"{got['seconds']:.1f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["checkpoint", "check-data", "peak"])
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "resnet18.py")
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--budget", default=None)
    parser.add_argument("--budgets", nargs="+", default=["1GiB", "2GiB", "4GiB"])
    args = parser.parse_args()
    {"checkpoint": bench_checkpoint, "check-data": bench_check_data, "peak": bench_peak}[args.what](
        args
    )


if __name__ == "__main__":
    main()
