"""Volumes end to end: readers (NIfTI, .npy, TIFF stacks), spacing and intensity, refusals,
float64 equivalence of 3-D trunks through the model-file loading path, and the CLI story."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel
import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from executor import GeometryError, SegmentSpec, StreamingCNN
from tests.oracle import compare_with_conventional
from tileplan.cli import cli
from tileplan.planning.model_file import load_model_file
from tileplan.run.data import DataError, load_csv
from tileplan.run.sizes import too_small
from tileplan.run.volume_readers import VolumeFileError, probe_volume
from tileplan.run.volumes import VolumeSource, resolve_volume
from tileplan.settings import DataSettings, SettingsError

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _nifti(path: Path, volume: np.ndarray, spacing: tuple[float, float, float] | None,
           slope: float | None = None) -> Path:  # fmt: skip
    """(D, H, W[, C]) written as NIfTI array (W, H, D[, C]) with voxel sizes (mm)."""
    data = np.moveaxis(volume, (0, 1, 2), (2, 1, 0))
    zooms = spacing or (1.0, 1.0, 1.0)
    img = nibabel.Nifti1Image(data, np.diag([zooms[2], zooms[1], zooms[0], 1.0]))
    img.header.set_xyzt_units("mm" if spacing else "unknown")
    if spacing is None:
        img.header["pixdim"][1:4] = 0  # records no spacing
    if slope is not None:
        img.header.set_slope_inter(slope, -1024.0)
    raw = img.to_bytes()
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def _csv(path: Path, rows: list[tuple[str, ...]], header: str = "image,label") -> Path:
    path.write_text(header + "\n" + "".join(",".join(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_nifti_crops_equal_the_whole_volume_in_tileplans_axis_order(tmp_path: Path,
                                                                    name: str) -> None:  # fmt: skip
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, (7, 11, 13)).astype(np.int16)
    path = _nifti(tmp_path / name, vol, (2.5, 0.8, 0.7), slope=2.0)
    info = probe_volume(path)
    assert (info.shape, info.channels, info.spacing) == ((7, 11, 13), 1, (2.5, 0.8, 0.7))
    region = resolve_volume(path, DataSettings())
    whole = VolumeSource(region).read_all()
    assert whole.shape == (1, 1, 7, 11, 13)
    assert whole.dtype == torch.float32
    np.testing.assert_array_equal(whole[0, 0].numpy(), vol * 2.0 - 1024.0)  # slope, intercept
    crop = VolumeSource(region).read((slice(2, 5), slice(3, 10), slice(0, 4)))
    assert torch.equal(crop, whole[..., 2:5, 3:10, 0:4])


def test_npy_and_tiff_stack_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vol = rng.random((2, 6, 9, 10), dtype=np.float32)  # (C, D, H, W)
    np.save(tmp_path / "cf.npy", vol)
    np.save(tmp_path / "cl.npy", np.moveaxis(vol, 0, -1))  # (D, H, W, C)
    for name in ("cf.npy", "cl.npy"):
        region = resolve_volume(tmp_path / name, DataSettings())
        got = VolumeSource(region).read_all()[0]
        np.testing.assert_array_equal(got.numpy(), vol)
    stack = (rng.random((5, 9, 10)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"spacing": 2.0, "unit": "mm", "axes": "ZYX"})  # fmt: skip
    info = probe_volume(tmp_path / "s.tif")
    assert (info.shape, info.spacing) == ((5, 9, 10), (2.0, 0.5, 0.5))
    source = VolumeSource(resolve_volume(tmp_path / "s.tif", DataSettings()))
    np.testing.assert_array_equal(source.read((slice(1, 4), slice(0, 9), slice(2, 7)))[0, 0],
                                  stack[1:4, :, 2:7])  # fmt: skip


def test_spacing_resamples_exactly_and_crops_match_the_whole(tmp_path: Path) -> None:
    """Area averages from global coordinates: any crop equals the same part of the whole."""
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(9, 20, 21)).astype(np.float32)
    path = _nifti(tmp_path / "v.nii", vol, (1.0, 0.5, 0.5))
    region = resolve_volume(path, DataSettings(spacing=(3.0, 1.0, 0.7)))
    assert region.scaled == (3, 10, 15)
    source = VolumeSource(region)
    whole = source.read_all()[0, 0].numpy()
    # Output voxel (0, 0, 0) covers stored [0, 3) x [0, 2) x [0, 1.4): the last column by 0.4.
    weights = np.array([1.0, 0.4])
    expected = (vol[0:3, 0:2, 0:2].astype(np.float64) * weights).sum() / (3 * 2 * 1.4)
    assert whole[0, 0, 0] == pytest.approx(expected, rel=1e-6)
    for box in [(slice(0, 2), slice(3, 9), slice(4, 15)), (slice(1, 3), slice(0, 1), slice(0, 7))]:
        np.testing.assert_array_equal(source.read(box)[0, 0].numpy(), whole[box])


def test_block_means_along_whole_factors(tmp_path: Path) -> None:
    vol = np.arange(6 * 8 * 4, dtype=np.float32).reshape(6, 8, 4)
    path = _nifti(tmp_path / "v.nii", vol, (1.0, 1.0, 1.0))
    got = VolumeSource(resolve_volume(path, DataSettings(spacing=(2.0, 4.0, 1.0)))).read_all()
    expected = vol.reshape(3, 2, 2, 4, 4).mean(axis=(1, 3))
    np.testing.assert_allclose(got[0, 0].numpy(), expected, rtol=1e-6)


def test_intensity_window_and_zscore(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    vol = rng.integers(-1024, 2000, (4, 8, 8)).astype(np.int16)
    path = _nifti(tmp_path / "ct.nii", vol, (1.0, 1.0, 1.0))
    window = VolumeSource(resolve_volume(path, DataSettings(intensity="window:-1000,400")))
    expected = (np.clip(vol, -1000, 400) + 1000) / 1400
    np.testing.assert_allclose(window.read_all()[0, 0].numpy(), expected, rtol=1e-6)
    z = VolumeSource(resolve_volume(path, DataSettings(intensity="zscore"))).read_all()
    assert float(z.mean()) == pytest.approx(0, abs=1e-5)
    assert float(z.double().std(unbiased=False)) == pytest.approx(1, abs=1e-5)
    with pytest.raises(SettingsError, match="window:LO,HI"):
        DataSettings(intensity="window:5,1")


# --------------------------------------------------------------------------------------------
# Refusals: one line naming the row, the file, what it has and the fix
# --------------------------------------------------------------------------------------------


def _refusal(tmp_path: Path, rows: list[tuple[str, ...]], header: str = "image,label",
             **settings: object) -> str:  # fmt: skip
    path = _csv(tmp_path / "data.csv", rows, header)
    with pytest.raises(DataError) as info:
        load_csv(path, (16, 16, 16), DataSettings(**settings), n_axes=3)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert "row 1" in message
    return message


def test_bad_volumes_are_refused_in_one_line(tmp_path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "flat.png")
    assert "not a volume file (a 2-D image)" in _refusal(tmp_path, [("flat.png", "0")])
    np.save(tmp_path / "flat.npy", np.zeros((8, 8), np.float32))
    assert "2-D .npy array of shape (8, 8), not a volume" in _refusal(
        tmp_path, [("flat.npy", "0")])  # fmt: skip
    vol = np.zeros((4, 6, 6), np.int16)
    raw = _nifti(tmp_path / "t.nii", vol, (1.0, 1.0, 1.0)).read_bytes()
    (tmp_path / "t.nii").write_bytes(raw[: len(raw) - 40])
    assert "cannot be read as nifti" in _refusal(tmp_path, [("t.nii", "0")])
    (tmp_path / "c.nii.gz").write_bytes(gzip.compress(raw)[:-30])
    assert "cannot be read as nifti" in _refusal(tmp_path, [("c.nii.gz", "0")])
    _nifti(tmp_path / "nospacing.nii", vol, None)
    message = _refusal(tmp_path, [("nospacing.nii", "0")], spacing=(2.0, 2.0, 2.0))
    assert "records no voxel spacing (it is 4x6x6 voxels)" in message
    assert "'spacing' column" in message
    _nifti(tmp_path / "coarse.nii", vol, (3.0, 3.0, 3.0))
    assert "resample to --spacing 3x3x3 or coarser" in _refusal(
        tmp_path, [("coarse.nii", "0")], spacing=(2.0, 2.0, 2.0))  # fmt: skip
    _nifti(tmp_path / "big.nii", np.zeros((20, 6, 6), np.int16), (1.0, 1.0, 1.0))
    message = _refusal(tmp_path, [("big.nii", "0")], oversize="refuse")
    assert "20x6x6 voxels" in message
    assert "--oversize crop" in message
    assert "is not mm per voxel" in _refusal(tmp_path, [("coarse.nii", "0", "2xq")],
                                             header="image,label,spacing")  # fmt: skip


def test_a_csv_spacing_states_what_the_file_does_not(tmp_path: Path) -> None:
    _nifti(tmp_path / "nospacing.nii", np.ones((4, 6, 6), np.int16), None)
    path = _csv(tmp_path / "d.csv", [("nospacing.nii", "1", "1x0.5x0.5")], "image,label,spacing")
    data = load_csv(path, (16, 16, 16), DataSettings(spacing=(2.0, 1.0, 1.0)), n_axes=3)
    assert data.image_shape(0) == (1, 2, 3, 3)
    with pytest.raises(DataError, match="'spacing' column states the voxel spacing of volumes"):
        load_csv(path)
    with pytest.raises(VolumeFileError, match="not a volume file"):
        probe_volume(tmp_path / "d.csv")


# --------------------------------------------------------------------------------------------
# Exactness: 3-D trunks through the model-file loading path
# --------------------------------------------------------------------------------------------


def test_r3d18_trunk_streams_exactly_in_float64(tmp_path: Path) -> None:
    """torchvision's r3d_18 (its receptive field is 109 slices deep, more than a CPU test's
    volume) streamed in segments, whose tiles need only their own halo: anisotropic tiles
    that do not divide the maps."""
    pytest.importorskip("torchvision")
    loaded = load_model_file(EXAMPLES / "r3d18.py")
    assert loaded.n_axes == 3
    assert "layer4" in loaded.split
    torch.manual_seed(0)
    image = torch.randn(1, 1, 20, 72, 68)
    segments = [SegmentSpec("layer1_1_relu", (14, 40, 40)), SegmentSpec("layer2_1_relu",
                (16, 24, 24)), SegmentSpec("layer3_1_relu", (10, 18, 18)),
                SegmentSpec(None, (5, 9, 9))]  # fmt: skip
    result = compare_with_conventional(loaded.trunk, image, 0, segments=segments)
    assert result.n_tiles > 8


@st.composite
def _trunks3d(draw: st.DrawFn) -> nn.Sequential:
    layers: list[nn.Module] = []
    c = 2
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "maxpool", "avgpool", "bn", "act"]))
        if kind == "conv":
            k = draw(st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)))
            s = draw(st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 2)))
            pad = tuple(draw(st.integers(0, n // 2)) for n in k)
            out = draw(st.integers(1, 3))
            layers.append(nn.Conv3d(c, out, k, s, pad))
            c = out
        elif kind in ("maxpool", "avgpool"):
            k = draw(st.tuples(st.integers(1, 2), st.integers(2, 3), st.integers(2, 3)))
            pool = nn.MaxPool3d if kind == "maxpool" else nn.AvgPool3d
            layers.append(pool(k, k))
        elif kind == "bn":
            bn = nn.BatchNorm3d(c).eval()
            bn.running_mean.uniform_(-1, 1)
            layers.append(bn)
        else:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trunk=_trunks3d(), size=st.tuples(st.integers(9, 14), st.integers(20, 33),
                                          st.integers(20, 33)), data=st.data())  # fmt: skip
def test_random_3d_trunks_stream_exactly(trunk: nn.Sequential, size: tuple[int, int, int],
                                         data: st.DataObject) -> None:  # fmt: skip
    torch.manual_seed(1)
    image = torch.randn(1, 2, *size)
    scnn = StreamingCNN(trunk.double(), size)
    try:
        scnn.tile_grids(size)
    except GeometryError:  # the volume is too small for this trunk: nothing to compare
        return
    geometry = scnn.program.streams[0].geometry
    smallest = [geometry.min_tile(ax) for ax in range(3)]
    # At most 3 tiles per axis (27 in all): a trunk without halo would take 1-px tiles.
    tile = tuple(data.draw(st.integers(min(n, max(m, -(-n // 3))), n)) for m, n in
                 zip(smallest, size, strict=True))  # fmt: skip
    compare_with_conventional(trunk, image, tile)


# --------------------------------------------------------------------------------------------
# The CLI story: demo volumes -> profile -> train -> report -> predict -> view
# --------------------------------------------------------------------------------------------


def test_volume_workflow_through_the_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    model = str(EXAMPLES / "small_cnn3d.py")

    def run(*args: str) -> str:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("demo-data", str(tmp_path / "vols"), "--volumes", "--n", "6", "--size", "48")
    out = run(
        "profile",
        model,
        "--data",
        str(tmp_path / "vols/train.csv"),
        "--intensity",
        "window:-1000,400",
        "--tile",
        "12x24x24",
        "--out",
        str(tmp_path / "plan.yaml"),
    )
    assert "16x48x48" in out  # at least 16 slices of 48 x 48 px
    run("train", model, "--plan", str(tmp_path / "plan.yaml"), "--data",
        str(tmp_path / "vols/train.csv"), "--val", str(tmp_path / "vols/val.csv"), "--out",
        str(tmp_path / "run"), "--epochs", "1", "--batch", "2", "--num-workers", "0",
        "--intensity", "window:-1000,400")  # fmt: skip
    assert "voxels" in run("report", str(tmp_path / "run"))
    rows = (tmp_path / "run/volumes.csv").read_text().splitlines()
    assert rows[0].startswith("csv,row,image,spacing_mm,scaled_d")
    assert rows[1].endswith(',2.5x0.8x0.8,16,48,48,0,0,0,16,48,48,"window:-1000,400"')
    out = run("predict", model, str(tmp_path / "vols/vol_000.nii.gz"), "--plan",
              str(tmp_path / "plan.yaml"), "--checkpoint", str(tmp_path / "run/last.pt"),
              "--saliency", str(tmp_path / "maps"))  # fmt: skip
    assert "vol_000.nii.gz" in out
    saliency = np.load(tmp_path / "maps/vol_000.nii.saliency.npy")
    assert saliency.shape == (1, 16, 48, 48)
    # A volume smaller than the model takes: predict says its size and the model's need,
    # and names none of train's options.
    _nifti(tmp_path / "tiny.nii", np.zeros((2, 4, 4), np.int16), (2.5, 0.8, 0.8))
    result = runner.invoke(cli, ["predict", model, str(tmp_path / "tiny.nii"), "--plan",
                                 str(tmp_path / "plan.yaml"), "--checkpoint",
                                 str(tmp_path / "run/last.pt")])  # fmt: skip
    assert result.exit_code != 0
    assert "is 2x4x4 voxels as read" in result.output
    assert "the model needs at least" in result.output
    assert "--spacing" not in result.output
    # Training refuses it before it starts, naming the row; read as stored, no spacing helps.
    tiny_csv = _csv(tmp_path / "tiny.csv", [("tiny.nii", "1")])
    result = runner.invoke(cli, ["train", model, "--plan", str(tmp_path / "plan.yaml"), "--data",
                                 str(tiny_csv), "--out", str(tmp_path / "tiny_run"),
                                 "--num-workers", "0"])  # fmt: skip
    assert result.exit_code == 1
    assert "row 1: 'tiny.nii' is 2x4x4 voxels as read (voxels as stored" in result.output
    assert "the model needs at least" in result.output
    assert "--spacing" not in result.output
    run("view", str(tmp_path / "plan.yaml"), "--out", str(tmp_path / "plan.html"), "--no-open")
    run("view", str(tmp_path / "run"), "--out", str(tmp_path / "run.html"), "--no-open")
    assert (tmp_path / "plan.html").stat().st_size > 0
    result = runner.invoke(cli, ["profile", model, "--image", "48x48"])
    assert result.exit_code != 0
    assert "has 2 axes but the model takes 3 spatial axes" in result.output


def test_the_python_api_plans_and_streams_a_volume_model_exactly() -> None:
    """``tileplan.profile`` on a 3-D module (a single size means every axis; a 2-axis size is
    refused), then ``tileplan.stream`` trained by ``loss.backward()``: float64 gradients equal
    conventional backprop's, with anisotropic tiles, segments and BatchNorm statistics."""
    import copy

    import tileplan
    from tests.oracle import assert_exact

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(1, 4, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2)), nn.BatchNorm3d(4),
        nn.ReLU(), nn.MaxPool3d(2), nn.Conv3d(4, 6, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 2),
    )  # fmt: skip
    with pytest.raises(ValueError, match="has 2 axes but the model takes 3 spatial axes"):
        tileplan.profile(model, image=(64, 64), channels=1, measure=False, budget="1GiB")
    for options in ({"tile": (10, 24, 24)}, {"bn": "train", "max_tile": 24}):
        plan = tileplan.profile(model, image=(18, 60, 52), channels=1, measure=False,
                                budget="1GiB", dtype="float64", **options)  # fmt: skip
        assert plan.n_axes == 3
        assert sum(g.n_tiles for g in plan.tile_grids()) > 2
        net_model = copy.deepcopy(model).double()
        ref = copy.deepcopy(net_model)
        net = tileplan.stream(net_model, plan).train()
        for a, b in zip(net.model.modules(), ref.modules(), strict=True):
            b.train(a.training)
        image = torch.randn(2, 1, 18, 60, 52, dtype=torch.float64)
        target = torch.tensor([0, 1])
        nn.functional.cross_entropy(net(image), target).backward()
        nn.functional.cross_entropy(ref(image), target).backward()
        want = {n: p.grad for n, p in ref.named_parameters()}
        largest = max(g.abs().max().item() for g in want.values())
        for name, p in net_model.named_parameters():
            assert_exact(p.grad, want[name], f"grad of {name}", largest)


