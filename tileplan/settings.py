"""Run settings, each rule written once: optimizers, image normalisation, and the run spec.

* ``OPTIMIZERS``: every optimizer tileplan knows, by the plan contract's names
  (``executor.OPTIMIZER_NAMES``): how to build it and how much state it keeps. The CLI's
  choices, the planner's estimates and measurements and the training loop all read it.
* ``Normalization``: per-channel mean and std applied to each crop on the compute device
  (uint8 pixels are scaled by 1/255 first). The default is ImageNet's statistics for 3-channel
  images (what torchvision and timm weights expect) and mean 0.5, std 0.5 per channel (pixels
  to [-1, 1]) for any other channel count; ``tileplan train --mean/--std`` sets it. The values
  used are recorded in the checkpoint, so prediction normalises exactly as training did.
* ``RunSpec``: a training run's settings, built from a plan and the user's options. Its
  precision comes from the plan's dtype through ``executor.Precision`` and nowhere else.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from executor import (
    BATCH_NORM_MODES,
    OPTIMIZER_NAMES,
    BatchNormMode,
    DtypeName,
    OptimizerName,
    Plan,
    Precision,
)
from tileplan.run.recipe import Recipe

__all__ = [
    "OPTIMIZERS", "DataSettings", "Normalization", "OptimizerSpec", "RunSpec", "SettingsError",
    "describe_resolution", "parse_intensity", "resolve_device",
]  # fmt: skip


class SettingsError(ValueError):
    """An option is out of range; the message names it and the fix."""


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer tileplan can train with.

    Attributes:
        name: its name in plans and on the command line.
        state_factor: bytes of optimizer state per byte of trainable parameters (Adam keeps
            two moments, SGD with momentum one buffer).
        build: ``build(params, lr, **options)`` makes it (options: the constructor's keywords,
            e.g. ``weight_decay``; ``tileplan.run.recipe.Recipe.optimizer_options``).
    """

    name: OptimizerName
    state_factor: int
    build: Callable[..., torch.optim.Optimizer]


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "adam": OptimizerSpec(
        "adam", 2, lambda params, lr, **kw: torch.optim.Adam(params, lr=lr, **kw)
    ),
    "adamw": OptimizerSpec(
        "adamw", 2, lambda params, lr, **kw: torch.optim.AdamW(params, lr=lr, **kw)
    ),
    "sgd": OptimizerSpec(
        "sgd", 1, lambda params, lr, **kw: torch.optim.SGD(params, lr=lr, **{"momentum": 0.9, **kw})
    ),
}
assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES, "OPTIMIZERS must follow executor.OPTIMIZER_NAMES"


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True, kw_only=True)
class Normalization:
    """Per-channel ``(x - mean) / std`` on the [0, 1] scale of uint8 images.

    Float images (float ``.npy``/TIFF) are taken to be in the units of ``mean``/``std``
    already and are not scaled by 1/255.
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.mean or len(self.mean) != len(self.std):
            raise SettingsError(
                f"--mean has {len(self.mean)} values and --std {len(self.std)}; give one per "
                "channel"
            )
        if not all(math.isfinite(v) for v in (*self.mean, *self.std)):
            raise SettingsError("--mean and --std must be finite numbers")
        if min(self.std) <= 0:
            raise SettingsError(f"--std {list(self.std)} must be > 0 for every channel")

    @classmethod
    def default(cls, channels: int, *, volume: bool = False) -> Normalization:
        """ImageNet's statistics for 3 channels; mean 0.5, std 0.5 otherwise. Volumes: mean 0,
        std 1 (none: ``DataSettings.intensity`` scales them)."""
        if volume:
            return cls(mean=(0.0,) * channels, std=(1.0,) * channels)
        if channels == 3:
            return cls(mean=_IMAGENET_MEAN, std=_IMAGENET_STD)
        return cls(mean=(0.5,) * channels, std=(0.5,) * channels)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def apply(self, tile: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A crop ``(C, *spatial)`` or ``(N, C, *spatial)``, uint8 or float, as normalised
        ``dtype`` on its own device; the input is not modified.

        Raises:
            SettingsError: the crop's channels differ from the normalisation's, or its dtype is
                neither uint8 nor floating point.
        """
        if not dtype.is_floating_point:
            raise SettingsError(f"normalised tiles must be floating point, not {dtype}")
        if tile.dim() < 3:
            raise SettingsError(
                f"a tile is (C, *spatial) or (N, C, *spatial), got {tuple(tile.shape)}"
            )
        channel_dim = 1 if tile.dim() >= 4 else 0
        if tile.shape[channel_dim] != self.channels:
            raise SettingsError(
                f"the image has {tile.shape[channel_dim]} channels but the normalisation "
                f"{self.channels}; give --mean/--std with one value per channel"
            )
        if tile.dtype == torch.uint8:
            scale = 1.0 / 255.0
        elif tile.dtype.is_floating_point:
            scale = 1.0
        else:
            raise SettingsError(f"tiles must be uint8 or floating point, not {tile.dtype}")
        view = (-1,) + (1,) * (tile.dim() - channel_dim - 1)
        mean = torch.tensor(self.mean, dtype=torch.float64, device=tile.device).view(view)
        std = torch.tensor(self.std, dtype=torch.float64, device=tile.device).view(view)
        # (x * scale - mean) / std == x * (scale / std) - mean / std: one multiply-add.
        return torch.addcmul((-mean / std).to(dtype), tile.to(dtype), (scale / std).to(dtype))


