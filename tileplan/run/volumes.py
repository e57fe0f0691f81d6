"""Volumes: 3-D images (CT, MRI, light-sheet, EM) on disk, read crop by crop.

Formats (one reader each, behind ``open_volume_reader``: ``read(box) -> (C, d, h, w)``)
    - NIfTI ``.nii`` / ``.nii.gz`` through nibabel: array axes ``(i, j, k[, c])`` are read as
      ``(D, H, W) = (k, j, i)``; the header's scale slope and intercept are applied (a CT
      then reads in Hounsfield units); voxel sizes from ``pixdim`` in its spatial unit. An
      uncompressed ``.nii`` is memory-mapped, so a crop reads only its own voxels; a
      ``.nii.gz`` is decompressed up to the crop (gzip has no random access).
    - NumPy ``.npy`` (memory-mapped): ``(D, H, W)``, or 4-D channel-last ``(D, H, W, C)``
      when ``C = shape[-1] <= 4 < shape[0]``, else channel-first ``(C, D, H, W)``. No spacing.
    - Multi-page TIFF stacks (``.tif``/``.tiff``) through tifffile: a page per slice; a crop
      decodes only the pages of its slices. Spacing from ImageJ metadata (``spacing``, ``unit``
      and the pages' resolution tags).

Spacing (``DataSettings.spacing``, mm per voxel along D, H, W)
    A volume is resampled to the asked spacing by exact area averages along each axis
    (``tileplan.run.resample``: a crop equals the same part of a whole resampling bit for bit,
    so streaming a volume from its file is exact). Only coarser than stored: a finer spacing
    is refused. A file without spacing takes the CSV's ``spacing`` column (``3x1x1``, mm).

Intensity (``DataSettings.intensity``)
    ``raw`` keeps the stored values (as float32); ``window:LO,HI`` clips to [LO, HI] and maps
    to [0, 1]; ``zscore`` subtracts each channel's mean and divides by its std over the whole
    stored volume, computed once when the CSV is loaded. Every crop comes back float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tileplan.run.advice import Fix
from tileplan.run.csv_rows import FIX_ROW, RowError, read_csv_rows, row_image
from tileplan.run.dataset import Dataset, Sample
from tileplan.run.file_source import FileSource
from tileplan.run.images import ImageInfo
from tileplan.run.pixels import DataError
from tileplan.run.resample import area_taps, resample_axis
from tileplan.run.volume_readers import Volume, VolumeFileError, open_volume_reader, probe_volume
from tileplan.settings import DataSettings, parse_intensity
from tileplan.units import format_shape, parse_spacing

__all__ = ["Volume", "VolumeDataset", "VolumeRegion", "VolumeSource", "load_volume_csv",
           "resolve_volume"]  # fmt: skip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeRegion:
    """What is streamed of a volume.

    Attributes:
        volume: the file's header (``volume_readers.Volume``).
        scaled: ``(D, H, W)`` voxels after resampling to the run's spacing.
        box: ``(d0, h0, w0, d, h, w)`` streamed, in scaled voxels (a centre crop when the
            volume is larger than the plan).
        intensity: ``DataSettings.intensity``.
        stats: per channel ``(mean, std)`` of the stored voxels for ``zscore``, else None.
        cropped_from: the scaled size when the box is a centre crop of it, else None.
        spacing: mm per voxel (D, H, W) as read: a CSV row's statement, the file's, or the
            run's ``assume_spacing``; None when neither says.
    """

    volume: Volume
    scaled: tuple[int, int, int]
    box: tuple[int, ...]
    intensity: str = "raw"
    stats: tuple[tuple[float, float], ...] | None = None
    cropped_from: tuple[int, int, int] | None = None
    spacing: tuple[float, ...] | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.box[3:])  # type: ignore[return-value]


_STATE_SPACING = Fix("state its spacing with --assume-spacing DxHxW (mm)", ("--assume-spacing",))
_STATE_SPACING_CSV = Fix("with a CSV 'spacing' column", csv=True)


def resolve_volume(path: Path, settings: DataSettings, *, stated: tuple[float, ...] | None = None,
                   max_shape: Sequence[int] | None = None) -> VolumeRegion:  # fmt: skip
    """The region of the volume at ``path`` to stream under ``settings``.

    Args:
        stated: a CSV row's statement of its spacing (mm, D x H x W), which wins over the
            file's own; ``settings.assume_spacing`` serves files that record none.
        max_shape: the plan's volume; larger volumes are centre-cropped or refused
            (``settings.oversize``).

    Raises:
        VolumeFileError: unreadable, no spacing when one is asked, spacing finer than stored,
            larger than the plan under ``oversize="refuse"``.
    """
    volume = probe_volume(path)
    spacing = stated or volume.spacing or settings.assume_spacing
    scaled = volume.shape
    if settings.spacing is not None:
        if spacing is None:
            raise VolumeFileError(
                f"records no voxel spacing (it is {format_shape(volume.shape)} voxels), and the "
                f"run resamples volumes to {_mm(settings.spacing)} mm voxels",
                _STATE_SPACING, _STATE_SPACING_CSV,
            )  # fmt: skip
        scaled = tuple(round(n * s / t) for n, s, t in
                       zip(volume.shape, spacing, settings.spacing, strict=True))  # fmt: skip
        if min(scaled) < 1:
            raise VolumeFileError(
                f"is {format_shape(volume.shape)} voxels of {_mm(spacing)} mm: smaller than one "
                f"voxel on an axis at the {_mm(settings.spacing)} mm the run resamples to",
                Fix("resample to a finer --spacing", ("--spacing",)),
            )
        finer = [ax for ax, (n, m) in enumerate(zip(volume.shape, scaled, strict=True)) if m > n]
        if finer:
            coarsest = _mm([max(a, b) for a, b in zip(spacing, settings.spacing, strict=True)])
            raise VolumeFileError(
                f"is stored at {_mm(spacing)} mm voxels, coarser on an axis than the "
                f"{_mm(settings.spacing)} mm the run resamples to (volumes are only resampled "
                "to coarser spacings)",
                Fix(f"resample to --spacing {coarsest} or coarser", ("--spacing",)),
            )  # fmt: skip
    box, cropped = (0, 0, 0, *scaled), None
    if max_shape is not None and any(n > m for n, m in zip(scaled, max_shape, strict=True)):
        if settings.oversize == "refuse":
            raise VolumeFileError(
                f"is {format_shape(scaled)} voxels at the run's spacing, larger than the plan's "
                f"{format_shape(max_shape)}",
                Fix("stream its centre with --oversize crop", ("--oversize",)),
                Fix("resample it to a coarser --spacing", ("--spacing",)),
                Fix(f"use a plan made for at least {format_shape(scaled)} voxels"),
            )
        size = tuple(min(n, m) for n, m in zip(scaled, max_shape, strict=True))
        start = tuple((n - s) // 2 for n, s in zip(scaled, size, strict=True))
        box, cropped = (*start, *size), scaled
    mode, _ = parse_intensity(settings.intensity)
    try:
        stats = _channel_stats(volume) if mode == "zscore" else None
    except VolumeFileError:
        raise
    except Exception as err:  # a corrupt slab found by the full read: one line
        text = " ".join(str(err).split()) or type(err).__name__
        raise VolumeFileError(f"cannot be read in full as {volume.format} ({text}); re-export "
                              "it") from None  # fmt: skip
    return VolumeRegion(volume, scaled, box, settings.intensity, stats, cropped,  # type: ignore[arg-type]
                        spacing)  # fmt: skip


def _mm(values: Sequence[float]) -> str:
    return "x".join(f"{v:g}" for v in values)


def _channel_stats(volume: Volume) -> tuple[tuple[float, float], ...]:
    """Per channel (mean, std) of the stored voxels, summed in float64 slab by slab."""
    reader = open_volume_reader(volume)
    depth, h, w = volume.shape
    total = np.zeros(volume.channels)
    squares = np.zeros(volume.channels)
    step = max(1, (64 * 1024**2) // max(1, h * w * volume.channels * 8))  # ~64 MiB slabs
    try:
        for d0 in range(0, depth, step):
            slab = reader.read((d0, 0, 0, min(step, depth - d0), h, w)).astype(np.float64)
            total += slab.sum(axis=(1, 2, 3))
            squares += np.square(slab).sum(axis=(1, 2, 3))
    finally:
        reader.close()
    count = depth * h * w
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    if not np.all(std > 0):
        raise VolumeFileError(
            "is constant in a channel, which a per-volume z-score cannot scale",
            Fix("use --intensity raw or window:LO,HI", ("--intensity",)),
        )
    return tuple((float(m), float(s)) for m, s in zip(mean, std, strict=True))


class VolumeSource(FileSource):
    """A volume's region as an ``executor.ImageSource``: ``(1, C, d, h, w)`` float32, read
    crop by crop from its file (resampled and scaled per ``VolumeRegion``)."""

    def __init__(self, region: VolumeRegion) -> None:
        super().__init__()
        self.region = region
        mode, window = parse_intensity(region.intensity)
        self._mode, self._window = mode, window

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, self.region.volume.channels, *self.region.shape)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def path(self) -> Path:
        return self.region.volume.path

    def read(self, region: Sequence[slice]) -> torch.Tensor:
        box = self.region.box
        if len(region) != 3 or not all(0 <= s.start < s.stop <= n
                                       for s, n in zip(region, box[3:], strict=True)):  # fmt: skip
            raise IndexError(f"region {region} is not inside the {format_shape(box[3:])} voxels "
                             f"of {self.region.volume.path.name}")  # fmt: skip
        stored, scaled = self.region.volume.shape, self.region.scaled
        taps, read_box = [], []
        for ax, s in enumerate(region):
            a, b = box[ax] + s.start, box[ax] + s.stop
            if stored[ax] == scaled[ax]:
                taps.append(None)
                read_box.append((a, b))
            else:
                t = area_taps(a, b, stored[ax], scaled[ax])
                taps.append(t)
                read_box.append((t[2], t[3]))
        (d0, d1), (h0, h1), (w0, w1) = read_box
        where = f"voxels z {d0}:{d1} y {h0}:{h1} x {w0}:{w1} as stored"
        with self._lock, self._decoding(where):
            data = self._reading().read((d0, h0, w0, d1 - d0, h1 - h0, w1 - w0))
        data = data.astype(np.float64)
        for ax, t in enumerate(taps):
            if t is not None:  # float data: the mean itself (denominator 1)
                data, _ = resample_axis(data, ax + 1, t, stored[ax], scaled[ax])
        return torch.from_numpy(self._scale(data).astype(np.float32))[None]

    def _scale(self, data: np.ndarray) -> np.ndarray:
        if self._mode == "window":
            lo, hi = self._window  # type: ignore[misc]
            return (np.clip(data, lo, hi) - lo) / (hi - lo)
        if self._mode == "zscore":
            stats = np.asarray(self.region.stats, dtype=np.float64)  # (C, 2)
            return (data - stats[:, 0, None, None, None]) / stats[:, 1, None, None, None]
        return data

    def _open_reader(self) -> Any:
        return open_volume_reader(self.region.volume)

    def _state(self) -> dict[str, Any]:
        return {"region": self.region}


class VolumeDataset(Dataset):
    """Volumes and labels of a validated CSV (``load_volume_csv``), each streamed from its file
    as a ``VolumeSource`` at its own size (up to the plan's)."""

    def __init__(self, samples: Sequence[Sample], regions: Sequence[VolumeRegion],
                 target_shape: Sequence[int] | None, csv_path: Path | None) -> None:  # fmt: skip
        infos = [ImageInfo(r.volume.channels, r.shape[1], r.shape[2], "float32", "volume")
                 for r in regions]  # fmt: skip
        super().__init__(samples, infos, None, csv_path)
        self.volumes: tuple[VolumeRegion, ...] = tuple(regions)
        self.target_shape = None if target_shape is None else tuple(target_shape)  # type: ignore[assignment]

    @property
    def streamed(self) -> bool:
        return True

    def source(self, index: int) -> VolumeSource:  # type: ignore[override]
        return VolumeSource(self.volumes[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.source(index)
        try:
            image = source.read_all()[0]
        finally:
            source.close()
        return image, torch.tensor(self.samples[index].label, dtype=torch.float32)

    def image_shape(self, index: int) -> tuple[int, ...]:  # type: ignore[override]
        return (self.volumes[index].volume.channels, *self.volumes[index].shape)

    @property
    def largest_shape(self) -> tuple[int, ...]:  # type: ignore[override]
        shapes = [r.shape for r in self.volumes]
        return tuple(max(s[ax] for s in shapes) for ax in range(3))

    def with_target_shape(self, shape: Sequence[int] | None) -> Dataset:
        raise ValueError("a dataset of volumes is not fitted to a shape")


def load_volume_csv(
    path: str | os.PathLike[str], target_shape: Sequence[int] | None, settings: DataSettings,
    *, command: str | None = None,
) -> VolumeDataset:  # fmt: skip
    """Read and validate a CSV of volumes (columns ``image,label`` and optionally
    ``spacing``, mm per voxel ``DxHxW`` for files that record none) before training.

    Raises:
        DataError: one line naming the CSV, the row, the file, what it has and the fix.
    """
    shown = os.fspath(path)
    csv_path = Path(path)
    columns, rows = read_csv_rows(csv_path, shown)
    for column in ("level", "mpp"):
        if column in columns:
            raise DataError(f"{shown}: the '{column}' column is for slides, and these are "
                            "volumes; remove the column", csv_path=csv_path)  # fmt: skip
    base = csv_path.absolute().parent
    samples, regions, errors = [], [], []
    for row, fields in rows:
        try:
            sample, region = _volume_row(row, fields, columns, base, settings, target_shape,
                                         command)  # fmt: skip
        except RowError as err:
            errors.append(err)
            continue
        if regions and region.volume.channels != regions[0].volume.channels:
            errors.append(RowError(row, f"'{sample.path.name}' has {region.volume.channels} "
                                        f"channel(s) but row {samples[0].row} has "
                                        f"{regions[0].volume.channels}"))  # fmt: skip
            continue
        samples.append(sample)
        regions.append(region)
    if not errors and not samples:
        raise DataError(f"{shown}: no rows; add 'image,label' rows", csv_path=csv_path)
    if errors:
        for err in errors:
            log.error("%s row %d: %s", shown, err.row, err.reason)
        more = f" ({len(errors) - 1} more bad row(s) logged)" if len(errors) > 1 else ""
        raise DataError(f"{shown} row {errors[0].row}: {errors[0].reason}; {FIX_ROW}{more}",
                        csv_path=csv_path, row=errors[0].row)  # fmt: skip
    dataset = VolumeDataset(samples, regions, target_shape, csv_path)
    log.info("%s: %d volumes, %s, largest %s voxels, task %s", shown, len(dataset),
             settings.describe_volumes(), format_shape(dataset.largest_shape),
             dataset.task)  # fmt: skip
    for sample, region in zip(samples, regions, strict=True):
        if region.cropped_from is not None:
            log.warning("%s row %d: '%s' is %s voxels, larger than the plan's %s; streaming its "
                        "centre (--oversize refuse to refuse it instead)", shown, sample.row,
                        sample.path.name, format_shape(region.cropped_from),
                        format_shape(target_shape or ()))  # fmt: skip
    return dataset


def _volume_row(row: int, fields: list[str], columns: dict[str, int], base: Path,
                settings: DataSettings, target_shape: Sequence[int] | None,
                command: str | None) -> tuple[Sample, VolumeRegion]:  # fmt: skip
    name, label, path = row_image(row, fields, columns, base)
    stated = None
    if "spacing" in columns and fields[columns["spacing"]].strip():
        text = fields[columns["spacing"]].strip()
        try:
            stated = parse_spacing(text)
        except ValueError:
            raise RowError(row, f"spacing {text!r} is not mm per voxel, e.g. 3x1x1 (D x H x W) "
                                "or 1") from None  # fmt: skip
    try:
        region = resolve_volume(path, settings, stated=stated, max_shape=target_shape)
    except VolumeFileError as err:
        raise RowError(row, f"'{name}' {err.render(command)}") from None
    return Sample(path=path, label=label, row=row), region
