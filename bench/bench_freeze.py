"""Benchmark: a training step with a frozen prefix (``--freeze layer3``: conv1 to layer3 fixed)
against the whole network training, ResNet-34 (torchvision).

Three methods, each in its own fresh process repeating its own step (``step_timing``):

* ``trainable``: every parameter trains, on the plan ``tileplan.profile`` picks for the budget;
* ``trainable-cut``: every parameter trains, on the plan cut after layer3 (``cut="layer3"``);
* ``frozen``: conv1 to layer3 frozen (``tileplan.run.freeze``), on the cut plan: the streamed
  backward pass runs no tile through the frozen segment, which streams forward only.

    python bench/bench_freeze.py                       # ResNet-34 at 4096², 4 GiB plans
    python bench/bench_freeze.py --image 2048 --budget 1GiB --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from step_timing import (  # bench/, beside this script
    GIB,
    add_method_options,
    answer_child,
    device_of,
    device_words,
    print_results,
    run_child,
    time_steps,
)
from torch import nn

METHODS = ("trainable", "trainable-cut", "frozen")
FROZEN = "layer3"


def build(device: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet34(num_classes=2).to(device).eval()  # BatchNorm frozen


def child(method: str, plan_path: str, repeats: int, device: str) -> dict[str, float]:
    import tileplan
    from tileplan.run.freeze import freeze_prefix

    model = build(device)
    net = tileplan.stream(model, tileplan.load_plan(plan_path)).train()
    if method == "frozen":
        freeze_prefix(net.trunk, FROZEN)
    image = torch.randn(1, 3, *net.plan.image_shape_px)  # on the host: crops move per tile
    target = torch.tensor([1], device=device)

    def step() -> None:
        nn.functional.cross_entropy(net(image), target).backward()
        model.zero_grad(set_to_none=True)

    return time_steps(step, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=4096, help="square image side, px")
    parser.add_argument("--budget", default="4GiB", help="memory budget of both plans")
    add_method_options(parser, METHODS)
    args = parser.parse_args()
    if answer_child(args, child):
        return
    import tileplan

    device = device_of(args)
    with tempfile.TemporaryDirectory() as folder:
        plans = {}
        for name, cut in (("whole", None), ("cut", FROZEN)):
            plan = tileplan.profile(build("cpu"), image=args.image, budget=args.budget,
                                    measure=False, device=device, cut=cut)  # fmt: skip
            plans[name] = plan.save(Path(folder) / f"{name}.yaml")
            tiles = sum(g.n_tiles for g in plan.tile_grids())
            print(f"plan {name}: {len(plan.segments) or 1} segment(s), {tiles} tiles, "
                  f"predicted peak {plan.peak_bytes / GIB:.2f} GiB")  # fmt: skip
        print(f"torch {torch.__version__}, {device_words(device)}, float32, ResNet-34, image "
              f"{args.image}², conv1 to {FROZEN} frozen in 'frozen'")  # fmt: skip
        results = {
            m: run_child(
                __file__, m, plans["whole" if m == "trainable" else "cut"], args.repeats, device
            )  # fmt: skip
            for m in args.methods
        }
    print_results(
        results,
        [
            ("frozen", "trainable", "frozen prefix / all trainable"),
            ("frozen", "trainable-cut", "frozen prefix / all trainable, same cut plan"),
        ],
    )


if __name__ == "__main__":
    main()
