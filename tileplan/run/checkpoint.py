"""Checkpoints (``last.pt``): weights, optimizer state, every RNG state, and typed metadata.

The metadata (completed epochs, task, the run's settings, the plan, the metrics history) is a
``CheckpointMeta`` stored as plain values, so ``torch.load(weights_only=True)`` reads it and it
is checked like every other record when it comes back. Files are written atomically: killing a
run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import io
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from executor import ContractError, Plan, StreamingError, atomic_write, from_data, to_data
from tileplan.run.data import Task
from tileplan.run.report import EpochMetrics
from tileplan.run.skips import SkippedImage
from tileplan.settings import RunSpec

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointMeta",
    "EpochProgress",
    "load_checkpoint",
    "restore_rng_state",
    "rng_state",
    "save_checkpoint",
]


class CheckpointError(StreamingError):
    """A checkpoint is missing, unreadable, or not this run's."""


@dataclass(frozen=True, kw_only=True)
class EpochProgress:
    """How far one process got into an epoch: the optimizer steps done, and the sums its
    epoch metrics are made of (so a resumed epoch reports what an uninterrupted one would).

    Attributes:
        step: optimizer steps of the epoch done.
        loss_sum, counted: the sum of the finite image losses, and how many there were.
        correct, seen: correctly classified images, and images trained on.
        seconds: training time of the epoch so far (s).
        skipped: images of the epoch that failed to read and were left out (all processes).
    """

    step: int = 0
    loss_sum: float = 0.0
    counted: int = 0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    skipped: int = 0


@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """What a checkpoint says about its run.

    Attributes:
        epoch: completed epochs.
        progress: written inside epoch ``epoch + 1``: each process's progress in it (one per
            rank); empty at an epoch's end.
        skipped: every image left out so far (``skipped.csv``).
        scaler_skips: steps the float16 loss scaler skipped in a row, at the checkpoint.
    """

    epoch: int
    task: Task
    spec: RunSpec
    plan: Plan
    history: tuple[EpochMetrics, ...] = ()
    progress: tuple[EpochProgress, ...] = ()
    skipped: tuple[SkippedImage, ...] = ()
    scaler_skips: int = 0  # optimizer steps the float16 loss scaler skipped in a row

    def describe(self) -> str:
        """``after epoch 2`` or ``in epoch 3 after step 40``."""
        if self.progress:
            return f"in epoch {self.epoch + 1} after step {self.progress[0].step}"
        return f"after epoch {self.epoch}"


@dataclass(frozen=True)
class Checkpoint:
    """A loaded ``last.pt``."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]  # float16 loss scaler state ({} when unused)
    rng: dict[str, Any]
    meta: CheckpointMeta
    scheduler: dict[str, Any] = dataclasses.field(default_factory=dict)  # ({} when unused)


def rng_state() -> dict[str, Any]:
    """Every RNG's state, in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically."""
    buffer = io.BytesIO()
    torch.save(
        {
            "model": checkpoint.model,
            "optimizer": checkpoint.optimizer,
            "scaler": checkpoint.scaler,
            "rng": checkpoint.rng,
            "meta": to_data(checkpoint.meta),
            "scheduler": checkpoint.scheduler,
        },
        buffer,
    )
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint; a missing, corrupt or foreign file is a one-line CheckpointError."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run's last.pt")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a damaged file
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable or corrupt ({type(err).__name__})"
        ) from err
    required = {"model", "optimizer", "scaler", "rng", "meta"}
    if not isinstance(data, dict) or not required <= set(data):
        raise CheckpointError(f"'{path}' is not a tileplan checkpoint of this version")
    try:
        meta = from_data(CheckpointMeta, data["meta"], where="checkpoint")
    except ContractError as err:
        raise CheckpointError(f"'{path}' has malformed metadata ({err})") from None
    return Checkpoint(data["model"], data["optimizer"], data["scaler"], data["rng"], meta,
                      data.get("scheduler") or {})  # fmt: skip
