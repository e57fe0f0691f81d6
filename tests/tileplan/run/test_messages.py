"""Every refusal the data layer can raise, as each command prints it: one line naming the
file, what it has and what the run or model needs, and only options that command has."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import click
import numpy as np
import pytest
import tifffile
from PIL import Image
from torch import nn

from executor import StreamingCNN
from tests.tileplan.run.test_volumes import _nifti
from tileplan.cli import cli
from tileplan.run.advice import COMMAND_OPTIONS, UnusableImageError
from tileplan.run.data import DataError, describe_error, load_csv
from tileplan.run.demo_slides import write_svs
from tileplan.run.sizes import too_small
from tileplan.run.slides import resolve
from tileplan.run.volumes import resolve_volume
from tileplan.settings import DataSettings

COMMANDS = ("train", "profile", "predict", "check-data")
READING = {"--mpp", "--level", "--tissue", "--oversize", "--assume-mpp", "--spacing",
           "--assume-spacing", "--intensity"}  # fmt: skip


def _options(command: str) -> set[str]:
    found = cli.commands[command]
    assert isinstance(found, click.Command)
    return {o for p in found.params for o in getattr(p, "opts", ()) if o.startswith("--")}


def test_the_table_of_reading_options_is_each_commands_own() -> None:
    for command in COMMANDS:
        assert COMMAND_OPTIONS[command] == _options(command) & READING, command


def _unknown_compression(path: Path) -> Path:
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), compression="zlib")
    raw = bytearray(path.read_bytes())
    entry = raw.find(bytes([0x03, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00]))  # tag 259, SHORT
    raw[entry + 8 : entry + 10] = struct.pack("<H", 52479)
    path.write_bytes(raw)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    Image.new("RGB", (64, 48), (200, 120, 160)).save(root / "plain.png")
    Image.new("L", (64, 48)).save(root / "gray.png")
    Image.new("RGB", (64, 48), (255, 255, 255)).save(root / "blank.png")
    _nifti(root / "nospacing.nii", np.ones((4, 6, 6), np.int16), None)
    _nifti(root / "coarse.nii", np.ones((4, 6, 6), np.int16), (3.0, 3.0, 3.0))
    _nifti(root / "flat.nii", np.ones((30, 6, 6), np.int16), (1.0, 1.0, 1.0))
    return {
        "svs": Path(write_svs(root / "a.svs", 300, 420, mpp=0.25, seed=1, label=1,
                              downsamples=(1, 2))),  # fmt: skip
        "plain": root / "plain.png", "gray": root / "gray.png", "blank": root / "blank.png",
        "compression": _unknown_compression(root / "u.tif"),
        "nospacing": root / "nospacing.nii", "coarse": root / "coarse.nii",
        "flat": root / "flat.nii",
    }  # fmt: skip


# (file, settings, the plan's largest image, what the message must say)
SLIDE_CASES = {
    "no_mpp": ("plain", DataSettings(mpp=1.0), None, "records no resolution"),
    "too_fine": ("svs", DataSettings(mpp=0.1), None, "coarser than the 0.1 µm/px"),
    "sub_pixel": ("plain", DataSettings(mpp=1e6, assume_mpp=0.5), None, "smaller than one pixel"),
    "no_level": ("svs", DataSettings(level=7), None, "has no level 7"),
    "tissue_gray": ("gray", DataSettings(tissue=True), None, "colour saturation"),
    "no_tissue": ("blank", DataSettings(tissue=True), None, "shows no tissue"),
    "oversize": ("svs", DataSettings(oversize="refuse"), (100, 100), "larger than the plan's"),
    "compression": ("compression", DataSettings(), None, "compression 52479"),
}
VOLUME_CASES = {
    "no_spacing": ("nospacing", DataSettings(spacing=(2.0, 2.0, 2.0)), None,
                   "records no voxel spacing"),
    "finer": ("coarse", DataSettings(spacing=(2.0, 2.0, 2.0)), None, "coarser on an axis"),
    "oversize": ("flat", DataSettings(oversize="refuse"), (16, 16, 16), "larger than the plan"),
    "zscore": ("flat", DataSettings(intensity="zscore"), None, "constant in a channel"),
    "flat_file": ("plain", DataSettings(), None, "not a volume file"),
}  # fmt: skip


def _message(files: dict[str, Path], tmp_path: Path, case: tuple, command: str,
             volumes: bool) -> str:  # fmt: skip
    """The line ``command`` prints: a CSV row for train and profile, predict's own line."""
    name, settings, largest, _ = case
    path = files[name]
    if command == "predict":  # what predict_files raises, from the functions it calls
        try:
            if volumes:
                resolve_volume(path, settings, max_shape=largest)
            else:
                resolve(path, level=settings.level, mpp=settings.mpp, tissue=settings.tissue,
                        max_shape=largest, oversize=settings.oversize,
                        assume_mpp=settings.assume_mpp)  # fmt: skip
        except Exception as exc:  # noqa: BLE001 (every refusal)
            return f"cannot predict '{path}': {describe_error(exc, 'predict')}"
        pytest.fail(f"{name} was not refused")
    csv = tmp_path / f"{command}.csv"
    csv.write_text(f"image,label\n{path},1\n")
    with pytest.raises(DataError) as info:
        load_csv(csv, largest, settings, n_axes=3 if volumes else 2, command=command)
    return str(info.value)


