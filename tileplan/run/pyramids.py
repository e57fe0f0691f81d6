"""Whole-slide image files as pyramids: their levels and resolution from the header, and
readers of a level's regions as stored.

Readers
    - Vendor formats (``.svs``, ``.ndpi``, ``.mrxs``, ``.scn``, ``.bif``, ``.vms``, ``.vmu``,
      ``.svslide``) and DICOM whole-slide images (``.dcm``: a file of the series, or the
      series folder; OpenSlide 4 finds the other levels beside it) through OpenSlide
      (``openslide-python`` with the ``openslide-bin`` wheel: no system package): the header,
      levels and microns per pixel (``openslide.mpp-x``/``-y``). Pixels: an Aperio ``.svs``
      whose levels tifffile sees alike is decoded by tifffile, tile by tile, exactly as
      stored. Otherwise OpenSlide reads them, at level-0 coordinates ``y * d_l, x * d_l``;
      OpenSlide interpolates a level whose downsample ``d_l`` is not an integer (a read would
      then depend on where the region starts), so only levels with an integer downsample on
      both axes are used: ``--mpp`` picks among them and ``--level`` of another one is
      refused. The alpha channel is dropped (0 outside the scanned area).
    - TIFF (``.tif``/``.tiff``, plain or pyramidal: SubIFDs or a page per level, as tifffile's
      ``series[0].levels`` sees them) through tifffile. A region read decodes only the tiles
      (or strips) it touches. Microns per pixel come from XResolution/YResolution with
      ResolutionUnit centimetre or inch; ``none`` means no metadata.
    - PNG, JPEG and ``.npy`` are single-level images without mpp, decoded whole
      (``tileplan.run.images.read_image``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tifffile
import torch

from tileplan.run.images import probe_image, read_image
from tileplan.run.pixels import BadImageError, Layout, out_dtype
from tileplan.run.tiff import check_tiff_extent, decode_first_segment, open_tiff, tiff_layout

__all__ = [
    "OPENSLIDE_SUFFIXES", "Backend", "LevelReader", "Pyramid", "dicom_series_file",
    "is_openslide_file", "open_level_reader", "open_pyramid",
]  # fmt: skip


#: File name suffixes (lower case) read through OpenSlide.
OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm"}
)
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
Backend = Literal["openslide", "tifffile", "array"]


@dataclass(frozen=True)
class Pyramid:
    """A slide's levels as stored, from its header.

    Attributes:
        path: the file.
        backend: what reads it: ``openslide``, ``tifffile`` or ``array`` (whole image).
        levels: ``(H, W)`` of each level in px, level 0 (full resolution) first.
        mpp: ``(y, x)`` microns per pixel of level 0, or None without metadata.
        channels: channels of a read (alpha dropped, gray = 1).
        dtype: ``"uint8"`` or ``"float32"``.
    """

    path: Path
    backend: Backend
    levels: tuple[tuple[int, int], ...]
    mpp: tuple[float, float] | None
    channels: int
    dtype: Literal["uint8", "float32"]

    def exact(self, level: int) -> bool:
        """Whether ``level`` reads exactly as stored from any origin: always, except through
        OpenSlide at a non-integer downsample (which it interpolates)."""
        (h0, w0), (h, w) = self.levels[0], self.levels[level]
        return self.backend != "openslide" or (h0 % h == 0 and w0 % w == 0)

    def level_mpp(self, level: int) -> tuple[float, float] | None:
        """``(y, x)`` µm/px of a level: level 0's scaled by the ratio of the sizes."""
        if self.mpp is None:
            return None
        (h0, w0), (h, w) = self.levels[0], self.levels[level]
        return (self.mpp[0] * h0 / h, self.mpp[1] * w0 / w)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.uint8 if self.dtype == "uint8" else torch.float32


def is_openslide_file(path: Path) -> bool:
    return path.suffix.lower() in OPENSLIDE_SUFFIXES


def open_pyramid(path: str | os.PathLike[str]) -> Pyramid:
    """Read a slide's (or an image's) levels and resolution from its header.

    Raises:
        BadImageError: the file cannot be read as a slide (the caller adds file and row).
    """
    path = Path(path)
    if path.is_dir() and path.suffix.lower() not in OPENSLIDE_SUFFIXES | _TIFF_SUFFIXES:
        path = dicom_series_file(path)  # a DICOM series folder (an image's name: not one)
    if not path.is_file():
        raise BadImageError("file not found" if not path.exists() else "not a regular file")
    suffix = path.suffix.lower()
    if suffix in OPENSLIDE_SUFFIXES:
        return _probe_openslide(path)
    if suffix in _TIFF_SUFFIXES:
        return _probe_tiff_pyramid(path)
    info = probe_image(path)
    return Pyramid(path, "array", ((info.height, info.width),), None, info.channels, info.dtype)