def test_the_python_api_plans_for_the_largest_volume_of_a_csv(tmp_path: Path) -> None:
    """``tileplan.profile(model3d, data=csv)`` reads the CSV as volumes (the model's layers
    say so), resampled to ``spacing``; a refusal names this function's keywords."""
    import tileplan

    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                          nn.AdaptiveMaxPool3d(1), nn.Flatten(), nn.Linear(4, 2))  # fmt: skip
    _nifti(tmp_path / "a.nii", np.zeros((8, 20, 24), np.int16), (2.0, 1.0, 1.0))
    _nifti(tmp_path / "b.nii", np.zeros((12, 16, 16), np.int16), None)
    csv = _csv(tmp_path / "d.csv", [("a.nii", "0"), ("b.nii", "1")])
    plan = tileplan.profile(model, data=csv, spacing=(2.0, 2.0, 2.0), assume_spacing=(1, 1, 1),
                            measure=False, budget="1GiB")  # fmt: skip
    assert plan.image_shape_px == (8, 10, 12)  # a: 8x10x12; b: 6x8x8 at 2 mm
    assert plan.channels == 1
    with pytest.raises(DataError, match=r"state its spacing with assume_spacing="):
        tileplan.profile(model, data=csv, spacing=(2.0, 2.0, 2.0), measure=False, budget="1GiB")


