"""Whole-slide images: pyramids on disk, read region by region at a chosen resolution.

Readers
    Levels and regions as stored come from ``tileplan.run.pyramids`` (OpenSlide formats, DICOM
    series, TIFF, and single-level images).

Resolution (:func:`choose_region`)
    ``level=N`` reads level N as stored. ``mpp=M`` reads the coarsest level that has at least
    as many pixels as the slide has at M µm/px (``round(size_0 * mpp_0 / M)`` per axis) and
    area-averages it down to exactly that size: output pixel ``i`` of an axis with ``L`` level
    pixels and ``O`` output pixels is the mean of the level interval ``[i L / O, (i+1) L / O)``,
    fractional pixels weighted by their overlap. Weights are exact integer ratios and every
    output pixel is computed from global coordinates in a fixed order, so a region read equals
    the same part of a whole-image read bit for bit, which is what makes streaming from a
    slide identical to streaming its pixels from memory (``executor.sources``).

Tissue (:func:`tissue_box`)
    The bounding box of tissue: Otsu's threshold (``skimage.filters.threshold_otsu``) on the
    HSV saturation of a thumbnail (the coarsest level, area-averaged to at most 2048 px per
    side), objects smaller than 0.1% of the thumbnail removed; glass is grey-white, stained
    tissue saturated. The box is cached per slide (path, size, modification time) in
    ``$TILEPLAN_CACHE/tissue`` (default ``~/.cache/tileplan``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from executor import atomic_write
from tileplan.run.advice import Fix, UnusableImageError
from tileplan.run.file_source import FileSource
from tileplan.run.pyramids import (
    OPENSLIDE_SUFFIXES,
    LevelReader,
    Pyramid,
    dicom_series_file,
    open_level_reader,
    open_pyramid,
)
from tileplan.run.resample import area_taps, resample_axis, round_ratio
from tileplan.settings import describe_resolution

__all__ = [
    "OPENSLIDE_SUFFIXES",
    "dicom_series_file",
    "Pyramid",
    "Region",
    "SlideSource",
    "choose_region",
    "open_pyramid",
    "thumbnail",
    "tissue_box",
]

log = logging.getLogger(__name__)

_THUMBNAIL_SIDE = 2048  # px, longest side of the image tissue is looked for on
_TISSUE_METHOD = "otsu-saturation-v1"  # changes invalidate cached boxes


# --------------------------------------------------------------------------------------------
# What a slide is
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Level readers (an open file; one read at a time)
# --------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Resolution and region
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """What is streamed from a slide: a box of one level resampled to a resolution.

    Attributes:
        level: the pyramid level read.
        scaled: ``(H, W)`` of the whole level at the asked resolution (the level's own size
            when no resampling is needed).
        box: ``(y0, x0, h, w)`` streamed, in px of ``scaled``.
    """

    level: int
    scaled: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.box[2], self.box[3])

    def with_box(self, box: tuple[int, int, int, int]) -> Region:
        return Region(self.level, self.scaled, box)


# Fixes for slides that cannot be read as asked (``tileplan.run.advice``).
_OTHER_LEVEL = Fix("choose another --level (or a CSV 'level' column)", ("--level",), csv=True)
_STATE_MPP = Fix("state its resolution with --assume-mpp M", ("--assume-mpp",))
_STATE_MPP_CSV = Fix("with a CSV 'mpp' column", csv=True)
_BY_LEVEL = Fix("read it by --level instead", ("--level",))


def choose_region(pyramid: Pyramid, *, level: int | None = None, mpp: float | None = None
                  ) -> Region:  # fmt: skip
    """The level to read and the size it is resampled to, for the whole slide: ``level`` as
    stored, or the resolution ``mpp`` (µm/px); neither means level 0.

    Raises:
        UnusableImageError: no such level; mpp asked of a slide without mpp metadata; an mpp
            finer than the slide's level 0.
    """
    n = len(pyramid.levels)
    if mpp is None:
        level = level or 0
        if level >= n:
            raise UnusableImageError(f"has no level {level} (it has {n}: 0..{n - 1})", _OTHER_LEVEL)
        if not pyramid.exact(level):
            (h0, w0), (h, w) = pyramid.levels[0], pyramid.levels[level]
            raise UnusableImageError(
                f"level {level} ({h}x{w} of {h0}x{w0} px) has a non-integer downsample, which "
                "OpenSlide reads interpolated (not the same pixels from every tile)",
                Fix("use --mpp or --level 0", ("--mpp", "--level")),
            )
        h, w = pyramid.levels[level]
        return Region(level, (h, w), (0, 0, h, w))
    (h0, w0) = pyramid.levels[0]
    if pyramid.mpp is None:
        raise UnusableImageError(
            f"records no resolution (it is {h0}x{w0} px, no microns per pixel), and the run "
            f"reads images at {mpp:g} µm/px", _STATE_MPP, _STATE_MPP_CSV, _BY_LEVEL,
        )  # fmt: skip
    mpp_y, mpp_x = pyramid.mpp
    target = (round(h0 * mpp_y / mpp), round(w0 * mpp_x / mpp))
    if target[0] > h0 or target[1] > w0:
        raise UnusableImageError(
            f"is scanned at {mpp_x:.4g} µm/px, coarser than the {mpp:g} µm/px the run reads at",
            Fix(f"read at --mpp {mpp_x:.4g} or more", ("--mpp",)),
        )
    if min(target) < 1:
        raise UnusableImageError(
            f"is {h0}x{w0} px at {mpp_x:.4g} µm/px: smaller than one pixel at {mpp:g} µm/px",
            Fix("read at a finer --mpp", ("--mpp",)),
        )
    # The coarsest level with at least the target's pixels on both axes: the least to decode.
    best = max(k for k, (h, w) in enumerate(pyramid.levels)
               if h >= target[0] and w >= target[1] and pyramid.exact(k))  # fmt: skip
    return Region(best, target, (0, 0, *target))


def _block_mean(data: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """Mean of every ``fy x fx`` block of a uint8 ``(C, fy n, fx m)`` array as ``(C, n, m)``
    uint8, rounded half up: the integer factors' case of the area average, as an exact
    integer sum of strided slices in the narrowest type that holds it (15x faster than a
    reduction over a reshaped array)."""
    count = fy * fx
    top = 255 * count + count // 2
    kind = np.uint16 if top < 2**16 else np.uint32 if top < 2**32 else np.uint64
    rows = data[:, 0::fy].astype(kind)
    for k in range(1, fy):
        rows += data[:, k::fy]
    total = rows[:, :, 0::fx].copy()
    for k in range(1, fx):
        total += rows[:, :, k::fx]
    total += count // 2
    total //= count  # == (2 total + count) // (2 count): the same rounding as round_ratio
    return total.astype(np.uint8)


class SlideSource(FileSource):
    """A region of a slide as an ``executor.ImageSource``: ``(1, C, h, w)`` read on demand.

    Each ``read`` decodes only the level's part that the asked region needs (plus, when
    resampling, the level pixels its edge output pixels overlap), and resamples it with
    ``area_taps``, so any region equals the same part of a whole read bit for bit. The file is
    opened on the first read and kept open (one read at a time) until ``close``.
    """

    def __init__(self, pyramid: Pyramid, region: Region) -> None:
        super().__init__()
        self.pyramid = pyramid
        self.region = region

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.pyramid.channels, *self.region.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.pyramid.torch_dtype

    @property
    def path(self) -> Path:
        return self.pyramid.path

    def read(self, region: Sequence[slice]) -> torch.Tensor:
        (ys, xs) = region
        y0, x0, h, w = self.region.box
        if not (0 <= ys.start < ys.stop <= h and 0 <= xs.start < xs.stop <= w):
            raise IndexError(f"region {ys.start}:{ys.stop} x {xs.start}:{xs.stop} is not inside "
                             f"the {h}x{w} px image of {self.pyramid.path.name}")  # fmt: skip
        # In px of the scaled level.
        a_y, b_y, a_x, b_x = y0 + ys.start, y0 + ys.stop, x0 + xs.start, x0 + xs.stop
        level_h, level_w = self.pyramid.levels[self.region.level]
        out_h, out_w = self.region.scaled
        level = self.region.level
        with self._lock:
            reader: LevelReader = self._reading()
            if (level_h, level_w) == (out_h, out_w):
                with self._decoding(f"level {level}, region y {a_y}:{b_y} x {a_x}:{b_x} px"):
                    data = reader.read(level, a_y, a_x, b_y - a_y, b_x - a_x)
                return torch.from_numpy(np.ascontiguousarray(data))[None]
            taps_y, taps_x = (
                area_taps(a_y, b_y, level_h, out_h),
                area_taps(a_x, b_x, level_w, out_w),
            )
            (*_, lo_y, hi_y), (*_, lo_x, hi_x) = taps_y, taps_x
            with self._decoding(f"level {level}, region y {lo_y}:{hi_y} x {lo_x}:{hi_x} px"):
                data = reader.read(level, lo_y, lo_x, hi_y - lo_y, hi_x - lo_x)
        if data.dtype == np.uint8 and level_h % out_h == 0 and level_w % out_w == 0:
            return torch.from_numpy(_block_mean(data, level_h // out_h, level_w // out_w))[None]
        rows, den_y = resample_axis(data, 1, taps_y, level_h, out_h)
        both, den_x = resample_axis(rows, 2, taps_x, level_w, out_w)
        if data.dtype == np.uint8:  # exact integer sum / exact integer count, rounded once
            scaled = round_ratio(both, den_y * den_x).astype(np.uint8)
        else:
            scaled = both.astype(np.float32)
        return torch.from_numpy(scaled)[None]

    def rescaled(self, factor: float) -> SlideSource:
        """This region read at ``factor`` times its µm/px (coarser above 1; scale jitter):
        the whole level resampled to ``round(scaled / factor)`` px from the coarsest level with
        as many (never finer than level 0), the box scaled alike and, where it came out larger
        than this region, centre-cropped to this region's size, so that an image never grows.
        """
        (sh, sw), (h0, w0) = self.region.scaled, self.pyramid.levels[0]
        g = min(1.0 / factor, h0 / sh, w0 / sw)  # px per px of this region's resolution
        th, tw = max(1, min(h0, round(sh * g))), max(1, min(w0, round(sw * g)))
        level = max(k for k, (h, w) in enumerate(self.pyramid.levels)
                    if h >= th and w >= tw and (k == 0 or self.pyramid.exact(k)))  # fmt: skip
        y0, x0, h, w = self.region.box
        # The box in px of the new size: start rounded down, size rounded, inside the level.
        ny0, nx0 = min(th - 1, (y0 * th) // sh), min(tw - 1, (x0 * tw) // sw)
        nh = max(1, min(th - ny0, round(h * th / sh)))
        nw = max(1, min(tw - nx0, round(w * tw / sw)))
        if nh > h:
            ny0, nh = ny0 + (nh - h) // 2, h
        if nw > w:
            nx0, nw = nx0 + (nw - w) // 2, w
        return SlideSource(self.pyramid, Region(level, (th, tw), (ny0, nx0, nh, nw)))

    def _open_reader(self) -> LevelReader:
        return open_level_reader(self.pyramid)

    def _state(self) -> dict[str, Any]:
        return {"pyramid": self.pyramid, "region": self.region}


# --------------------------------------------------------------------------------------------
# Thumbnails and tissue
# --------------------------------------------------------------------------------------------


def thumbnail(pyramid: Pyramid, max_side: int = _THUMBNAIL_SIDE) -> np.ndarray:
    """The whole slide as ``(h, w, C)`` with its longest side at most ``max_side`` px: the
    coarsest level, area-averaged down when it is still larger."""
    level = len(pyramid.levels) - 1
    h, w = pyramid.levels[level]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
    source = SlideSource(pyramid, Region(level, size, (0, 0, *size)))
    try:
        strips = []
        step = max(1, (64 << 20) // max(1, 8 * pyramid.channels * w * max(1, round(1 / scale))))
        for top in range(0, size[0], step):  # strips: bounded memory for a huge level
            strips.append(source.read((slice(top, min(size[0], top + step)), slice(0, size[1]))))
    finally:
        source.close()
    return torch.cat(strips, dim=2)[0].permute(1, 2, 0).numpy()


def _cache_file(path: Path) -> Path:
    root = Path(os.environ.get("TILEPLAN_CACHE", Path.home() / ".cache" / "tileplan"))
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_TISSUE_METHOD}"
    return root / "tissue" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def tissue_box(pyramid: Pyramid) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, x0, y1, x1)`` of the tissue in level-0 px (end exclusive), found on a
    thumbnail (see the module docstring) and cached per slide.

    Raises:
        BadImageError: no tissue found (a blank slide, or one image of uniform colour).
    """
    cache = _cache_file(pyramid.path)
    if cache.is_file():
        try:
            box = tuple(int(v) for v in json.loads(cache.read_text())["box"])
            if len(box) == 4:
                return box  # type: ignore[return-value]
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            log.warning("ignoring unreadable tissue cache %s", cache)
    box = _find_tissue(pyramid)
    try:
        text = json.dumps({"path": str(pyramid.path), "box": box, "method": _TISSUE_METHOD})
        atomic_write(cache, lambda f: f.write(text.encode()))
    except OSError as err:  # a read-only home must not stop training
        log.warning("cannot cache the tissue box in %s (%s)", cache, err)
    return box


