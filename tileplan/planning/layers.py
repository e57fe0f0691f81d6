"""Per-layer activation memory of a trunk: at the whole image, and at one tile.

Channels per layer come from one shape propagation on meta tensors; spatial sizes come from the
trunk's exact geometry (``executor.TrunkGeometry.node_lengths``), so this costs no compute and
never runs (or changes the running statistics of) the user's module.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn

from executor import LayerMemory, TrunkGeometry
from tileplan.planning.estimate import EstimateError, node_shapes

__all__ = ["layer_memory", "layer_shapes"]


def layer_shapes(trunk: nn.Module, channels: int, geometry: TrunkGeometry
                 ) -> dict[str, tuple[int, ...]]:  # fmt: skip
    """The shape of every node of the trunk's traced graph for a small image (channels are
    what is read from it), on meta tensors: the user's module is never run."""
    dtype = next((p.dtype for p in trunk.parameters()), torch.float32)
    # Small first (most trunks pad); else the receptive field, which always gives an output.
    for size in (max(64, 2 * max(geometry.output_stride)), max(geometry.receptive_field)):
        try:
            return node_shapes(trunk, (1, channels, *(size,) * geometry.n_axes), dtype)
        except EstimateError:
            continue
    return {}


def layer_memory(
    trunk: nn.Module,
    geometry: TrunkGeometry,
    image_shape: tuple[int, ...],
    crop_shape: tuple[int, ...],
    dtype: torch.dtype,
    *,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[LayerMemory, ...]:
    """Output bytes of every spatial layer for the whole image and for one crop.

    Args:
        image_shape, crop_shape: (N, C, *spatial) of the image (or a segment's input) and of
            the largest tile crop.
        shapes: node shapes of the whole trunk (``layer_shapes``), when ``trunk`` is a part
            of it; default: ``trunk``'s own.

    Returns:
        One record per layer (its inputs excepted), in execution order.
    """
    if shapes is None:
        shapes = layer_shapes(trunk, image_shape[1], geometry)
    full = [geometry.node_lengths(ax, n) for ax, n in enumerate(image_shape[2:])]
    crop = [geometry.node_lengths(ax, n) for ax, n in enumerate(crop_shape[2:])]
    layers = []
    for index, node in enumerate(geometry.graph.nodes):
        shape = shapes.get(node.name)
        if not node.inputs or shape is None:
            continue
        spatial = math.prod(shape[d] for d in node.spatial_dims)
        per_position = math.prod(shape) // (shape[0] * spatial)  # channels (or C x extra dims)
        size = per_position * dtype.itemsize * image_shape[0]
        layers.append(LayerMemory(
            name=node.where,
            channels=per_position,
            full_bytes=size * math.prod(f[index] for f in full),
            tile_bytes=size * math.prod(c[index] for c in crop),
        ))  # fmt: skip
    return tuple(layers)
