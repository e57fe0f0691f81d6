"""Augmentation of volumes: flips and axis permutations where the spacing allows, intensity,
noise, cutout, 3D rotation and elastic deformation, each crop equal to the same part of the
whole volume augmented first, and streamed from a NIfTI file on disk exactly as that whole
augmented volume streams (float64)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from executor import StreamingCNN
from tests.tileplan.run.test_volumes import _nifti
from tileplan.augment import Augmentation, AugmentError
from tileplan.run.volumes import VolumeSource, resolve_volume
from tileplan.settings import DataSettings

SPECS = ["flip", "rot90", "transpose", "dihedral", "crop:0.8", "rotate:30", "elastic:3",
         "intensity:0.2", "noise:0.05", "cutout:0.3",
         "dihedral,crop:0.9,rotate:20,elastic:2,intensity,noise,cutout"]  # fmt: skip


def _volume(shape: tuple[int, ...] = (1, 1, 13, 17, 19)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_volume_region_equals_the_same_part_of_the_whole(spec: str, data: st.DataObject) -> None:
    a = Augmentation.parse(spec, spacing=(1.0, 1.0, 1.0))
    source = a.apply(_volume(), seed=2, epoch=data.draw(st.integers(0, 3)),
                     index=data.draw(st.integers(0, 9)))  # fmt: skip
    whole = source.read_all()
    region = []
    for n in source.shape[2:]:
        lo = data.draw(st.integers(0, n - 1))
        region.append(slice(lo, data.draw(st.integers(lo + 1, n))))
    assert torch.equal(source.read(tuple(region)), whole[(..., *region)])


def test_the_symmetries_of_the_cube_respect_the_spacing() -> None:
    volume = _volume((1, 1, 6, 6, 6))
    cube = Augmentation.parse("dihedral", spacing=(1.0, 1.0, 1.0))
    seen = {cube.apply(volume, seed=0, epoch=0, index=i).params[0].geometry.perm
            for i in range(200)}  # fmt: skip
    assert len(seen) == 6  # every permutation of three equal axes
    slab = Augmentation.parse("dihedral", spacing=(3.0, 0.8, 0.8))
    for i in range(40):
        g = slab.apply(volume, seed=0, epoch=0, index=i).params[0].geometry
        assert g.perm in ((0, 1, 2), (0, 2, 1))  # depth (3 mm) never swaps with a plane axis
        got = slab.apply(volume, seed=0, epoch=0, index=i).read_all()
        ref = volume.permute(0, 1, *(2 + a for a in g.perm))
        dims = [2 + k for k, f in enumerate(g.flips) if f]
        assert torch.equal(got, ref.flip(dims) if dims else ref)
    # Without a known spacing a volume's axes are not permuted; rotation needs two equal axes.
    unknown = Augmentation.parse("dihedral")
    assert {unknown.apply(volume, seed=0, epoch=0, index=i).params[0].geometry.perm
            for i in range(20)} == {(0, 1, 2)}  # fmt: skip
    with pytest.raises(AugmentError, match="no two axes of these volumes have the same spacing"):
        Augmentation.parse("rotate", spacing=(3.0, 1.0, 0.8)).apply(volume, seed=0, epoch=0,
                                                                    index=0)  # fmt: skip


def test_rotation_turns_only_the_plane_of_equal_spacing() -> None:
    a = Augmentation.parse("rotate:40", spacing=(2.5, 0.8, 0.8))
    g = a.apply(_volume(), seed=0, epoch=0, index=1).params[0].geometry
    assert g.rotation is not None
    assert g.rotation[0, 0] == 1.0
    assert not g.rotation[0, 1:].any()
    assert not g.rotation[1:, 0].any()
    iso = Augmentation.parse("rotate:40", spacing=(1.0, 1.0, 1.0))
    r = iso.apply(_volume(), seed=0, epoch=0, index=1).params[0].geometry.rotation
    assert np.allclose(r @ r.T, np.eye(3))
    assert np.isclose(np.linalg.det(r), 1.0)
    assert np.abs(r - np.eye(3)).min() < 1  # a proper 3D turn: no axis left alone in general


def _trunk() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                         nn.Conv3d(3, 4, 3, stride=2, padding=1)).double()  # fmt: skip


def _step(trunk: nn.Module, image: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    trunk.zero_grad(set_to_none=True)
    scnn = StreamingCNN(trunk, (12, 16, 16), preprocess=lambda c: c.to(torch.float64))
    out = scnn.forward(image).requires_grad_()
    out.tanh().sum().backward()
    scnn.backward(image, out.grad)
    return out.detach(), [p.grad.clone() for p in trunk.parameters()]


def test_an_augmented_nifti_volume_streams_as_the_whole_augmented_volume(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 1000, (26, 40, 44)).astype(np.int16)  # (D, H, W) as tileplan reads
    path = _nifti(tmp_path / "v.nii", data, (2.0, 0.8, 0.8))
    settings = DataSettings(spacing=(2.0, 0.8, 0.8), intensity="zscore")
    source = VolumeSource(resolve_volume(path, settings, max_shape=None))
    a = Augmentation.parse("flip,transpose,rotate:25,elastic:2,intensity,noise:0.1,cutout",
                           spacing=settings.spacing)  # fmt: skip
    augmented = a.apply(source, seed=4, epoch=1, index=0)
    whole = augmented.read_all()
    trunk = _trunk()
    got, expected = _step(trunk, augmented), _step(trunk, whole)
    assert torch.equal(got[0], expected[0])
    for g, e in zip(got[1], expected[1], strict=True):
        assert torch.equal(g, e)
    assert augmented.params[0].geometry.rotation[0, 0] == 1.0
    grid = StreamingCNN(_trunk(), (12, 16, 16)).tile_grid(whole.shape[2:])
    assert grid.n_tiles > 4


def test_train_augments_volumes_through_the_cli(tmp_path: Path) -> None:
    from tests.tileplan.run.tiny_runs import run_cli

    model = Path(__file__).resolve().parents[3] / "examples" / "small_cnn3d.py"
    code, out = run_cli("demo-data", tmp_path / "vols", "--volumes", "--n", 4, "--size", 48)
    assert code == 0, out
    code, out = run_cli("profile", model, "--data", tmp_path / "vols/train.csv", "--spacing",
                        "2.5x0.8x0.8", "--tile", "12x24x24", "--no-measure",
                        "--out", tmp_path / "plan.yaml")  # fmt: skip
    assert code == 0, out
    base = ["train", model, "--plan", tmp_path / "plan.yaml", "--data",
            tmp_path / "vols/train.csv", "--epochs", 1, "--batch", 1, "--num-workers", 0,
            "--no-report", "--spacing", "2.5x0.8x0.8"]  # fmt: skip
    spec = "dihedral,rotate:15,elastic:2,intensity,noise,cutout"
    code, out = run_cli(*base, "--out", tmp_path / "run", "--augment", spec)
    assert code == 0, out
    rows = (tmp_path / "run" / "augmentations.csv").read_text().splitlines()
    assert len(rows) == 1 + 2  # 2 of the 4 demo volumes train
    assert "symmetry=axes0," in rows[1]  # depth (2.5 mm) stays the first axis
    code, out = run_cli(*base, "--out", tmp_path / "bad", "--augment", "scale")
    assert code == 1
    assert "leave scale out" in out
    assert not (tmp_path / "bad" / "last.pt").exists()
