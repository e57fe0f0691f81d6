"""Random CNN trunks for property tests: a spec (list of layer tuples) and its module."""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

Spec = tuple[tuple[Any, ...], ...]


@st.composite
def layer(draw: st.DrawFn, *, nonlinear: bool = True) -> tuple[Any, ...]:
    kinds = ["conv", "conv", "avgpool", "residual", "concat"]
    if nonlinear:
        kinds += ["act", "maxpool"]
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
    return ("act", draw(st.sampled_from(["relu", "tanh", "gelu"])))


def specs(*, nonlinear: bool = True) -> st.SearchStrategy[Spec]:
    """Random layer lists; ``nonlinear=False`` keeps only ops whose gradient never vanishes."""
    return st.lists(layer(nonlinear=nonlinear), min_size=1, max_size=6).map(tuple)


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


def build(spec: Spec, channels: int = 2) -> nn.Module:
    """Module for ``spec``: every conv keeps (or grows by one, for concat) the channels."""
    layers: list[nn.Module] = []
    c = channels
    for entry in spec:
        kind = entry[0]
        if kind == "conv":
            _, k, s, p, d, bias = entry
            layers.append(nn.Conv2d(c, c, k, stride=s, padding=p, dilation=d, bias=bias))
        elif kind == "maxpool":
            layers.append(nn.MaxPool2d(entry[1], entry[2], entry[3], ceil_mode=entry[4]))
        elif kind == "avgpool":
            layers.append(nn.AvgPool2d(entry[1], entry[2], entry[3], ceil_mode=entry[4]))
        elif kind in ("residual", "concat"):
            stride = entry[2] if kind == "residual" else 1
            layers.append(Branchy(kind, c, entry[1], stride))
            c += kind == "concat"
        else:
            layers.append({"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[entry[1]])
    return nn.Sequential(*layers).eval()
