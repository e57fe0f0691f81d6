"""Tests of tileplan.run.demo_slides: synthetic slides as Aperio SVS and pyramidal TIFF."""

from __future__ import annotations

import csv
import math
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tifffile

from tileplan.run.demo_slides import (
    MIN_SIDE,
    THUMBNAIL_SIDE,
    Level,
    SyntheticSlide,
    pyramid_levels,
    write_demo_slides,
    write_pyramidal_tiff,
    write_svs,
)

openslide = pytest.importorskip("openslide")

# Sides that do not divide by 4, so floor() level sizes matter; level 1 is the last one.
SVS_H, SVS_W = 1203, 1601
TIF_H, TIF_W = 1100, 1300


@pytest.fixture(scope="module")
def svs_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("svs") / "slide.svs"
    assert write_svs(path, SVS_H, SVS_W, mpp=0.25, seed=3, label=1) == path
    return path


@pytest.fixture(scope="module")
def tif_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tif") / "slide.tif"
    write_pyramidal_tiff(path, TIF_H, TIF_W, mpp=0.5, seed=4, label=0, compression="zlib")
    return path


def _rgb(region: object) -> np.ndarray:
    rgba = np.asarray(region)
    assert (rgba[..., 3] == 255).all()  # inside the slide: opaque
    return rgba[..., :3]


# --------------------------------------------------------------------------------------------
# SVS
# --------------------------------------------------------------------------------------------


