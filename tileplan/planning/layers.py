"""Per-layer activation memory of a trunk: at the whole image, and at one tile.

Channels per layer come from one shape propagation on a small real input; spatial sizes come
from the trunk's exact geometry (``executor.TrunkGeometry.node_lengths``), so this costs one
small forward pass whatever the image size.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from executor import LayerMemory, TrunkGeometry, trace

__all__ = ["layer_memory"]


def _shapes(trunk: nn.Module, channels: int, geometry: TrunkGeometry) -> dict[str, torch.Size]:
    gm = trace(trunk)  # the same graph (and node names) the geometry was derived from
    device = next((p.device for p in trunk.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in trunk.parameters()), torch.float32)
    # Small first (most trunks pad); else the receptive field, which always gives an output.
    for size in (max(64, 2 * max(geometry.output_stride)), max(geometry.receptive_field)):
        x = torch.zeros(1, channels, *(size,) * geometry.n_axes, device=device, dtype=dtype)
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(x)
        except RuntimeError:
            continue
        return {
            n.name: n.meta["tensor_meta"].shape
            for n in gm.graph.nodes
            if isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)
        }
    return {}


def layer_memory(
    trunk: nn.Module,
    geometry: TrunkGeometry,
    image_shape: tuple[int, ...],
    crop_shape: tuple[int, ...],
    dtype: torch.dtype,
) -> tuple[LayerMemory, ...]:
    """Output bytes of every spatial layer for the whole image and for one crop.

    Args:
        image_shape, crop_shape: (N, C, *spatial) of the image and of the largest tile crop.

    Returns:
        One record per layer, in execution order.
    """
    shapes = _shapes(trunk, image_shape[1], geometry)
    full = [geometry.node_lengths(ax, n) for ax, n in enumerate(image_shape[2:])]
    crop = [geometry.node_lengths(ax, n) for ax, n in enumerate(crop_shape[2:])]
    layers = []
    for index, node in enumerate(geometry.graph.nodes):
        shape = shapes.get(node.name)
        if index == 0 or shape is None:
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
