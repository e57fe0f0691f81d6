"""How far tileplan streams timm's CNN families (random init, nothing downloaded).

For each model: where the automatic split ends the trunk, its output stride, how many
statistics of whole maps it streams with (global-context layers), what stopped it,
the trunk's share of a conventional training step's activation memory at ``--image`` px
(meta-tensor estimates: what streaming can save at best), and the float64 error of streaming
against conventional backprop (output, every parameter gradient, the input gradient) on the
deepest prefix of the trunk whose smallest tile is at most 96 px, over several tiles.

    python bench/bench_timm.py                    # every family below (a few minutes)
    python bench/bench_timm.py resnet18 efficientnet_b0
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the exactness check is the test suite's

from executor import analyze_trunk, build_program  # noqa: E402
from tests.tileplan.planning.test_timm_models import (  # noqa: E402
    REFUSED,
    STREAMED,
    check_exact,
    timm_model,
)
from tileplan.planning.estimate import (  # noqa: E402
    EstimateError,
    ModelState,
    estimate_conventional,
)
from tileplan.planning.model_file import split_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="timm model names (default: every family)")
    parser.add_argument("--image", type=int, default=1024, help="px per side for the share")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    families = {name: family for family, (name, *_) in {**STREAMED, **REFUSED}.items()}
    names = args.models or list(families)
    print(f"{'model':<22} {'trunk ends after':<44} {'stride':>6} {'stats':>5} {'share':>6} "
          f"{'float64 error':>13}  stopped by")  # fmt: skip
    for name in names:
        start = time.perf_counter()
        model = timm_model(name)
        split = split_model(model)
        geometry = analyze_trunk(split.trunk)
        try:
            conventional = estimate_conventional(
                trunk=split.trunk, head=split.head, state=ModelState.of(model, "adam"),
                image_shape=(1, 3, args.image, args.image), dtype=torch.float32,
            )  # fmt: skip
            share = conventional.trunk_bytes / (conventional.trunk_bytes + conventional.head_bytes)
        except EstimateError:  # e.g. attention built for one input size
            share = math.nan
        worst = check_exact(split)
        stats = len(build_program(split.trunk).reductions)
        where = split.where.removeprefix("auto: trunk ends after ")
        stop = (split.stopped_by or "-").removeprefix("cannot stream ")
        print(f"{name:<22} {where[:44]:<44} {geometry.output_stride[0]:>6} {stats:>5} "
              f"{share:>6.0%} {worst:>13.1e}  {stop[:110]} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