def test_svs_opens_in_openslide_as_aperio(svs_path: Path) -> None:
    assert openslide.OpenSlide.detect_format(str(svs_path)) == "aperio"
    with openslide.OpenSlide(str(svs_path)) as slide:
        assert slide.level_count == 2
        assert slide.level_dimensions == ((SVS_W, SVS_H), (SVS_W // 4, SVS_H // 4))
        # OpenSlide's downsample is the mean of the two axes' ratios (floor sizes).
        expected = (SVS_W / (SVS_W // 4) + SVS_H / (SVS_H // 4)) / 2
        assert slide.level_downsamples == pytest.approx((1.0, expected))
        props = slide.properties
        assert float(props["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(props["openslide.mpp-y"]) == pytest.approx(0.25)
        assert props["openslide.objective-power"] == "40"
        assert props["openslide.vendor"] == "aperio"
        thumb = slide.associated_images["thumbnail"]
        assert max(thumb.size) == THUMBNAIL_SIDE
        assert thumb.size[0] / thumb.size[1] == pytest.approx(SVS_W / SVS_H, rel=0.01)


def test_svs_page_layout(svs_path: Path) -> None:
    with tifffile.TiffFile(svs_path) as tif:
        pages = tif.pages
        assert len(pages) == 3
        level0, thumb, level1 = pages[0], pages[1], pages[2]
        assert level0.description.startswith("Aperio Image Library")
        assert "|MPP = 0.25|" in level0.description + "|"
        assert "|AppMag = 40|" in level0.description
        assert level0.is_tiled
        assert level1.is_tiled
        assert not thumb.is_tiled
        assert (level0.tilelength, level0.tilewidth) == (256, 256)
        for page in pages:
            assert page.compression == tifffile.COMPRESSION.JPEG
            assert page.photometric == tifffile.PHOTOMETRIC.RGB  # Aperio's "JPEG/RGB"
        assert [s.name for s in tif.series] == ["Baseline", "Thumbnail"]
        assert [lv.shape for lv in tif.series[0].levels] == [
            (SVS_H, SVS_W, 3),
            (SVS_H // 4, SVS_W // 4, 3),
        ]


@pytest.mark.parametrize(
    ("level", "y", "x", "h", "w"), [(0, 400, 600, 700, 900), (1, 0, 0, 175, 225)]
)
def test_svs_read_region_matches_tifffile_and_content(
    svs_path: Path, level: int, y: int, x: int, h: int, w: int
) -> None:
    # Level 1 is read from its origin: OpenSlide divides level-0 positions by the level's
    # non-integer downsample (4.006 here, floor sizes) and resamples fractional positions.
    ds = 4**level
    with openslide.OpenSlide(str(svs_path)) as slide:
        region = _rgb(slide.read_region((x * ds, y * ds), level, (w, h)))
    with tifffile.TiffFile(svs_path) as tif:
        decoded = tif.series[0].levels[level].asarray()[y : y + h, x : x + w]
    # The same JPEG tiles, both decoded with libjpeg-turbo's exact integer IDCT: identical
    # here (allow 1 for other builds).
    assert np.abs(region.astype(int) - decoded).max() <= 1
    rendered = SyntheticSlide(SVS_H, SVS_W, seed=3, label=1).render(y, x, h, w, ds)
    diff = np.abs(region.astype(int) - rendered)
    assert diff.mean() < 4.0  # JPEG quality 90 of a noisy image
    assert np.percentile(diff, 99) < 25


def test_ycbcr_svs_is_smaller_and_decodes_alike(tmp_path: Path) -> None:
    rgb = write_svs(tmp_path / "rgb.svs", 512, 768, seed=1)
    ycc = write_svs(tmp_path / "ycc.svs", 512, 768, seed=1, ycbcr=True)
    assert ycc.stat().st_size < 0.6 * rgb.stat().st_size
    with tifffile.TiffFile(ycc) as tif:
        assert tif.pages[0].photometric == tifffile.PHOTOMETRIC.YCBCR
        decoded = tif.pages[0].asarray()
    with openslide.OpenSlide(str(ycc)) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        region = _rgb(slide.read_region((0, 0), 0, (768, 512)))
    assert np.abs(region.astype(int) - decoded).max() <= 1
    rendered = SyntheticSlide(512, 768, seed=1).render(0, 0, 512, 768)
    assert np.abs(region.astype(int) - rendered).mean() < 5.0


# --------------------------------------------------------------------------------------------
# Pyramidal TIFF
# --------------------------------------------------------------------------------------------


def test_pyramidal_tiff_levels_and_resolution(tif_path: Path) -> None:
    with tifffile.TiffFile(tif_path) as tif:
        assert len(tif.pages) == 1  # the reduced level is a SubIFD, not a page
        series = tif.series[0]
        shapes = [lv.shape for lv in series.levels]
        assert shapes == [(TIF_H, TIF_W, 3), (TIF_H // 4, TIF_W // 4, 3)]
        for i, lv in enumerate(series.levels):
            page = lv.keyframe
            assert page.is_tiled
            assert (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
            assert page.subfiletype == (1 if i else 0)
            xres, yres = page.resolution  # px per cm
            assert 1e4 / xres == pytest.approx(0.5 * TIF_W / shapes[i][1], rel=1e-6)
            assert 1e4 / yres == pytest.approx(0.5 * TIF_H / shapes[i][0], rel=1e-6)
        # zlib is lossless: the file holds exactly what the slide renders, at every level.
        slide = SyntheticSlide(TIF_H, TIF_W, seed=4, label=0)
        assert np.array_equal(series.levels[0].asarray(), slide.render(0, 0, TIF_H, TIF_W))
        low = slide.render(0, 0, TIF_H // 4, TIF_W // 4, 4)
        assert np.array_equal(series.levels[1].asarray(), low)


def test_pyramidal_tiff_jpeg_and_openslide_generic(tmp_path: Path) -> None:
    path = write_pyramidal_tiff(tmp_path / "j.tif", 300, 400, mpp=0.3, downsamples=(1, 2, 4))
    with tifffile.TiffFile(path) as tif:
        levels = tif.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [(300, 400), (150, 200), (75, 100)]
        assert levels[0].keyframe.compression == tifffile.COMPRESSION.JPEG
        assert 1e4 / levels[0].keyframe.resolution[0] == pytest.approx(0.3, rel=1e-6)
    # OpenSlide ignores SubIFDs: a single-level generic TIFF.
    assert openslide.OpenSlide.detect_format(str(path)) == "generic-tiff"
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((400, 300),)


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("downsample", [1, 4, 2.5])
def test_render_is_independent_of_tiling(downsample: float) -> None:
    slide = SyntheticSlide(2000, 2600, seed=7, label=1)
    # A region across the tissue outline and an object, cut at awkward places.
    obj = slide.objects[0]
    y = max(0, int(obj.y / downsample) - 150)
    x = max(0, int(obj.x / downsample) - 170)
    h, w = 301, 333
    whole = slide.render(y, x, h, w, downsample)
    cy, cx = 117, 201
    parts = np.empty_like(whole)
    for r0, r1 in ((0, cy), (cy, h)):
        for c0, c1 in ((0, cx), (cx, w)):
            parts[r0:r1, c0:c1] = slide.render(y + r0, x + c0, r1 - r0, c1 - c0, downsample)
    assert np.array_equal(whole, parts)
    # The outline crosses the full-slide view, so glass and tissue tiles are both exercised.
    view = slide.tissue_alpha(0, 0, 250, 325, 8)
    assert view.min() == 0.0
    assert view.max() == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_tissue_fraction_colours_and_glass_frame(seed: int) -> None:
    h, w = 2400, 3200
    slide = SyntheticSlide(h, w, seed=seed, label=None)
    ds = 8
    alpha = slide.tissue_alpha(0, 0, h // ds, w // ds, ds)
    assert 0.2 <= float(alpha.mean()) <= 0.5
    assert abs(float(alpha.mean()) - slide.tissue_target) < 0.03
    frame = math.ceil(0.03 * min(h, w) / ds)
    border = np.ones_like(alpha, dtype=bool)
    border[frame:-frame, frame:-frame] = False
    assert (alpha[border] == 0).all()  # the tissue never reaches the edges
    image = slide.render(0, 0, h // ds, w // ds, ds).astype(np.float32)
    saturation = image.max(-1) - image.min(-1)
    glass, tissue = image[alpha == 0], image[alpha == 1]
    assert glass.mean() > 235
    assert np.percentile(saturation[alpha == 0], 99) < 12
    assert 130 < tissue.mean() < 225
    assert np.median(saturation[alpha == 1]) > 40  # pink/purple
    assert (tissue[:, 0] > tissue[:, 1]).mean() > 0.99
    assert (tissue[:, 2] > tissue[:, 1]).all()


def test_rings_and_discs_at_full_resolution() -> None:
    pos, neg = (
        SyntheticSlide(1500, 1500, seed=5, label=1),
        SyntheticSlide(1500, 1500, seed=5, label=0),
    )
    assert len(pos.objects) == len(neg.objects) >= 3
    for o in pos.objects:
        assert pos.tissue_alpha(int(o.y) - 8, int(o.x) - 8, 17, 17).min() == 1.0
    for ring, disc in zip(pos.objects, neg.objects, strict=True):
        assert ring.ring
        assert not disc.ring
        assert (ring.y, ring.x) == (disc.y, disc.x)
        y, x = math.floor(ring.y), math.floor(ring.x)  # the pixel holding the centre
        r_img = pos.render(y - 8, x - 8, 17, 17).astype(np.float32)
        d_img = neg.render(y - 8, x - 8, 17, 17).astype(np.float32)
        assert d_img[8, 8].mean() > r_img[8, 8].mean() + 15  # the disc is bright, the hole not
        assert abs(d_img.mean() - r_img.mean()) < 4  # same area, same mass


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    paths = [write_svs(tmp_path / d / "s.svs", 700, 900, seed=11) for d in ("a", "b")]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    other = write_svs(tmp_path / "c" / "s.svs", 700, 900, seed=12)
    assert other.read_bytes() != paths[0].read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.svs"]  # no temp files left


# --------------------------------------------------------------------------------------------
# Levels and validation
# --------------------------------------------------------------------------------------------


def test_pyramid_levels_rule() -> None:
    assert pyramid_levels(32768, 32768) == tuple(
        Level(ds, 32768 // ds, 32768 // ds) for ds in (1, 4, 16, 64)
    )
    assert [lv.downsample for lv in pyramid_levels(3000, 4000)] == [1, 4]
    assert pyramid_levels(600, 1000) == (Level(1, 600, 1000),)
    assert pyramid_levels(64, 5000)[-1] == Level(16, 4, 312)  # short side floors, never 0
    assert pyramid_levels(100, 100, (1, 3)) == (Level(1, 100, 100), Level(3, 33, 33))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": MIN_SIDE - 1}, "height must be"),
        ({"width": 10.5}, "width must be"),
        ({"mpp": 0.0}, "mpp must be"),
        ({"mpp": float("nan")}, "mpp must be"),
        ({"mpp": True}, "mpp must be"),
        ({"tile": 100}, "tile must be a multiple of 16"),
        ({"tile": 8}, "tile must be"),
        ({"quality": 0}, "quality must be"),
        ({"seed": -1}, "seed must be"),
        ({"label": 2}, "label must be"),
        ({"downsamples": (2, 4)}, "starting with 1"),
        ({"downsamples": (1, 4, 4)}, "strictly increasing"),
        ({"downsamples": (1, 128)}, "empty level"),
        ({"workers": 0}, "workers must be"),
    ],
)
def test_write_svs_rejects_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"height": 100, "width": 100} | kwargs
    height, width = args.pop("height"), args.pop("width")
    with pytest.raises(ValueError, match=match) as info:
        write_svs(tmp_path / "x.svs", height, width, **args)
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())


def test_other_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="compression must be"):
        write_pyramidal_tiff(tmp_path / "x.tif", 100, 100, compression="lzw")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n must be"):
        write_demo_slides(tmp_path, n=3)
    with pytest.raises(ValueError, match="sizes must be distinct"):
        write_demo_slides(tmp_path, sizes=((100, 100), (100, 100)))
    with pytest.raises(ValueError, match="height must be"):
        write_demo_slides(tmp_path, sizes=((10, 100),))
    with pytest.raises(ValueError, match="formats must be"):
        write_demo_slides(tmp_path, formats=("png",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="downsample must be"):
        SyntheticSlide(100, 100).render(0, 0, 10, 10, 0.5)
    with pytest.raises(ValueError, match="region must be"):
        SyntheticSlide(100, 100).render(0, 0, 0, 10)


# --------------------------------------------------------------------------------------------
# The demo dataset
# --------------------------------------------------------------------------------------------


def _rows(path: Path) -> list[tuple[str, int]]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        assert next(reader) == ["image", "label"]
        return [(name, int(label)) for name, label in reader]


def test_write_demo_slides(tmp_path: Path) -> None:
    sizes = ((300, 400), (256, 320), (350, 290), (280, 280))
    out = tmp_path / "demo"
    train_csv = write_demo_slides(out, n=6, sizes=sizes, seed=2)
    assert train_csv == out / "train.csv"
    train, val = _rows(train_csv), _rows(out / "val.csv")
    rows = train + val
    names = sorted(name for name, _ in rows)
    assert names == [f"slide_{i:03d}{'.svs' if i % 2 == 0 else '.tif'}" for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "train.csv", "val.csv"])
    for part in (train, val):
        assert {label for _, label in part} == {0, 1}
    assert sum(label for _, label in rows) == 3
    shapes = set()
    for name, _ in rows:
        with tifffile.TiffFile(out / name) as tif:
            shapes.add(tif.series[0].levels[0].shape)
    # Sizes cycle, grown by 32 px per round, so all differ.
    assert shapes == {(*hw, 3) for hw in (*sizes, (332, 432), (288, 352))}
    # Deterministic for a seed.
    again = write_demo_slides(tmp_path / "again", n=6, sizes=sizes, seed=2)
    for name in [*names, "train.csv", "val.csv"]:
        assert (again.parent / name).read_bytes() == (out / name).read_bytes()


# --------------------------------------------------------------------------------------------
# A larger slide: time and memory (reported, not asserted, except for gross buffering)
# --------------------------------------------------------------------------------------------


def test_8192_svs_write_time_and_memory(tmp_path: Path, record_property) -> None:
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        path = write_svs(tmp_path / "big.svs", 8192, 8192, seed=0, label=1)
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
    extra_mb = (peak[0] - base) / 2**20
    record_property("seconds", round(elapsed, 2))
    record_property("peak_rss_increase_mb", round(extra_mb, 1))
    record_property("file_mb", round(path.stat().st_size / 2**20, 1))
    print(f"8192x8192 SVS: {elapsed:.2f} s, +{extra_mb:.0f} MB RSS, {path.stat().st_size >> 20} MB")
    # Level 0 alone is 192 MiB raw: the writer must stream it, never hold it.
    assert extra_mb < 150
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.level_dimensions == ((8192, 8192), (2048, 2048), (512, 512))
