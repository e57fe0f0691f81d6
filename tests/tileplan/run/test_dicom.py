"""DICOM whole-slide images (a series of .dcm files, one per level) through OpenSlide 4: read at
a level and at an mpp, cropped to tissue, given as a file or as the series folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.tileplan.run.dicom_wsi import write_dicom_wsi
from tileplan.api import largest_image
from tileplan.run.data import DataError, load_csv
from tileplan.run.slides import SlideSource, open_pyramid, resolve
from tileplan.settings import DataSettings

pytest.importorskip("pydicom")


def _slide() -> list[np.ndarray]:
    """Level 0 (240 x 320, white glass with a pink blob) and its exact 2x block mean."""
    y, x = np.mgrid[0:240, 0:320]
    image = np.full((240, 320, 3), 250, np.uint8)
    blob = (y - 100) ** 2 / 50**2 + (x - 200) ** 2 / 70**2 <= 1
    image[blob] = np.stack([180 + (x[blob] % 40), 90 + (y[blob] % 30), 160 + (x[blob] % 20)], -1)
    half = image.reshape(120, 2, 160, 2, 3).astype(np.int64).sum(axis=(1, 3))
    return [image, ((2 * half + 4) // 8).astype(np.uint8)]  # rounded half up


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dicom_wsi(tmp_path_factory.mktemp("dicom") / "slide", _slide(), mpp=0.25)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILEPLAN_CACHE", str(tmp_path / "cache"))


def test_a_dicom_series_opens_as_a_pyramid_from_its_folder_or_any_file(series: Path) -> None:
    for given in (series, series / "level0.dcm", series / "level1.dcm"):
        pyramid = open_pyramid(given)
        assert pyramid.levels == ((240, 320), (120, 160))
        assert pyramid.mpp == pytest.approx((0.25, 0.25))
        assert pyramid.backend == "openslide"
        assert pyramid.exact(1)


@pytest.mark.parametrize(("settings", "expected"), [
    (DataSettings(level=0), lambda levels: levels[0]),
    (DataSettings(level=1), lambda levels: levels[1]),
    (DataSettings(mpp=0.5), lambda levels: levels[1]),  # level 1 as stored: 0.5 µm/px
])  # fmt: skip
def test_read_at_a_level_and_an_mpp_gives_the_stored_pixels(
    series: Path, settings: DataSettings, expected: object
) -> None:
    found = resolve(series, level=settings.level, mpp=settings.mpp, tissue=False,
                    max_shape=None)  # fmt: skip
    source = SlideSource(found.pyramid, found.region)
    try:
        got = source.read_all()[0].permute(1, 2, 0).numpy()
        crop = source.read((slice(30, 90), slice(17, 111)))[0].permute(1, 2, 0).numpy()
    finally:
        source.close()
    want = expected(_slide())  # type: ignore[operator]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(crop, want[30:90, 17:111])


def test_csv_rows_train_profile_and_tissue(series: Path, tmp_path: Path) -> None:
    csv = tmp_path / "train.csv"
    csv.write_text(f"image,label\n{series},1\n{series / 'level0.dcm'},0\n")
    data = load_csv(csv, (4096, 4096), DataSettings(mpp=1.0), command="train")
    assert [data.image_shape(i) for i in range(2)] == [(3, 60, 80), (3, 60, 80)]
    shape, channels = largest_image(csv, mpp=0.5, tissue=True, command="profile")
    assert channels == 3
    # The blob spans rows 50..150 and columns 130..270 of level 0: half that at 0.5 µm/px,
    # rounded outwards from the thumbnail.
    assert 50 <= shape[0] <= 56
    assert 70 <= shape[1] <= 76


def test_jpeg_tiles_read_close_to_the_written_pixels(tmp_path: Path) -> None:
    folder = write_dicom_wsi(tmp_path / "jpeg", _slide(), mpp=0.25, jpeg=True)
    found = resolve(folder, level=0, mpp=None, tissue=False, max_shape=None)
    source = SlideSource(found.pyramid, found.region)
    try:
        got = source.read_all()[0].permute(1, 2, 0).numpy().astype(int)
    finally:
        source.close()
    error = np.abs(got - _slide()[0])
    assert error.mean() < 2  # JPEG at quality 95 (the blob's sharp stripes ring more)
    assert np.percentile(error, 99) <= 16


def test_a_folder_without_dicom_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    csv = tmp_path / "train.csv"
    csv.write_text(f"image,label\n{tmp_path / 'empty'},1\n")
    with pytest.raises(DataError, match=r"row 1: .*is a folder without \.dcm files"):
        load_csv(csv, (512, 512), DataSettings(), command="train")
