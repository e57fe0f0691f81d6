"""Benchmark a training epoch: streamed at the planned tile vs conventional, same images.

    python bench/bench_training.py --size 2048 --n 8 --model examples/resnet18.py

Prints seconds per image of one epoch each way (same images, order, optimizer), and the
memory-savings report of the run (streaming and conventional step peaks, both measured in fresh
child processes when the conventional step fits).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from executor import save_plan
from tileplan.planning.model_file import load_model_file
from tileplan.planning.profile import ProfileRequest, profile
from tileplan.run.data import load_csv
from tileplan.run.report import measure_run_report
from tileplan.run.trainer import Trainer
from tileplan.settings import RunSpec
from tileplan.text import render_report

ROOT = Path(__file__).resolve().parent.parent


def conventional_epoch(model_file: Path, data, order: list[int], spec: RunSpec) -> float:  # type: ignore[no-untyped-def]
    """Seconds per image of a conventional epoch over ``order``."""
    torch.manual_seed(spec.seed)
    model = load_model_file(model_file).model.float().eval()
    optimizer = spec.make_optimizer(model.parameters())
    start = time.perf_counter()
    for i in range(0, len(order), spec.batch):
        optimizer.zero_grad(set_to_none=True)
        batch = order[i : i + spec.batch]
        for index in batch:
            image, label = data[index]
            x = spec.normalization.apply(image.unsqueeze(0))
            loss = torch.nn.functional.cross_entropy(model(x), label.reshape(1).long())
            (loss / len(batch)).backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--model", type=Path, default=ROOT / "examples" / "resnet18.py")
    parser.add_argument("--budget", default=None, help="e.g. 2GiB: force smaller tiles")
    args = parser.parse_args()
    from tileplan.run.demo_data import write_demo_dataset
    from tileplan.units import parse_bytes

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_demo_dataset(root / "demo", n=args.n, size=args.size, seed=0)
        budget = parse_bytes(args.budget) if args.budget else None
        plan = profile(ProfileRequest(model_file=args.model, image_shape=(args.size, args.size),
                                      budget_bytes=budget, verify=False))  # fmt: skip
        save_plan(plan, root / "plan.yaml")
        spec = RunSpec.from_plan(plan, epochs=1, lr=1e-4, batch=4, num_workers=0, seed=0)
        data = load_csv(root / "demo" / "train.csv", target_shape=plan.image_shape_px)
        torch.manual_seed(spec.seed)
        loaded = load_model_file(args.model)
        trainer = Trainer(model=loaded.model, trunk=loaded.trunk, head=loaded.head, plan=plan,
                          spec=spec, train_data=data, val_data=None, out_dir=root / "run",
                          device=torch.device("cpu"))  # fmt: skip
        history = trainer.fit(progress=False)
        streamed = history[-1].seconds_per_image
        conventional = conventional_epoch(args.model, data, trainer.order(0), spec)
        report = measure_run_report(run="bench", plan=plan, model_file=args.model, device="cpu",
                                    time_per_image_s=streamed)  # fmt: skip
    tiles = trainer.scnn.tile_grid(plan.image_shape_px)
    print(f"{args.model.name} at {args.size}², {len(data)} training images, planned tile "
          f"{'x'.join(map(str, plan.tile_px))} ({tiles.n_tiles} tiles, overlap "
          f"{tiles.overlap_factor:.2f})")  # fmt: skip
    print(f"epoch: streamed {streamed:.2f} s/image, conventional {conventional:.2f} s/image, "
          f"ratio {streamed / conventional:.2f}")  # fmt: skip
    print(render_report(report))


if __name__ == "__main__":
    main()