def _floats(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


# --------------------------------------------------------------------------------------------
# Data settings
# --------------------------------------------------------------------------------------------

Oversize = Literal["crop", "refuse"]


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """How images are read (see ``tileplan.run.slides``); recorded with the run.

    Attributes:
        level: pyramid level to read (a CSV ``level`` column overrides it per row).
        mpp: microns per pixel to read at, from each slide's metadata (exclusive with level).
        tissue: crop each image to the bounding box of its tissue.
        oversize: an image larger than the plan's image: ``crop`` to its centre (with a
            warning) or ``refuse`` it before training starts.
        spacing: volumes: mm per voxel (D, H, W) to resample every volume to (exact area
            averages, coarser than stored only), or None to read them as stored.
        intensity: volumes: ``raw`` (values as stored, e.g. Hounsfield units), ``zscore``
            (each volume to mean 0, std 1 per channel) or ``window:LO,HI`` (clipped to
            [LO, HI] and mapped to [0, 1], e.g. ``window:-1000,400`` for lung CT).
        assume_mpp: the µm/px of level 0 of files that record none (a CSV ``mpp`` column
            states it per row, and wins over a file's own).
        assume_spacing: volumes: mm per voxel (D, H, W) of files that record none (a CSV
            ``spacing`` column states it per row, and wins).
    """

    level: int | None = None
    mpp: float | None = None
    tissue: bool = False
    oversize: Oversize = "crop"
    spacing: tuple[float, ...] | None = None
    intensity: str = "raw"
    assume_mpp: float | None = None
    assume_spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.spacing is not None and not (
            len(self.spacing) == 3 and all(v > 0 and math.isfinite(v) for v in self.spacing)
        ):
            raise SettingsError(
                f"--spacing {self.spacing}: give one size in mm (2) or one per axis (3x1x1, "
                "D x H x W), each > 0"
            )
        parse_intensity(self.intensity)
        if self.assume_mpp is not None and not (
            self.assume_mpp > 0 and math.isfinite(self.assume_mpp)
        ):
            raise SettingsError(f"--assume-mpp {self.assume_mpp} must be a positive number of "
                                "microns per pixel")  # fmt: skip
        if self.assume_spacing is not None and not (
            len(self.assume_spacing) == 3
            and all(v > 0 and math.isfinite(v) for v in self.assume_spacing)
        ):
            raise SettingsError(f"--assume-spacing {self.assume_spacing}: give one size in mm "
                                "or one per axis (3x1x1, D x H x W), each > 0")  # fmt: skip
        if self.level is not None and self.mpp is not None:
            raise SettingsError("give either --level or --mpp, not both")
        if self.level is not None and self.level < 0:
            raise SettingsError(f"--level {self.level} must be 0 or more")
        if self.mpp is not None and not (self.mpp > 0 and math.isfinite(self.mpp)):
            raise SettingsError(f"--mpp {self.mpp} must be a positive number of microns per px")
        if self.oversize not in get_args(Oversize):
            raise SettingsError(f"--oversize {self.oversize!r}: use crop or refuse")

    def describe_volumes(self) -> str:
        """What is read of each volume, e.g. ``3x1x1 mm voxels, intensity window:-1000,400``."""
        where = "voxels as stored" if self.spacing is None else (
            "x".join(f"{v:g}" for v in self.spacing) + " mm voxels")  # fmt: skip
        return f"{where}, intensity {self.intensity}"

    def describe_reading(self) -> str:
        """What is read of each image, e.g. ``1 µm/px, tissue box``."""
        tissue = ", tissue box" if self.tissue else ""
        return f"{describe_resolution(self.level, self.mpp)}{tissue}"

    def describe(self) -> str:
        """E.g. ``1 µm/px, tissue box, larger images centre-cropped``."""
        policy = "centre-cropped" if self.oversize == "crop" else "refused"
        return f"{self.describe_reading()}, larger images {policy}"


def parse_intensity(text: str) -> tuple[str, tuple[float, float] | None]:
    """``'raw'``, ``'zscore'`` or ``'window:LO,HI'`` as (mode, window).

    Raises:
        SettingsError: anything else, or a window with ``LO >= HI``.
    """
    mode, _, rest = text.partition(":")
    if mode in ("raw", "zscore") and not rest:
        return mode, None
    if mode == "window":
        try:
            lo, hi = (float(v) for v in rest.split(","))
        except ValueError:
            lo = hi = math.nan
        if lo < hi and math.isfinite(lo) and math.isfinite(hi):
            return mode, (lo, hi)
    raise SettingsError(
        f"--intensity {text}: use raw, zscore, or window:LO,HI with LO < HI (e.g. "
        "window:-1000,400 for CT in Hounsfield units)"
    )


def describe_resolution(level: int | None, mpp: float | None) -> str:
    """``0.5 µm/px`` or ``level 2`` (level 0 when neither is given)."""
    return f"{mpp:g} µm/px" if mpp is not None else f"level {level or 0}"


# --------------------------------------------------------------------------------------------
# The run spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """Everything a training run computes with, derived once (and saved in checkpoints).

    Attributes:
        dtype: the plan's dtype; ``precision`` says what it means.
        optimizer: the optimizer (default: the one the plan counted).
        lr: learning rate per optimizer step.
        epochs: epochs to train.
        batch: effective batch: gradients accumulated over this many images per step.
        seed: the initial weights and the image order derive from it.
        num_workers: image-reading worker processes.
        normalization: per-channel normalisation of each crop.
        data: how images are read (resolution, tissue crop, oversize policy).
        batch_norm: ``frozen`` (running statistics, the affine weights train) or ``train``
            (batch statistics in training steps, running statistics updated as conventional
            training updates them and used for validation).
        recipe: weight decay, schedule, class balance, monitoring (``tileplan.run.recipe``).
        augment: the training images' augmentation, a canonical ``--augment`` spec
            (``tileplan.augment``; empty: none).
    """

    dtype: DtypeName
    optimizer: OptimizerName = "adam"
    lr: float = 1e-4
    epochs: int = 10
    batch: int = 16
    seed: int = 0
    num_workers: int = 2
    normalization: Normalization = field(default_factory=lambda: Normalization.default(3))
    data: DataSettings = field(default_factory=DataSettings)
    batch_norm: BatchNormMode = "frozen"
    recipe: Recipe = field(default_factory=Recipe)
    augment: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in get_args(DtypeName):
            raise SettingsError(f"unknown dtype {self.dtype!r}")
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(
                f"unknown optimizer {self.optimizer!r}; use one of {', '.join(OPTIMIZERS)}"
            )
        if self.epochs < 1 or self.batch < 1 or not self.lr > 0 or self.num_workers < 0:
            raise SettingsError("epochs, batch and lr must be positive and num-workers >= 0")
        if self.batch_norm not in BATCH_NORM_MODES:
            raise SettingsError(f"--bn {self.batch_norm}: use one of {', '.join(BATCH_NORM_MODES)}")
        from tileplan.augment.spec import AugmentError, canonical

        try:  # one spelling of a spec, so that --resume compares settings, not text
            object.__setattr__(self, "augment", canonical(self.augment))
        except AugmentError as err:
            raise SettingsError(f"--augment: {err}") from None

    @classmethod
    def from_plan(
        cls,
        plan: Plan,
        *,
        optimizer: str | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        batch_norm: str | None = None,
        **options: object,
    ) -> RunSpec:
        """The run settings for ``plan``: its dtype, its optimizer unless another is asked
        for, its BatchNorm mode unless another is asked for (the plan then refuses the
        model: its segments are another mode's), and the default normalisation for its
        channel count unless ``mean``/``std``."""
        normalization = Normalization.default(plan.channels, volume=plan.n_axes == 3)
        if mean is not None or std is not None:
            normalization = Normalization(
                mean=_floats(mean) or normalization.mean, std=_floats(std) or normalization.std
            )
        if normalization.channels != plan.channels:
            raise SettingsError(
                f"--mean/--std have {normalization.channels} values but the plan's images have "
                f"{plan.channels} channels; give one value per channel"
            )
        return cls(dtype=plan.dtype, optimizer=optimizer or plan.optimizer,
                   normalization=normalization, batch_norm=batch_norm or plan.batch_norm,
                   **options)  # type: ignore[arg-type]  # fmt: skip

    @property
    def precision(self) -> Precision:
        return Precision.of(self.dtype)

    def make_optimizer(self, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
        options = self.recipe.optimizer_options(self.optimizer)
        return OPTIMIZERS[self.optimizer].build(params, self.lr, **options)

    def preprocess(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Per-crop normalisation into the parameter dtype (the executor's ``preprocess``)."""
        dtype = self.precision.param_dtype
        return lambda crop: self.normalization.apply(crop, dtype)


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: this process's GPU when CUDA is available (``LOCAL_RANK`` under torchrun),
    else the CPU; ``cuda`` is ``cuda:0``; anything else as given.

    Raises:
        SettingsError: CUDA asked for but not available, or not a device name.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        return torch.device("cpu")
    try:
        device = torch.device("cuda:0" if name == "cuda" else name)
    except RuntimeError:
        raise SettingsError(f"--device {name}: unknown device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SettingsError(
            f"--device {name}: CUDA is not available here; use --device cpu (or plan for a GPU "
            "from estimates with `tileplan profile --no-measure --budget SIZE`)"
        )
    if device.type not in ("cpu", "cuda"):
        raise SettingsError(f"--device {name}: unsupported device; use auto, cpu or cuda[:N]")
    return device
