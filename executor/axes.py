"""How many spatial axes a network's maps have, read from its layers.

A trunk is traced for a number of spatial axes (2 for images ``(N, C, H, W)``, 3 for volumes
``(N, C, D, H, W)``). The number is a property of the model, not of an option: the first
convolution or pooling layer in module order says it (``Conv3d`` has 3, ``MaxPool2d`` 2), and
the ``--image`` size must then have as many axes. A network of functional calls only has no
such layer; then the caller's default (the image option's length, else 2) stands.
"""

from __future__ import annotations

from torch import nn

__all__ = ["spatial_axes"]

# Layers whose class fixes the rank of the maps they take: (N, C, *spatial).
_RANKED: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3),
    (nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 2), (nn.ConvTranspose3d, 3),
    (nn.MaxPool1d, 1), (nn.MaxPool2d, 2), (nn.MaxPool3d, 3),
    (nn.AvgPool1d, 1), (nn.AvgPool2d, 2), (nn.AvgPool3d, 3),
    (nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3),
)  # fmt: skip


def spatial_axes(module: nn.Module, default: int = 2) -> int:
    """Spatial axes of the maps ``module`` takes, from its first convolution, pooling or
    BatchNorm layer in module order (``default`` when it has none).

    ``BatchNorm1d`` also takes ``(N, C)`` vectors, so it counts only when no convolution or
    pooling layer says otherwise.

    Example:
        >>> spatial_axes(torchvision.models.video.r3d_18())
        3
    """
    found: int | None = None
    for sub in module.modules():
        for kind, n in _RANKED:
            if isinstance(sub, kind):
                if kind is not nn.BatchNorm1d:
                    return n
                found = n if found is None else found
    return found if found is not None else default
