"""Abstract values of a traced trunk's nodes that are not feature maps.

``executor.classify`` walks the trunk's fx graph and gives every node a value: a spatial map
(an index into the ``SpatialGraph``) or one of these. They say what a node's value depends on,
which decides whether a tile computes it exactly as the image does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Const", "Flat", "Maps", "Meta", "NotConstantError", "PositionCount", "SizeDep", "SpatialSize",
    "Stat",
    "Value", "as_list", "shape_of",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Const:
    """A value computed from parameters, buffers and literals only: the same for every tile."""

    value: Any


@dataclass(frozen=True, slots=True)
class Meta:
    """A map's metadata that a tile shares with the image (dtype, device, batch, channels)."""


@dataclass(frozen=True, slots=True)
class SizeDep:
    """A value computed from a map's spatial size: a tile's differs from the image's."""


@dataclass(frozen=True, slots=True)
class SpatialSize(SizeDep):
    """The size along spatial axis ``axis`` of the maps on position grid ``grid`` (the index
    of the node that made the grid: the image or a window op; pointwise ops keep it).
    ``source`` is the map it was read from (not part of its identity: every map on the grid
    has that size)."""

    grid: int
    axis: int
    source: int = field(default=-1, compare=False)


@dataclass(frozen=True, slots=True)
class Maps:
    """A tuple of maps (split, chunk, max with indices...): node ``node`` stands for each."""

    node: int


@dataclass(frozen=True, slots=True)
class Stat:
    """A statistic of whole maps: a value without spatial extent that depends on maps (a mean
    over positions, a group variance, what squeeze-excitation computes from them...). A tile
    cannot compute it; the engine computes it once from the whole map (``executor.program``)
    and every tile then uses it like a constant."""


@dataclass(frozen=True, slots=True)
class Flat:
    """A map whose spatial dims were merged into one dim of positions, ``dim`` (attention
    pooling: ``x.reshape(B, C, H * W)``). Only whole-map computations may use it, and only
    to reduce over the positions (a softmax over them, a product that sums over them)."""

    dim: int
    rank: int


@dataclass(frozen=True, slots=True)
class PositionCount(SizeDep):
    """The product of every spatial size of the maps on grid ``grid`` (``H * W``): the
    length of the positions dim of a flattened map."""

    grid: int
    axes: frozenset[int]


Value = int | Const | Meta | SizeDep | Maps | Stat | Flat | tuple


class NotConstantError(Exception):
    """An argument is not a constant known at trace time."""


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def shape_of(value: Value) -> tuple[int, ...] | None:
    if isinstance(value, Const) and isinstance(value.value, torch.Tensor):
        return tuple(value.value.shape)
    return None
