"""The weight files a run keeps beside ``last.pt``: ``best.pt`` (the checkpoint of the epoch
with the best monitored value), ``epochs/epoch_NNN.pt`` (each epoch's weights, while
``--average`` needs them) and ``averaged.pt`` (their mean over the best window), all written
atomically; ``best.pt`` and ``averaged.pt`` load wherever a checkpoint does (``predict``)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from executor import atomic_write

__all__ = [
    "AVERAGED_FILE", "BEST_FILE", "EPOCHS_DIR", "average_weights", "epoch_file", "prune_epochs",
    "save_weights",
]  # fmt: skip

BEST_FILE = "best.pt"
AVERAGED_FILE = "averaged.pt"
EPOCHS_DIR = "epochs"


def epoch_file(epoch: int) -> str:
    """``epoch_007.pt``: the weights after epoch ``epoch`` (1-based)."""
    return f"epoch_{epoch:03d}.pt"


def save_weights(path: Path, state: dict[str, torch.Tensor]) -> None:
    """A model's ``state_dict`` (on the CPU), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getvalue()))


def prune_epochs(folder: Path, keep_after: int) -> None:
    """Remove the epoch files of epochs up to ``keep_after``."""
    for path in folder.glob("epoch_*.pt"):
        if int(path.stem.split("_")[1]) <= keep_after:
            path.unlink()


def average_weights(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The mean of the ``state_dict`` files: floating tensors averaged in float64 and cast
    back to their dtype; other tensors (BatchNorm's step counters) from the last file."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    averaged = {}
    for name, last in states[-1].items():
        if last.is_floating_point():
            total = torch.zeros(last.shape, dtype=torch.float64)
            for state in states:
                total += state[name].to(torch.float64)
            averaged[name] = (total / len(states)).to(last.dtype)
        else:
            averaged[name] = last.clone()
    return averaged
