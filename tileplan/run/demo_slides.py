"""A demo dataset of synthetic whole-slide images (``tileplan demo-data --slides``).

:func:`write_demo_slides` writes a small dataset of such slides (mixed sizes and formats,
labels balanced) with ``train.csv``/``val.csv`` like :mod:`tileplan.run.demo_data`. Every file
is written to a temporary name and renamed into place, and the CSVs are written last.

The content is ``tileplan.run.demo_tissue`` (tissue on glass, rings or discs); the files are
written by ``tileplan.run.slide_writers``; their public names are re-exported here.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from tileplan.run.csv_out import write_csv
from tileplan.run.demo_data import stratified_split
from tileplan.run.demo_tissue import MIN_SIDE, SyntheticSlide, check_seed, check_side, is_int
from tileplan.run.slide_writers import (
    SMALLEST_LEVEL_SIDE,
    THUMBNAIL_SIDE,
    Level,
    check_mpp,
    check_quality,
    pyramid_levels,
    write_pyramidal_tiff,
    write_svs,
)

__all__ = [
    "DEFAULT_SIZES", "MIN_SIDE", "SMALLEST_LEVEL_SIDE", "THUMBNAIL_SIDE", "Level",
    "SyntheticSlide", "demo_slide_sizes", "pyramid_levels", "write_demo_slides",
    "write_pyramidal_tiff", "write_svs",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Default ``(height, width)`` of the slides of :func:`write_demo_slides` (about 30 Mpx).
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (3000, 4000), (2500, 2048), (2048, 3072), (1536, 2560), (3200, 2400), (1800, 1800),
)  # fmt: skip
_FORMATS = {"svs": ".svs", "tiff": ".tif"}


def _check_sizes(sizes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    try:
        pairs = [tuple(s) for s in sizes]
    except TypeError:
        pairs = []
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ValueError(f"sizes must be a non-empty sequence of (height, width), got {sizes!r}")
    for h, w in pairs:
        check_side("height", h)
        check_side("width", w)
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"sizes must be distinct, got {sizes!r}")
    return [(int(h), int(w)) for h, w in pairs]


def _slide_sizes(pairs: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """``n`` distinct sizes: ``pairs`` in turn, grown by 32 px per round (and past clashes)."""
    used: set[tuple[int, int]] = set()
    out = []
    for i in range(n):
        grow = 32 * (i // len(pairs))
        h, w = pairs[i % len(pairs)]
        while (h + grow, w + grow) in used:
            grow += 32
        used.add((h + grow, w + grow))
        out.append((h + grow, w + grow))
    return out


def demo_slide_sizes(n: int, largest: int) -> list[tuple[int, int]]:
    """``n`` distinct slide sizes ``(H, W)`` from about half of ``largest`` up to ``largest``
    per side, portrait and landscape (what ``tileplan demo-data --slides --size`` writes).

    The first is ``largest x (3/4 largest)``; the others step down evenly, alternating in
    orientation, so the plan for the set is ``largest`` on one axis.

    Raises:
        ValueError: ``largest`` too small for ``n`` distinct sizes of at least MIN_SIDE.
    """
    if n < 1 or largest // 2 < MIN_SIDE:
        raise ValueError(f"--size {largest} is too small for slides; use at least {4 * MIN_SIDE}")
    sizes = []
    for i in range(n):
        long = largest - (largest // 2) * i // max(1, n - 1)  # largest down to about half
        short = max(MIN_SIDE, 3 * long // 4)
        sizes.append((long, short) if i % 2 == 0 else (short, long))
    if len(set(sizes)) != n:
        raise ValueError(f"--size {largest} is too small for {n} distinct slides; use a larger one")
    return sizes


def write_demo_slides(
    out_dir: str | os.PathLike[str],
    *,
    n: int = 6,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    mpp: float = 0.25,
    seed: int = 0,
    formats: Sequence[Literal["svs", "tiff"]] = ("svs", "tiff"),
    quality: int = 90,
    workers: int | None = None,
) -> Path:
    """Write ``n`` synthetic slides of different sizes plus ``train.csv`` and ``val.csv``.

    Slide ``i`` is ``slide_{i:03d}.svs`` or ``.tif`` (``formats`` taken in turn), of size
    ``sizes[i % len(sizes)]`` grown by ``32 * (i // len(sizes))`` px per side (and by 32 more
    while it equals an earlier one, so all sizes differ). Half the slides (rounded down) are
    label 1 (rings), the rest label 0 (discs). The CSVs (``image,label``, paths relative to
    ``out_dir``, a stratified ~75/25 split with both classes on each side) are written last.
    The same arguments give the same bytes.

    Args:
        out_dir: folder to write into (created if needed).
        n: number of slides, at least 4.
        sizes: distinct ``(height, width)`` pairs, each side at least :data:`MIN_SIDE`.
        mpp: micrometres per level-0 pixel, for every slide.
        seed: random seed.
        formats: ``"svs"`` and/or ``"tiff"`` (pyramidal TIFF, JPEG).
        quality: JPEG quality.
        workers: threads per slide (see :func:`write_svs`).

    Returns:
        The path of ``train.csv``.

    Raises:
        ValueError: for bad arguments.
    """
    if not is_int(n) or n < 4:
        raise ValueError(f"n must be an integer of at least 4 (two per class), got {n!r}")
    pairs = _check_sizes(sizes)
    mpp = check_mpp(mpp)
    check_seed(seed)
    quality = check_quality(quality)
    fmts = list(formats)
    if not fmts or any(f not in _FORMATS for f in fmts):
        raise ValueError(f"formats must be a non-empty sequence of 'svs'/'tiff', got {formats!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    split_seq, *slide_seqs = np.random.SeedSequence(seed).spawn(n + 1)
    split_rng = np.random.default_rng(split_seq)
    labels = [int(v) for v in split_rng.permutation([1] * (n // 2) + [0] * (n - n // 2))]
    width_digits = max(3, len(str(n - 1)))
    names = []
    for i, (label, (h, w)) in enumerate(zip(labels, _slide_sizes(pairs, n), strict=True)):
        fmt = fmts[i % len(fmts)]
        name = f"slide_{i:0{width_digits}d}{_FORMATS[fmt]}"
        slide_seed = int(slide_seqs[i].generate_state(1)[0])
        writer = write_svs if fmt == "svs" else write_pyramidal_tiff
        writer(
            out / name, h, w, mpp=mpp, seed=slide_seed, label=label, quality=quality,
            workers=workers,
        )  # fmt: skip
        names.append(name)
        log.debug("wrote %s (%dx%d, label %d)", name, w, h, label)
    train, val = stratified_split(labels, split_rng)
    for csv_name, idx in (("train.csv", train), ("val.csv", val)):
        write_csv(out / csv_name, ["image", "label"], [(names[i], labels[i]) for i in idx])
    log.info(
        "demo slides: %d slides (%d train, %d val) in %s, %.1f s",
        n, len(train), len(val), out, time.perf_counter() - start,
    )  # fmt: skip
    return out / "train.csv"
