"""Benchmark: augmentation applied as crops are read (``tileplan.augment``).

Three parts, float32 on this machine's CPU:

* ``reads``: crops of ``--tile`` px read from a JPEG pyramidal TIFF of ``--size``² px (written
  here, ``tileplan.run.demo_slides``), plain and under each augmentation at its default
  strength, and the default set: megapixels per second, median over the crops of a tile grid;
* ``step``: a ResNet-18 training step at ``--size``² (examples/resnet18.py, the plan
  ``tileplan.profile`` picks under ``--budget``) streamed from that slide, plain and with
  ``--augment default`` (a new epoch's parameters every step), each method in its own fresh
  process repeating its own step (``step_timing``); the target is <= 1.10x the plain step;
* ``demo``: the demo experiment (rings vs discs, ``examples/small_cnn.py``) on a small
  training set, with and without ``--augment``, validation AUC for 3 seeds, as measured.

    python bench/bench_augment.py                               # all three, the issue's sizes
    python bench/bench_augment.py --parts reads --size 2048      # a quick look
    python bench/bench_augment.py --parts demo --n 24 --demo-size 512 --epochs 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
METHODS = ("plain", "augmented")
SLIDE = "bench_augment_{size}.tif"


def _slide(folder: Path, size: int) -> Path:
    from tileplan.run.demo_slides import write_pyramidal_tiff

    path = folder / SLIDE.format(size=size)
    if not path.exists():
        write_pyramidal_tiff(path, size, size, mpp=0.5, seed=7, label=1, compression="jpeg")
    return path


def _source(path: Path):  # noqa: ANN202
    from tileplan.run.slides import SlideSource, choose_region, open_pyramid

    pyramid = open_pyramid(path)
    return SlideSource(pyramid, choose_region(pyramid))


def _resnet18():  # noqa: ANN202
    from tileplan.planning.model_file import load_model_file

    torch.manual_seed(0)
    loaded = load_model_file(ROOT / "examples" / "resnet18.py")
    loaded.model.eval()
    return loaded


# -- reads ----------------------------------------------------------------------------------------


def bench_reads(folder: Path, size: int, tile: int) -> None:
    from executor import analyze_trunk
    from tileplan.augment import DEFAULT_SPEC, OPS, Augmentation

    loaded = _resnet18()
    path = _slide(folder, size)
    base = _source(path)
    grid = analyze_trunk(loaded.trunk).tile_grid((size, size), (tile, tile))
    regions = [tuple(t.input_slices()) for t in list(grid)[:6]]
    print(f"\nreads: {len(regions)} crops of about {tile} px (ResNet-18 tiles) of a {size}² "
          "JPEG TIFF, median Mpx/s (and the cost per crop over a plain read)")  # fmt: skip

    def rate(source) -> tuple[float, float]:  # noqa: ANN001
        seconds = []
        for region in regions:
            start = time.perf_counter()
            crop = source.read(region)
            seconds.append(time.perf_counter() - start)
        px = crop.shape[-1] * crop.shape[-2]
        return px / 1e6 / statistics.median(seconds), statistics.median(seconds)

    plain, plain_s = rate(base)
    print(f"  {'plain':<24} {plain:7.1f} Mpx/s  {plain_s * 1e3:6.0f} ms/crop")
    specs = [n for n in OPS if n != "scale"] + ["default"]
    for spec in specs:
        source = Augmentation.parse(spec).apply(base, seed=0, epoch=0, index=0)
        mpx, s = rate(source)
        name = spec if spec != "default" else f"default ({DEFAULT_SPEC.count(',') + 1} ops)"
        kind = OPS[spec].kind if spec in OPS else "mixed"
        print(f"  {name:<24} {mpx:7.1f} Mpx/s  {s * 1e3:6.0f} ms/crop  "
              f"+{(s - plain_s) * 1e3:5.0f} ms  {kind}")  # fmt: skip
    base.close()


# -- step -----------------------------------------------------------------------------------------


def child(method: str, plan_path: str, repeats: int, device: str) -> dict[str, float]:
    from executor import StreamingCNN, load_plan, streaming_step
    from tileplan.augment import Augmentation
    from tileplan.settings import Normalization

    plan = load_plan(plan_path)
    loaded = _resnet18()
    loaded.model.to(device)
    normalization = Normalization.default(3)
    scnn = StreamingCNN.from_plan(
        loaded.trunk, plan, preprocess=lambda c: normalization.apply(c, torch.float32)
    )
    base = _source(Path(plan_path).parent / SLIDE.format(size=plan.image_shape_px[0]))
    augmentation = Augmentation.parse("default", max_shape=plan.image_shape_px)
    epoch = [0]

    def step() -> None:
        image = base
        if method == "augmented":  # new parameters every step, as a new epoch draws them
            image = augmentation.apply(base, seed=0, epoch=epoch[0], index=0)
            epoch[0] += 1
        streaming_step(scnn, loaded.head, image, torch.tensor([1]),
                       torch.nn.functional.cross_entropy)  # fmt: skip
        loaded.model.zero_grad(set_to_none=True)

    return time_steps(step, repeats, device)


def bench_step(folder: Path, size: int, budget: str, args: argparse.Namespace) -> None:
    import tileplan

    device = device_of(args)
    _slide(folder, size)
    plan = tileplan.profile(_resnet18().model, image=size, budget=budget, measure=False,
                            device=device)  # fmt: skip
    plan_path = plan.save(folder / "plan.yaml")
    tiles = sum(g.n_tiles for g in plan.tile_grids())
    print(f"\nstep: torch {torch.__version__}, {device_words(device)}, float32, ResNet-18, "
          f"{size}² JPEG TIFF on disk, {tiles} tiles, predicted peak "
          f"{plan.peak_bytes / GIB:.2f} GiB; augmented: --augment default")  # fmt: skip
    results = {m: run_child(__file__, m, plan_path, args.repeats, device) for m in args.methods}
    print_results(results, [("augmented", "plain", "augmented / plain (target <= 1.10x)")])


# -- demo -----------------------------------------------------------------------------------------


def bench_demo(folder: Path, n: int, size: int, epochs: int, spec: str) -> None:
    from executor import load_plan, save_plan
    from tileplan.planning.model_file import load_model_file
    from tileplan.planning.profile import ProfileRequest, profile
    from tileplan.run.data import load_csv
    from tileplan.run.demo_data import write_demo_dataset
    from tileplan.run.trainer import Trainer
    from tileplan.settings import RunSpec

    model = ROOT / "examples" / "small_cnn.py"
    write_demo_dataset(folder / "demo", n=n, size=size, seed=0)
    plan = profile(ProfileRequest(model_file=model, image_shape=(size, size), measure=False,
                                  budget_bytes=8 * GIB))  # fmt: skip
    save_plan(plan, folder / "demo_plan.yaml")
    plan = load_plan(folder / "demo_plan.yaml")
    train = load_csv(folder / "demo" / "train.csv", target_shape=plan.image_shape_px)
    val = load_csv(folder / "demo" / "val.csv", target_shape=plan.image_shape_px)
    print(f"\ndemo: {len(train)} training and {len(val)} validation images of {size}² px, "
          f"examples/small_cnn.py, {epochs} epochs, Adam 1e-3, batch 4; "
          f"augmented: {spec}")  # fmt: skip
    rows = {"none": [], spec: []}
    for seed in range(3):
        for augment in rows:
            config = RunSpec.from_plan(
                plan, epochs=epochs, lr=1e-3, batch=4, num_workers=0, seed=seed,
                augment="" if augment == "none" else augment,
            )  # fmt: skip
            torch.manual_seed(seed)
            loaded = load_model_file(model)
            trainer = Trainer(model=loaded.model, trunk=loaded.trunk, head=loaded.head,
                              plan=plan, spec=config, train_data=train, val_data=val,
                              out_dir=folder / f"run_{seed}_{len(rows[augment])}_{augment[:4]}",
                              device=torch.device("cpu"))  # fmt: skip
            start = time.perf_counter()
            history = trainer.fit(progress=False)
            auc = history[-1].val_auc
            rows[augment].append(auc)
            print(f"  seed {seed}, augment {augment}: val AUC {auc:.3f} "
                  f"(train loss {history[-1].train_loss:.3f}), "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    for augment, aucs in rows.items():
        print(f"  {augment}: mean val AUC {statistics.mean(aucs):.3f} over seeds 0-2 "
              f"({', '.join(f'{a:.3f}' for a in aucs)})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["reads", "step", "demo"],
                        choices=["reads", "step", "demo"])  # fmt: skip
    parser.add_argument("--size", type=int, default=4096, help="slide side, px")
    parser.add_argument("--tile", type=int, default=1024, help="crop side for reads, px")
    parser.add_argument("--budget", default="2GiB", help="the step's plan budget")
    parser.add_argument("--n", type=int, default=32, help="demo images (3/4 train)")
    parser.add_argument("--demo-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--spec", default="default", help="the demo's --augment")
    parser.add_argument("--folder", type=Path, default=None, help="keep slides here")
    add_method_options(parser, METHODS)
    args = parser.parse_args()
    if answer_child(args, child):
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if "reads" in args.parts:
            bench_reads(folder, args.size, args.tile)
        if "step" in args.parts:
            bench_step(folder, args.size, args.budget, args)
        if "demo" in args.parts:
            bench_demo(folder, args.n, args.demo_size, args.epochs, args.spec)


if __name__ == "__main__":
    main()
