"""Run settings written once: normalisation, optimizers, the run spec, devices."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from executor import OPTIMIZER_NAMES, from_data, to_data
from tests.plans import make_plan
from tileplan.settings import (
    OPTIMIZERS,
    Normalization,
    RunSpec,
    SettingsError,
    resolve_device,
)

# --------------------------------------------------------------------------------------------
# Normalization
# --------------------------------------------------------------------------------------------


def test_normalization_values_and_input_untouched() -> None:
    tile = torch.tensor([[[0, 255], [51, 102]], [[255, 0], [0, 0]]], dtype=torch.uint8)
    before = tile.clone()
    out = Normalization(mean=(0.5, 0.0), std=(0.5, 2.0)).apply(tile, torch.float64)
    expected = (
        tile.double() / 255 - torch.tensor([0.5, 0.0]).view(2, 1, 1).double()
    ) / torch.tensor([0.5, 2.0]).view(2, 1, 1).double()
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert out[0, 0, 0].item() == pytest.approx(-1.0)
    assert out[0, 0, 1].item() == pytest.approx(1.0)
    assert out[1, 0, 0].item() == pytest.approx(0.5)
    assert torch.equal(tile, before)


def test_normalization_of_batches_volumes_and_low_precision() -> None:
    rng = np.random.default_rng(0)
    norm = Normalization(mean=(0.45,) * 3, std=(0.25,) * 3)
    batch = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 8, 8), dtype=np.uint8))
    ref = (batch.double() / 255 - 0.45) / 0.25
    out32 = norm.apply(batch)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-5)
    out16 = norm.apply(batch, torch.float16)
    torch.testing.assert_close(out16.double(), ref, rtol=0, atol=1e-2)
    volume = torch.from_numpy(rng.integers(0, 256, size=(1, 3, 4, 5, 6), dtype=np.uint8))
    torch.testing.assert_close(
        norm.apply(volume).double(), (volume.double() / 255 - 0.45) / 0.25, rtol=0, atol=1e-5
    )


def test_float_images_are_not_rescaled() -> None:
    out = Normalization(mean=(10.0,), std=(5.0,)).apply(torch.tensor([[[10.0, 20.0]]]))
    torch.testing.assert_close(out, torch.tensor([[[0.0, 2.0]]]))


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((0.1, 0.2), (1.0,), "one per channel"),
        ((0.0, 0.0, 0.0), (1.0, 0.0, 1.0), "must be > 0"),
        ((math.nan,), (1.0,), "finite"),
        ((), (), "one per channel"),
    ],
)
def test_bad_normalization_is_refused(mean: tuple, std: tuple, match: str) -> None:
    with pytest.raises(SettingsError, match=match):
        Normalization(mean=mean, std=std)


def test_bad_tiles_are_refused() -> None:
    norm = Normalization.default(1)
    with pytest.raises(SettingsError, match="uint8 or floating"):
        norm.apply(torch.zeros(1, 2, 2, dtype=torch.int16))
    with pytest.raises(SettingsError, match="channels"):
        norm.apply(torch.zeros(3, 2, 2, dtype=torch.uint8))
    with pytest.raises(SettingsError, match="floating point"):
        norm.apply(torch.zeros(1, 2, 2, dtype=torch.uint8), torch.int32)


def test_default_normalization_by_channel_count() -> None:
    assert Normalization.default(3).mean == (0.485, 0.456, 0.406)
    assert Normalization.default(1) == Normalization(mean=(0.5,), std=(0.5,))
    assert Normalization.default(4).channels == 4


# --------------------------------------------------------------------------------------------
# Optimizers and the run spec
# --------------------------------------------------------------------------------------------


def test_optimizers_follow_the_contract_names_and_build() -> None:
    assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES
    param = torch.nn.Parameter(torch.zeros(3))
    for name, spec in OPTIMIZERS.items():
        optimizer = spec.build([param], 0.1)
        assert optimizer.param_groups[0]["lr"] == 0.1, name
    assert OPTIMIZERS["adam"].state_factor == 2
    assert OPTIMIZERS["sgd"].state_factor == 1


@pytest.mark.parametrize(
    ("dtype", "param", "amp", "scaling"),
    [
        ("float32", torch.float32, None, False),
        ("float64", torch.float64, None, False),
        ("bfloat16", torch.float32, torch.bfloat16, False),
        ("float16", torch.float32, torch.float16, True),
    ],
)
def test_run_spec_takes_precision_from_the_plan(
    dtype: str, param: torch.dtype, amp: torch.dtype | None, scaling: bool
) -> None:
    spec = RunSpec.from_plan(make_plan(dtype=dtype), lr=1e-3)
    assert spec.precision.param_dtype == param
    assert spec.precision.amp_dtype == amp
    assert spec.precision.grad_scaling == scaling
    assert spec.optimizer == "adam"  # the plan's
    crop = spec.preprocess()(torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    assert crop.dtype == param


def test_run_spec_options_and_round_trip() -> None:
    plan = make_plan(channels=1)
    spec = RunSpec.from_plan(plan, optimizer="sgd", mean=(0.2,), std=(0.3,), batch=4)
    assert spec.normalization == Normalization(mean=(0.2,), std=(0.3,))
    assert spec.optimizer == "sgd"
    assert from_data(RunSpec, to_data(spec)) == spec
    with pytest.raises(SettingsError, match="1 channels"):
        RunSpec.from_plan(plan, mean=(0.2, 0.2, 0.2), std=(0.3, 0.3, 0.3))
    with pytest.raises(SettingsError, match="positive"):
        dataclasses.replace(spec, batch=0)
    with pytest.raises(SettingsError, match="unknown optimizer"):
        dataclasses.replace(spec, optimizer="lamb")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(SettingsError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(SettingsError, match="device"):
        resolve_device("tpu")
