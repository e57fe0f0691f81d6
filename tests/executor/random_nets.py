"""Random CNN trunks for property tests: a spec (list of layer tuples) and its module."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import strategies as st
from torch import nn

Spec = tuple[tuple[Any, ...], ...]


@st.composite
def layer(draw: st.DrawFn, *, nonlinear: bool = True) -> tuple[Any, ...]:
    kinds = ["conv", "conv", "avgpool", "residual", "concat", "split", "shuffle", "pad",
             "same", "unshuffle"]  # fmt: skip
    if nonlinear:
        kinds += ["act", "maxpool", "channel_gate", "channels_last_norm"]
    kind = draw(st.sampled_from(kinds))
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    if kind == "conv":
        d = draw(st.integers(1, 2))
        p = draw(st.integers(0, d * (k - 1)))
        return ("conv", k, s, p, d, draw(st.booleans()))
    if kind in ("maxpool", "avgpool"):
        k = max(k, 2)
        p = draw(st.integers(0, k // 2))
        return (kind, k, s, p, draw(st.booleans()))
    if kind == "residual":
        return ("residual", draw(st.sampled_from([1, 3, 5])), draw(st.integers(1, 2)))
    if kind == "concat":
        return ("concat", draw(st.sampled_from([1, 3])))
    if kind == "split":
        return ("split", draw(st.sampled_from([1, 3])), draw(st.sampled_from([3, 5])))
    if kind == "pad":
        pads = draw(st.tuples(*[st.integers(0, 2)] * 4))
        return ("pad", pads, draw(st.sampled_from(["constant", "reflect", "replicate"])))
    if kind == "same":
        return ("same", draw(st.integers(1, 5)), s, draw(st.integers(1, 2)))
    if kind in ("shuffle", "unshuffle", "channel_gate", "channels_last_norm"):
        return (kind,)
    return ("act", draw(st.sampled_from(["relu", "tanh", "gelu"])))


def _no_norm_of_a_norm(layers: list[tuple[Any, ...]]) -> Spec:
    """Drop a channels-last LayerNorm right after another: its input already has mean 0 and
    variance 1 at every position, so its input gradient is a difference of nearly equal terms
    that float64 reproduces only to about 1e-10 (rounding, not a streaming error)."""
    kept: list[tuple[Any, ...]] = []
    for entry in layers:
        if not (entry == ("channels_last_norm",) and kept and kept[-1] == entry):
            kept.append(entry)
    return tuple(kept)


def specs(*, nonlinear: bool = True) -> st.SearchStrategy[Spec]:
    """Random layer lists; ``nonlinear=False`` keeps only ops whose gradient never vanishes."""
    return st.lists(layer(nonlinear=nonlinear), min_size=1, max_size=6).map(_no_norm_of_a_norm)


@st.composite
def global_layer(draw: st.DrawFn) -> tuple[Any, ...]:
    """A global-context layer: its statistic needs the whole map."""
    kind = draw(st.sampled_from(["se", "gn", "in", "grn", "bn", "se_block", "eca"]))
    if kind == "se_block":  # squeeze-excitation inside a residual block, maybe downsampling
        return ("se_block", draw(st.integers(1, 2)), draw(st.booleans()))
    if kind == "in":
        return ("in", draw(st.booleans()))
    return (kind,)


@st.composite
def global_specs(draw: st.DrawFn) -> Spec:
    """Random trunks with one to three global-context layers at random places among local
    ones. Each comes after a convolution and an activation of its own: a norm right after
    another whose statistics it undoes (instance norm after a per-channel scaling) has
    gradients that cancel to rounding noise, which no float64 comparison can judge."""
    layers = list(draw(st.lists(layer(), max_size=4)))
    for entry in draw(st.lists(global_layer(), min_size=1, max_size=3)):
        layers.insert(draw(st.integers(0, len(layers))), entry)
    return tuple(layers)


class Branchy(nn.Module):
    def __init__(self, kind: str, c: int, k: int, s: int) -> None:
        super().__init__()
        self.kind = kind
        self.main = nn.Conv2d(c, c, k, stride=s, padding=k // 2)
        self.side = nn.Conv2d(c, c, 1, stride=s) if kind == "residual" else nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "residual":
            return self.main(x) + self.side(x)
        return torch.cat([self.main(x), self.side(x)], dim=1)


class ChannelSplit(nn.Module):
    """Res2Net/MixConv style: split the channels, convolve each part differently, concat."""

    def __init__(self, c: int, k1: int, k2: int) -> None:
        super().__init__()
        self.first = c // 2
        self.a = nn.Conv2d(self.first, self.first, k1, padding=k1 // 2)
        self.b = nn.Conv2d(c - self.first, c - self.first, k2, padding=k2 // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.first, x.shape[1] - self.first], dim=1)
        assert a.ndim == 4, "shape checks are traced, not refused"
        return torch.cat([self.a(a), self.b(b)], dim=1)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: a reshape of the channel dims only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous()
        return x.view(n, c, h, w)


class Padded(nn.Module):
    """F.pad by fixed amounts (any local mode), then an unpadded convolution."""

    def __init__(self, c: int, pads: tuple[int, ...], mode: str) -> None:
        super().__init__()
        self.pads, self.mode = pads, mode
        self.conv = nn.Conv2d(c, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pads, mode=self.mode))


class Unshuffle(nn.Module):
    """Space to depth, then back to the channel count."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(2)
        self.mix = nn.Conv2d(4 * c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.unshuffle(x))