def test_more_refusals_of_volumes_say_what_is_there(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "cyx.tif", np.zeros((3, 16, 16), np.uint8), imagej=True,
                     metadata={"axes": "CYX"})  # fmt: skip
    assert "axes CYX, not a stack of slices" in _refusal(tmp_path, [("cyx.tif", "0")])
    _nifti(tmp_path / "thin.nii", np.zeros((2, 8, 8), np.int16), (1.0, 1.0, 1.0))
    message = _refusal(tmp_path, [("thin.nii", "0")], spacing=(5.0, 1.0, 1.0))
    assert "smaller than one voxel on an axis at the 5x1x1 mm" in message
    assert "finer --spacing" in message
    trunk = nn.Sequential(nn.Conv3d(1, 2, 3), nn.MaxPool3d(2), nn.Conv3d(2, 2, 3))
    scnn = StreamingCNN(trunk, (16, 16, 16))
    as_stored = too_small(scnn, (4, 16, 16), volumes=True, reading="voxels as stored",
                          resampled=False)  # fmt: skip
    assert as_stored is not None
    assert "the model needs at least 8x8x8 voxels" in as_stored.fact
    assert as_stored.render("train") == as_stored.fact  # no spacing makes it larger
    resampled = too_small(scnn, (4, 16, 16), volumes=True, reading="2x2x2 mm voxels")
    assert resampled is not None
    assert "finer --spacing" in resampled.render("train")
