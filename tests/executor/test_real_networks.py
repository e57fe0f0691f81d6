"""Streaming equals conventional backprop on real torchvision trunks (no weights downloaded).

Images are kept small for CI, but always larger than the trunk's smallest tile along at least
one axis, so that every network is streamed over several tiles with real halos. Elongated
images keep that affordable for the networks with large receptive fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.oracle import compare_with_conventional

tv = pytest.importorskip("torchvision").models


def _trunk(net: nn.Module, drop: int) -> nn.Module:
    """Everything before the last ``drop`` children (avgpool, fc...)."""
    return nn.Sequential(*list(net.children())[:-drop])


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int], tuple[int, int]]] = {
    # name: (trunk factory, image (H, W), tile (H, W))
    "resnet18": (lambda: _trunk(tv.resnet18(), 2), (576, 480), (480, 448)),
    "resnet34": (lambda: _trunk(tv.resnet34(), 2), (1216, 96), (960, 960)),
    "resnet50": (lambda: _trunk(tv.resnet50(), 2), (544, 480), (448, 448)),
    "vgg11": (lambda: tv.vgg11().features, (320, 288), (192, 160)),
    "mobilenet_v2": (lambda: tv.mobilenet_v2().features, (704, 160), (512, 512)),
    "densenet121": (lambda: tv.densenet121().features, (2304, 64), (2080, 2080)),
    "convnext_tiny": (lambda: tv.convnext_tiny().features, (1856, 32), (1696, 1696)),
}


def _frozen_norms(trunk: nn.Module) -> nn.Module:
    """Eval mode with non-trivial BatchNorm statistics (fresh ones are the identity)."""
    gen = torch.Generator().manual_seed(0)
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return trunk.eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_real_network(name: str, dtype: torch.dtype, record_property: Callable) -> None:
    factory, shape, tile = NETWORKS[name]
    torch.manual_seed(0)
    trunk = _frozen_norms(factory())
    image = torch.randn(1, 3, *shape)
    start = time.perf_counter()
    result = compare_with_conventional(trunk, image, tile, dtype=dtype)
    assert result.n_tiles > 1
    record_property("worst_relative_error", result.worst)
    record_property("seconds", time.perf_counter() - start)
    print(f"{name} {dtype}: {result.n_tiles} tiles, worst rel. error {result.worst:.2e}")
