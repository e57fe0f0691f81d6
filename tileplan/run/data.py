"""Data layer: a CSV of whole images and labels, validated up front, read lazily.

The CSV
    A UTF-8 text file with a header line ``image,label`` (in either order; an optional third
    column ``level`` names the pyramid level to read for that row, empty for the run's choice)
    and one row per image. ``image`` is a path, relative to the CSV file's folder (or absolute);
    ``label`` is a number. Blank lines are ignored. Rows are numbered from 1 for the first line
    after the header, so ``row N`` is line ``N + 1`` of the file.

Validation
    :func:`load_csv` checks every row before any training starts and reads only file headers
    (TIFF tags, PNG/JPEG headers, ``.npy`` headers) plus, for a compressed TIFF, its first
    tile or strip, so that it stays cheap for thousands of gigapixel images. Every problem
    (missing file or column, empty CSV, non-numeric label, unreadable or corrupt image, mixed
    channel counts) raises :class:`DataError` with one line that names the CSV, the row and the
    fix, e.g. ``train.csv row 3: cannot read 'img3.tif': not a TIFF file; fix or remove the row``.

Image formats and layout
    - TIFF (``.tif``/``.tiff``; classic and BigTIFF; strips or tiles) through ``tifffile``: the
      first page (the full-resolution level of a pyramid). Uncompressed contiguous data is
      memory-mapped, and only the part kept by :func:`fit_to_shape` is copied into RAM;
      compressed data (zlib, and whatever ``imagecodecs`` provides when installed) is decoded.
    - PNG and JPEG (``.png``, ``.jpg``, ``.jpeg``) through Pillow, without its
      decompression-bomb limit (large images are the point). EXIF orientation is not applied.
    - NumPy ``.npy`` through ``numpy.load(mmap_mode="r")``: a 2-D array is ``(H, W)``; a 3-D
      array is channel-last ``(H, W, C)`` when ``C = shape[-1] <= 4 < shape[0]``, else
      channel-first ``(C, H, W)``. All channels of an ``.npy`` array are kept.

    Images come back as channel-first ``(C, H, W)`` tensors: grayscale has ``C = 1``; an alpha
    channel (RGBA, gray+alpha, TIFF extra samples) is dropped; palette/CMYK/YCbCr images are
    converted to RGB. Pixel types: ``uint8`` stays ``uint8`` (4x less RAM than float; convert
    per tile on the compute device with ``tileplan.settings.Normalization``); floating-point
    ``.npy``/TIFF
    becomes ``float32``. Other types (``uint16``, signed integers, 1-bit) are refused with a
    message asking for 8-bit or float32 data, rather than rescaled silently.

Whole-slide images (``load_csv(..., settings=DataSettings(...))``, what training uses)
    Vendor slides (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ...) and TIFFs are read region by
    region at the run's resolution (``--mpp``/``--level``, or the row's ``level``), optionally
    cropped to their tissue (``--tissue``): see ``tileplan.run.slides``. Each image streams at
    its own size, never padded; one larger than the plan's image on an axis is centre-cropped
    to it (logged) or refused, by ``DataSettings.oversize``. Every row's level, mpp metadata,
    tissue and size are checked before training starts.

Shape policy without settings (:func:`fit_to_shape`)
    When a plan fixes the image shape ``(H, W)`` and an image differs, each spatial axis is
    handled on its own: an axis that is too long is **center-cropped** (start offset
    ``(size - target) // 2``, so an odd surplus loses one pixel more at the bottom/right); an
    axis that is too short is **zero-padded on both sides, centered** (``(target - size) // 2``
    before, the rest after). Nothing is resized or interpolated. :func:`load_csv` logs how
    many images will be cropped or padded, so the policy is never applied silently.

Labels and tasks
    Labels are floats. :func:`infer_task` calls integer labels in ``{0, 1}`` ``"binary"``,
    small non-negative integers with more than two classes ``"multiclass"``, and anything else
    ``"regression"``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image

from executor import ImageSource, StreamingError, TensorSource
from tileplan.run.advice import UnusableImageError
from tileplan.run.pixels import DTYPE_HINT, BadImageError, Layout, out_dtype
from tileplan.run.tiff import check_tiff_extent, decode_first_segment, open_tiff, tiff_layout

if TYPE_CHECKING:
    from tileplan.run.slides import Pyramid, Region, Resolved
    from tileplan.settings import DataSettings

__all__ = [
    "FIX_ROW",
    "IMAGE_SUFFIXES",
    "RowError",
    "parse_label",
    "read_csv_rows",
    "DataError",
    "Dataset",
    "ImageInfo",
    "Task",
    "Sample",
    "fit_to_shape",
    "infer_task",
    "load_csv",
    "probe_image",
    "read_image",
]

log = logging.getLogger(__name__)

Task = Literal["binary", "multiclass", "regression"]

#: Recognised file name suffixes (lower case) and the reader used for each.
IMAGE_SUFFIXES: dict[str, str] = {
    ".tif": "tiff",
    ".tiff": "tiff",
    ".png": "pil",
    ".jpg": "pil",
    ".jpeg": "pil",
    ".npy": "npy",
    **{
        suffix: "openslide"
        for suffix in (
            ".svs",
            ".ndpi",
            ".mrxs",
            ".scn",
            ".bif",
            ".vms",
            ".vmu",
            ".svslide",
            ".dcm",
        )  # fmt: skip
    },
}

_COLUMNS = ("image", "label")
_OPTIONAL_COLUMNS = ("level", "mpp", "spacing")  # spacing: of volumes (tileplan.run.volumes)
FIX_ROW = "fix or remove the row"

# Pillow modes that read as one channel, and those we cannot represent without rescaling.
_PIL_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_PIL_REFUSED_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PIL_LOCK = threading.Lock()


class DataError(StreamingError):
    """A data file (the CSV or an image it lists) cannot be used.

    The message is one line naming the file (and the CSV row) and the fix, ready for the CLI.

    Attributes:
        csv_path: the CSV being read, when the problem was found through one.
        row: the 1-based data row of the CSV, when the problem belongs to a row.
    """

    def __init__(self, message: str, *, csv_path: Path | None = None, row: int | None = None):
        self.csv_path = csv_path
        self.row = row
        super().__init__(message)


@dataclass(frozen=True)
class Sample:
    """One row of a dataset CSV.

    Attributes:
        path: absolute path of the image file.
        label: the label as a float.
        row: 1-based data row in the CSV (for error messages).
        level: the pyramid level this row asks for (the CSV's ``level`` column), or None.
    """

    path: Path
    label: float
    row: int
    level: int | None = None
    mpp: float | None = None  # the row's statement of the file's µm/px (CSV column ``mpp``)


@dataclass(frozen=True)
class ImageInfo:
    """What the header of an image says, as it will be returned by :func:`read_image`.

    Attributes:
        channels: channels after layout normalisation (alpha dropped, gray = 1).
        height: rows of pixels.
        width: columns of pixels.
        dtype: ``"uint8"`` or ``"float32"``.
        reader: ``"tiff"``, ``"pil"`` or ``"npy"``.
    """

    channels: int
    height: int
    width: int
    dtype: Literal["uint8", "float32"]
    reader: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the tensor :func:`read_image` returns."""
        return (self.channels, self.height, self.width)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the tensor :func:`read_image` returns."""
        return torch.uint8 if self.dtype == "uint8" else torch.float32


# --------------------------------------------------------------------------------------------
# Shape policy
# --------------------------------------------------------------------------------------------


def _axis_plan(size: int, target: int) -> tuple[int, int, int]:
    """Return ``(src_start, dst_start, length)`` mapping one axis onto ``target`` (centered)."""
    if size >= target:
        return (size - target) // 2, 0, target
    return 0, (target - size) // 2, size


def _check_shape(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) != 2 or any(int(s) != s or s < 1 for s in shape):
        raise ValueError(f"target shape must be two positive integers (H, W), got {shape!r}")
    return int(shape[0]), int(shape[1])


def fit_to_shape(image: torch.Tensor, shape: Sequence[int], fill: float = 0) -> torch.Tensor:
    """Center-crop and/or center-pad the last two axes of ``image`` to ``shape``.

    Each spatial axis is treated on its own: a longer axis is cropped to the middle ``target``
    pixels (start ``(size - target) // 2``); a shorter axis is padded with ``fill`` on both
    sides, ``(target - size) // 2`` before and the rest after. No resampling.

    Args:
        image: tensor ``(..., H, W)`` of any dtype, e.g. ``(C, H, W)``.
        shape: target ``(H, W)``.
        fill: value of padded pixels (0 = black for uint8 images).

    Returns:
        ``image`` itself when it already has the shape, else a new contiguous tensor
        ``(..., shape[0], shape[1])`` with ``image``'s dtype and device.

    Raises:
        ValueError: if ``shape`` is not two positive integers or ``image`` has fewer than two
            dimensions.
    """
    th, tw = _check_shape(shape)
    if image.dim() < 2:
        raise ValueError(f"image must have at least 2 dimensions (H, W), got {tuple(image.shape)}")
    h, w = image.shape[-2], image.shape[-1]
    if (h, w) == (th, tw):
        return image
    sy, dy, ly = _axis_plan(h, th)
    sx, dx, lx = _axis_plan(w, tw)
    crop = image[..., sy : sy + ly, sx : sx + lx]
    if ly == th and lx == tw:
        return crop.contiguous()
    out = torch.full((*image.shape[:-2], th, tw), fill, dtype=image.dtype, device=image.device)
    out[..., dy : dy + ly, dx : dx + lx] = crop
    return out


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def infer_task(labels: Iterable[float], max_classes: int = 100) -> Task:
    """Tell the task type from the labels.

    Args:
        labels: the labels (floats).
        max_classes: the largest number of classes ``max(label) + 1`` still taken as
            classification.

    Returns:
        ``"binary"`` when every label is 0 or 1; ``"multiclass"`` when every label is a
        non-negative integer and ``2 < max(label) + 1 <= max_classes``; otherwise
        ``"regression"``.

    Raises:
        ValueError: if there are no labels or one is not finite.
    """
    values = [float(v) for v in labels]
    if not values:
        raise ValueError("no labels: cannot infer the task")
    if not all(math.isfinite(v) for v in values):
        raise ValueError("labels must be finite numbers")
    if all(v in (0.0, 1.0) for v in values):
        return "binary"
    if all(v >= 0 and v.is_integer() for v in values) and max(values) + 1 <= max_classes:
        return "multiclass"
    return "regression"


# --------------------------------------------------------------------------------------------
# Image readers
# --------------------------------------------------------------------------------------------


def _reader_for(path: Path) -> str:
    if path.is_dir():  # the folder of a DICOM whole-slide image series
        return "openslide"
    reader = IMAGE_SUFFIXES.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(sorted(IMAGE_SUFFIXES))
        raise BadImageError(
            f"unsupported file type '{path.suffix or path.name}' (use one of {known})"
        )
    return reader


def _npy_layout(shape: tuple[int, ...]) -> tuple[Layout, int, int]:
    if len(shape) == 2:
        return Layout("hw", 1), shape[0], shape[1]
    if len(shape) == 3:
        if shape[-1] <= 4 < shape[0]:
            return Layout("hwc", shape[2]), shape[0], shape[1]
        return Layout("chw", shape[0]), shape[1], shape[2]
    raise BadImageError(
        f"array of shape {shape} is not an image; expected (H, W), (H, W, C) or (C, H, W)"
    )


@contextlib.contextmanager
def _open_tiff(path: Path) -> Iterator[tuple[Any, Any]]:
    with open_tiff(path) as tif:
        if not len(tif.pages):
            raise BadImageError("TIFF file has no pages")
        yield tif, tif.pages[0]


def _probe_tiff(path: Path) -> ImageInfo:
    with _open_tiff(path) as (tif, page):
        layout, h, w = tiff_layout(page)
        dtype = out_dtype(np.dtype(page.dtype))
        check_tiff_extent(page, path.stat().st_size)
        if not page.is_memmappable:
            decode_first_segment(tif, page)
        if len(tif.series) and len(tif.series[0].pages) > 1:
            log.warning(
                "%s: the first series has %d pages; only page 0 is used",
                path,
                len(tif.series[0].pages),
            )
    return ImageInfo(layout.channels, h, w, dtype, "tiff")


def _read_tiff(path: Path) -> tuple[np.ndarray, Layout]:
    with _open_tiff(path) as (_tif, page):
        layout, _, _ = tiff_layout(page)
        out_dtype(np.dtype(page.dtype))
        # A memmap outlives the TiffFile; only the cropped part is copied later.
        array = page.asarray(out="memmap") if page.is_memmappable else page.asarray()
    return array, layout


@contextlib.contextmanager
def _open_pil(path: Path) -> Iterator[Any]:
    with _PIL_LOCK:  # whole-slide images exceed Pillow's decompression-bomb limit by design
        old_limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
    with image:
        yield image


def _pil_layout(mode: str) -> Layout:
    if mode in _PIL_REFUSED_MODES:
        raise BadImageError(f"{mode} (16/32-bit) PNG/JPEG is not supported; {DTYPE_HINT}")
    return Layout("hw", 1) if mode in _PIL_GRAY_MODES else Layout("hwc", 3)


def _probe_pil(path: Path) -> ImageInfo:
    with _open_pil(path) as image:
        layout = _pil_layout(image.mode)
        width, height = image.size
    return ImageInfo(layout.channels, height, width, "uint8", "pil")


def _read_pil(path: Path) -> tuple[np.ndarray, Layout]:
    with _open_pil(path) as image:
        layout = _pil_layout(image.mode)
        target_mode = "L" if layout.kind == "hw" else "RGB"
        converted = image if image.mode == target_mode else image.convert(target_mode)
        array = np.asarray(converted)
    return array, layout


def _load_npy(path: Path) -> np.ndarray:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise BadImageError("not a single .npy array")
    return array


def _probe_npy(path: Path) -> ImageInfo:
    array = _load_npy(path)
    layout, h, w = _npy_layout(array.shape)
    return ImageInfo(layout.channels, h, w, out_dtype(array.dtype), "npy")


def _read_npy(path: Path) -> tuple[np.ndarray, Layout]:
    array = _load_npy(path)
    layout, _, _ = _npy_layout(array.shape)
    out_dtype(array.dtype)
    return array, layout


def _probe_openslide(path: Path) -> ImageInfo:
    from tileplan.run.slides import open_pyramid

    pyramid = open_pyramid(path)
    (h, w) = pyramid.levels[0]
    return ImageInfo(pyramid.channels, h, w, pyramid.dtype, "openslide")


def _read_openslide(path: Path) -> tuple[np.ndarray, Layout]:
    from tileplan.run.slides import SlideSource, choose_region, open_pyramid

    pyramid = open_pyramid(path)
    source = SlideSource(pyramid, choose_region(pyramid))
    try:
        return source.read_all()[0].numpy(), Layout("chw", pyramid.channels)
    finally:
        source.close()


_PROBERS = {"tiff": _probe_tiff, "pil": _probe_pil, "npy": _probe_npy,
            "openslide": _probe_openslide}  # fmt: skip
_READERS = {"tiff": _read_tiff, "pil": _read_pil, "npy": _read_npy,
            "openslide": _read_openslide}  # fmt: skip


def _describe(exc: BaseException, command: str | None = None) -> str:
    if isinstance(exc, UnusableImageError):
        text = exc.render(command)
    elif isinstance(exc, FileNotFoundError):
        text = "file not found"
    elif isinstance(exc, (IsADirectoryError, PermissionError)):
        text = exc.strerror or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())  # one line


def describe_error(exc: BaseException, command: str | None = None) -> str:
    """Why reading an image failed, as one line (for messages that add file and row), with
    the fixes ``command`` offers (``tileplan.run.advice``; None: every fix)."""
    return _describe(exc, command)


def _probe(path: Path) -> ImageInfo:
    reader = _reader_for(path)
    if not (path.is_file() or (reader == "openslide" and path.is_dir())):
        raise BadImageError("file not found" if not path.exists() else "not a regular file")
    info = _PROBERS[reader](path)
    if info.height < 1 or info.width < 1 or info.channels < 1:
        raise BadImageError(f"empty image of shape {info.shape}")
    return info


def _to_tensor(array: np.ndarray, layout: Layout, shape: tuple[int, int] | None) -> torch.Tensor:
    if layout.kind == "hw":
        chw = array[None]
    elif layout.kind == "hwc":
        chw = array.transpose(2, 0, 1)
    else:
        chw = array
    chw = chw[: layout.channels]
    if shape is not None:  # crop before copying, so a memory-mapped file is read only in part
        sy, _, ly = _axis_plan(chw.shape[1], shape[0])
        sx, _, lx = _axis_plan(chw.shape[2], shape[1])
        chw = chw[:, sy : sy + ly, sx : sx + lx]
    dtype = np.uint8 if out_dtype(array.dtype) == "uint8" else np.float32
    data = np.array(chw, dtype=dtype, order="C", copy=True)  # native order, writable, in RAM
    if layout.invert and dtype == np.uint8:
        np.subtract(255, data, out=data)
    tensor = torch.from_numpy(data)
    return tensor if shape is None else fit_to_shape(tensor, shape)


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Read an image's header: channels, size and pixel type, without decoding the pixels.

    For a compressed TIFF the first tile/strip is decoded too (a missing codec or garbage data
    is found now rather than during training).

    Args:
        path: image file (.tif/.tiff, .png, .jpg/.jpeg, .npy).

    Returns:
        The :class:`ImageInfo` of the tensor :func:`read_image` would return.

    Raises:
        DataError: the file is missing, of an unsupported type, corrupt or not an image.
    """
    path = Path(path)
    try:
        return _probe(path)
    except Exception as exc:  # any reader failure becomes one clear line
        raise DataError(f"cannot read '{path}': {_describe(exc)}") from exc


def read_image(path: str | os.PathLike[str], shape: Sequence[int] | None = None) -> torch.Tensor:
    """Read a whole image as a channel-first tensor, optionally fitted to ``shape``.

    Args:
        path: image file (.tif/.tiff, .png, .jpg/.jpeg, .npy).
        shape: target ``(H, W)``; the image is center-cropped/padded to it (see
            :func:`fit_to_shape`). For memory-mapped files (uncompressed TIFF, .npy) only the
            kept region is read from disk.

    Returns:
        ``(C, H, W)`` tensor, ``uint8`` for 8-bit images and ``float32`` for floating-point
        ones, in (writable) host memory.

    Raises:
        DataError: the file is missing, of an unsupported type, corrupt or not an image.
    """
    path = Path(path)
    target = None if shape is None else _check_shape(shape)
    try:
        array, layout = _READERS[_reader_for(path)](path)
        return _to_tensor(array, layout, target)
    except Exception as exc:  # any reader failure becomes one clear line
        raise DataError(f"cannot read '{path}': {_describe(exc)}") from exc


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


class Dataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Whole images and labels listed in a validated CSV (see :func:`load_csv`).

    ``dataset[i]`` reads image ``i`` from disk (as described in the module docstring), fits it
    to ``target_shape`` when one is set, and returns ``(image, label)``: ``image`` is
    ``(C, H, W)`` ``uint8`` (or ``float32``), ``label`` a 0-d ``float32`` tensor. No file
    handles are kept open, so the dataset can be sent to DataLoader worker processes.

    Attributes:
        samples: the rows, in CSV order.
        infos: header information of each sample's image (same order).
        target_shape: ``(H, W)`` every image is fitted to, or None to return images as stored.
            With ``regions`` it is the largest image size instead (nothing is fitted).
        csv_path: the CSV the samples came from, if any.
        regions: with settings (see :func:`load_csv`): what is streamed of each image (level,
            resolution, box), read region by region through :meth:`source`; ``infos`` then
            describe those regions.
        pyramids: each image's levels and resolution, alongside ``regions``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        infos: Sequence[ImageInfo],
        target_shape: Sequence[int] | None = None,
        csv_path: Path | None = None,
        regions: Sequence[Region] | None = None,
        pyramids: Sequence[Pyramid] | None = None,
    ) -> None:
        self.regions: tuple[Region, ...] | None = None if regions is None else tuple(regions)
        self.pyramids: tuple[Pyramid, ...] | None = None if pyramids is None else tuple(pyramids)
        if len(samples) != len(infos):
            raise ValueError(f"{len(samples)} samples but {len(infos)} image infos")
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.infos: tuple[ImageInfo, ...] = tuple(infos)
        self.target_shape: tuple[int, int] | None = (
            None if target_shape is None else _check_shape(target_shape)
        )
        self.csv_path = csv_path

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def streamed(self) -> bool:
        """Whether images stream from their files region by region (``source``), not whole."""
        return self.regions is not None

    def source(self, index: int) -> ImageSource:
        """Image ``index`` as an ``executor.ImageSource`` of shape ``(1, C, H, W)``: read region
        by region from its file with ``regions``, else the tensor ``self[index]`` holds."""
        if self.regions is None or self.pyramids is None:
            return TensorSource(self[index][0][None])
        from tileplan.run.slides import SlideSource

        return SlideSource(self.pyramids[index], self.regions[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sample = self.samples[index]  # IndexError ends iteration as usual
        try:
            if self.regions is not None:
                source = self.source(index)
                image = source.read_all()[0]  # type: ignore[attr-defined]
                source.close()  # type: ignore[attr-defined]
            else:
                image = read_image(sample.path, self.target_shape)
        except DataError as exc:
            where = self.csv_path if self.csv_path is not None else "dataset"
            raise DataError(
                f"{where} row {sample.row}: {exc}; {FIX_ROW}",
                csv_path=self.csv_path,
                row=sample.row,
            ) from exc
        return image, torch.tensor(sample.label, dtype=torch.float32)

    @property
    def labels(self) -> list[float]:
        """The labels, in sample order."""
        return [s.label for s in self.samples]

    @property
    def task(self) -> Task:
        """The task type the labels imply (see :func:`infer_task`)."""
        return infer_task(self.labels)

    @property
    def largest_shape(self) -> tuple[int, int]:
        """``(H, W)``: the largest height and the largest width of the images (as streamed)."""
        shapes = [self.image_shape(i)[1:] for i in range(len(self))]
        return (max(h for h, _ in shapes), max(w for _, w in shapes))

    @property
    def channels(self) -> int:
        """Channels of every image (validated to be equal)."""
        return self.infos[0].channels if self.infos else 0

    @property
    def dtype(self) -> torch.dtype:
        """Pixel dtype of every image: ``torch.uint8`` or ``torch.float32``."""
        return self.infos[0].torch_dtype if self.infos else torch.uint8

    def image_shape(self, index: int) -> tuple[int, int, int]:
        """``(C, H, W)`` of ``self[index][0]`` without reading the image."""
        info = self.infos[index]
        if self.target_shape is None or self.regions is not None:
            return info.shape
        return (info.channels, *self.target_shape)

    def with_target_shape(self, shape: Sequence[int] | None) -> Dataset:
        """The same samples, fitted to another ``(H, W)`` (or as stored, for None)."""
        if self.regions is not None:
            raise ValueError("a dataset of slide regions is not fitted to a shape")
        return Dataset(self.samples, self.infos, shape, self.csv_path)


# --------------------------------------------------------------------------------------------
# CSV loading and validation
# --------------------------------------------------------------------------------------------


class RowError(Exception):
    def __init__(self, row: int, reason: str) -> None:
        self.row = row
        self.reason = reason
        super().__init__(reason)


def read_csv_rows(csv_path: Path, shown: str) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
    """Return the column index of each name and ``(row, fields)`` for each non-blank data row."""
    if not csv_path.exists():
        raise DataError(f"{shown}: file not found", csv_path=csv_path)
    if not csv_path.is_file():
        raise DataError(f"{shown}: not a regular file", csv_path=csv_path)
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            records = list(_numbered(csv.reader(fh)))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{shown}: not a UTF-8 text file ({exc.reason})", csv_path=csv_path
        ) from exc
    except (OSError, csv.Error) as exc:
        raise DataError(f"{shown}: cannot read: {_describe(exc)}", csv_path=csv_path) from exc
    if not records:
        raise DataError(
            f"{shown}: the file is empty; expected a header line 'image,label' and one row per "
            "image",
            csv_path=csv_path,
        )
    header_line, header = records[0]
    columns = _check_header(header, shown, csv_path)
    rows = [(line - header_line, fields) for line, fields in records[1:]]
    if not rows:
        raise DataError(
            f"{shown}: no data rows after the header; add one 'image,label' row per image",
            csv_path=csv_path,
        )
    return columns, rows


def _numbered(reader: Any) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of each non-blank record of a ``csv.reader``."""
    for fields in reader:
        if any(f.strip() for f in fields):
            yield reader.line_num, fields


def _check_header(header: list[str], shown: str, csv_path: Path) -> dict[str, int]:
    names = [h.strip().lower() for h in header]
    missing = [c for c in _COLUMNS if c not in names]
    extra = [h for h in names if h not in (*_COLUMNS, *_OPTIONAL_COLUMNS)]
    dupes = sorted({h for h in names if names.count(h) > 1})
    problems = []
    if missing:
        problems.append("missing column(s) " + ", ".join(repr(c) for c in missing))
    if extra:
        problems.append("unexpected column(s) " + ", ".join(repr(c) for c in extra))
    if dupes:
        problems.append("repeated column(s) " + ", ".join(repr(c) for c in dupes))
    if problems:
        raise DataError(
            f"{shown}: {'; '.join(problems)} in header {','.join(header)!r}; "
            "the header must be 'image,label' (and optionally 'level' and 'mpp', or 'spacing' for "
            "volumes)",
            csv_path=csv_path,
        )
    return {name: names.index(name) for name in (*_COLUMNS, *_OPTIONAL_COLUMNS) if name in names}


def parse_label(text: str, row: int) -> float:
    try:
        label = float(text)
    except ValueError:
        raise RowError(row, f"label {text.strip()!r} is not a number") from None
    if not math.isfinite(label):
        raise RowError(row, f"label {text.strip()!r} is not a finite number")
    return label


def _parse_level(text: str, row: int) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise RowError(row, f"level {text!r} is not a whole number >= 0 (0 = full resolution)")
    return int(text)


def _parse_mpp(text: str, row: int) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise RowError(row, f"mpp {text!r} is not a positive number of microns per pixel")
    return value


def _parse_row(
    row: int, fields: list[str], columns: dict[str, int], base: Path, command: str | None
) -> tuple[Sample, ImageInfo]:
    if len(fields) != len(columns):
        raise RowError(row, f"expected {len(columns)} fields ({','.join(columns)}), got "
                             f"{len(fields)}")  # fmt: skip
    name = fields[columns["image"]].strip()
    if not name:
        raise RowError(row, "the image path is empty")
    label = parse_label(fields[columns["label"]], row)
    level = _parse_level(fields[columns["level"]], row) if "level" in columns else None
    mpp = _parse_mpp(fields[columns["mpp"]], row) if "mpp" in columns else None
    path = Path(name).expanduser()
    path = (path if path.is_absolute() else base / path).resolve()
    if not path.exists():
        raise RowError(row, f"image {name!r} not found (looked for {path})")
    try:
        info = _probe(path)
    except Exception as exc:  # any reader failure becomes one clear line
        raise RowError(row, f"cannot read {name!r}: {_describe(exc, command)}") from exc
    return Sample(path=path, label=label, row=row, level=level, mpp=mpp), info


def _check_consistent(samples: Sequence[Sample], infos: Sequence[ImageInfo]) -> None:
    first = infos[0]
    for sample, info in zip(samples, infos, strict=True):
        if info.channels != first.channels:
            raise RowError(
                sample.row,
                f"image has {info.channels} channel(s) but row {samples[0].row} has "
                f"{first.channels}; all images must have the same channels",
            )
        if info.dtype != first.dtype:
            raise RowError(
                sample.row,
                f"image is {info.dtype} but row {samples[0].row} is {first.dtype}; all images "
                "must have the same pixel type",
            )


def _log_summary(shown: str, dataset: Dataset) -> None:
    sizes = {(i.height, i.width) for i in dataset.infos}
    log.info(
        "%s: %d images, %d channel(s) %s, %d distinct size(s), task %s",
        shown,
        len(dataset),
        dataset.channels,
        dataset.infos[0].dtype,
        len(sizes),
        dataset.task,
    )
    target = dataset.target_shape
    if target is None:
        return
    crop = sum(1 for i in dataset.infos if i.height > target[0] or i.width > target[1])
    pad = sum(1 for i in dataset.infos if i.height < target[0] or i.width < target[1])
    if crop or pad:
        log.warning(
            "%s: %d image(s) will be center-cropped and %d zero-padded to %dx%d (see "
            "tileplan.run.data.fit_to_shape)",
            shown,
            crop,
            pad,
            target[0],
            target[1],
        )


def _resolve_rows(
    samples: Sequence[Sample], target_shape: Sequence[int] | None, settings: DataSettings,
    command: str | None,
) -> tuple[list[Resolved], list[RowError]]:  # fmt: skip
    from tileplan.run.slides import resolve

    resolved, errors = [], []
    for sample in samples:
        level = sample.level if sample.level is not None else settings.level
        mpp = None if sample.level is not None else settings.mpp
        try:
            found = resolve(sample.path, level=level, mpp=mpp, tissue=settings.tissue,
                            max_shape=target_shape, oversize=settings.oversize,
                            assume_mpp=settings.assume_mpp, row_mpp=sample.mpp)  # fmt: skip
            resolved.append(found)
        except Exception as exc:  # any reader failure becomes one clear line
            errors.append(RowError(sample.row, f"'{sample.path.name}' {_describe(exc, command)}"))
    return resolved, errors


def load_csv(
    path: str | os.PathLike[str],
    target_shape: Sequence[int] | None = None,
    settings: DataSettings | None = None,
    n_axes: int = 2,
    command: str | None = None,
) -> Dataset:
    """Read and validate a dataset CSV (columns ``image,label``) before any training starts.

    Every row is checked: the label must be a finite number, the image must exist and its
    header must be readable and supported (see the module docstring). Only headers are read.
    All rows are checked; the first problem is raised, and every problem is logged.

    Args:
        path: the CSV file; image paths in it are relative to its folder.
        target_shape: ``(H, W)`` the plan expects; images of another size are fitted with
            :func:`fit_to_shape` when read (and counted in a log warning now). With
            ``settings`` it is the largest size instead (see the module docstring).
        settings: read images region by region as slides (resolution, tissue, oversize
            policy), each at its own size; every row is resolved and checked now.
        n_axes: spatial axes of the plan's images: 3 reads every row as a volume
            (``tileplan.run.volumes.load_volume_csv``, which needs ``settings``).
        command: the command reading it (``train``, ``profile``): messages offer only fixes
            with its options (``tileplan.run.advice``); None: every fix.

    Returns:
        The validated :class:`Dataset`.

    Raises:
        DataError: one line naming the CSV, the 1-based data row and the fix, e.g.
            ``train.csv row 3: cannot read 'img3.tif': ...; fix or remove the row``.
    """
    if n_axes == 3:
        from tileplan.run.volumes import load_volume_csv
        from tileplan.settings import DataSettings as Settings

        return load_volume_csv(path, target_shape, settings or Settings(), command=command)
    shown = os.fspath(path)
    csv_path = Path(path)
    columns, rows = read_csv_rows(csv_path, shown)
    if "spacing" in columns:
        raise DataError(f"{shown}: the 'spacing' column states the voxel spacing of volumes, and "
                        "these are 2-D images; remove the column", csv_path=csv_path)  # fmt: skip
    base = csv_path.absolute().parent
    samples: list[Sample] = []
    infos: list[ImageInfo] = []
    errors: list[RowError] = []
    for row, fields in rows:
        try:
            sample, info = _parse_row(row, fields, columns, base, command)
        except RowError as exc:
            errors.append(exc)
            continue
        samples.append(sample)
        infos.append(info)
    if not errors:
        try:
            _check_consistent(samples, infos)
        except RowError as exc:
            errors.append(exc)
    resolved: list[Resolved] = []
    if settings is not None and not errors:
        resolved, errors = _resolve_rows(samples, target_shape, settings, command)
    if errors:
        for err in errors:
            log.error("%s row %d: %s", shown, err.row, err.reason)
        more = f" ({len(errors) - 1} more bad row(s) logged)" if len(errors) > 1 else ""
        first = errors[0]
        raise DataError(
            f"{shown} row {first.row}: {first.reason}; {FIX_ROW}{more}",
            csv_path=csv_path,
            row=first.row,
        )
    if settings is None:
        dataset = Dataset(samples, infos, target_shape, csv_path)
        _log_summary(shown, dataset)
        return dataset
    infos = [ImageInfo(i.channels, *r.region.shape, i.dtype, i.reader)
             for i, r in zip(infos, resolved, strict=True)]  # fmt: skip
    dataset = Dataset(samples, infos, target_shape, csv_path,
                      regions=[r.region for r in resolved],
                      pyramids=[r.pyramid for r in resolved])  # fmt: skip
    _log_slides(shown, dataset, settings, resolved)
    return dataset


def _log_slides(
    shown: str, dataset: Dataset, settings: DataSettings, resolved: Sequence[Resolved]
) -> None:
    sizes = [i.height * i.width for i in dataset.infos]
    log.info("%s: %d images at %s, %.1f to %.1f MP each, task %s", shown, len(dataset),
             settings.describe(), min(sizes) / 1e6, max(sizes) / 1e6, dataset.task)  # fmt: skip
    for sample, r in zip(dataset.samples, resolved, strict=True):
        if r.cropped_from is not None:
            log.warning(
                "%s row %d: '%s' is %dx%d px, larger than the plan's %s; streaming its "
                "centre %dx%d (--oversize refuse to refuse it instead)",
                shown, sample.row, sample.path.name, *r.cropped_from,
                "x".join(map(str, dataset.target_shape or ())), *r.region.shape,
            )  # fmt: skip
