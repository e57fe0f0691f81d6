"""Streaming equals conventional backprop on hand-built edge cases (float64, tight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tests.oracle import compare_with_conventional


def _seeded(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            # Non-trivial frozen statistics, so eval-mode BN is not the identity.
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return module.eval()


class Residual(nn.Module):
    """ResNet-style block: 3x3 stride-2 path plus a 1x1 stride-2 shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.down = nn.Conv2d(cin, cout, 1, stride=2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.conv1(x)))
        out = self.conv2(out)
        out += self.down(x)
        return torch.relu(out)


class Concat(nn.Module):
    """Inception/DenseNet-style branches concatenated along channels."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(c, 2, 1)
        self.b = nn.Conv2d(c, 3, 5, padding=2, dilation=1)
        self.c = nn.Conv2d(c, 2, 3, padding=2, dilation=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x), self.c(x)], dim=1)


class ChannelsLastBlock(nn.Module):
    """ConvNeXt-style: depthwise conv, permute, LayerNorm + Linear over channels, scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc = nn.Linear(c, c)
        self.scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = F.gelu(self.fc(self.norm(y)))
        return x + self.scale * y.permute(0, 3, 1, 2)


class Functional(nn.Module):
    """Functional ops with parameters held by the module."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w, stride=2, padding=1)
        return F.max_pool2d(F.silu(y), 3, stride=2, padding=1)


CASES = {
    # name: (trunk factory, image (N, C, H, W), tile)
    "stride_gt_kernel": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1, stride=3), nn.ReLU(), nn.Conv2d(4, 4, 2, 3)),
        (1, 3, 97, 61), (45, 36),
    ),
    "dilation": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=2, dilation=2), nn.Tanh(),
                              nn.Conv2d(4, 3, 3, padding=3, dilation=3)),
        (1, 3, 70, 53), (40, 40),
    ),
    "even_kernels": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 4, stride=2, padding=1), nn.ReLU(),
                              nn.Conv2d(4, 4, 2, stride=2), nn.Conv2d(4, 2, 4, padding=1)),
        (1, 3, 83, 90), (40, 48),
    ),
    "asymmetric_same_padding": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.ELU(),
                              nn.Conv2d(4, 4, (2, 5), padding="same", dilation=(3, 1))),
        (1, 3, 50, 47), (24, 20),
    ),
    "pools_ceil_mode": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(3, 2, 1, ceil_mode=True),
                              nn.Conv2d(4, 4, 3), nn.AvgPool2d(3, 2, 1, ceil_mode=True,
                                                               count_include_pad=False)),
        (1, 3, 77, 66), (40, 36),
    ),
    "maxpool_dilation": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 1, dilation=2),
                              nn.Conv2d(4, 2, 1)),
        (1, 3, 45, 38), (24, 24),
    ),
    "residual_downsample_bn_eval": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Residual(4, 6), Residual(6, 8)),
        (1, 3, 75, 93), (48, 40),
    ),
    "concat_branches": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), Concat(4), nn.ReLU6()),
        (1, 3, 65, 58), (36, 30),
    ),
    "groups_depthwise_no_bias": (
        lambda: nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False),
                              nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False),
                              nn.Conv2d(6, 4, 3, stride=2, groups=2), nn.Hardswish()),
        (1, 3, 54, 71), (30, 28),
    ),
    "channels_last_layernorm_linear": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 2, stride=2), ChannelsLastBlock(4)),
        (1, 3, 66, 50), (34, 30),
    ),
    "functional_ops": (Functional, (1, 3, 61, 49), (32, 28)),
    "batch_of_three": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.LeakyReLU(0.1),
                              nn.Conv2d(4, 4, 3, padding=1)),
        (3, 3, 48, 40), (24, 20),
    ),
    "image_smaller_than_tile": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)),
        (1, 3, 21, 17), (64, 64),
    ),
    "tile_equals_image": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(2)),
        (1, 3, 32, 32), (32, 32),
    ),
    "unaligned_tile_is_aligned_down": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, stride=2, padding=1)),
        (1, 3, 50, 50), (23, 19),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_streaming_equals_conventional(name: str) -> None:
    factory, shape, tile = CASES[name]
    trunk = _seeded(factory())
    torch.manual_seed(1)
    image = torch.randn(shape)
    result = compare_with_conventional(trunk, image, tile)
    assert result.worst <= 1e-10
    single = name in ("image_smaller_than_tile", "tile_equals_image")
    assert (result.n_tiles == 1) == single, f"{name} streamed over {result.n_tiles} tiles"


@pytest.mark.parametrize("name", ["residual_downsample_bn_eval", "concat_branches"])
def test_float32_within_loose_tolerance(name: str) -> None:
    factory, shape, tile = CASES[name]
    trunk = _seeded(factory())
    image = torch.randn(shape)
    compare_with_conventional(trunk, image, tile, dtype=torch.float32)


def test_larger_forward_tile_and_no_cache() -> None:
    factory, shape, tile = CASES["residual_downsample_bn_eval"]
    trunk = _seeded(factory())
    image = torch.randn(shape)
    compare_with_conventional(trunk, image, tile, forward_tile_shape=(80, 80))
    compare_with_conventional(trunk, image, tile, cache_last_tile=False)


def test_published_tile_shape_form() -> None:
    factory, shape, tile = CASES["even_kernels"]
    trunk = _seeded(factory())
    compare_with_conventional(trunk, torch.randn(shape), (1, 3, *tile))


def test_volume_conv3d() -> None:
    trunk = _seeded(
        nn.Sequential(
            nn.Conv3d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
            nn.Conv3d(3, 3, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)), nn.BatchNorm3d(3),
        )
    )  # fmt: skip
    image = torch.randn(1, 2, 18, 30, 27)
    compare_with_conventional(trunk, image, (12, 16, 14))


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_autocast_on_cpu_as_accurate_as_conventional(amp: torch.dtype) -> None:
    factory, shape, tile = CASES["residual_downsample_bn_eval"]
    trunk = _seeded(factory())
    image = torch.randn(shape)
    result = compare_with_conventional(trunk, image, tile, dtype=torch.float32, amp_dtype=amp)
    assert result.n_tiles > 1


class _StdConv(nn.Conv2d):
    """Weight standardisation in forward (BiT): the weight is computed from parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "standardised"])
def test_weights_computed_from_parameters(kind: str) -> None:
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    if kind == "standardised":
        conv: nn.Module = _StdConv(3, 4, 3, stride=2, padding=1)
    else:
        conv = getattr(parametrizations, kind)(nn.Conv2d(3, 4, 3, stride=2, padding=1))
    trunk = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    result = compare_with_conventional(trunk, torch.randn(1, 3, 45, 38), (20, 20))
    assert result.n_tiles > 1