def dicom_series_file(folder: Path) -> Path:
    """A file of the DICOM whole-slide image series in ``folder`` (OpenSlide opens the series
    from any one of its files, finding the other levels beside it).

    Raises:
        BadImageError: no ``.dcm`` file in the folder.
    """
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".dcm" and p.is_file())
    if not files:
        raise BadImageError("is a folder without .dcm files; give a DICOM whole-slide image "
                            "series folder, or a slide file")  # fmt: skip
    return files[0]


def _probe_openslide(path: Path) -> Pyramid:
    import openslide

    try:
        slide = openslide.OpenSlide(path)
    except openslide.OpenSlideUnsupportedFormatError:
        raise BadImageError("OpenSlide does not recognise this file as a slide") from None
    except openslide.OpenSlideError as err:
        raise BadImageError(f"OpenSlide cannot read it ({err})") from None
    try:
        levels = tuple((h, w) for w, h in slide.level_dimensions)
        props = slide.properties
        mpp = None
        if openslide.PROPERTY_NAME_MPP_X in props and openslide.PROPERTY_NAME_MPP_Y in props:
            mpp_x = float(props[openslide.PROPERTY_NAME_MPP_X])
            mpp_y = float(props[openslide.PROPERTY_NAME_MPP_Y])
            mpp = (mpp_y, mpp_x) if mpp_x > 0 and mpp_y > 0 else None
        # Decode one region now: a truncated or corrupt file fails here, not in training.
        w, h = slide.level_dimensions[-1]
        slide.read_region((0, 0), slide.level_count - 1, (min(w, 64), min(h, 64)))
        vendor = slide.properties.get(openslide.PROPERTY_NAME_VENDOR)
    except openslide.OpenSlideError as err:
        raise BadImageError(f"OpenSlide cannot read it ({err})") from None
    finally:
        slide.close()
    if vendor == "aperio":  # a TIFF: decode its tiles exactly, as stored, if tifffile agrees
        try:
            tiff = _probe_tiff_pyramid(path)
        except BadImageError:
            raise  # truncated or corrupt as a TIFF: say so now, not during training
        except Exception:  # noqa: BLE001 (e.g. a codec tifffile lacks: OpenSlide reads it)
            tiff = None
        if tiff is not None and tiff.levels == levels and tiff.channels == 3:
            return Pyramid(path, "tifffile", levels, mpp, 3, tiff.dtype)
    return Pyramid(path, "openslide", levels, mpp, 3, "uint8")


def _tiff_mpp(page: Any) -> tuple[float, float] | None:
    unit = int(page.resolutionunit)
    per_um = {int(tifffile.RESUNIT.CENTIMETER): 1e4, int(tifffile.RESUNIT.INCH): 25400.0}
    if unit not in per_um:
        return None
    try:
        res_x, res_y = page.resolution  # px per unit
    except (TypeError, ValueError):
        return None
    if not (res_x > 0 and res_y > 0 and math.isfinite(res_x) and math.isfinite(res_y)):
        return None
    return (per_um[unit] / res_y, per_um[unit] / res_x)


def _probe_tiff_pyramid(path: Path) -> Pyramid:
    with open_tiff(path) as tif:
        pages = _tiff_levels(tif)
        dtype: Literal["uint8", "float32"] = "uint8"
        channels = 0
        levels = []
        for k, page in enumerate(pages):
            layout, h, w = tiff_layout(page)
            if k == 0:
                dtype, channels = out_dtype(np.dtype(page.dtype)), layout.channels
            check_tiff_extent(page, path.stat().st_size)
            levels.append((h, w))
        decode_first_segment(tif, pages[-1])
        mpp = _tiff_mpp(pages[0])
    return Pyramid(path, "tifffile", tuple(levels), mpp, channels, dtype)


def _tiff_levels(tif: Any) -> list[Any]:
    """The pages of the pyramid of the first series, level 0 first (a plain TIFF has one)."""
    if not len(tif.pages):
        raise BadImageError("TIFF file has no pages")
    series = tif.series[0] if tif.series else None
    if series is None:
        return [tif.pages[0]]
    pages = []
    for level in series.levels:
        page = level.keyframe
        if len(pages) and (page.imagelength, page.imagewidth) >= (
            pages[-1].imagelength,
            pages[-1].imagewidth,
        ):
            break  # not a reduced level: keep the pyramid proper
        pages.append(page)
    return pages or [tif.pages[0]]


