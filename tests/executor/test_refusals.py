"""Unsupported trunks and bad inputs are refused before any work, naming the culprit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from executor import GeometryError, StreamingCNN, UnsupportedLayerError


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        seq = y.flatten(2).transpose(1, 2)
        return self.attn(seq, seq, seq)[0]


class Rows(nn.Module):
    """Coordinate attention's pooling: a mean along one spatial axis keeps the other."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.mean(dim=3, keepdim=True).sigmoid()


class ArgMax(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x.argmax()


class PositionalBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 3, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


def _conv() -> nn.Conv2d:
    return nn.Conv2d(3, 3, 3, padding=1)


def _stream(trunk: nn.Module) -> None:
    """Construct (static checks) and run a forward pass (mode checks run when a pass starts)."""
    StreamingCNN(trunk, (32, 32)).forward(torch.randn(1, 3, 64, 64))


REFUSED = {
    # name: (trunk, where, words in the reason/fix)
    "adaptive_pool": (nn.Sequential(_conv(), nn.AdaptiveAvgPool2d(1)), "1", "global pooling"),
    "adaptive_pool_to_regions": (nn.Sequential(_conv(), nn.AdaptiveAvgPool2d(4)), "1",
                                 "whole map's size"),
    "coordinate_pooling": (nn.Sequential(_conv(), Rows()), "mean", "not all of them"),
    "sync_batchnorm_train": (nn.Sequential(_conv(), nn.SyncBatchNorm(3)).train(), "1",
                             "processes"),
    "linear_on_spatial": (nn.Sequential(_conv(), nn.Linear(16, 4)), "1", "spatial"),
    "attention": (Attention(), "attn", "mixes all positions"),
    "circular_padding": (nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular")),
                         "0", "opposite border"),
    "flatten": (nn.Sequential(_conv(), nn.Flatten()), "1", "head"),
    "dropout_train": (nn.Sequential(_conv(), nn.Dropout2d(0.5)).train(), "1", "eval()"),
    "argmax_position": (nn.Sequential(_conv(), ArgMax()), "argmax", "position"),
    "positional_constant": (nn.Sequential(PositionalBias()), "0", "positional"),
    "data_dependent_control_flow": (DataDependent(), "DataDependent", "torch.fx"),
    "upsample": (nn.Sequential(_conv(), nn.Upsample(scale_factor=2)), "1", "upsampling"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_trunk_is_refused_with_name_and_fix(name: str) -> None:
    trunk, where, words = REFUSED[name]
    with pytest.raises(UnsupportedLayerError) as info:
        _stream(trunk)
    message = str(info.value)
    assert where in info.value.where
    assert words in message
    assert "\n" not in message


def test_tile_smaller_than_receptive_field_is_refused() -> None:
    trunk = nn.Sequential(*[nn.Conv2d(3, 3, 5, padding=2) for _ in range(6)])  # halo 12/side
    scnn = StreamingCNN(trunk, (20, 20))
    with pytest.raises(GeometryError, match="use a tile of at least 25 px"):
        scnn.forward(torch.randn(1, 3, 64, 64))


def test_wrong_grad_output_shape_is_refused() -> None:
    scnn = StreamingCNN(nn.Sequential(_conv()), (32, 32))
    image = torch.randn(1, 3, 64, 64)
    scnn.forward(image)
    with pytest.raises(GeometryError, match="pass out.grad"):
        scnn.backward(image, torch.randn(1, 3, 32, 64))


def test_wrong_image_rank_and_tile_shape_are_refused() -> None:
    with pytest.raises(GeometryError, match="tile_shape"):
        StreamingCNN(nn.Sequential(_conv()), (1, 2, 3, 4, 5, 6))
    scnn = StreamingCNN(nn.Sequential(_conv()), (32, 32))
    with pytest.raises(GeometryError, match="spatial axes"):
        scnn.forward(torch.randn(3, 64, 64))


def test_branches_disagreeing_in_size_are_refused() -> None:
    class Mismatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 3, stride=2, padding=1)
            self.b = nn.Conv2d(3, 3, 2, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(x)

    scnn = StreamingCNN(Mismatch(), (32, 32))
    with pytest.raises(GeometryError, match="merged maps have lengths"):
        scnn.forward(torch.randn(1, 3, 63, 64))  # odd height: 32 vs 31 rows