_NO_TISSUE = Fix("read it without --tissue", ("--tissue",))


def _find_tissue(pyramid: Pyramid) -> tuple[int, int, int, int]:
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import remove_small_objects

    thumb = thumbnail(pyramid)
    if thumb.shape[2] != 3:
        raise UnusableImageError(f"has {thumb.shape[2]} channel(s), and the tissue box is found on "
                           "colour saturation (RGB only)", _NO_TISSUE)  # fmt: skip
    rgb = thumb.astype(np.float64) / (255.0 if thumb.dtype == np.uint8 else 1.0)
    saturation = rgb2hsv(np.clip(rgb, 0.0, 1.0))[..., 1]
    if float(saturation.max()) == float(saturation.min()):
        raise UnusableImageError("shows no tissue (uniform colour)", _NO_TISSUE)
    mask = saturation > threshold_otsu(saturation)
    mask = remove_small_objects(mask, max_size=max(1, mask.size // 1000))
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(rows):
        raise UnusableImageError("shows no tissue", _NO_TISSUE)
    (h0, w0), (th, tw) = pyramid.levels[0], mask.shape
    # Thumbnail pixel r covers level-0 rows [r h0 / th, (r+1) h0 / th): floor and ceil.
    return ((int(rows[0]) * h0) // th, (int(cols[0]) * w0) // tw,
            -((-(int(rows[-1]) + 1) * h0) // th), -((-(int(cols[-1]) + 1) * w0) // tw))  # fmt: skip


def box_in(region: Region, level0: tuple[int, int], box0: tuple[int, int, int, int]
           ) -> tuple[int, int, int, int]:  # fmt: skip
    """A level-0 box ``(y0, x0, y1, x1)`` as ``(y0, x0, h, w)`` in px of ``region.scaled``,
    rounded outwards so the tissue stays inside."""
    (h0, w0), (h, w) = level0, region.scaled
    y0, x0 = (box0[0] * h) // h0, (box0[1] * w) // w0
    y1, x1 = -((-box0[2] * h) // h0), -((-box0[3] * w) // w0)
    return (y0, x0, max(1, y1 - y0), max(1, x1 - x0))


@dataclass(frozen=True)
class Resolved:
    """What a CSV row streams (see :func:`resolve`)."""

    pyramid: Pyramid
    region: Region
    cropped_from: tuple[int, int] | None  # the size before an oversize centre crop, if any


def resolve(path: Path, *, level: int | None, mpp: float | None, tissue: bool,
            max_shape: Sequence[int] | None, oversize: str = "crop",
            assume_mpp: float | None = None, row_mpp: float | None = None) -> Resolved:  # fmt: skip
    """Open a slide and decide what of it is streamed: the resolution (``level`` as stored or
    ``mpp``), the tissue box if asked, and the centre crop to ``max_shape`` (``oversize``
    ``crop``) or a refusal (``refuse``) for a larger image.

    Args:
        assume_mpp: the user's statement of level 0's µm/px for a file that records none.
        row_mpp: a CSV row's statement of it, which wins over the file's own.

    Raises:
        UnusableImageError: why the slide cannot be used this way (the caller adds file and row).
    """
    pyramid = open_pyramid(path)
    stated = row_mpp or (assume_mpp if pyramid.mpp is None else None)
    if stated is not None:
        pyramid = replace(pyramid, mpp=(stated, stated))
    region = choose_region(pyramid, level=level, mpp=mpp)
    if tissue:
        region = region.with_box(box_in(region, pyramid.levels[0], tissue_box(pyramid)))
    if max_shape is None:
        return Resolved(pyramid, region, None)
    (h, w), (mh, mw) = region.shape, max_shape
    if h <= mh and w <= mw:
        return Resolved(pyramid, region, None)
    what = describe_resolution(level, mpp)
    if oversize == "refuse":
        raise UnusableImageError(
            f"is {h}x{w} px at {what}{' (tissue box)' if tissue else ''}, larger than the "
            f"plan's {mh}x{mw}",
            Fix("stream its centre with --oversize crop", ("--oversize",)),
            Fix("read it at a coarser --mpp or a higher --level", ("--mpp", "--level")),
            Fix(f"use a plan made for at least {h}x{w} px"),
        )
    y0, x0, _, _ = region.box
    ch, cw = min(h, mh), min(w, mw)
    box = (y0 + (h - ch) // 2, x0 + (w - cw) // 2, ch, cw)  # centred; odd surplus: 1 px more after
    return Resolved(pyramid, region.with_box(box), (h, w))