class LevelReader:
    """Reads ``(C, h, w)`` regions of a level as stored."""

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _OpenSlideReader(LevelReader):
    def __init__(self, path: Path) -> None:
        import openslide

        self._slide = openslide.OpenSlide(path)

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        # Integer downsample (Pyramid.exact): level px * ds is exactly level-0 px.
        (h0, w0), (lh, lw) = self._slide.level_dimensions[0][::-1], self._slide.level_dimensions[
            level][::-1]  # fmt: skip
        location = (x0 * (w0 // lw), y0 * (h0 // lh))
        region = self._slide.read_region(location, level, (w, h))
        return np.asarray(region)[..., :3].transpose(2, 0, 1)  # RGBA (h, w, 4) -> (3, h, w)

    def close(self) -> None:
        self._slide.close()


class _TiffReader(LevelReader):
    """Decodes only the tiles (or strips) a region touches."""

    def __init__(self, path: Path) -> None:
        self._tif = open_tiff(path)
        self._pages = _tiff_levels(self._tif)
        self._layouts = [tiff_layout(p)[0] for p in self._pages]

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        page, layout = self._pages[level], self._layouts[level]
        raw = _read_page_region(self._tif, page, y0, x0, h, w)  # (S, h, w)
        return _apply_layout(raw, layout)

    def close(self) -> None:
        self._tif.close()


class _ArrayReader(LevelReader):
    def __init__(self, path: Path) -> None:
        self._image = read_image(path)  # (C, H, W)

    def read(self, level: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return self._image[:, y0 : y0 + h, x0 : x0 + w].numpy()


_READERS: dict[Backend, type[LevelReader]] = {
    "openslide": _OpenSlideReader,
    "tifffile": _TiffReader,
    "array": _ArrayReader,
}


def _read_page_region(tif: Any, page: Any, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """Pixels ``[y0, y0+h) x [x0, x0+w)`` of a TIFF page as ``(S, h, w)``, decoding only the
    segments (tiles or strips) that overlap the region."""
    height, width = page.imagelength, page.imagewidth
    samples = int(page.samplesperpixel)
    separate = samples > 1 and int(page.planarconfig) == int(tifffile.PLANARCONFIG.SEPARATE)
    if page.is_tiled:
        seg_h, seg_w = page.tilelength, page.tilewidth
    else:
        seg_h, seg_w = min(page.rowsperstrip or height, height), width
    across, down = -(-width // seg_w), -(-height // seg_h)
    out = np.zeros((samples, h, w), dtype=page.dtype)
    fh = tif.filehandle
    for plane in range(samples if separate else 1):
        for ty in range(y0 // seg_h, (y0 + h - 1) // seg_h + 1):
            for tx in range(x0 // seg_w, (x0 + w - 1) // seg_w + 1):
                index = (plane * down + ty) * across + tx
                count = page.databytecounts[index]
                if not count:
                    continue  # a missing segment reads as zeros
                decode = page.decode  # building it may move the file position: first
                fh.seek(page.dataoffsets[index])
                data = fh.read(count)
                if len(data) < count:  # tifffile would decode the short read as zeros
                    raise OSError(f"the file is truncated: tile {index} runs to byte "
                                  f"{page.dataoffsets[index] + count} but the file ends at "
                                  f"{page.dataoffsets[index] + len(data)}")  # fmt: skip
                segment, _, _ = decode(data, index, jpegtables=page.jpegtables)
                seg = np.asarray(segment).reshape(segment.shape[-3:])  # (seg_h', seg_w', s)
                sy, sx = ty * seg_h, tx * seg_w
                a_y, b_y = max(y0, sy), min(y0 + h, sy + seg.shape[0], height)
                a_x, b_x = max(x0, sx), min(x0 + w, sx + seg.shape[1], width)
                part = seg[a_y - sy : b_y - sy, a_x - sx : b_x - sx].transpose(2, 0, 1)
                target = slice(plane, plane + 1) if separate else slice(0, samples)
                out[target, a_y - y0 : b_y - y0, a_x - x0 : b_x - x0] = part
    return out


def _apply_layout(raw: np.ndarray, layout: Layout) -> np.ndarray:
    """``(S, h, w)`` as stored -> ``(C, h, w)`` uint8/float32 as ``read_image`` returns."""
    data = raw[: layout.channels]
    dtype = np.uint8 if out_dtype(raw.dtype) == "uint8" else np.float32
    data = np.ascontiguousarray(data, dtype=dtype)
    if layout.invert and dtype == np.uint8:
        np.subtract(255, data, out=data)
    return data


def open_level_reader(pyramid: Pyramid) -> LevelReader:
    """An open reader of ``pyramid``'s levels (``close()`` it when done)."""
    return _READERS[pyramid.backend](pyramid.path)
