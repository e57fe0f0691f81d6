"""2-D image files read whole (TIFF, PNG, JPEG, ``.npy``), and the shape policy for them.

Formats and layout
    - TIFF (``.tif``/``.tiff``; classic and BigTIFF; strips or tiles) through ``tifffile``: the
      first page (the full-resolution level of a pyramid). Uncompressed contiguous data is
      memory-mapped, and only the part kept by :func:`fit_to_shape` is copied into RAM;
      compressed data (zlib, and whatever ``imagecodecs`` provides) is decoded.
    - PNG and JPEG (``.png``, ``.jpg``, ``.jpeg``) through Pillow, without its
      decompression-bomb limit (large images are the point). EXIF orientation is not applied.
    - NumPy ``.npy`` through ``numpy.load(mmap_mode="r")``: a 2-D array is ``(H, W)``; a 3-D
      array is channel-last ``(H, W, C)`` when ``C = shape[-1] <= 4 < shape[0]``, else
      channel-first ``(C, H, W)``. All channels of an ``.npy`` array are kept.
    - Slide formats (``.svs``, ``.dcm``, ... and DICOM series folders) are handed to
      ``tileplan.run.slides``, which reads them by levels and regions.

    Images come back as channel-first ``(C, H, W)`` tensors: grayscale has ``C = 1``; an alpha
    channel (RGBA, gray+alpha, TIFF extra samples) is dropped; palette/CMYK/YCbCr images are
    converted to RGB. Pixel types: ``uint8`` stays ``uint8`` (4x less RAM than float; convert
    per tile on the compute device with ``tileplan.settings.Normalization``); floating-point
    ``.npy``/TIFF becomes ``float32``. Other types (``uint16``, signed integers, 1-bit) are
    refused with a message asking for 8-bit or float32 data, rather than rescaled silently.

Shape policy (:func:`fit_to_shape`)
    When a plan fixes the image shape ``(H, W)`` and an image differs, each spatial axis is
    handled on its own: an axis that is too long is **center-cropped** (start offset
    ``(size - target) // 2``, so an odd surplus loses one pixel more at the bottom/right); an
    axis that is too short is **zero-padded on both sides, centered** (``(target - size) // 2``
    before, the rest after). Nothing is resized or interpolated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from tileplan.run.advice import UnusableImageError
from tileplan.run.pixels import DTYPE_HINT, BadImageError, DataError, Layout, out_dtype
from tileplan.run.tiff import check_tiff_extent, decode_first_segment, open_tiff, tiff_layout

__all__ = [
    "IMAGE_SUFFIXES", "ImageInfo", "check_shape", "describe_error", "fit_to_shape", "probe_file",
    "probe_image", "read_image",
]  # fmt: skip

log = logging.getLogger(__name__)

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

_PIL_GRAY_MODES = frozenset({"1", "L", "LA", "La"})
_PIL_REFUSED_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_PIL_LOCK = threading.Lock()


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


def check_shape(shape: Sequence[int]) -> tuple[int, int]:
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
    th, tw = check_shape(shape)
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
# Readers
# --------------------------------------------------------------------------------------------


def _reader_for(path: Path) -> str:
    if path.is_dir() and path.suffix.lower() not in IMAGE_SUFFIXES:
        return "openslide"  # the folder of a DICOM whole-slide image series
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


def probe_file(path: Path) -> ImageInfo:
    """The header of ``path`` (see :func:`probe_image`), raising what its reader raised."""
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
        return probe_file(path)
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
    target = None if shape is None else check_shape(shape)
    try:
        array, layout = _READERS[_reader_for(path)](path)
        return _to_tensor(array, layout, target)
    except Exception as exc:  # any reader failure becomes one clear line
        raise DataError(f"cannot read '{path}': {_describe(exc)}") from exc
