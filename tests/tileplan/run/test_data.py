"""Tests of executor.data: CSV validation, image readers, shape policy, normalisation."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from executor import StreamingError
from tileplan.run import data as data_mod
from tileplan.run.data import (
    DataError,
    Dataset,
    ImageInfo,
    Sample,
    fit_to_shape,
    infer_task,
    load_csv,
    probe_image,
    read_image,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def _rgb(rng: np.random.Generator, h: int = 40, w: int = 56) -> np.ndarray:
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _chw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))


# --------------------------------------------------------------------------------------------
# Readers: real files, exact round trips
# --------------------------------------------------------------------------------------------

TIFF_VARIANTS: dict[str, dict] = {
    "plain": {},
    "tiled": {"tile": (16, 16)},
    "tiled_zlib": {"tile": (16, 16), "compression": "zlib"},
    "strips_zlib": {"compression": "zlib", "rowsperstrip": 8},
    "bigtiff": {"bigtiff": True},
    "bigtiff_tiled": {"bigtiff": True, "tile": (32, 32)},
    "big_endian": {"byteorder": ">"},
}


@pytest.mark.parametrize("variant", sorted(TIFF_VARIANTS))
def test_tiff_rgb_round_trip(tmp_path: Path, rng: np.random.Generator, variant: str) -> None:
    image = _rgb(rng)
    path = tmp_path / "img.tif"
    tifffile.imwrite(path, image, photometric="rgb", **TIFF_VARIANTS[variant])
    info = probe_image(path)
    assert info == ImageInfo(3, 40, 56, "uint8", "tiff")
    out = read_image(path)
    assert out.dtype == torch.uint8
    assert out.shape == (3, 40, 56)
    assert out.is_contiguous()
    assert torch.equal(out, _chw(image))


def test_bigtiff_is_really_bigtiff(tmp_path: Path, rng: np.random.Generator) -> None:
    path = tmp_path / "big.tiff"
    tifffile.imwrite(path, _rgb(rng), photometric="rgb", bigtiff=True, tile=(16, 16))
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
    assert read_image(path).shape == (3, 40, 56)


def test_tiff_planar_gray_rgba_float(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _rgb(rng)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(
        planar,
        np.ascontiguousarray(image.transpose(2, 0, 1)),
        photometric="rgb",
        planarconfig="separate",
    )
    assert torch.equal(read_image(planar), _chw(image))

    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, image[..., 0], photometric="minisblack")
    out = read_image(gray)
    assert out.shape == (1, 40, 56)
    assert torch.equal(out[0], torch.from_numpy(image[..., 0]))

    rgba = tmp_path / "rgba.tif"
    alpha = rng.integers(0, 256, size=(40, 56, 1), dtype=np.uint8)
    tifffile.imwrite(rgba, np.concatenate([image, alpha], axis=2), photometric="rgb")
    assert probe_image(rgba).channels == 3
    assert torch.equal(read_image(rgba), _chw(image))

    floats = tmp_path / "float.tif"
    values = rng.standard_normal((40, 56)).astype(np.float64)
    tifffile.imwrite(floats, values)
    out = read_image(floats)
    assert out.dtype == torch.float32
    assert torch.equal(out[0], torch.from_numpy(values.astype(np.float32)))


def test_multipage_tiff_uses_page_0_and_says_so(
    tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    stack = rng.integers(0, 256, size=(5, 24, 32), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack")
    with caplog.at_level(logging.WARNING, logger="executor.data"):
        assert probe_image(path) == ImageInfo(1, 24, 32, "uint8", "tiff")
    assert "only page 0 is used" in caplog.text
    assert torch.equal(read_image(path)[0], torch.from_numpy(stack[0]))


def test_tiff_min_is_white_is_inverted(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _rgb(rng)[..., 0]
    path = tmp_path / "miniswhite.tif"
    tifffile.imwrite(path, image, photometric="miniswhite")
    assert torch.equal(read_image(path)[0], torch.from_numpy(255 - image))


def test_png_jpeg_modes(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _rgb(rng)
    Image.fromarray(image).save(tmp_path / "rgb.png")
    assert torch.equal(read_image(tmp_path / "rgb.png"), _chw(image))

    alpha = rng.integers(0, 256, size=(40, 56, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([image, alpha], axis=2)).save(tmp_path / "rgba.png")
    assert probe_image(tmp_path / "rgba.png") == ImageInfo(3, 40, 56, "uint8", "pil")
    assert torch.equal(read_image(tmp_path / "rgba.png"), _chw(image))

    Image.fromarray(image[..., 1]).save(tmp_path / "gray.png")
    out = read_image(tmp_path / "gray.png")
    assert out.shape == (1, 40, 56)
    assert torch.equal(out[0], torch.from_numpy(image[..., 1]))

    palette = Image.fromarray(image).convert("P")
    palette.save(tmp_path / "palette.png")
    expected = np.asarray(palette.convert("RGB"))
    assert torch.equal(read_image(tmp_path / "palette.png"), _chw(expected))

    yy, xx = np.mgrid[0:40, 0:56]
    smooth = np.stack([yy * 5, xx * 4, (yy + xx) * 2], axis=2).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "photo.JPG", quality=95)
    with Image.open(tmp_path / "photo.JPG") as im:
        decoded = np.asarray(im.convert("RGB"))
    out = read_image(tmp_path / "photo.JPG")
    assert out.dtype == torch.uint8
    assert torch.equal(out, _chw(decoded))
    assert (out.float() - _chw(smooth).float()).abs().mean() < 3  # lossy but the same picture


def test_npy_layouts(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _rgb(rng)
    np.save(tmp_path / "hwc.npy", image)
    assert torch.equal(read_image(tmp_path / "hwc.npy"), _chw(image))

    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    np.save(tmp_path / "chw.npy", chw)
    assert torch.equal(read_image(tmp_path / "chw.npy"), torch.from_numpy(chw))

    np.save(tmp_path / "hw.npy", image[..., 0])
    assert read_image(tmp_path / "hw.npy").shape == (1, 40, 56)

    values = rng.standard_normal((2, 40, 56))  # float64 on disk
    np.save(tmp_path / "float.npy", values)
    assert probe_image(tmp_path / "float.npy") == ImageInfo(2, 40, 56, "float32", "npy")
    out = read_image(tmp_path / "float.npy")
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(values.astype(np.float32)))


def test_read_image_returns_writable_ram_tensor(tmp_path: Path, rng: np.random.Generator) -> None:
    image = _rgb(rng)
    tifffile.imwrite(tmp_path / "a.tif", image, photometric="rgb")
    np.save(tmp_path / "a.npy", image)
    for name in ("a.tif", "a.npy"):
        out = read_image(tmp_path / name)
        out += 1  # writable, not a view of the file
        assert torch.equal(out, _chw(image) + 1)
        assert np.array_equal(np.load(tmp_path / "a.npy"), image)


@pytest.mark.parametrize("shape", [(20, 30), (40, 56), (64, 80), (17, 99)])
@pytest.mark.parametrize("name", ["a.tif", "tiled.tif", "a.npy", "a.png"])
def test_read_image_with_shape_equals_fit_to_shape(
    tmp_path: Path, rng: np.random.Generator, name: str, shape: tuple[int, int]
) -> None:
    image = _rgb(rng)
    path = tmp_path / name
    if name == "a.npy":
        np.save(path, image)
    elif name == "a.png":
        Image.fromarray(image).save(path)
    else:
        tifffile.imwrite(path, image, photometric="rgb", tile=(16, 16) if "tiled" in name else None)
    out = read_image(path, shape)
    assert out.shape == (3, *shape)
    assert torch.equal(out, fit_to_shape(_chw(image), shape))


# --------------------------------------------------------------------------------------------
# Shape policy
# --------------------------------------------------------------------------------------------


def test_fit_to_shape_center_crop_exact() -> None:
    image = torch.arange(5 * 7, dtype=torch.uint8).reshape(1, 5, 7)
    out = fit_to_shape(image, (2, 4))
    # H: surplus 3 -> start 1; W: surplus 3 -> start 1.
    assert torch.equal(out, image[:, 1:3, 1:5])
    out = fit_to_shape(image, (4, 6))  # surplus 1: the extra row/column goes at the end
    assert torch.equal(out, image[:, 0:4, 0:6])


def test_fit_to_shape_center_pad_exact() -> None:
    image = torch.tensor([[[1, 2], [3, 4]]], dtype=torch.uint8)
    out = fit_to_shape(image, (5, 4))
    expected = torch.zeros((1, 5, 4), dtype=torch.uint8)
    expected[:, 1:3, 1:3] = image  # H: 3 missing -> 1 before, 2 after; W: 2 -> 1 and 1
    assert torch.equal(out, expected)
    assert out.dtype == torch.uint8


def test_fit_to_shape_mixed_fill_batch_and_identity() -> None:
    image = torch.arange(2 * 3 * 6 * 2, dtype=torch.float32).reshape(2, 3, 6, 2)
    out = fit_to_shape(image, (4, 5), fill=-1.0)
    assert out.shape == (2, 3, 4, 5)
    assert torch.equal(out[..., 1:3], image[..., 1:5, :])  # crop H (start 1), pad W (1, 2)
    assert bool((out[..., 0] == -1).all())
    assert bool((out[..., 3:] == -1).all())
    assert fit_to_shape(image, (6, 2)) is image


@pytest.mark.parametrize("shape", [(0, 4), (4,), (2.5, 4), (-1, 3)])
def test_fit_to_shape_rejects_bad_shape(shape: tuple) -> None:
    with pytest.raises(ValueError, match="target shape"):
        fit_to_shape(torch.zeros(1, 4, 4), shape)


# --------------------------------------------------------------------------------------------
# infer_task
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "task"),
    [
        ([0, 1, 1, 0], "binary"),
        ([1.0, 1.0], "binary"),
        ([0.0], "binary"),
        ([0, 1, 2], "multiclass"),
        ([0, 2, 5, 5.0], "multiclass"),
        ([0, 0.5, 1], "regression"),
        ([-1, 0, 1], "regression"),
        ([0, 1, 250], "regression"),
        ([3.7, 12.1], "regression"),
    ],
)
def test_infer_task(labels: list[float], task: str) -> None:
    assert infer_task(labels) == task


def test_infer_task_limits() -> None:
    assert infer_task([0, 1, 250], max_classes=251) == "multiclass"
    with pytest.raises(ValueError, match="no labels"):
        infer_task([])
    with pytest.raises(ValueError, match="finite"):
        infer_task([0, float("inf")])


# --------------------------------------------------------------------------------------------
# load_csv: the happy path
# --------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_dataset(tmp_path: Path, rng: np.random.Generator) -> Path:
    """A CSV listing RGB images of several formats and sizes, in a subfolder layout."""
    (tmp_path / "imgs").mkdir()
    tifffile.imwrite(tmp_path / "imgs" / "a.tif", _rgb(rng, 40, 56), photometric="rgb")
    tifffile.imwrite(
        tmp_path / "imgs" / "b.tiff",
        _rgb(rng, 64, 64),
        photometric="rgb",
        tile=(32, 32),
        compression="zlib",
        bigtiff=True,
    )
    Image.fromarray(_rgb(rng, 30, 20)).save(tmp_path / "imgs" / "c.png")
    np.save(tmp_path / "d.npy", _rgb(rng, 50, 50))
    Image.fromarray(_rgb(rng, 33, 47)).save(tmp_path / "e.jpeg")
    return _write_csv(
        tmp_path / "train.csv",
        "image,label\nimgs/a.tif,0\nimgs/b.tiff,1\n imgs/c.png , 1.0\nd.npy,0\ne.jpeg,1\n",
    )


def test_load_csv_valid(mixed_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(mixed_dataset.parent / "imgs")  # paths are relative to the CSV, not cwd
    ds = load_csv(mixed_dataset)
    assert isinstance(ds, torch.utils.data.Dataset)
    assert len(ds) == 5
    assert ds.labels == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert ds.task == "binary"
    assert ds.channels == 3
    assert ds.dtype == torch.uint8
    assert [s.row for s in ds.samples] == [1, 2, 3, 4, 5]
    assert ds.samples[2] == Sample(mixed_dataset.parent / "imgs" / "c.png", 1.0, 3)
    assert ds.samples[0].path.is_absolute()
    assert [ds.image_shape(i) for i in range(5)] == [
        (3, 40, 56),
        (3, 64, 64),
        (3, 30, 20),
        (3, 50, 50),
        (3, 33, 47),
    ]
    image, label = ds[1]
    assert image.shape == (3, 64, 64)
    assert image.dtype == torch.uint8
    assert label.dtype == torch.float32
    assert label.shape == ()
    assert label.item() == 1.0


def test_load_csv_target_shape(mixed_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="executor.data"):
        ds = load_csv(mixed_dataset, target_shape=(48, 48))
    assert "center-cropped" in caplog.text  # the shape policy is never silent
    for i in range(len(ds)):
        image, _ = ds[i]
        assert image.shape == (3, 48, 48)
        assert ds.image_shape(i) == (3, 48, 48)
        assert torch.equal(image, fit_to_shape(read_image(ds.samples[i].path), (48, 48)))
    assert ds.with_target_shape(None)[0][0].shape == (3, 40, 56)
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 48, 48)
    assert labels.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_dataset_pickles_for_worker_processes(mixed_dataset: Path) -> None:
    ds = load_csv(mixed_dataset, target_shape=(32, 32))
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[3][0], ds[3][0])
    assert clone.samples == ds.samples


def test_load_csv_column_order_case_blank_lines_and_absolute_paths(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    tifffile.imwrite(tmp_path / "a.tif", _rgb(rng), photometric="rgb")
    other = tmp_path / "elsewhere"
    other.mkdir()
    csv_path = _write_csv(
        other / "list.csv",
        f"\ufeffLabel, Image\n\n2,{tmp_path / 'a.tif'}\n\n\n0,../a.tif\n3,../a.tif\n",
    )
    ds = load_csv(csv_path)
    assert ds.labels == [2.0, 0.0, 3.0]
    assert ds.task == "multiclass"
    assert [s.row for s in ds.samples] == [2, 5, 6]  # row N is line N + 1, blank lines count
    assert all(s.path == (tmp_path / "a.tif").resolve() for s in ds.samples)


def test_validation_reads_headers_only(
    mixed_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pixel data decoded during validation")

    monkeypatch.setattr(Image.Image, "load", refuse)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", refuse)
    monkeypatch.setattr(np, "load", _header_only_np_load(np.load))
    ds = load_csv(mixed_dataset)
    assert len(ds) == 5


def _header_only_np_load(real: Callable) -> Callable:
    def load(path: object, mmap_mode: str | None = None, **kwargs: object) -> object:
        assert mmap_mode == "r", "npy must be memory-mapped, not read"
        return real(path, mmap_mode=mmap_mode, **kwargs)

    return load


def test_pil_decompression_bomb_limit_is_lifted_and_restored(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.fromarray(_rgb(rng)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40 x 56 is a "bomb" now
    assert read_image(tmp_path / "big.png").shape == (3, 40, 56)
    assert probe_image(tmp_path / "big.png").height == 40
    assert Image.MAX_IMAGE_PIXELS == 100


# --------------------------------------------------------------------------------------------
# load_csv: every kind of bad input
# --------------------------------------------------------------------------------------------


def _good_images(folder: Path, rng: np.random.Generator) -> None:
    for name in ("img1.tif", "img2.tif", "img3.tif"):
        tifffile.imwrite(folder / name, _rgb(rng), photometric="rgb")


def _corrupt_random_bytes(folder: Path, rng: np.random.Generator) -> None:
    (folder / "img3.tif").write_bytes(rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes())


def _corrupt_header(folder: Path, rng: np.random.Generator) -> None:
    # A valid little-endian TIFF signature whose first IFD points far outside the file.
    (folder / "img3.tif").write_bytes(b"II*\x00" + (10**9).to_bytes(4, "little") + bytes(64))


def _truncate(folder: Path, rng: np.random.Generator) -> None:
    path = folder / "img3.tif"
    path.write_bytes(path.read_bytes()[:2000])


def _empty_file(folder: Path, rng: np.random.Generator) -> None:
    (folder / "img3.tif").write_bytes(b"")


def _png_named_tif(folder: Path, rng: np.random.Generator) -> None:
    Image.fromarray(_rgb(rng)).save(folder / "img3.tif", format="PNG")


def _uint16(folder: Path, rng: np.random.Generator) -> None:
    tifffile.imwrite(folder / "img3.tif", rng.integers(0, 4000, (8, 8), dtype=np.uint16))


def _gray_among_rgb(folder: Path, rng: np.random.Generator) -> None:
    tifffile.imwrite(folder / "img3.tif", _rgb(rng)[..., 0])


def _zlib_tiles_garbage(folder: Path, rng: np.random.Generator) -> None:
    path = folder / "img3.tif"
    tifffile.imwrite(path, _rgb(rng), photometric="rgb", tile=(16, 16), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[0].dataoffsets[0]
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 16] = bytes(16)  # destroys the zlib stream header of the first tile
    path.write_bytes(bytes(raw))


def _palette_tiff(folder: Path, rng: np.random.Generator) -> None:
    colormap = rng.integers(0, 65536, size=(3, 256), dtype=np.uint16)
    tifffile.imwrite(
        folder / "img3.tif", _rgb(rng)[..., 0], photometric="palette", colormap=colormap
    )


def _volume(folder: Path, rng: np.random.Generator) -> None:
    np.save(folder / "img3.npy", np.zeros((2, 3, 8, 8), dtype=np.uint8))


def _directory(folder: Path, rng: np.random.Generator) -> None:
    (folder / "img3.tif").unlink()
    (folder / "img3.tif").mkdir()


BAD_IMAGES: dict[str, tuple[Callable[[Path, np.random.Generator], None], str, str]] = {
    # name: (how to break row 3, image name in row 3, expected fragment of the message)
    "random_bytes": (_corrupt_random_bytes, "img3.tif", "not a TIFF file"),
    "bad_header": (_corrupt_header, "img3.tif", "cannot read 'img3.tif'"),
    "truncated": (_truncate, "img3.tif", "truncated"),
    "empty_file": (_empty_file, "img3.tif", "cannot read 'img3.tif'"),
    "png_named_tif": (_png_named_tif, "img3.tif", "not a TIFF file"),
    "uint16": (_uint16, "img3.tif", "uint16 is not supported"),
    "gray_among_rgb": (_gray_among_rgb, "img3.tif", "1 channel(s) but row 1 has 3"),
    "garbage_zlib_tile": (_zlib_tiles_garbage, "img3.tif", "cannot read 'img3.tif'"),
    "volume_npy": (_volume, "img3.npy", "is not an image"),
    "palette_tiff": (_palette_tiff, "img3.tif", "colour space PALETTE is not supported"),
    "directory": (_directory, "img3.tif", "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_names_row(tmp_path: Path, rng: np.random.Generator, case: str) -> None:
    _good_images(tmp_path, rng)
    breaker, name, fragment = BAD_IMAGES[case]
    breaker(tmp_path, rng)
    _write_csv(tmp_path / "train.csv", f"image,label\nimg1.tif,0\nimg2.tif,1\n{name},1\n")
    with pytest.raises(DataError) as info:
        load_csv(tmp_path / "train.csv")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'train.csv'} row 3: ")
    assert fragment in message
    assert message.endswith("fix or remove the row")
    assert "\n" not in message
    assert info.value.row == 3
    assert isinstance(info.value, StreamingError)


BAD_ROWS: dict[str, tuple[str, str]] = {
    # name: (row 2 of the CSV, expected fragment)
    "missing_image": ("nope.tif,1", "image 'nope.tif' not found (looked for "),
    "non_numeric_label": ("img2.tif,tumour", "label 'tumour' is not a number"),
    "empty_label": ("img2.tif,", "label '' is not a number"),
    "nan_label": ("img2.tif,nan", "label 'nan' is not a finite number"),
    "empty_path": (",1", "the image path is empty"),
    "too_many_fields": ("img2.tif,1,extra", "expected 2 fields (image,label), got 3"),
    "too_few_fields": ("img2.tif", "expected 2 fields (image,label), got 1"),
    "unsupported_suffix": ("img2.bmp,1", "unsupported file type '.bmp'"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_row_names_row(tmp_path: Path, rng: np.random.Generator, case: str) -> None:
    _good_images(tmp_path, rng)
    Image.fromarray(_rgb(rng)).save(tmp_path / "img2.bmp")
    row, fragment = BAD_ROWS[case]
    _write_csv(tmp_path / "train.csv", f"image,label\nimg1.tif,0\n{row}\nimg3.tif,1\n")
    with pytest.raises(DataError, match=r"train\.csv row 2: ") as info:
        load_csv(tmp_path / "train.csv")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)
    assert info.value.row == 2


BAD_CSVS: dict[str, tuple[str, str]] = {
    # name: (CSV text, expected fragment)
    "empty": ("", "the file is empty; expected a header line 'image,label'"),
    "blank_only": ("\n \n", "the file is empty"),
    "header_only": ("image,label\n", "no data rows after the header"),
    "missing_label_column": ("image\nimg1.tif\n", "missing column(s) 'label'"),
    "extra_column": ("image,label,weight\nimg1.tif,0,1\n", "unexpected column(s) 'weight'"),
    "no_header": ("img1.tif,0\nimg2.tif,1\n", "missing column(s) 'image', 'label'"),
    "repeated_column": ("image,label,label\nimg1.tif,0,0\n", "repeated column(s) 'label'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSVS))
def test_bad_csv(tmp_path: Path, rng: np.random.Generator, case: str) -> None:
    _good_images(tmp_path, rng)
    text, fragment = BAD_CSVS[case]
    _write_csv(tmp_path / "train.csv", text)
    with pytest.raises(DataError) as info:
        load_csv(tmp_path / "train.csv")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'train.csv'}: ")
    assert fragment in message
    assert "\n" not in message


def test_missing_or_binary_csv(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.csv: file not found"):
        load_csv(tmp_path / "missing.csv")
    (tmp_path / "latin1.csv").write_bytes("image,label\nbild\xe4.tif,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: not a UTF-8 text file"):
        load_csv(tmp_path / "latin1.csv")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(DataError, match=r"folder\.csv: not a regular file"):
        load_csv(tmp_path / "folder.csv")


def test_all_bad_rows_are_reported(
    tmp_path: Path, rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    _good_images(tmp_path, rng)
    _write_csv(
        tmp_path / "train.csv", "image,label\nimg1.tif,x\nimg2.tif,1\nnope.tif,0\nimg3.tif,y\n"
    )
    with pytest.raises(DataError) as info:
        load_csv(tmp_path / "train.csv")
    assert "row 1: label 'x' is not a number" in str(info.value)
    assert "(2 more bad row(s) logged)" in str(info.value)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("row 3: image 'nope.tif' not found" in m for m in logged)
    assert any("row 4: label 'y'" in m for m in logged)


def test_image_broken_after_validation_names_row(tmp_path: Path, rng: np.random.Generator) -> None:
    _good_images(tmp_path, rng)
    _write_csv(tmp_path / "train.csv", "image,label\nimg1.tif,0\nimg2.tif,1\n")
    ds = load_csv(tmp_path / "train.csv")
    (tmp_path / "img2.tif").write_bytes(b"garbage")
    assert ds[0][0].shape == (3, 40, 56)
    with pytest.raises(DataError, match=r"train\.csv row 2: cannot read .*img2\.tif") as info:
        ds[1]
    assert info.value.row == 2
    with pytest.raises(IndexError):
        ds[2]


def test_probe_and_read_errors_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        probe_image(tmp_path / "nothing.tif")
    with pytest.raises(DataError, match="file not found"):
        read_image(tmp_path / "nothing.png")
    with pytest.raises(DataError, match="unsupported file type"):
        read_image(tmp_path / "x.gif")


def test_dataset_checks_lengths() -> None:
    with pytest.raises(ValueError, match="1 samples but 0 image infos"):
        Dataset([Sample(Path("a.tif"), 0.0, 1)], [])
    assert data_mod.IMAGE_SUFFIXES[".tif"] == "tiff"
