"""Benchmark: volumes. torchvision's r3d_18 (one input channel, ``examples/r3d18.py``) on a
CT-sized volume, streamed (``tileplan.stream`` with the planner's plan) vs conventional; the
read throughput of a NIfTI crop vs the whole volume; and the estimate-only plan for a 512³ CT
on an 80 GiB GPU.

Each training method runs in its own fresh process repeating its own step (alternating them in
one process slows the conventional step); time is the median of ``--repeats`` steps after one
warm-up step, memory the peak RSS above the RSS after the warm-up (CPU) or the CUDA allocator's
peak above what was allocated before.

    python bench/bench_volumes.py                                  # 1x96x384x384, 2 GiB plan
    python bench/bench_volumes.py --volume 64x256x256 --budget 1GiB --repeats 1
    python bench/bench_volumes.py --device cuda --volume 128x512x512 --budget 8GiB
"""

from __future__ import annotations

import argparse
import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
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

METHODS = ("streamed", "conventional")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "r3d18.py"


def build(device: str) -> nn.Module:
    spec = importlib.util.spec_from_file_location("r3d18_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.build_model().to(device).eval()  # BatchNorm frozen


def child(method: str, plan_path: str, repeats: int, device: str) -> dict[str, float]:
    import tileplan

    model = build(device)
    plan = tileplan.load_plan(plan_path)
    net = tileplan.stream(model, plan).train()
    image = torch.randn(1, 1, *plan.image_shape_px)  # on the host: crops move per tile
    target = torch.tensor([1], device=device)

    def step() -> None:
        if method == "streamed":
            nn.functional.cross_entropy(net(image), target).backward()
        else:
            nn.functional.cross_entropy(model(image.to(device)), target).backward()

    return time_steps(step, repeats, device)


def reading(folder: Path, shape: tuple[int, int, int]) -> None:
    """Seconds to read one 64³ crop vs the whole volume, from .nii and .nii.gz."""
    import gzip

    import nibabel

    from tileplan.run.volumes import VolumeSource, resolve_volume
    from tileplan.settings import DataSettings

    data = np.random.default_rng(0).integers(-1024, 2000, shape[::-1]).astype(np.int16)
    img = nibabel.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0]))
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    (folder / "ct.nii").write_bytes(raw)
    (folder / "ct.nii.gz").write_bytes(gzip.compress(raw, compresslevel=1))
    crop = tuple(slice(n // 2 - 32, n // 2 + 32) for n in shape)
    print(f"NIfTI reading, {'x'.join(map(str, shape))} int16 voxels, crop 64x64x64 in the middle:")
    for name in ("ct.nii", "ct.nii.gz"):
        region = resolve_volume(folder / name, DataSettings())
        times = {}
        for what, box in (("crop", crop), ("whole", tuple(slice(0, n) for n in shape))):
            source = VolumeSource(region)
            start = time.perf_counter()
            source.read(box)
            times[what] = time.perf_counter() - start
            source.close()
        print(f"  {name:>10}: crop {times['crop']:.3f} s, whole {times['whole']:.3f} s "
              f"({times['whole'] / times['crop']:.1f}x the crop)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volume", default="96x384x384", help="D x H x W voxels")
    parser.add_argument("--budget", default="2GiB", help="memory budget of the plan")
    add_method_options(parser, METHODS)
    args = parser.parse_args()
    if answer_child(args, child):
        return
    import tileplan
    from tileplan.units import parse_shape

    device = device_of(args)
    shape = parse_shape(args.volume, 3)
    ct = tileplan.profile(build("cpu"), image=(512, 512, 512), channels=1, budget="80GiB",
                          measure=False, device="cuda")  # fmt: skip
    tiles = sum(g.n_tiles for g in ct.tile_grids())
    print(f"512^3 CT on an 80 GiB GPU (estimates): {len(ct.segments) or 1} segment(s), "
          f"tile {'x'.join(map(str, ct.tile_px))}, {tiles} tiles, peak "
          f"{ct.peak_bytes / GIB:.1f} GiB; conventional would need "
          f"{ct.conventional_peak_bytes / GIB:.1f} GiB")  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        reading(Path(folder), (64, 256, 256))
        plan = tileplan.profile(build("cpu"), image=shape, channels=1, budget=args.budget,
                                measure=False, device=device)  # fmt: skip
        plan_path = plan.save(Path(folder) / "plan.yaml")
        where = device_words(device)
        tiles = sum(g.n_tiles for g in plan.tile_grids())
        print(f"torch {torch.__version__}, {where}, float32, r3d_18, volume {args.volume}, "
              f"plan: {len(plan.segments) or 1} segment(s), {tiles} tiles, predicted peak "
              f"{plan.peak_bytes / GIB:.2f} GiB")  # fmt: skip
        results = {m: run_child(__file__, m, plan_path, args.repeats, device) for m in args.methods}
    print_results(results, [("streamed", "conventional", "streamed / conventional")])


if __name__ == "__main__":
    main()