def _check(message: str, command: str, fact: str, path: Path) -> None:
    assert "\n" not in message
    assert fact in message
    assert path.name in message
    named = set(re.findall(r"--[a-z][a-z-]*", message))
    assert named <= _options(command), (command, message)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(SLIDE_CASES))
def test_slide_refusals_name_only_the_commands_options(
    files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
    command: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("TILEPLAN_CACHE", str(tmp_path / "cache"))
    message = _message(files, tmp_path, SLIDE_CASES[case], command, volumes=False)
    _check(message, command, SLIDE_CASES[case][3], files[SLIDE_CASES[case][0]])


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(VOLUME_CASES))
def test_volume_refusals_name_only_the_commands_options(
    files: dict[str, Path], tmp_path: Path, case: str, command: str
) -> None:
    message = _message(files, tmp_path, VOLUME_CASES[case], command, volumes=True)
    _check(message, command, VOLUME_CASES[case][3], files[VOLUME_CASES[case][0]])


def test_a_file_without_resolution_is_told_how_to_state_it(
    files: dict[str, Path], tmp_path: Path
) -> None:
    """The reported case: a PNG under a run at --mpp was told 'use --level', which predict
    does not have. Each command now offers what it has, and the statement works."""
    case = SLIDE_CASES["no_mpp"]
    train = _message(files, tmp_path, case, "train", volumes=False)
    assert "--assume-mpp" in train
    assert "'mpp' column" in train
    assert "--level" in train
    predict = _message(files, tmp_path, case, "predict", volumes=False)
    assert "--assume-mpp" in predict
    assert "--level" not in predict
    assert "column" not in predict
    found = resolve(files["plain"], level=None, mpp=1.0, tissue=False, max_shape=None,
                    assume_mpp=0.5)  # fmt: skip
    assert found.region.scaled == (24, 32)  # 48x64 px at 0.5 µm/px, read at 1 µm/px
    csv = tmp_path / "rows.csv"
    csv.write_text(f"image,label,mpp\n{files['plain']},1,0.25\n")
    data = load_csv(csv, None, DataSettings(mpp=1.0), command="train")
    assert data.image_shape(0) == (3, 12, 16)  # the row's statement


def test_an_image_too_small_for_the_model_says_what_it_needs() -> None:
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3))
    scnn = StreamingCNN(trunk, (64, 64))
    problem = too_small(scnn, (4, 40), volumes=False, reading="2 µm/px")
    assert isinstance(problem, UnusableImageError)
    # Conv 3/2, pool 2, conv 3: the last conv needs 3 pooled positions, 6 strided, 13 px.
    assert problem.fact == ("is 4x40 px as read (2 µm/px), and the model needs at least 13x13 px")
    assert "--mpp" in problem.render("train")
    assert "--" not in problem.render("predict")
    assert too_small(scnn, (13, 13), volumes=False, reading="") is None
    assert too_small(scnn, (12, 13), volumes=False, reading="") is not None
