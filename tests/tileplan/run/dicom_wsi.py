"""Write a small DICOM whole-slide image (VL Whole Slide Microscopy Image, TILED_FULL, one
file per level) with pydicom, as scanners and archives ship them, for OpenSlide 4 to read."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def _tiles(array: np.ndarray, tile: int) -> list[np.ndarray]:
    """Row-major tiles (the TILED_FULL frame order), edge tiles padded with white."""
    out = []
    for y in range(0, array.shape[0], tile):
        for x in range(0, array.shape[1], tile):
            padded = np.full((tile, tile, 3), 255, np.uint8)
            part = array[y : y + tile, x : x + tile]
            padded[: part.shape[0], : part.shape[1]] = part
            out.append(padded)
    return out


def _level(path: Path, array: np.ndarray, index: int, mpp: float, uids: tuple[str, str, str],
           tile: int, jpeg: bool) -> None:  # fmt: skip
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

    ds = Dataset()
    ds.file_meta = meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = WSI_SOP_CLASS, generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg else ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = WSI_SOP_CLASS, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids  # one series
    ds.Modality, ds.InstanceNumber, ds.PatientName, ds.PatientID = "SM", index + 1, "Test", "T1"
    ds.ImageType = (["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if index == 0
                    else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"])  # fmt: skip
    ds.Rows = ds.Columns = tile
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = array.shape[:2]
    ds.NumberOfFrames = -(-array.shape[0] // tile) * -(-array.shape[1] // tile)
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation, ds.PlanarConfiguration = 0, 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if jpeg else "RGB"  # as the JPEG's colours
    ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm, (row, column)
    measures.SliceThickness = 0.0005
    shared = Dataset()
    shared.PixelMeasuresSequence = [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    if jpeg:
        frames = []
        for t in _tiles(array, tile):
            out = io.BytesIO()
            Image.fromarray(t).save(out, "JPEG", quality=95, subsampling=1)
            frames.append(out.getvalue())
        ds.PixelData = encapsulate(frames)
        ds.LossyImageCompression = "01"
    else:
        ds.PixelData = b"".join(t.tobytes() for t in _tiles(array, tile))
    ds.save_as(path, enforce_file_format=True)


def write_dicom_wsi(folder: Path, levels: list[np.ndarray], mpp: float, *, tile: int = 128,
                    jpeg: bool = False) -> Path:  # fmt: skip
    """Write ``levels`` (``(H, W, 3)`` uint8, level 0 first, each an integer downsample) as a
    DICOM WSI series, ``level0.dcm``, ``level1.dcm``, ... in ``folder``; returns the folder."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = (generate_uid(), generate_uid(), generate_uid())
    h0 = levels[0].shape[0]
    for index, array in enumerate(levels):
        _level(folder / f"level{index}.dcm", array, index, mpp * h0 / array.shape[0], uids,
               tile, jpeg)  # fmt: skip
    return folder
