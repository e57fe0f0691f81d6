"""Benchmark: streaming whole-slide images from disk (JPEG-compressed pyramids).

Three measurements, on slides this script writes (``tileplan.run.demo_slides``: Aperio-layout
``.svs`` read through OpenSlide, pyramidal ``.tif`` read through tifffile, JPEG quality 90,
0.25 µm/px, levels 1, 4, 16, ...), float32 on this machine's CPU:

1. **Region reads vs compute.** Crops of the ResNet-18 tile size are read from level 0 (and at
   0.5 µm/px, i.e. level 0 area-averaged by 2) in the order of a tile grid: megapixels per
   second, median over the crops. Against it: ResNet-18's forward + backward on one such tile
   (what streaming computes per crop), in megapixels of crop per second.
2. **Training step from the slide vs from RAM.** A ResNet-18 streamed training step (trunk
   tiles of ``--tile`` px, global-pool + linear head, cross-entropy, backward) on the
   ``--size``² slide read region by region from disk (crops read ahead on a thread), and on
   the same pixels as an in-RAM uint8 tensor; the two alternate, medians of ``--repeats``.
   The ratio says how much of the I/O is left visible.
3. **Host memory of a gigapixel slide.** A ``--big``² slide streamed through
   ``examples/small_cnn.py`` forward and backward (tiles of ``--big-tile`` px) in a fresh child
   process: the RSS high-water mark, the RSS after setup (torch, model), and the step time.
   The decoded slide would be ``3 * big²`` bytes. (A fixed glibc mmap threshold,
   ``MALLOC_MMAP_THRESHOLD_=131072``, lowered that peak by only 0.03 GiB and slowed the step
   1.6x, so the default malloc is measured.)

    python bench/bench_slides.py                          # the issue's sizes (~25 min)
    python bench/bench_slides.py --parts step big         # 2 and 3 only
    python bench/bench_slides.py --size 2048 --big 4096   # a quick run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GIB = 1024**3


def _slide(workdir: Path, kind: str, side: int) -> Path:
    """Write (once) a synthetic slide of ``side``² px."""
    from tileplan.run.demo_slides import write_pyramidal_tiff, write_svs

    path = workdir / f"bench_{side}.{'svs' if kind == 'svs' else 'tif'}"
    if not path.exists():
        start = time.perf_counter()
        if kind == "svs":
            write_svs(path, side, side, mpp=0.25, seed=7, label=1)
        else:
            write_pyramidal_tiff(path, side, side, mpp=0.25, seed=7, label=1, compression="jpeg")
        print(f"  wrote {path.name}: {path.stat().st_size / 1e6:.0f} MB in "
              f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    return path


def _source(path: Path, mpp: float | None = None):  # noqa: ANN202
    from tileplan.run.slides import SlideSource, choose_region, open_pyramid

    pyramid = open_pyramid(path)
    return SlideSource(pyramid, choose_region(pyramid, mpp=mpp))


def _resnet18() -> tuple[nn.Module, nn.Module]:
    from tileplan.planning.model_file import load_model_file

    torch.manual_seed(0)
    loaded = load_model_file(ROOT / "examples" / "resnet18.py", "auto")
    loaded.model.eval()
    return loaded.trunk, loaded.head


def _preprocess(crop: torch.Tensor) -> torch.Tensor:
    from tileplan.settings import Normalization

    return Normalization.default(3).apply(crop, torch.float32)


# -- 1. region reads ----------------------------------------------------------------------------


def bench_reads(workdir: Path, side: int, tile: int) -> None:
    from executor import analyze_trunk

    trunk, _ = _resnet18()
    grid = analyze_trunk(trunk).tile_grid((side, side), (tile, tile))
    print(f"\n1. region reads of {tile} px crops (a {grid.n_tiles}-tile grid of a {side}² slide) "
          "vs ResNet-18 compute per crop")  # fmt: skip
    for kind in ("svs", "tif"):
        path = _slide(workdir, kind, side)
        for mpp in (None, 0.5):
            source = _source(path, mpp)
            h, w = source.region.shape
            tiles = source_grid = analyze_trunk(trunk).tile_grid((h, w), (tile, tile))
            rates = []
            for t in list(source_grid)[:9]:
                region = t.input_slices()
                start = time.perf_counter()
                crop = source.read(region)
                rates.append(crop[0, 0].numel() / 1e6 / (time.perf_counter() - start))
            source.close()
            what = "level 0" if mpp is None else f"{mpp} µm/px (level 0 / 2)"
            print(f"  {kind:4s} {what:22s} {statistics.median(rates):7.1f} MP/s "
                  f"({len(rates)} crops of {tiles.tile_shape[0]} px)")  # fmt: skip
    crop = torch.randint(0, 256, (1, 3, tile, tile), dtype=torch.uint8)
    times = []
    for _ in range(2):
        start = time.perf_counter()
        out = trunk(_preprocess(crop))
        out.sum().backward()
        times.append(time.perf_counter() - start)
    rate = tile * tile / 1e6 / min(times)
    print(f"  compute: ResNet-18 forward+backward of one {tile} px crop: {min(times):.2f} s = "
          f"{rate:.2f} MP/s")  # fmt: skip


# -- 2. a training step from the slide vs from RAM ---------------------------------------------


def _step(scnn, head: nn.Module, image) -> float:  # noqa: ANN001
    from executor import streaming_step

    target = torch.tensor([1])
    start = time.perf_counter()
    streaming_step(scnn, head, image, target, nn.functional.cross_entropy)
    return time.perf_counter() - start


def bench_step(workdir: Path, side: int, tile: int, repeats: int) -> None:
    from executor import StreamingCNN

    print(f"\n2. ResNet-18 training step at {side}², tiles of {tile} px: JPEG slide on disk vs "
          "the same pixels in RAM")  # fmt: skip
    trunk, head = _resnet18()
    source = _source(_slide(workdir, "svs", side))
    pixels = source.read_all()  # (1, 3, side, side) uint8: the in-RAM baseline
    scnn = StreamingCNN(trunk, tile, preprocess=_preprocess)
    print(f"  {scnn.tile_grid((side, side)).n_tiles} tiles per pass", flush=True)
    print(f"  warm-up step (not counted): {_step(scnn, head, pixels):.1f} s", flush=True)
    disk, ram = [], []
    for k in range(repeats):
        order = [("disk", source), ("ram", pixels)] if k % 2 == 0 else [
            ("ram", pixels), ("disk", source)]  # fmt: skip
        for name, image in order:
            seconds = _step(scnn, head, image)
            (disk if name == "disk" else ram).append(seconds)
            print(f"  step {k + 1} from {name}: {seconds:.1f} s", flush=True)
    source.close()
    d, r = statistics.median(disk), statistics.median(ram)
    print(f"  median: from the slide {d:.1f} s, from RAM {r:.1f} s: ratio {d / r:.3f} "
          "(target <= 1.10)")  # fmt: skip


# -- 3. host memory of a gigapixel slide ---------------------------------------------------------


def _child_big(path: str, tile: int) -> None:
    """In a fresh process: stream small_cnn forward and backward over the slide; print JSON."""
    import runpy

    from executor import StreamingCNN
    from tileplan.planning.measure_child import peak_rss, reset_peak_rss

    torch.manual_seed(0)
    example = runpy.run_path(str(ROOT / "examples" / "small_cnn.py"))  # (no model-file loader:
    model = example["build_model"]().eval()  # it imports torchvision and timm, +200 MB RSS)
    trunk, head = example["split"](model)
    source = _source(Path(path))
    scnn = StreamingCNN(trunk, tile, preprocess=_preprocess)
    setup = reset_peak_rss()
    start = time.perf_counter()
    out = scnn.forward(source).requires_grad_()
    shape, map_bytes = list(out.shape), out.numel() * out.element_size()
    nn.functional.cross_entropy(head(out), torch.tensor([1])).backward()
    grad = out.grad
    del out  # as executor.streaming_step does: the map is not needed by the streamed backward
    scnn.backward(source, grad)
    seconds = time.perf_counter() - start
    print(json.dumps({"setup_rss": setup, "peak_rss": peak_rss(), "seconds": seconds,
                      "map": shape, "map_bytes": map_bytes,
                      "tiles": scnn.tile_grid(source.shape[2:]).n_tiles}))  # fmt: skip


def bench_big(workdir: Path, side: int, tile: int) -> None:
    print(f"\n3. host memory: a {side}² JPEG slide ({3 * side * side / 1e9:.2f} GB decoded) "
          f"through examples/small_cnn.py, forward + backward, tiles of {tile} px")  # fmt: skip
    path = _slide(workdir, "svs", side)
    run = subprocess.run([sys.executable, __file__, "--child", str(path), "--tile", str(tile)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"  {result['tiles']} tiles, output map {result['map']} "
          f"({result['map_bytes'] / GIB:.2f} GiB, and as much for its gradient)")  # fmt: skip
    peak, setup = result["peak_rss"] / GIB, result["setup_rss"] / GIB
    print(f"  peak RSS {peak:.2f} GiB (after setup {setup:.2f} GiB; target <= 1.40 GiB = 1.5 GB);"
          f" step {result['seconds']:.0f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8192, help="slide side for 1 and 2 (px)")
    parser.add_argument("--big", type=int, default=32768, help="slide side for 3 (px); 0: skip")
    parser.add_argument("--tile", type=int, default=2048, help="backward tile (px)")
    parser.add_argument("--big-tile", type=int, default=1024, help="tile for 3 (px)")
    parser.add_argument("--parts", nargs="+", default=["reads", "step", "big"],
                        choices=["reads", "step", "big"])  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tileplan-bench-slides"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    if args.child:
        _child_big(args.child, args.tile)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    print(f"CPU: {psutil.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    if "reads" in args.parts:
        bench_reads(args.workdir, args.size, args.tile)
    if "step" in args.parts:
        bench_step(args.workdir, args.size, args.tile, args.repeats)
    if "big" in args.parts and args.big:
        bench_big(args.workdir, args.big, args.big_tile)


if __name__ == "__main__":
    main()
