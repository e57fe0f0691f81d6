"""Run-time checks on the trunk's module modes (train/eval), done before every pass.

Tracing sees the modes the trunk had when it was traced; users switch ``train()``/``eval()``
between steps, so the modes that change numerics are checked again whenever a pass starts.
"""

from __future__ import annotations

from torch import nn

from executor.errors import UnsupportedLayerError

__all__ = ["check_modes", "mode_signature"]


def mode_signature(trunk: nn.Module) -> tuple[bool, ...]:
    """The training flag of every submodule, in order: changes when the user calls train()."""
    return tuple(m.training for m in trunk.modules())


def check_modes(trunk: nn.Module) -> None:
    """Refuse modules whose current mode makes a tile's output depend on other tiles.

    BatchNorm with batch statistics streams exactly (``executor.statistics``); what stays
    refused is what draws randomness per call, or gathers statistics over processes.

    Raises:
        UnsupportedLayerError: active dropout, SyncBatchNorm with batch statistics.
    """
    for name, module in trunk.named_modules():
        where = name or type(trunk).__name__
        if isinstance(module, nn.SyncBatchNorm) and (
            module.training or not module.track_running_stats
        ):
            raise UnsupportedLayerError(
                where,
                "SyncBatchNorm with batch statistics gathers them over processes, which "
                "streaming does not do",
                "use BatchNorm (statistics over each process's images) or call eval() on it",
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise UnsupportedLayerError(
                where,
                f"{type(module).__name__} is active and would drop different units per tile",
                "call eval() on it or set p=0 inside the trunk",
            )
        if type(module).__name__ == "_SpectralNorm" and module.training:
            raise UnsupportedLayerError(
                where,
                "spectral norm in train mode updates its power iteration at every call, so each "
                "tile would see another weight",
                "call eval() on the trunk",
            )
        p = getattr(module, "p", 0.0)
        if type(module).__name__ == "StochasticDepth" and module.training and p > 0:
            raise UnsupportedLayerError(
                where,
                "StochasticDepth is active and would drop differently per tile",
                "call eval() on it or set p=0 inside the trunk",
            )
