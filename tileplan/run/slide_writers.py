"""Whole-slide image files written tile by tile with tifffile, in the Aperio SVS layout and
as pyramidal TIFF with SubIFD levels, from a ``SyntheticSlide``'s regions.

**Level sizes.** Levels have downsamples ``1, 4, 16, ...`` and sizes ``floor(level0 / ds)``
(what Aperio scanners write: CMU-1.svs is 46000x32914, 11500x8228, 2875x2057), stopping after
the first level whose long side is under :data:`SMALLEST_LEVEL_SIDE` (1024) px. OpenSlide
reports each level's downsample as the mean of the two axes' ratios, so it is ``4`` only when
the sides divide; its ``read_region`` on a reduced level divides the level-0 position by that
downsample and resamples (interpolates) when the result is fractional.

**SVS layout** (:func:`write_svs`), as OpenSlide's ``aperio`` driver expects:

- page 0: level 0, tiled, JPEG; ImageDescription ``Aperio Image Library ...`` with
  ``|AppMag = 40|MPP = 0.25`` (``AppMag = 10 / mpp``); OpenSlide turns ``MPP`` into
  ``openslide.mpp-x``/``-y``. That is the only place the pixel size is stored: the
  resolution tags say 1 px per unit, ResolutionUnit NONE;
- page 1: the thumbnail, stripped JPEG, long side :data:`THUMBNAIL_SIDE` (OpenSlide's
  associated image ``thumbnail``);
- pages 2, 3, ...: the reduced levels, tiled JPEG.

JPEG is stored like Aperio's ``JPEG/RGB``: PhotometricInterpretation RGB, no colour transform
and no chroma subsampling (tifffile also writes a harmless ``YCbCrSubSampling = (1, 1)`` tag).
``ycbcr=True`` writes the more common YCbCr 4:2:0 JPEG instead (PhotometricInterpretation
YCbCr, about 3x smaller). Both decode to identical pixels in OpenSlide and tifffile (both use
libjpeg-turbo's exact integer IDCT).

**Pyramidal TIFF layout** (:func:`write_pyramidal_tiff`): page 0 is level 0, tiled, and the
reduced levels are its SubIFDs (NewSubfileType 1), tiled, which tifffile reads as
``series[0].levels``. The pixel size is in XResolution/YResolution with ResolutionUnit
CENTIMETER (``1e4 / mpp`` px per cm at level 0, scaled by each level's size ratio). OpenSlide
ignores SubIFDs and opens such a file as a single-level ``generic-tiff``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import tifffile

from executor import atomic_write_path
from tileplan.run.demo_tissue import SyntheticSlide, check_seed, check_side, is_int

__all__ = [
    "SMALLEST_LEVEL_SIDE", "THUMBNAIL_SIDE", "Level", "check_mpp", "check_quality",
    "pyramid_levels", "write_pyramidal_tiff", "write_svs",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Automatic pyramids stop after the first level whose long side is under this, px.
SMALLEST_LEVEL_SIDE = 1024
#: Long side of the SVS thumbnail (page 1), px (smaller if the slide is smaller).
THUMBNAIL_SIDE = 1024
_APERIO_HEADER = "Aperio Image Library v12.0.15 \r\n"
_LEVEL_FACTOR = 4
_T = TypeVar("_T")
_R = TypeVar("_R")


def check_mpp(mpp: object) -> float:
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)):
        raise ValueError(f"mpp must be a positive number (micrometres per pixel), got {mpp!r}")
    if not (math.isfinite(mpp) and 0.0 < mpp <= 1000.0):
        raise ValueError(f"mpp must be in (0, 1000] micrometres per pixel, got {mpp!r}")
    return float(mpp)


def _check_tile(tile: object) -> int:
    if not is_int(tile) or not 16 <= tile <= 4096 or tile % 16:  # type: ignore[operator]
        raise ValueError(f"tile must be a multiple of 16 between 16 and 4096, got {tile!r}")
    return int(tile)  # type: ignore[call-overload]


def check_quality(quality: object) -> int:
    if not is_int(quality) or not 1 <= int(quality) <= 100:  # type: ignore[call-overload]
        raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}")
    return int(quality)  # type: ignore[call-overload]


def _check_workers(workers: int | None) -> int:
    if workers is None:
        return min(4, os.cpu_count() or 1)
    if not is_int(workers) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return int(workers)


@dataclass(frozen=True)
class Level:
    """One pyramid level: integer ``downsample`` and its size ``floor(level0 / downsample)``."""

    downsample: int
    height: int
    width: int


def pyramid_levels(
    height: int, width: int, downsamples: Sequence[int] | None = None
) -> tuple[Level, ...]:
    """The levels written for a slide of ``height x width``.

    Args:
        height: level-0 rows.
        width: level-0 columns.
        downsamples: explicit increasing integer downsamples starting with 1; by default
            ``1, 4, 16, ...`` up to and including the first level whose long side is under
            :data:`SMALLEST_LEVEL_SIDE` (and while both sides stay at least 1 px).

    Raises:
        ValueError: for bad sizes or downsamples.
    """
    check_side("height", height)
    check_side("width", width)
    if downsamples is None:
        found = [1]
        while max(height, width) // found[-1] >= SMALLEST_LEVEL_SIDE:
            nxt = found[-1] * _LEVEL_FACTOR
            if min(height, width) // nxt < 1:
                break
            found.append(nxt)
        downsamples = found
    ds = list(downsamples)
    if not ds or ds[0] != 1 or not all(is_int(v) for v in ds):
        raise ValueError(f"downsamples must be integers starting with 1, got {downsamples!r}")
    if any(b <= a for a, b in zip(ds, ds[1:], strict=False)):
        raise ValueError(f"downsamples must be strictly increasing, got {downsamples!r}")
    if min(height, width) // ds[-1] < 1:
        raise ValueError(f"downsample {ds[-1]} leaves an empty level of a {height}x{width} slide")
    return tuple(Level(int(d), height // int(d), width // int(d)) for d in ds)


def _thumbnail_shape(height: int, width: int) -> tuple[float, int, int]:
    ds = max(1.0, max(height, width) / THUMBNAIL_SIDE)
    return ds, max(1, round(height / ds)), max(1, round(width / ds))


def _ordered_map(fn: Callable[[_T], _R], items: Iterable[_T], workers: int) -> Iterator[_R]:
    """``map(fn, items)`` on ``workers`` threads, in order, at most ``2 * workers`` ahead."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="demo-slides") as pool:
        pending: deque[Future[_R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _tiles(slide: SyntheticSlide, level: Level, tile: int, workers: int) -> Iterator[np.ndarray]:
    """Full ``tile x tile`` tiles of a level in row-major order (edge tiles run past it)."""
    ds = float(level.downsample)
    origins = ((y, x) for y in range(0, level.height, tile) for x in range(0, level.width, tile))
    return _ordered_map(lambda o: slide.render(o[0], o[1], tile, tile, ds), origins, workers)


def _codec(compression: str, quality: int, ycbcr: bool) -> dict[str, object]:
    """tifffile keyword arguments for the compression (and photometric) of RGB data."""
    if compression == "jpeg":
        # tifffile's default for RGB input is YCbCr 4:2:0; Aperio stores RGB, unsubsampled.
        args: dict[str, object] = {"level": quality}
        if not ycbcr:
            args["outcolorspace"] = "rgb"
        return {"compression": "jpeg", "compressionargs": args, "photometric": "rgb",
                "subsampling": (2, 2) if ycbcr else (1, 1)}  # fmt: skip
    if compression == "zlib":
        return {"compression": "zlib", "compressionargs": {"level": 1}, "photometric": "rgb"}
    return {"compression": None, "photometric": "rgb"}


def _needs_bigtiff(levels: Sequence[Level], extra_px: int = 0) -> bool:
    raw = 3 * (extra_px + sum(lv.height * lv.width for lv in levels))
    return raw > 2**32 - 2**25


def _write_level(
    tw: tifffile.TiffWriter,
    slide: SyntheticSlide,
    level: Level,
    tile: int,
    workers: int,
    codec: dict[str, object],
    **kwargs: object,
) -> None:
    tw.write(
        _tiles(slide, level, tile, workers),
        shape=(level.height, level.width, 3),
        dtype=np.uint8,
        tile=(tile, tile),
        metadata=None,
        software=False,
        maxworkers=workers,
        buffersize=tile * tile * 3 * 4 * workers,
        **codec,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def _check_common(
    height: int, width: int, mpp: float, seed: int, tile: int, quality: int
) -> tuple[float, int, int]:
    check_side("height", height)
    check_side("width", width)
    check_seed(seed)
    return check_mpp(mpp), _check_tile(tile), check_quality(quality)


def write_svs(
    path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    mpp: float = 0.25,
    seed: int = 0,
    label: int | None = 0,
    tile: int = 256,
    quality: int = 90,
    downsamples: Sequence[int] | None = None,
    ycbcr: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic slide as an Aperio SVS file (OpenSlide vendor ``aperio``).

    Args:
        path: the file to write (replaced atomically if it exists).
        height: level-0 rows (at least :data:`MIN_SIDE`).
        width: level-0 columns.
        mpp: micrometres per level-0 pixel; written as ``MPP`` (and ``AppMag = 10 / mpp``) in
            the ImageDescription.
        seed: content seed; the same arguments give the same bytes.
        label: 1 (rings), 0 (discs) or None (neither); see :class:`SyntheticSlide`.
        tile: tile side, a multiple of 16.
        quality: JPEG quality, 1-100.
        downsamples: level downsamples (default ``1, 4, 16, ...``; see
            :func:`pyramid_levels`).
        ycbcr: store YCbCr 4:2:0 JPEG instead of Aperio's RGB JPEG (about 3x smaller).
        workers: threads rendering and encoding tiles (default: up to 4 CPUs).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for bad arguments.
    """
    mpp, tile, quality = _check_common(height, width, mpp, seed, tile, quality)
    workers = _check_workers(workers)
    levels = pyramid_levels(height, width, downsamples)
    slide = SyntheticSlide(height, width, seed=seed, label=label)
    codec = _codec("jpeg", quality, ycbcr)
    thumb_ds, thumb_h, thumb_w = _thumbnail_shape(height, width)
    space = "YCbCr" if ycbcr else "RGB"
    geometry = f"{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    description = (
        f"{_APERIO_HEADER}{geometry} JPEG/{space} Q={quality}"
        f"|AppMag = {10.0 / mpp:.10g}|MPP = {mpp:.10g}|ImageID = synthetic-{seed}"
    )

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(levels, thumb_h * thumb_w)) as tw:
            _write_level(tw, slide, levels[0], tile, workers, codec, description=description)
            thumbnail = slide.render(0, 0, thumb_h, thumb_w, thumb_ds)
            tw.write(
                thumbnail,
                rowsperstrip=64,
                description=f"{_APERIO_HEADER}{width}x{height} -> {thumb_w}x{thumb_h} - ",
                metadata=None,
                software=False,
                **codec,  # type: ignore[arg-type]
            )
            for level in levels[1:]:
                text = f"{_APERIO_HEADER}{geometry} -> {level.width}x{level.height} JPEG/{space}"
                _write_level(
                    tw, slide, level, tile, workers, codec, description=f"{text} Q={quality}"
                )

    start = time.perf_counter()
    out = atomic_write_path(path, write)
    log.debug(
        "wrote %s: %dx%d SVS, %d levels, %.1f s",
        out, width, height, len(levels), time.perf_counter() - start,
    )  # fmt: skip
    return out


def write_pyramidal_tiff(
    path: str | os.PathLike[str],
    height: int,
    width: int,
    *,
    mpp: float = 0.5,
    seed: int = 0,
    label: int | None = 0,
    tile: int = 256,
    compression: Literal["jpeg", "zlib", "none"] = "jpeg",
    quality: int = 90,
    downsamples: Sequence[int] | None = None,
    ycbcr: bool = False,
    workers: int | None = None,
) -> Path:
    """Write a synthetic slide as a tiled pyramidal TIFF (reduced levels in SubIFDs).

    Args:
        path: the file to write (replaced atomically if it exists).
        height: level-0 rows (at least :data:`MIN_SIDE`).
        width: level-0 columns.
        mpp: micrometres per level-0 pixel, stored as X/YResolution in px per centimetre.
        seed: content seed; the same arguments give the same bytes.
        label: 1 (rings), 0 (discs) or None (neither).
        tile: tile side, a multiple of 16.
        compression: ``"jpeg"`` (RGB JPEG, or YCbCr with ``ycbcr``), ``"zlib"`` (deflate
            level 1) or ``"none"``.
        quality: JPEG quality, 1-100 (ignored otherwise).
        downsamples: level downsamples (default ``1, 4, 16, ...``).
        ycbcr: with JPEG, store YCbCr 4:2:0 instead of RGB.
        workers: threads rendering and encoding tiles (default: up to 4 CPUs).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: for bad arguments.
    """
    mpp, tile, quality = _check_common(height, width, mpp, seed, tile, quality)
    if compression not in ("jpeg", "zlib", "none"):
        raise ValueError(f"compression must be 'jpeg', 'zlib' or 'none', got {compression!r}")
    workers = _check_workers(workers)
    levels = pyramid_levels(height, width, downsamples)
    slide = SyntheticSlide(height, width, seed=seed, label=label)
    codec = _codec(compression, quality, ycbcr)
    px_per_cm = 1e4 / mpp

    def resolution(level: Level) -> tuple[float, float]:
        return (px_per_cm * level.width / width, px_per_cm * level.height / height)

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=_needs_bigtiff(levels)) as tw:
            _write_level(
                tw, slide, levels[0], tile, workers, codec,
                subifds=len(levels) - 1, resolution=resolution(levels[0]),
                resolutionunit="CENTIMETER",
            )  # fmt: skip
            for level in levels[1:]:
                _write_level(
                    tw, slide, level, tile, workers, codec,
                    subfiletype=1, resolution=resolution(level), resolutionunit="CENTIMETER",
                )  # fmt: skip

    start = time.perf_counter()
    out = atomic_write_path(path, write)
    log.debug(
        "wrote %s: %dx%d pyramidal TIFF, %d levels, %.1f s",
        out, width, height, len(levels), time.perf_counter() - start,
    )  # fmt: skip
    return out
