"""Data layer: a CSV of whole images and labels, validated up front, read lazily.

One data room, one module per concern: ``csv_rows`` (the CSV's header and fields),
``images`` (2-D files read whole, and the shape policy), ``slides`` and ``pyramids``
(whole-slide images by levels and regions), ``volumes`` and ``volume_readers`` (3-D
images), ``dataset`` (the validated dataset). This module loads a CSV through them and
re-exports their public names.

Validation
    :func:`load_csv` checks every row before any training starts and reads only file headers
    (TIFF tags, PNG/JPEG headers, ``.npy`` headers) plus, for a compressed TIFF, its first
    tile or strip, so that it stays cheap for thousands of gigapixel images. Every problem
    (missing file or column, empty CSV, non-numeric label, unreadable or corrupt image, mixed
    channel counts) raises :class:`DataError` with one line that names the CSV, the row, the
    file, what it has and the fix (in the options of the command reading it: see
    ``tileplan.run.advice``), e.g. ``train.csv row 3: cannot read 'img3.tif': not a TIFF
    file; fix or remove the row``.

Whole-slide images (``load_csv(..., settings=DataSettings(...))``, what training uses)
    Vendor slides, DICOM series and TIFFs are read region by region at the run's resolution
    (``--mpp``/``--level``, or the row's ``level``), optionally cropped to their tissue
    (``--tissue``): see ``tileplan.run.slides``. Each image streams at its own size, never
    padded; one larger than the plan's image on an axis is centre-cropped to it (logged) or
    refused, by ``DataSettings.oversize``. Every row's level, mpp metadata, tissue and size
    are checked before training starts. Without settings images are read whole and fitted to
    the plan's shape (``images.fit_to_shape``; :func:`load_csv` logs how many).

Volumes (``n_axes=3``)
    Every row is a volume: see ``tileplan.run.volumes``.

Labels and tasks
    Labels are floats. :func:`infer_task` calls integer labels in ``{0, 1}`` ``"binary"``,
    small non-negative integers with more than two classes ``"multiclass"``, and anything else
    ``"regression"``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tileplan.run.csv_rows import (
    FIX_ROW,
    RowError,
    parse_label,
    parse_level,
    parse_mpp,
    read_csv_rows,
    row_image,
)
from tileplan.run.dataset import Dataset, Sample, Task, infer_task
from tileplan.run.images import (
    IMAGE_SUFFIXES,
    ImageInfo,
    describe_error,
    fit_to_shape,
    probe_file,
    probe_image,
    read_image,
)
from tileplan.run.pixels import DataError, ImageReadError

if TYPE_CHECKING:
    from tileplan.run.slides import Resolved
    from tileplan.settings import DataSettings

__all__ = [
    "FIX_ROW", "IMAGE_SUFFIXES", "DataError", "Dataset", "ImageInfo", "ImageReadError",
    "RowError", "Sample",
    "Task", "describe_error", "fit_to_shape", "infer_task", "load_csv", "parse_label",
    "probe_image", "read_csv_rows", "read_image",
]  # fmt: skip

log = logging.getLogger(__name__)


def _parse_row(
    row: int, fields: list[str], columns: dict[str, int], base: Path, command: str | None
) -> tuple[Sample, ImageInfo]:
    name, label, path = row_image(row, fields, columns, base)
    level = parse_level(fields[columns["level"]], row) if "level" in columns else None
    mpp = parse_mpp(fields[columns["mpp"]], row) if "mpp" in columns else None
    try:
        info = probe_file(path)
    except Exception as exc:  # any reader failure becomes one clear line
        raise RowError(row, f"cannot read {name!r}: {describe_error(exc, command)}") from exc
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
            errors.append(
                RowError(sample.row, f"'{sample.path.name}' {describe_error(exc, command)}")
            )
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
