"""TIFF pages through tifffile: opening (failures said in one line: a compression the reader
cannot decode names its code and how to re-save the file), a page's layout as ``(C, H, W)``,
and cheap checks that its data is complete and decodes."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import tifffile

from tileplan.run.advice import UnusableImageError
from tileplan.run.pixels import BadImageError, Layout

__all__ = [
    "check_decodable", "check_tiff_extent", "decode_first_segment", "open_tiff", "tiff_layout",
]  # fmt: skip

# tifffile maps the Compression tag (259) to its enum; a code it does not know fails there.
_UNKNOWN_CODE = re.compile(r"(\d+) is not a known COMPRESSION")
_RESAVE = "re-save it with JPEG, deflate (zlib), LZW or no compression"


def open_tiff(path: Path) -> Any:
    """``tifffile.TiffFile(path)`` (a context manager), or an ``UnusableImageError`` saying why not.

    Raises:
        UnusableImageError: an unknown compression code, or not a TIFF tifffile can parse.
    """
    try:
        return tifffile.TiffFile(path)
    except ValueError as err:
        code = _UNKNOWN_CODE.search(str(err))
        if code:
            raise UnusableImageError(
                f"uses TIFF compression {code.group(1)}, which no TIFF decoder here "
                f"knows; {_RESAVE}"
            ) from None
        raise UnusableImageError(f"is not a readable TIFF ({' '.join(str(err).split())})") from None
    except tifffile.TiffFileError as err:
        raise UnusableImageError(f"is not a readable TIFF ({' '.join(str(err).split())})") from None


def check_decodable(page: Any, data: bytes, index: int) -> None:
    """Decode one stored tile or strip of ``page``; a codec this installation lacks (or
    garbage data) becomes an ``UnusableImageError`` naming the compression.

    Raises:
        UnusableImageError: the segment cannot be decoded.
    """
    try:
        page.decode(data, index, jpegtables=page.jpegtables)
    except Exception as err:  # tifffile raises what its codec raises
        code = int(page.compression)
        name = getattr(page.compression, "name", None)
        if name is None:  # a code tifffile does not know at all
            raise UnusableImageError(
                f"uses TIFF compression {code}, which no TIFF decoder here knows; {_RESAVE}"
            ) from None
        why = " ".join(str(err).split())[:120]
        raise UnusableImageError(
            f"uses TIFF compression {name} ({code}), which cannot be decoded here "
            f"({type(err).__name__}: {why}); {_RESAVE}"
        ) from None


_PHOTOMETRIC_MINISWHITE = int(tifffile.PHOTOMETRIC.MINISWHITE)
_PHOTOMETRIC_RGB = int(tifffile.PHOTOMETRIC.RGB)
_PHOTOMETRIC_YCBCR = int(tifffile.PHOTOMETRIC.YCBCR)  # JPEG-compressed slides (SVS, ...)
_PHOTOMETRIC_GRAY = int(tifffile.PHOTOMETRIC.MINISBLACK)
_PHOTOMETRIC_SUPPORTED = frozenset(
    {_PHOTOMETRIC_MINISWHITE, _PHOTOMETRIC_GRAY, _PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR}
)


def tiff_layout(page: Any) -> tuple[Layout, int, int]:
    axes, shape = page.axes, tuple(page.shape)
    photometric = int(page.photometric)
    if photometric not in _PHOTOMETRIC_SUPPORTED:
        name = getattr(page.photometric, "name", photometric)
        raise BadImageError(
            f"TIFF colour space {name} is not supported; convert it to RGB or grayscale"
        )
    if axes == "YX":
        return Layout("hw", 1, photometric == _PHOTOMETRIC_MINISWHITE), shape[0], shape[1]
    if axes not in ("YXS", "SYX"):
        raise BadImageError(
            f"TIFF layout '{axes}' {shape} is not a 2-D image; expected YX, YXS or SYX"
        )
    samples = int(page.samplesperpixel)
    keep = samples - len(page.extrasamples)  # extra samples (alpha, ...) are dropped
    if photometric in (_PHOTOMETRIC_RGB, _PHOTOMETRIC_YCBCR):
        keep = 3
    keep = max(1, min(keep, samples))
    invert = photometric == _PHOTOMETRIC_MINISWHITE
    if axes == "YXS":
        return Layout("hwc", keep, invert), shape[0], shape[1]
    return Layout("chw", keep, invert), shape[1], shape[2]


def check_tiff_extent(page: Any, file_size: int) -> None:
    ends = [o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False) if c]
    if not ends and page.shape and min(page.shape) > 0:
        raise BadImageError("TIFF page has no image data")
    if ends and max(ends) > file_size:
        raise BadImageError(
            f"file is truncated: image data runs to byte {max(ends)} but the file has "
            f"{file_size} bytes"
        )


def decode_first_segment(tif: Any, page: Any) -> None:
    """Decode one tile/strip: catches missing codecs and garbage data cheaply."""
    index = next((i for i, c in enumerate(page.databytecounts) if c), None)
    if index is None:
        return
    fh = tif.filehandle
    fh.seek(page.dataoffsets[index])
    check_decodable(page, fh.read(page.databytecounts[index]), index)
