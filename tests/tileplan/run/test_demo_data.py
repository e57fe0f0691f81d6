"""Tests of executor.demo_data: a synthetic dataset that needs full resolution."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from tileplan.run.data import load_csv, read_image
from tileplan.run.demo_data import (
    RING_WIDTH,
    DemoObject,
    demo_image,
    render_object,
    write_demo_dataset,
)

N, SIZE = 8, 256


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    assert write_demo_dataset(out, n=N, size=SIZE, seed=0) == out
    return out


def _rows(path: Path) -> list[tuple[str, int]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["image", "label"]
        return [(name, int(label)) for name, label in reader]


def test_files_split_and_balance(demo_dir: Path) -> None:
    train, val = _rows(demo_dir / "train.csv"), _rows(demo_dir / "val.csv")
    assert (len(train), len(val)) == (6, 2)
    names = [name for name, _ in train + val]
    assert sorted(names) == [f"img_{i:03d}.tif" for i in range(N)]  # disjoint and complete
    assert sorted(p.name for p in demo_dir.iterdir()) == sorted([*names, "train.csv", "val.csv"])
    for rows in (train, val):
        labels = [label for _, label in rows]
        assert labels.count(0) == labels.count(1)


def test_images_are_tiled_rgb_uint8_tiffs(demo_dir: Path) -> None:
    with tifffile.TiffFile(demo_dir / "img_000.tif") as tif:
        page = tif.pages[0]
        assert page.is_tiled
        assert (page.tilelength, page.tilewidth) == (256, 256)
        assert page.shape == (SIZE, SIZE, 3)
        assert page.dtype == np.uint8
    ds = load_csv(demo_dir / "train.csv")
    assert ds.task == "binary"
    image, label = ds[0]
    assert image.shape == (3, SIZE, SIZE)
    assert image.dtype == torch.uint8
    assert label.item() in (0.0, 1.0)
    assert float(image.float().std()) > 5  # textured, not flat


def test_deterministic_for_a_seed(demo_dir: Path, tmp_path: Path) -> None:
    again = write_demo_dataset(tmp_path / "again", n=N, size=SIZE, seed=0)
    for path in demo_dir.iterdir():
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = write_demo_dataset(tmp_path / "other", n=N, size=SIZE, seed=1)
    assert (other / "img_000.tif").read_bytes() != (demo_dir / "img_000.tif").read_bytes()


def test_compressed_variant_has_the_same_pixels(demo_dir: Path, tmp_path: Path) -> None:
    packed = write_demo_dataset(tmp_path / "packed", n=N, size=SIZE, seed=0, compress=True)
    with tifffile.TiffFile(packed / "img_003.tif") as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE
    assert torch.equal(read_image(packed / "img_003.tif"), read_image(demo_dir / "img_003.tif"))


def _ring_kernels() -> list[torch.Tensor]:
    """Per outer radius: mean over the ring, over its hole, and over a band just outside."""
    kernels = []
    for r in np.arange(3.5, 6.01, 0.5):
        half = math.ceil(r + 3)
        yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
        d = np.hypot(yy, xx)
        masks = [
            (d >= r - 1.5) & (d <= r - 0.5),
            d <= max(r - 2.5, 0.5),
            (d >= r + 1) & (d <= r + 2.5),
        ]
        kernels.append(torch.stack([torch.tensor(m / m.sum(), dtype=torch.float32) for m in masks]))
    return kernels


def _ring_score(image: torch.Tensor) -> float:
    """Max over positions and radii of min(ring - hole, ring - outside): high only for rings."""
    gray = image.float().mean(0)[None, None]
    best = -math.inf
    for kernel in _ring_kernels():
        ring, hole, outside = F.conv2d(gray, kernel[:, None])[0]
        best = max(best, float(torch.minimum(ring - hole, ring - outside).max()))
    return best


def test_positives_contain_rings_negatives_do_not(demo_dir: Path) -> None:
    scores: dict[int, list[float]] = {0: [], 1: []}
    for csv_name in ("train.csv", "val.csv"):
        for name, label in _rows(demo_dir / csv_name):
            scores[label].append(_ring_score(read_image(demo_dir / name)))
    assert len(scores[0]) == len(scores[1]) == N // 2
    # Rings are ~100 grey levels brighter than their hole; discs and noise score far lower.
    assert min(scores[1]) > 60
    assert max(scores[0]) < 35


@pytest.mark.parametrize("outer", [3.5, 4.7, 6.0])
def test_ring_and_its_disc_match_in_mass_and_at_low_resolution(outer: float) -> None:
    inner = outer - RING_WIDTH
    disc_radius = math.sqrt(outer**2 - inner**2)
    canvas = (64, 64)
    ring = np.zeros(canvas, dtype=np.float32)
    disc = np.zeros(canvas, dtype=np.float32)
    region, alpha = render_object(DemoObject(24.3, 40.6, outer, ring=True), canvas)
    ring[region] = alpha
    region, alpha = render_object(DemoObject(24.3, 40.6, disc_radius, ring=False), canvas)
    disc[region] = alpha
    assert ring.sum() == pytest.approx(math.pi * (outer**2 - inner**2), rel=0.02)
    assert disc.sum() == pytest.approx(ring.sum(), rel=0.02)
    # At full resolution the hole is obvious ...
    assert ring[24, 40] < 0.05
    assert disc[24, 40] > 0.95
    # ... after 16x average pooling the two are nearly the same grey pixel (< 1% of the
    # object's contrast, i.e. < 1 grey level for the ~100 level contrast drawn).
    pooled_ring = F.avg_pool2d(torch.from_numpy(ring)[None, None], 16)
    pooled_disc = F.avg_pool2d(torch.from_numpy(disc)[None, None], 16)
    assert float((pooled_ring - pooled_disc).abs().max()) < 0.01


def test_global_statistics_do_not_give_the_label_away() -> None:
    # The same background and object positions, once with rings and once with discs.
    pos, rings = demo_image(SIZE, 1, seed=7)
    neg, discs = demo_image(SIZE, 0, seed=7)
    assert [(o.y, o.x) for o in rings] == [(o.y, o.x) for o in discs]
    assert all(o.ring for o in rings)
    assert not any(o.ring for o in discs)
    assert not np.array_equal(pos, neg)
    np.testing.assert_allclose(pos.mean((0, 1)), neg.mean((0, 1)), atol=0.05)
    np.testing.assert_allclose(pos.std((0, 1)), neg.std((0, 1)), rtol=0.02)


@pytest.mark.parametrize("stage", ["encode", "rename"])
def test_interrupted_write_leaves_nothing_half_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    target = {"encode": (tifffile, "imwrite"), "rename": (os, "replace")}
    module, name = target[stage]
    real = getattr(module, name)
    calls = []

    def fail_on_third_call(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, fail_on_third_call)
    out = tmp_path / "broken"
    with pytest.raises(OSError, match="disk full"):
        write_demo_dataset(out, n=4, size=64, seed=0)
    monkeypatch.undo()
    # Finished images are complete, nothing temporary is left, and no CSV lists missing files.
    assert sorted(p.name for p in out.iterdir()) == ["img_000.tif", "img_001.tif"]
    assert read_image(out / "img_001.tif").shape == (3, 64, 64)


@pytest.mark.parametrize(("n", "size", "match"), [(3, 64, "n must be"), (4, 16, "size must be")])
def test_rejects_too_small(tmp_path: Path, n: int, size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_demo_dataset(tmp_path, n=n, size=size)
