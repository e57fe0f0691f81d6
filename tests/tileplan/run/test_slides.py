"""Whole-slide images: region reads, resolution choice, tissue, streaming from disk, bad input.

The slides are written by the tests (``tileplan.run.demo_slides``: JPEG-compressed Aperio SVS
that OpenSlide reads, and generic pyramidal TIFF with resolution tags that tifffile reads).
The oracle for reads is the decoded array: a region read equals the same part of the whole
decoded level (tifffile's own ``asarray`` for TIFF; one whole-level read for OpenSlide), and a
resampled read equals the area mean computed here with NumPy. The oracle for streaming is the
tensor of the same pixels: bit-identical outputs and gradients in float64.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from executor import StreamingCNN
from tileplan.planning.estimate import LiveBytes
from tileplan.run.advice import UnusableImageError
from tileplan.run.data import DataError, load_csv
from tileplan.run.demo_slides import SyntheticSlide, write_pyramidal_tiff, write_svs
from tileplan.run.slides import (
    SlideSource,
    choose_region,
    open_pyramid,
    thumbnail,
    tissue_box,
)
from tileplan.settings import DataSettings

# -- fixtures: slides on disk --------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEPLAN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slides")
    paths = {
        "svs": write_svs(root / "a.svs", 1500, 2100, mpp=0.25, seed=1, label=1,
                         downsamples=(1, 2, 8)),
        "tiff": write_pyramidal_tiff(root / "b.tif", 1300, 900, mpp=0.5, seed=2, label=0,
                                     compression="jpeg", downsamples=(1, 4)),
        "zlib": write_pyramidal_tiff(root / "c.tif", 700, 1000, mpp=0.5, seed=3,
                                     compression="zlib", downsamples=(1, 2)),
    }  # fmt: skip
    return {k: Path(v) for k, v in paths.items()}


def _whole_level(path: Path, level: int) -> np.ndarray:
    """(C, H, W) of a TIFF level decoded whole by tifffile (the oracle for region reads)."""
    with tifffile.TiffFile(path) as tif:
        return np.asarray(tif.series[0].levels[level].asarray()).transpose(2, 0, 1)


# -- 1. slides and levels ------------------------------------------------------------------------


def test_levels_and_mpp_of_both_formats(slides: dict[str, Path]) -> None:
    svs = open_pyramid(slides["svs"])
    assert svs.backend == "tifffile"  # OpenSlide's header; tiles decoded by tifffile as stored
    assert svs.levels == ((1500, 2100), (750, 1050), (187, 262))
    assert svs.mpp == pytest.approx((0.25, 0.25))
    assert svs.level_mpp(1) == pytest.approx((0.5, 0.5))
    tif = open_pyramid(slides["tiff"])
    assert tif.backend == "tifffile"
    assert tif.levels == ((1300, 900), (325, 225))
    assert tif.mpp == pytest.approx((0.5, 0.5))
    assert (tif.channels, tif.dtype) == (3, "uint8")


@pytest.mark.parametrize("name", ["tiff", "zlib"])
def test_tiff_region_reads_equal_the_decoded_level(slides: dict[str, Path], name: str) -> None:
    pyramid = open_pyramid(slides[name])
    rng = np.random.default_rng(0)
    for level in range(len(pyramid.levels)):
        whole = _whole_level(slides[name], level)
        source = SlideSource(pyramid, choose_region(pyramid, level=level))
        h, w = pyramid.levels[level]
        for _ in range(6):
            y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
            y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
            got = source.read((slice(y0, y1), slice(x0, x1)))
            assert got.dtype == torch.uint8
            assert np.array_equal(got[0].numpy(), whole[:, y0:y1, x0:x1])
        source.close()


def test_openslide_region_reads_equal_a_whole_level_read(slides: dict[str, Path]) -> None:
    pyramid = dataclasses.replace(open_pyramid(slides["svs"]), backend="openslide")
    for level in (0, 1):
        source = SlideSource(pyramid, choose_region(pyramid, level=level))
        whole = source.read_all()
        for y0, y1, x0, x1 in [(0, 300, 0, 257), (255, 257, 511, 700), (100, 750, 3, 1050)]:
            got = source.read((slice(y0, y1), slice(x0, x1)))
            assert torch.equal(got, whole[..., y0:y1, x0:x1])
        # And OpenSlide decodes the tiles as tifffile does, up to JPEG decoder rounding.
        decoded = _whole_level(slides["svs"], 0 if level == 0 else 2)
        if level == 0:
            diff = np.abs(whole[0].numpy().astype(int) - decoded.astype(int))
            assert diff.mean() < 1.0
        source.close()


@pytest.mark.parametrize(("mpp", "level", "shape"), [
    (None, None, (1500, 2100)),  # level 0
    (0.5, None, (750, 1050)),  # exactly level 1: read as stored
    (0.75, None, (500, 700)),  # between levels 1 and 2: level 1 area-averaged by 1.5
    (1.0, None, (375, 525)),  # level 1 by 2
    (1.3, None, (288, 404)),  # a fractional factor from level 1
    (None, 2, (187, 262)),
])  # fmt: skip
def test_resolution_picks_the_nearest_finer_level(
    slides: dict[str, Path], mpp: float | None, level: int | None, shape: tuple[int, int]
) -> None:
    pyramid = open_pyramid(slides["svs"])
    region = choose_region(pyramid, level=level, mpp=mpp)
    assert region.scaled == shape
    expected_level = level if level is not None else {None: 0, 0.5: 1, 0.75: 1, 1.0: 1, 1.3: 1}[
        mpp]  # fmt: skip
    assert region.level == expected_level


def test_openslide_levels_with_a_fractional_downsample_are_not_used(tmp_path: Path) -> None:
    """OpenSlide interpolates a level whose downsample is not an integer (here 1203/300):
    ``--level 1`` is refused, and ``--mpp`` reads from level 0 instead."""
    path = write_svs(tmp_path / "odd.svs", 1203, 1601, mpp=0.25, downsamples=(1, 4))
    pyramid = dataclasses.replace(open_pyramid(path), backend="openslide")
    assert pyramid.levels[1] == (300, 400)
    assert not pyramid.exact(1)
    with pytest.raises(UnusableImageError, match="non-integer downsample"):
        choose_region(pyramid, level=1)
    assert choose_region(pyramid, mpp=1.0).level == 0
    # Through tifffile (what an Aperio file gets) every level is exact. Level 1 is 1.0025
    # µm/px (floor(1203 / 4) = 300 rows), coarser than 1.0: 1.0 needs level 0, 1.003 not.
    assert open_pyramid(path).exact(1)
    assert choose_region(open_pyramid(path), mpp=1.0).level == 0
    assert choose_region(open_pyramid(path), mpp=1.003).level == 1


def test_integer_downsampling_is_the_exact_block_mean(slides: dict[str, Path]) -> None:
    pyramid = open_pyramid(slides["tiff"])  # 1300x900 at 0.5 µm/px, level 1 = 325x225
    region = choose_region(pyramid, mpp=1.0)  # level 1 is too coarse: level 0 by 2
    assert (region.level, region.scaled) == (0, (650, 450))
    got = SlideSource(pyramid, region).read_all()[0].numpy()
    level0 = _whole_level(slides["tiff"], 0).astype(np.int64)
    total = level0.reshape(3, 650, 2, 450, 2).sum(axis=(2, 4))
    assert np.array_equal(got, np.floor(total / 4 + 0.5).astype(np.uint8))  # rounded half up


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(mpp=st.floats(0.5, 3.0), data=st.data())
def test_resampled_regions_equal_the_whole_read_bit_for_bit(
    slides: dict[str, Path], mpp: float, data: st.DataObject
) -> None:
    """Any region of a resampled slide equals the same part of one whole read: what makes
    streaming from a slide identical to streaming its pixels."""
    pyramid = open_pyramid(slides["tiff"])
    source = SlideSource(pyramid, choose_region(pyramid, mpp=mpp))
    whole = source.read_all()
    h, w = source.region.shape
    y0 = data.draw(st.integers(0, h - 1))
    x0 = data.draw(st.integers(0, w - 1))
    y1 = data.draw(st.integers(y0 + 1, h))
    x1 = data.draw(st.integers(x0 + 1, w))
    assert torch.equal(source.read((slice(y0, y1), slice(x0, x1))), whole[..., y0:y1, x0:x1])


# -- 2. tissue -----------------------------------------------------------------------------------


def test_tissue_box_covers_the_tissue_and_skips_the_glass(tmp_path: Path) -> None:
    path = write_svs(tmp_path / "t.svs", 2400, 3000, mpp=0.25, seed=5)
    pyramid = open_pyramid(path)
    y0, x0, y1, x1 = tissue_box(pyramid)
    # The truth: where the synthetic slide drew tissue (its alpha on a coarse grid).
    alpha = SyntheticSlide(2400, 3000, seed=5).tissue_alpha(0, 0, 300, 375, 8.0)
    rows, cols = np.nonzero(alpha.max(axis=1) > 0.5)[0], np.nonzero(alpha.max(axis=0) > 0.5)[0]
    true = (rows[0] * 8, cols[0] * 8, (rows[-1] + 1) * 8, (cols[-1] + 1) * 8)
    slack = 48  # px of level 0: thumbnail pixels, blur at the tissue's edge
    for got, want in zip((y0, x0, y1, x1), true, strict=True):
        assert abs(got - want) <= slack, f"tissue box {(y0, x0, y1, x1)}, drawn {true}"
    assert (y1 - y0) * (x1 - x0) < 0.9 * 2400 * 3000, "the box should leave glass out"
    # Cached per slide: a second call reads the cache (edit it to prove it).
    (cache,) = (Path(os.environ["TILEPLAN_CACHE"]) / "tissue").glob("*.json")
    record = json.loads(cache.read_text())
    record["box"] = [1, 2, 3, 4]
    cache.write_text(json.dumps(record))
    assert tissue_box(pyramid) == (1, 2, 3, 4)


def test_thumbnail_is_bounded(slides: dict[str, Path]) -> None:
    thumb = thumbnail(open_pyramid(slides["svs"]), max_side=100)
    assert thumb.shape == (71, 100, 3) or max(thumb.shape[:2]) <= 100
    assert thumb.dtype == np.uint8


# -- 3. streaming from disk ----------------------------------------------------------------------


def _trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        c1=nn.Conv2d(3, 6, 5, stride=2, padding=2), a1=nn.ReLU(),
        c2=nn.Conv2d(6, 8, 3, padding=1), a2=nn.ReLU(), p=nn.MaxPool2d(2),
        c3=nn.Conv2d(8, 8, 3, stride=2, padding=1),
    )).double()  # fmt: skip


def _normalise(crop: torch.Tensor) -> torch.Tensor:
    return crop.to(torch.float64) / 255.0 - 0.5


@pytest.mark.parametrize(("name", "mpp"), [("svs", 0.75), ("tiff", None), ("zlib", 1.3)])
def test_streaming_a_slide_equals_streaming_its_pixels(
    slides: dict[str, Path], name: str, mpp: float | None
) -> None:
    pyramid = open_pyramid(slides[name])
    source = SlideSource(pyramid, choose_region(pyramid, mpp=mpp))
    pixels = source.read_all()
    trunk = _trunk()
    results = []
    for image in (pixels, source):
        scnn = StreamingCNN(trunk, 160, input_grad=True, preprocess=_normalise)
        trunk.zero_grad(set_to_none=True)
        out = scnn.forward(image).requires_grad_()
        (out.tanh() * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
         ).sum().backward()  # fmt: skip
        image_grad = scnn.backward(image, out.grad)
        results.append((out.detach(), [p.grad.clone() for p in trunk.parameters()], image_grad))
        assert scnn.tile_grid(pixels.shape[2:]).n_tiles > 4
    (out_t, grads_t, ig_t), (out_s, grads_s, ig_s) = results
    assert torch.equal(out_t, out_s)
    assert torch.equal(ig_t, ig_s)
    for g_t, g_s in zip(grads_t, grads_s, strict=True):
        assert torch.equal(g_t, g_s)


def test_smaller_slides_peak_below_the_planned_image(slides: dict[str, Path]) -> None:
    """A plan is for its largest image; smaller slides stream with their own grids of the same
    tiles, so their peak tensor memory (measured: live bytes of every tensor the step makes) is
    at most that of the largest image."""
    trunk = _trunk().float()
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))

    def peak(image: torch.Tensor | SlideSource) -> int:
        scnn = StreamingCNN(trunk, 192, preprocess=lambda c: c.float() / 255)
        with LiveBytes() as tracker:
            out = scnn.forward(image).requires_grad_()
            head(out).sum().backward()
            scnn.backward(image, out.grad)
            del out
        return tracker.peak

    largest = torch.zeros(1, 3, 1500, 2100, dtype=torch.uint8)  # the plan's image
    planned = peak(largest)
    for name, mpp in [("svs", 0.5), ("tiff", None), ("zlib", None), ("svs", 1.3)]:
        pyramid = open_pyramid(slides[name])
        source = SlideSource(pyramid, choose_region(pyramid, mpp=mpp))
        assert peak(source) <= planned, f"{name} at {mpp} µm/px peaks above the plan"


# -- 4. the CSV: per-row level, validation before training -----------------------------------


def _csv(path: Path, rows: list[str], header: str = "image,label") -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_of_slides_resolves_each_row(slides: dict[str, Path], tmp_path: Path) -> None:
    csv = _csv(tmp_path / "train.csv", [f"{slides['svs']},1,1", f"{slides['tiff']},0,",
                                        f"{slides['zlib']},1,0"], "image,label,level")  # fmt: skip
    data = load_csv(csv, target_shape=(1400, 1400), settings=DataSettings(mpp=1.0))
    assert [r.level for r in data.regions] == [1, 0, 0]  # row levels win over --mpp
    assert data.regions[0].scaled == (750, 1050)
    assert data.regions[1].scaled == (650, 450)  # 0.5 µm/px level 0 by 2 (level 1: 325 px)
    assert data.regions[2].scaled == (700, 1000)  # level 0 as stored
    assert [data.image_shape(i) for i in range(3)] == [(3, 750, 1050), (3, 650, 450),
                                                        (3, 700, 1000)]  # fmt: skip
    assert data.source(1).shape == (1, 3, 650, 450)


def test_oversize_slides_are_centre_cropped_or_refused(
    slides: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = _csv(tmp_path / "train.csv", [f"{slides['svs']},1", f"{slides['tiff']},0"])
    data = load_csv(csv, target_shape=(1000, 1000), settings=DataSettings())
    assert data.regions[0].box == (250, 550, 1000, 1000)  # 1500x2100 -> its centre
    assert data.regions[1].box == (150, 0, 1000, 900)  # only its height is too large
    assert "larger than the plan's 1000x1000" in caplog.text
    with pytest.raises(DataError, match=r"train.csv row 1: 'a.svs' is 1500x2100 px at level 0, "
                       r"larger than the plan's 1000x1000; stream its centre with "
                       r"--oversize crop"):  # fmt: skip
        load_csv(csv, target_shape=(1000, 1000), settings=DataSettings(oversize="refuse"))


@pytest.mark.parametrize(("make", "settings_", "message"), [
    ("missing_level", DataSettings(level=5), r"row 1: 'a.svs' has no level 5 \(it has 3: 0..2\)"),
    ("no_mpp", DataSettings(mpp=1.0), r"row 1: 'plain.tif' records no resolution .* "
     r"--assume-mpp M, or with a CSV 'mpp' column, or read it by --level instead"),
    ("truncated", DataSettings(), r"row 1: cannot read '\S*cut.svs': OpenSlide .*; fix or "
     r"remove the row"),
    ("truncated_tif", DataSettings(), r"row 1: cannot read '\S*cut.tif': file is truncated"),
    ("garbage", DataSettings(), r"row 1: cannot read '\S*junk.svs': OpenSlide does not "
     r"recognise this file as a slide; fix or remove the row"),
    ("too_fine", DataSettings(mpp=0.1), r"row 1: 'a.svs' is scanned at 0.25 µm/px, coarser "
     r"than the 0.1 µm/px the run reads at; read at --mpp 0.25 or more"),
    ("bad_level", DataSettings(), r"row 1: level 'x' is not a whole number"),
])  # fmt: skip
def test_bad_slides_are_refused_in_one_line_before_training(
    slides: dict[str, Path], tmp_path: Path, make: str, settings_: DataSettings, message: str
) -> None:
    header, level = "image,label", ""
    if make in ("missing_level", "too_fine"):
        image = slides["svs"]
    elif make == "no_mpp":
        image = tmp_path / "plain.tif"
        tifffile.imwrite(image, np.zeros((64, 64, 3), np.uint8), tile=(32, 32))
    elif make == "truncated":
        image = tmp_path / "cut.svs"
        image.write_bytes(slides["svs"].read_bytes()[: slides["svs"].stat().st_size // 2])
    elif make == "truncated_tif":
        image = tmp_path / "cut.tif"
        image.write_bytes(slides["tiff"].read_bytes()[: slides["tiff"].stat().st_size // 2])
    elif make == "garbage":
        image = tmp_path / "junk.svs"
        image.write_bytes(b"not a slide at all" * 100)
    else:
        image, header, level = slides["svs"], "image,label,level", ",x"
    csv = _csv(tmp_path / "train.csv", [f"{image},1{level}"], header)
    with pytest.raises(DataError, match=message) as info:
        load_csv(csv, target_shape=(4096, 4096), settings=settings_)
    assert "\n" not in str(info.value)


def test_fractional_area_average_equals_exact_fractions() -> None:
    """The resampler against arithmetic with Fractions: output pixel i of an axis of L px
    resampled to O px is the overlap-weighted mean of level interval [i L/O, (i+1) L/O)."""
    from fractions import Fraction

    from tileplan.run.resample import area_taps, resample_axis, round_ratio

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (2, 7, 10), dtype=np.uint8)
    (h, w), (oh, ow) = data.shape[1:], (3, 4)

    def weights(i: int, size: int, out: int) -> list[Fraction]:
        a, b = Fraction(i * size, out), Fraction((i + 1) * size, out)
        return [max(Fraction(0), min(b, j + 1) - max(a, j)) / (b - a) for j in range(size)]

    rows, den_y = resample_axis(data, 1, area_taps(0, oh, h, oh), h, oh)
    both, den_x = resample_axis(rows, 2, area_taps(0, ow, w, ow), w, ow)
    got = round_ratio(both, den_y * den_x)
    for c in range(2):
        for i in range(oh):
            for k in range(ow):
                exact = sum(wy * wx * int(data[c, y, x])
                            for y, wy in enumerate(weights(i, h, oh))
                            for x, wx in enumerate(weights(k, w, ow)))  # fmt: skip
                assert got[c, i, k] == int(exact + Fraction(1, 2)), (c, i, k, exact)
