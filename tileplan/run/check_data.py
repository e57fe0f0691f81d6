"""``tileplan check-data``: decode everything training will read, before a long run.

Training reads each image region by region (slides at their level and box, volumes at their
spacing). A corrupt JPEG tile or a truncated file fails only when its region comes, hours into
an epoch. This reads every image of a CSV exactly as ``tileplan train`` with the same options
would, block by block in worker processes, and lists the blocks that fail with the reader's
own one-line reason (file, level, region, decoder), so the data can be fixed or the rows
removed first.
"""

from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import itertools
import logging
import math
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from executor import load_plan
from tileplan.run.csv_out import write_csv
from tileplan.run.data import DataError, Dataset, load_csv, read_image
from tileplan.settings import DataSettings

__all__ = ["BadRead", "DataCheck", "check_data", "save_bad_reads"]

log = logging.getLogger(__name__)

BLOCK_PX = {2: 1024, 3: 128}  # block side per spatial axis count: about 1-2 Mpx (3 MB uint8)
_BLOCKS_PER_JOB = 16  # a job reads this many blocks of one image: work to share, few opens


@dataclass(frozen=True)
class BadRead:
    """A block of an image that failed to read.

    Attributes:
        csv, row: the CSV and its 1-based data row.
        image: the file.
        reason: the reader's one line (the level and region it read, the decoder's reason).
    """

    csv: str
    row: int
    image: str
    reason: str


@dataclass(frozen=True)
class DataCheck:
    """What ``check_data`` read.

    Attributes:
        images: images checked; blocks: blocks decoded (or tried).
        pixels: pixels (voxels) read, as training reads them.
        seconds: wall time of the reads.
        bad: the blocks that failed, in CSV order.
    """

    images: int
    blocks: int
    pixels: int
    seconds: float
    bad: tuple[BadRead, ...]

    @property
    def bad_images(self) -> int:
        return len({(b.csv, b.row) for b in self.bad})


def _blocks(shape: Sequence[int], side: int) -> Iterator[tuple[slice, ...]]:
    """Regions of at most ``side`` px per axis covering ``shape``, in raster order."""
    ranges = [range(0, n, side) for n in shape]
    for starts in itertools.product(*ranges):
        yield tuple(slice(a, min(a + side, n)) for a, n in zip(starts, shape, strict=True))


def _read_blocks(job: tuple[Any, ...]) -> tuple[int, int, list[str]]:
    """Worker: read one job's blocks; returns (index, pixels read, failure reasons)."""
    index, source, blocks, whole = job
    reasons: list[str] = []
    pixels = 0
    if whole is not None:  # an image read whole (PNG, small TIFF): its reader's own check
        path, shape = whole
        try:
            image = read_image(path, shape)
            pixels = math.prod(image.shape[1:])
        except DataError as err:
            reasons.append(str(err))
        return index, pixels, reasons
    try:
        source.open()  # a file that does not open fails once, not once per block
    except DataError as err:
        return index, 0, [str(err)]
    try:
        for region in blocks:
            try:
                source.read(region)
                pixels += math.prod(s.stop - s.start for s in region)
            except DataError as err:
                reasons.append(str(err))
            except Exception as err:  # after a short read, e.g. resampling: still this block's
                where = " x ".join(f"{s.start}:{s.stop}" for s in region)
                reasons.append(f"'{source.path}' failed to read at {where} px as streamed: "
                               f"{type(err).__name__}: {' '.join(str(err).split())}")  # fmt: skip
    finally:
        source.close()
    return index, pixels, reasons


def _jobs(data: Dataset, block: int) -> Iterator[tuple[Any, ...]]:
    for index in range(len(data)):
        if not data.streamed:
            yield index, None, (), (data.samples[index].path, data.target_shape)
            continue
        source = data.source(index)
        blocks = list(_blocks(source.shape[2:], block))
        for start in range(0, len(blocks), _BLOCKS_PER_JOB):
            yield index, source, blocks[start : start + _BLOCKS_PER_JOB], None


def check_data(
    csv_path: Path,
    *,
    plan_file: Path,
    settings: DataSettings,
    workers: int = 2,
    block: int | None = None,
    progress: bool = False,
) -> DataCheck:
    """Read every image of ``csv_path`` as ``tileplan train --plan plan_file`` with
    ``settings`` would, in ``workers`` processes, and list what fails.

    Args:
        block: side of the blocks read (px; default ``BLOCK_PX``): a failure names its block.

    Raises:
        DataError, PlanError: the CSV or the plan is unusable (as train would say).
    """
    plan = load_plan(plan_file)
    data = load_csv(csv_path, target_shape=plan.image_shape_px, settings=settings,
                    n_axes=plan.n_axes, command="check-data")  # fmt: skip
    side = block or BLOCK_PX[plan.n_axes]
    jobs = list(_jobs(data, side))
    where = str(data.csv_path or csv_path)
    found: dict[int, list[str]] = {}
    pixels = 0
    start = time.perf_counter()
    # Spawned workers: each imports the readers afresh, sharing no thread or file handle.
    context = multiprocessing.get_context("spawn")
    with (
        concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=context) as pool,
        tqdm(total=len(jobs), desc="check-data", unit="block", disable=not progress) as bar,
    ):
        futures = [pool.submit(_read_blocks, job) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            try:
                index, read, reasons = future.result()
            except concurrent.futures.process.BrokenProcessPool:
                sample = data.samples[job[0]]
                raise DataError(
                    f"{where} row {sample.row}: a reader process died while decoding "
                    f"'{sample.path}' (a crash in its decoder); check or remove that file and run "
                    "check-data again"
                ) from None
            pixels += read
            if reasons:
                found.setdefault(index, []).extend(reasons)
            bar.update(1)
    seconds = time.perf_counter() - start
    bad = tuple(BadRead(where, data.samples[i].row, str(data.samples[i].path), reason)
                for i in sorted(found) for reason in found[i])  # fmt: skip
    n_blocks = sum(len(job[2]) or 1 for job in jobs)
    log.info("check-data: %d images, %d blocks, %.1f Mpx in %.1f s", len(data), n_blocks,
             pixels / 1e6, seconds)  # fmt: skip
    return DataCheck(len(data), n_blocks, pixels, seconds, bad)


def save_bad_reads(path: Path, bad: Sequence[BadRead]) -> None:
    """The failed blocks as a CSV (``csv,row,image,reason``), written atomically."""
    write_csv(
        path, ["csv", "row", "image", "reason"], ((b.csv, b.row, b.image, b.reason) for b in bad)
    )
