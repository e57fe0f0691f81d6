"""Volume file formats behind one small interface: ``probe_volume(path) -> Volume`` (the
header: shape, channels, spacing) and ``open_volume_reader(volume).read(box)`` (a crop as a
``(C, d, h, w)`` array of the stored values). See ``tileplan.run.volumes`` for the formats."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tileplan.run.advice import UnusableImageError
from tileplan.run.tiff import decode_first_segment, open_tiff

__all__ = ["VOLUME_SUFFIXES", "Volume", "VolumeFileError", "open_volume_reader", "probe_volume",
           "volume_format"]  # fmt: skip

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".npy", ".tif", ".tiff")
_FORMATS = {".nii": "nifti", ".nii.gz": "nifti", ".npy": "npy", ".tif": "tiff", ".tiff": "tiff"}
_TO_MM = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3}
_IMAGEJ_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0, "micron": 1e-3, "um": 1e-3, "µm": 1e-3,
                 "\\u00b5m": 1e-3, "nm": 1e-6}  # fmt: skip


class VolumeFileError(UnusableImageError):
    """Why a volume cannot be used, as the rest of a line that starts with its name."""


@dataclass(frozen=True)
class Volume:
    """A volume file's header, in tileplan's axis order.

    Attributes:
        path: the file.
        format: ``nifti``, ``npy`` or ``tiff``.
        shape: ``(D, H, W)`` voxels as stored.
        channels: channels (1 for a scalar volume).
        spacing: mm per voxel along ``(D, H, W)``, or None when the file records none.
        dtype: the stored values' type (after NIfTI scaling), e.g. ``int16``.
    """

    path: Path
    format: str
    shape: tuple[int, int, int]
    channels: int
    spacing: tuple[float, float, float] | None
    dtype: str


def volume_format(path: Path) -> str | None:
    """``nifti``/``npy``/``tiff`` by the file name's ending, or None."""
    name = path.name.lower()
    for suffix in sorted(_FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return _FORMATS[suffix]
    return None


def probe_volume(path: Path) -> Volume:
    """Read ``path``'s header (and, for compressed NIfTI, check the data decompresses).

    Raises:
        VolumeFileError: not a volume format, not 3-D, unreadable, truncated or corrupt.
    """
    fmt = volume_format(path)
    if fmt is None:
        kind = " (a 2-D image)" if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".svs") else ""
        raise VolumeFileError(
            f"is not a volume file{kind}; this plan is for volumes (D x H x W): give "
            f"{', '.join(VOLUME_SUFFIXES)}"
        )
    if not path.is_file():
        raise VolumeFileError("is not a regular file")
    try:
        volume = _PROBES[fmt](path)
        reader = open_volume_reader(volume)
        try:  # the last voxel: a truncated file fails here, not in the middle of training
            d, h, w = volume.shape
            reader.read((d - 1, h - 1, w - 1, 1, 1, 1))
        finally:
            reader.close()
    except UnusableImageError as err:  # said in full already (e.g. a TIFF's compression)
        raise VolumeFileError(err.fact, *err.fixes) from None
    except Exception as err:
        text = " ".join(str(err).split()) or type(err).__name__
        raise VolumeFileError(f"cannot be read as {fmt} ({text}); re-export it") from None
    if volume.dtype in ("bool",) or np.dtype(volume.dtype).kind not in "uif":
        raise VolumeFileError(f"holds {volume.dtype} values; store integers or floats")
    return volume


def _layout_4d(shape: tuple[int, ...]) -> tuple[bool, tuple[int, int, int], int]:
    """(channel last?, (D, H, W), C) of a 4-D array."""
    if shape[-1] <= 4 < shape[0]:
        return True, shape[:3], shape[3]  # type: ignore[return-value]
    return False, shape[1:], shape[0]  # type: ignore[return-value]


def _rank_error(shape: tuple[int, ...], fmt: str) -> VolumeFileError:
    return VolumeFileError(
        f"is a {len(shape)}-D {fmt} array of shape {shape}, not a volume; a volume is D x H x W "
        "(or with a channel axis)"
    )


def _probe_npy(path: Path) -> Volume:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    shape = tuple(array.shape)
    if len(shape) == 3:
        return Volume(path, "npy", shape, 1, None, array.dtype.name)  # type: ignore[arg-type]
    if len(shape) == 4:
        _, spatial, channels = _layout_4d(shape)
        return Volume(path, "npy", spatial, channels, None, array.dtype.name)
    raise _rank_error(shape, ".npy")


def _nifti(path: Path) -> Any:
    try:
        import nibabel
    except ImportError:
        raise VolumeFileError("is NIfTI, which needs nibabel: pip install 'tileplan[volumes]'"
                              ) from None  # fmt: skip

    return nibabel.load(str(path))


def _nifti_dims(shape: tuple[int, ...]) -> tuple[tuple[int, int, int], int]:
    """((D, H, W), channels) of a NIfTI array ``(i, j, k[, 1][, c])``."""
    dims = shape[:3] + tuple(n for n in shape[3:] if n != 1)
    if len(shape) < 3 or len(dims) > 4:
        raise _rank_error(shape, "NIfTI")
    i, j, k = dims[:3]
    return (k, j, i), (dims[3] if len(dims) == 4 else 1)


