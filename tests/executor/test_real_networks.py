"""Streaming equals conventional backprop on real torchvision trunks (no weights downloaded).

float64 (exact up to reassociation): images just larger than the trunk's smallest tile, so that
every network streams over several tiles with huge relative halos (the hardest case for the
geometry), along both axes where that stays affordable.

float32 (as accurate as conventional backprop, judged against float64; see tests/oracle.py):
images with the low overlap real plans have (each pixel in at most about two crops, overlap
factor <= 1.8). The overlap matters in low precision: a position's gradient is the sum of the
contributions of every tile whose crop holds it, each rounded on its own, so the streamed
float32 error of badly conditioned gradients grows with the number of overlapping crops.
Measured on DenseNet-121 (float32, 5 seeds): at overlap 7.2 (8 tiles of nearly the whole
image) the streamed error of early-layer gradients reached 10x the conventional one in median
and far more on single tensors; at overlap 1.5 it stayed within 1.44x of it on every tensor.
Elongated images keep both affordable for the networks with large receptive fields.
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


Size = tuple[int, int]
NETWORKS: dict[str, tuple[Callable[[], nn.Module], Size, Size, Size, Size]] = {
    # name: (trunk factory, float64 image and tile, float32 image and tile), all (H, W) px
    "resnet18": (lambda: _trunk(tv.resnet18(), 2), (576, 480), (480, 448), (544, 64), (480, 480)),
    "resnet34": (lambda: _trunk(tv.resnet34(), 2), (1216, 96), (960, 960), (1184, 64),
                 (1056, 1056)),
    "resnet50": (lambda: _trunk(tv.resnet50(), 2), (544, 480), (448, 448), (544, 64), (480, 480)),
    "vgg11": (lambda: tv.vgg11().features, (320, 288), (192, 160), (192, 64), (160, 160)),
    "mobilenet_v2": (lambda: tv.mobilenet_v2().features, (704, 160), (512, 512), (608, 64),
                     (544, 544)),
    "densenet121": (lambda: tv.densenet121().features, (2304, 64), (2080, 2080), (2560, 64),
                    (2304, 2304)),
    "convnext_tiny": (lambda: tv.convnext_tiny().features, (1856, 32), (1696, 1696),
                      (2080, 64), (1888, 1888)),
}  # fmt: skip


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
    factory, shape, tile, shape32, tile32 = NETWORKS[name]
    if dtype == torch.float32:
        shape, tile = shape32, tile32
    torch.manual_seed(0)
    trunk = _frozen_norms(factory())
    image = torch.randn(1, 3, *shape)
    start = time.perf_counter()
    result = compare_with_conventional(trunk, image, tile, dtype=dtype)
    assert result.n_tiles > 1
    record_property("worst_streamed_error", result.worst)
    record_property("worst_conventional_error", result.worst_conventional)
    record_property("seconds", time.perf_counter() - start)
    conventional = result.worst_conventional
    versus = "conventional" if conventional is None else "float64"
    also = "" if conventional is None else f", conventional vs float64 {conventional:.2e}"
    print(f"{name} {dtype}: {result.n_tiles} tiles, streamed vs {versus} {result.worst:.2e}{also}")
