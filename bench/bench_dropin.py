"""Benchmark: a training step through ``tileplan.stream`` (``loss.backward()``) vs the engine's
manual ``forward``/``backward`` pair vs conventional backprop, ResNet-34 (torchvision).

The plan is ``tileplan.profile``'s for the image size and budget (estimates only, or
``--plan`` a saved one). Each method runs in its own fresh process repeating its own step
(alternating methods in one process slows the conventional step); time is the median of
``--repeats`` steps after one warm-up step; memory is the peak RSS above the RSS after the
warm-up step (CPU; the same allocator setting as tileplan's measurements) or the CUDA
allocator's peak above what was allocated before the step.

    python bench/bench_dropin.py                       # ResNet-34 at 4096², 4 GiB plan
    python bench/bench_dropin.py --image 2048 --budget 1GiB --repeats 3
    python bench/bench_dropin.py --device cuda --image 8192 --budget 8GiB
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

METHODS = ("dropin", "manual", "conventional")


def build(device: str) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet34(num_classes=2).to(device).eval()  # BatchNorm frozen


def child(method: str, plan_path: str, repeats: int, device: str) -> dict[str, float]:
    """``repeats`` steps of one method; median seconds and peak bytes above the baseline."""
    import tileplan

    model = build(device)
    plan = tileplan.load_plan(plan_path)
    net = tileplan.stream(model, plan).train()
    scnn, head = net.engine, net.head
    image = torch.randn(1, 3, *plan.image_shape_px)  # on the host: crops move per tile
    target = torch.tensor([1], device=device)

    def step() -> None:
        if method == "dropin":
            nn.functional.cross_entropy(net(image), target).backward()
        elif method == "manual":
            features = scnn.forward(image).requires_grad_()
            nn.functional.cross_entropy(head(features), target).backward()
            grad = features.grad
            del features
            scnn.backward(image, grad)
        else:
            nn.functional.cross_entropy(model(image.to(device)), target).backward()

    return time_steps(step, repeats, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=4096, help="square image side, px")
    parser.add_argument("--budget", default="4GiB", help="memory budget of the plan")
    parser.add_argument("--plan", type=Path, default=None, help="use this plan instead")
    add_method_options(parser, METHODS)
    args = parser.parse_args()
    if answer_child(args, child):
        return
    import tileplan

    device = device_of(args)
    with tempfile.TemporaryDirectory() as folder:
        plan_path = args.plan
        if plan_path is None:
            plan = tileplan.profile(build("cpu"), image=args.image, budget=args.budget,
                                    measure=False, device=device)  # fmt: skip
            plan_path = plan.save(Path(folder) / "plan.yaml")
        plan = tileplan.load_plan(plan_path)
        where = device_words(device)
        tiles = sum(g.n_tiles for g in plan.tile_grids())
        print(f"torch {torch.__version__}, {where}, float32, ResNet-34, image "
              f"{'x'.join(map(str, plan.image_shape_px))}, plan: "
              f"{len(plan.segments) or 1} segment(s), {tiles} tiles, predicted peak "
              f"{plan.peak_bytes / GIB:.2f} GiB")  # fmt: skip
        results = {m: run_child(__file__, m, plan_path, args.repeats, device) for m in args.methods}
    print_results(
        results,
        [
            ("dropin", "manual", "drop-in / manual pair"),
            ("dropin", "conventional", "drop-in / conventional"),
        ],
    )


if __name__ == "__main__":
    main()
