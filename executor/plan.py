"""The plan file: the YAML contract between the planner (``tileplan``) and the executor.

A plan says how to stream one model on one image shape and dtype: which tiles, and what that
was predicted (and measured) to cost. It records where it came from (tool, torch, device, date)
and a fingerprint of the trunk's architecture, so a plan made for another model, image shape or
dtype is refused with a clear message rather than silently mis-used.

Keys carry units (``_px``, ``_bytes``, ``_s``). ``save_plan`` writes atomically and
``load_plan(save_plan(p))`` returns a plan equal to ``p``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from executor.errors import StreamingError
from executor.fileio import atomic_write

__all__ = [
    "SCHEMA_VERSION",
    "Candidate",
    "MemoryBreakdown",
    "Plan",
    "PlanError",
    "check_plan_matches",
    "dtype_of",
    "load_plan",
    "save_plan",
    "trunk_fingerprint",
]

SCHEMA_VERSION = 1


class PlanError(StreamingError):
    """A plan file is unreadable, malformed, or made for something else."""


def trunk_fingerprint(trunk: nn.Module) -> str:
    """Fingerprint of the trunk's architecture and parameter shapes (not its weights).

    Two trunks get the same fingerprint when they have the same module tree (types and their
    configuration, e.g. kernel sizes and strides) and the same parameter and buffer shapes.
    """
    digest = hashlib.sha256()
    for name, module in trunk.named_modules():
        digest.update(f"{name}|{type(module).__qualname__}|{module.extra_repr()}\n".encode())
    for name, tensor in (*trunk.named_parameters(), *trunk.named_buffers()):
        digest.update(f"{name}|{tuple(tensor.shape)}\n".encode())
    return "sha256:" + digest.hexdigest()[:32]


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Peak memory of one streaming step, by category (bytes)."""

    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    image_bytes: int
    output_bytes: int  # the trunk's full output map ...
    output_grad_bytes: int  # ... and its gradient
    head_bytes: int  # the head's activations and transients
    tile_forward_bytes: int  # one no-grad forward tile's transient peak
    tile_backward_bytes: int  # one tile's forward-with-grad + backward peak

    @property
    def total_bytes(self) -> int:
        """Predicted peak: state and maps plus the larger of the two tile phases."""
        fixed = (
            self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.image_bytes
            + self.output_bytes + self.output_grad_bytes + self.head_bytes
        )  # fmt: skip
        return fixed + max(self.tile_forward_bytes, self.tile_backward_bytes)

    def scaled(self, factor: float) -> MemoryBreakdown:
        """Tile activations scaled by a calibration ``factor`` (measured ÷ estimated)."""
        return MemoryBreakdown(
            **{
                **asdict(self),
                "tile_forward_bytes": round(self.tile_forward_bytes * factor),
                "tile_backward_bytes": round(self.tile_backward_bytes * factor),
            }
        )


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """One tile shape the planner considered."""

    tile_px: tuple[int, ...]
    grid: tuple[int, ...]  # tiles per axis
    n_tiles: int
    overlap_factor: float  # pixels processed ÷ image pixels, per pass
    memory: MemoryBreakdown  # estimate (calibrated when a calibration was measured)
    estimated_peak_bytes: int
    measured_peak_bytes: int | None = None  # a whole real streaming step
    measured_tile_bytes: int | None = None  # one real backward tile (activations)
    predicted_time_s: float
    fits: bool


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A streaming plan for one model, image shape and dtype."""

    schema_version: int = SCHEMA_VERSION
    provenance: dict[str, Any]
    model: dict[str, Any]  # file, split, trunk class, parameter_count, trunk_fingerprint
    image_shape_px: tuple[int, ...]
    channels: int
    batch: int = 1
    dtype: str
    optimizer: str
    output_stride_px: tuple[int, ...]
    halo_lo_px: tuple[int, ...]
    halo_hi_px: tuple[int, ...]
    align_px: tuple[int, ...] = ()  # crop origins are multiples of this (default: the stride)
    output_shape: tuple[int, ...]
    budget_bytes: int
    margin: float
    tile_px: tuple[int, ...]
    forward_tile_px: tuple[int, ...]
    predicted_peak_bytes: int
    predicted_time_s: float
    measured_peak_bytes: int | None = None
    verified: str = "no"  # how the chosen plan was checked on the device, in words
    calibration_factor: float | None = None  # measured ÷ estimated tile activations
    time_source: str = ""  # where predicted times come from
    conventional_peak_bytes: int
    conventional_measured: bool = False
    candidates: tuple[Candidate, ...] = field(default_factory=tuple)
    # Per layer of the trunk: name, channels, output bytes at the full image and at one tile.
    layers: tuple[dict[str, Any], ...] = field(default_factory=tuple)

    @property
    def usable_bytes(self) -> int:
        return math.floor(self.budget_bytes * (1.0 - self.margin))

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-able dict (tuples as lists), keys in a readable order."""
        return _plain(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        """Inverse of ``to_dict``; raises ``PlanError`` naming the first bad key."""
        if not isinstance(data, Mapping):
            raise PlanError("plan file does not hold a mapping; it is not a tileplan plan")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise PlanError(
                f"plan schema_version is {version!r}, this tileplan reads {SCHEMA_VERSION}; "
                "re-run `tileplan profile` to make a new plan"
            )
        try:
            values = _typed(cls, data)
            values["candidates"] = tuple(
                Candidate(**{**_typed(Candidate, c), "memory": MemoryBreakdown(**c["memory"])})
                for c in data.get("candidates", ())
            )
            return cls(**values)
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"plan file is malformed ({err}); re-run `tileplan profile`") from err


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    for kind in (bool, int, float, str):  # e.g. torch's TorchVersion is a str subclass
        if isinstance(value, kind):
            return kind(value)
    return value