class ChannelGate(nn.Module):
    """CBAM-style spatial attention: statistics over channels at each position (local)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean(1, keepdim=True) + x.amax(dim=1, keepdim=True))


class ChannelsLastNorm(nn.Module):
    """ConvNeXt style: LayerNorm over channels in channels-last layout."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation as timm writes it: means over positions, two 1x1 convs, a gate."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(c, 3, 1)
        self.expand = nn.Conv2d(3, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.relu(self.reduce(s))))


class EfficientChannelAttention(nn.Module):
    """ECA as timm writes it: a 1-D conv across the channels' means, expanded back."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean((2, 3)).view(x.shape[0], 1, -1)
        y = self.conv(y).view(x.shape[0], -1, 1, 1).sigmoid()
        return x * y.expand_as(x)


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's global response norm, channels-last between permutes."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, c))
        self.bias = nn.Parameter(torch.linspace(-0.1, 0.1, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        g = x.norm(p=2, dim=(1, 2), keepdim=True)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return (x + torch.addcmul(self.bias, self.weight, x * n)).permute(0, 3, 1, 2)


class SEBlock(nn.Module):
    """A residual block with squeeze-excitation on its main branch; a strided one has a 1x1
    strided shortcut (which must be kept whole across the statistic, or recomputed)."""

    def __init__(self, c: int, stride: int, group_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=stride, padding=1)
        self.norm = nn.GroupNorm(1, c) if group_norm else nn.Identity()
        self.se = SqueezeExcite(c)
        self.down = nn.Conv2d(c, c, 1, stride=stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se(F.relu(self.norm(self.conv(x)))) + self.down(x)


_GLOBAL = frozenset({"se", "gn", "in", "grn", "bn", "se_block", "eca"})


def _same_conv(c: int, k: int, s: int, d: int) -> nn.Module:
    from timm.layers import Conv2dSame  # TensorFlow 'same' padding computed from the input size

    return Conv2dSame(c, c, k, stride=s, dilation=d)


_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}

# kind -> (module for the entry and the current channels, channels after it)
_LAYERS: dict[str, Any] = {
    "conv": lambda e, c: nn.Conv2d(c, c, e[1], stride=e[2], padding=e[3], dilation=e[4],
                                   bias=e[5]),
    "maxpool": lambda e, c: nn.MaxPool2d(e[1], e[2], e[3], ceil_mode=e[4]),
    "avgpool": lambda e, c: nn.AvgPool2d(e[1], e[2], e[3], ceil_mode=e[4]),
    "residual": lambda e, c: Branchy("residual", c, e[1], e[2]),
    "concat": lambda e, c: Branchy("concat", c, e[1], 1),
    "split": lambda e, c: ChannelSplit(c, e[1], e[2]),
    "pad": lambda e, c: Padded(c, e[1], e[2]),
    "same": lambda e, c: _same_conv(c, *e[1:]),
    "unshuffle": lambda e, c: Unshuffle(c),
    "channel_gate": lambda e, c: ChannelGate(),
    "channels_last_norm": lambda e, c: ChannelsLastNorm(c),
    "act": lambda e, c: _ACTIVATIONS[e[1]](),
    "se": lambda e, c: SqueezeExcite(c),
    "gn": lambda e, c: nn.GroupNorm(c if c % 2 else 2 if c > 2 else 1, c),
    # A 1x1 convolution after it: torch's own instance_norm computes wrong gradients for a
    # batch of one when the gradient reaching it is channels-last (as after a permute; CPU,
    # torch 2.14), which would fail the conventional side of the oracle.
    "in": lambda e, c: nn.Sequential(
        nn.InstanceNorm2d(c, affine=True, track_running_stats=e[1]).train(), nn.Conv2d(c, c, 1)),
    "grn": lambda e, c: ResponseNorm(c),
    "bn": lambda e, c: nn.BatchNorm2d(c, momentum=0.3).train(),
    "se_block": lambda e, c: SEBlock(c, e[1], e[2]),
    "eca": lambda e, c: EfficientChannelAttention(),
}  # fmt: skip


def build(spec: Spec, channels: int = 2) -> nn.Module:
    """Module for ``spec``: layers keep the channels (concat grows them by one, a shuffle
    makes them even)."""
    layers: list[nn.Module] = []
    c = channels
    for entry in spec:
        kind = entry[0]
        if kind == "shuffle":
            if c % 2:
                layers.append(nn.Conv2d(c, c + 1, 1))
                c += 1
            layers.append(ChannelShuffle())
            continue
        if kind in _GLOBAL:
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.GELU()]
        layers.append(_LAYERS[kind](entry, c))
        c += kind == "concat"
    trunk = nn.Sequential(*layers).eval()
    for module in trunk.modules():  # norms with batch statistics stay in train mode
        if isinstance(module, nn.BatchNorm2d | nn.InstanceNorm2d):
            module.train()
    return trunk