def _probe_nifti(path: Path) -> Volume:
    img = _nifti(path)
    spatial, channels = _nifti_dims(tuple(img.shape))
    unit = img.header.get_xyzt_units()[0] or "unknown"
    # pixdim is float32: 0.8 reads 0.800000011920929; 7 significant digits are what it holds.
    zooms = [float(f"{float(z) * _TO_MM.get(unit, 1.0):.7g}") for z in img.header.get_zooms()[:3]]
    # A unit of "unknown" records sizes of no stated unit (nibabel also turns pixdim 0 to 1):
    # no spacing, so that the user states it rather than tileplan guessing mm.
    known = unit != "unknown" and all(z > 0 for z in zooms)
    spacing = (zooms[2], zooms[1], zooms[0]) if known else None
    slope, inter = img.dataobj.slope, img.dataobj.inter
    scaled = (slope not in (None, 1.0) and not np.isnan(slope)) or (
        inter not in (None, 0.0) and not np.isnan(inter))  # fmt: skip
    dtype = "float32" if scaled else img.get_data_dtype().name
    return Volume(path, "nifti", spatial, channels, spacing, dtype)


def _probe_tiff(path: Path) -> Volume:
    with open_tiff(path) as tif:
        decode_first_segment(tif, tif.pages[0])  # a codec missing here is named now
        series = tif.series[0]
        shape = tuple(series.shape)
        axes = series.axes
        # A stack of slices: its first axis is depth (Z), or pages tifffile calls I or Q;
        # C (channels) or T (time) first is not a volume.
        if len(shape) == 4 and axes[0] in "ZIQ" and axes.endswith("S"):
            spatial, channels = shape[:3], shape[3]
        elif len(shape) == 3 and axes[0] in "ZIQ" and not axes.endswith("S"):
            spatial, channels = shape, 1
        else:
            raise VolumeFileError(
                f"is a TIFF of shape {shape} with axes {axes}, not a stack of slices; a volume "
                "is one page per slice, axes ZYX (or ZYXS with samples per pixel)"
            )
        spacing = _tiff_spacing(tif)
        return Volume(path, "tiff", spatial, channels, spacing, series.dtype.name)  # type: ignore[arg-type]


def _tiff_spacing(tif: Any) -> tuple[float, float, float] | None:
    meta = tif.imagej_metadata or {}
    page = tif.pages[0]
    if "spacing" not in meta:
        return None
    scale = _IMAGEJ_TO_MM.get(str(meta.get("unit", "")).lower())
    x_res, y_res = page.tags.get("XResolution"), page.tags.get("YResolution")
    if scale is None or x_res is None or y_res is None:
        return None
    (xn, xd), (yn, yd) = x_res.value, y_res.value
    if not (xn and yn):
        return None
    return (float(meta["spacing"]) * scale, yd / yn * scale, xd / xn * scale)


_PROBES = {"npy": _probe_npy, "nifti": _probe_nifti, "tiff": _probe_tiff}


class _Reader:
    """Crops of one open volume: ``read((d0, h0, w0, d, h, w))`` -> ``(C, d, h, w)``."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self._stack: contextlib.ExitStack = contextlib.ExitStack()

    def read(self, box: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        self._stack.close()


class _NpyReader(_Reader):
    def __init__(self, volume: Volume) -> None:
        super().__init__(volume)
        self.array = np.load(volume.path, mmap_mode="r", allow_pickle=False)

    def read(self, box: tuple[int, ...]) -> np.ndarray:
        d0, h0, w0, d, h, w = box
        a = self.array
        if a.ndim == 3:
            return np.array(a[d0 : d0 + d, h0 : h0 + h, w0 : w0 + w])[None]
        last, _, _ = _layout_4d(a.shape)
        if last:
            return np.moveaxis(np.array(a[d0 : d0 + d, h0 : h0 + h, w0 : w0 + w]), -1, 0)
        return np.array(a[:, d0 : d0 + d, h0 : h0 + h, w0 : w0 + w])


class _NiftiReader(_Reader):
    def __init__(self, volume: Volume) -> None:
        super().__init__(volume)
        self.img = _nifti(volume.path)

    def read(self, box: tuple[int, ...]) -> np.ndarray:
        d0, h0, w0, d, h, w = box
        proxy = self.img.dataobj
        extra = (slice(None),) * (len(proxy.shape) - 3)
        data = np.asarray(proxy[(slice(w0, w0 + w), slice(h0, h0 + h), slice(d0, d0 + d), *extra)])
        data = data.reshape(w, h, d, -1)  # (i, j, k, c): singleton NIfTI axes dropped
        return np.ascontiguousarray(data.transpose(3, 2, 1, 0))  # (C, D, H, W)


class _TiffReader(_Reader):
    def __init__(self, volume: Volume) -> None:
        super().__init__(volume)
        self.tif = self._stack.enter_context(open_tiff(volume.path))

    def read(self, box: tuple[int, ...]) -> np.ndarray:
        d0, h0, w0, d, h, w = box
        pages = self.tif.series[0].pages
        out = np.empty((self.volume.channels, d, h, w), dtype=self.tif.series[0].dtype)
        for k in range(d):  # only the pages of the crop's slices are decoded
            page = pages[d0 + k].asarray()
            page = page.reshape(*page.shape[:2], -1)[h0 : h0 + h, w0 : w0 + w]
            out[:, k] = np.moveaxis(page, -1, 0)
        return out


_READERS: dict[str, type[_Reader]] = {"npy": _NpyReader, "nifti": _NiftiReader,
                                      "tiff": _TiffReader}  # fmt: skip


def open_volume_reader(volume: Volume) -> _Reader:
    """An open reader of ``volume``'s crops; ``close()`` it when done."""
    return _READERS[volume.format](volume)