def _typed(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Field values of ``cls`` from ``data``: lists back to tuples, unknown keys refused."""
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise KeyError(f"unknown keys {sorted(unknown)}")
    out: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue  # dataclass defaults or a TypeError for required fields
        value = data[f.name]
        out[f.name] = tuple(value) if isinstance(value, list) and "tuple" in str(f.type) else value
    return out


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write ``plan`` as YAML atomically (a crash never leaves a half-written plan)."""
    text = _HEADER + yaml.safe_dump(plan.to_dict(), sort_keys=False, width=100)
    return atomic_write(path, lambda f: f.write(text.encode()))


_HEADER = "# tileplan streaming plan: see `tileplan validate` and `tileplan view`\n"


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan file; every problem is a one-line ``PlanError``."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlanError(
            f"plan file '{path}' does not exist; make one with `tileplan profile`"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise PlanError(f"cannot read plan file '{path}': {err}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise PlanError(f"plan file '{path}' is not valid YAML ({first})") from err
    return Plan.from_dict(data)


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}  # fmt: skip


def check_plan_matches(
    plan: Plan,
    trunk: nn.Module,
    *,
    image_shape: tuple[int, ...] | None = None,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Refuse a plan made for another trunk, image shape or dtype.

    Raises:
        PlanError: one line naming what differs and what to do.
    """
    fingerprint = trunk_fingerprint(trunk)
    if plan.model.get("trunk_fingerprint") != fingerprint:
        raise PlanError(
            f"plan was made for a different model (trunk fingerprint "
            f"{plan.model.get('trunk_fingerprint')} != {fingerprint}); re-run `tileplan profile` "
            "for this model"
        )
    if image_shape is not None and tuple(image_shape) != tuple(plan.image_shape_px):
        raise PlanError(
            f"plan was made for images of {_fmt(plan.image_shape_px)} px, not {_fmt(image_shape)}; "
            "re-run `tileplan profile --image ...` for this size"
        )
    if dtype is not None:
        name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        if name != plan.dtype:
            raise PlanError(
                f"plan was made for dtype {plan.dtype}, not {name}; re-run `tileplan profile "
                f"--dtype {name}`"
            )


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype for a plan's dtype name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise PlanError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


def _fmt(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(v) for v in shape)
