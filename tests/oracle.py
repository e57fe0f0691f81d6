"""The correctness oracle: conventional backprop with the same weights.

Tolerances live here and nowhere else (DESIGN §3.1): per tensor,
``max|streaming - conventional| <= rtol(dtype) * max|conventional|``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from executor import StreamingCNN

# float64 is exact up to reassociation (the original notebook got ~1e-13); float32 loose.
# bfloat16 keeps 8 mantissa bits: tile-wise and whole-image kernels round differently, so
# only a coarse agreement is meaningful there.
RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (0/0 counts as 0)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_rel_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str
) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_error(actual, expected)
    assert err <= RTOL[dtype], f"{what}: relative error {err:.3e} > {RTOL[dtype]:.0e}"
    return err


@dataclass(frozen=True)
class Comparison:
    """Largest relative errors of one streaming-vs-conventional comparison."""

    n_tiles: int
    output: float
    param_grads: dict[str, float]
    input_grad: float | None

    @property
    def worst(self) -> float:
        errs = [self.output, *self.param_grads.values()]
        if self.input_grad is not None:
            errs.append(self.input_grad)
        return max(errs)


def _head(out: torch.Tensor) -> torch.Tensor:
    """A non-trivial scalar loss of the trunk output, fixed by a seeded weighting."""
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return (torch.tanh(out) * w).sum() + 0.5 * (out.float() ** 2).mean().to(out.dtype)


def compare_with_conventional(
    trunk: nn.Module,
    image: torch.Tensor,
    tile_shape: int | Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    head: Callable[[torch.Tensor], torch.Tensor] = _head,
    input_grad: bool = True,
    **streaming_kwargs: object,
) -> Comparison:
    """Run ``trunk`` conventionally and streamed on ``image``; assert every tensor agrees."""
    trunk = trunk.to(dtype)
    image = image.to(dtype)

    # Conventional backprop: the oracle.
    trunk.zero_grad(set_to_none=True)
    x = image.clone().requires_grad_(input_grad)
    ref = trunk(x)
    head(ref).backward()
    ref_grads = {n: p.grad.clone() for n, p in trunk.named_parameters() if p.grad is not None}
    ref_input = x.grad.clone() if input_grad else None
    ref = ref.detach()

    # Streaming.
    trunk.zero_grad(set_to_none=True)
    scnn = StreamingCNN(trunk, tile_shape, input_grad=input_grad, **streaming_kwargs)
    out = scnn.forward(image)
    out.requires_grad_()
    head(out).backward()
    input_g = scnn.backward(image, out.grad)

    errors = Comparison(
        n_tiles=scnn.tile_grid(image.shape[2:]).n_tiles,
        output=assert_rel_close(out, ref, dtype, "output"),
        param_grads={
            name: assert_rel_close(p.grad, ref_grads[name], dtype, f"grad of {name}")
            for name, p in trunk.named_parameters()
            if name in ref_grads
        },
        input_grad=(
            assert_rel_close(input_g, ref_input, dtype, "input grad")
            if ref_input is not None
            else None
        ),
    )
    missing = {n for n, p in trunk.named_parameters() if p.grad is None} & set(ref_grads)
    assert not missing, f"streaming left no gradient for {sorted(missing)}"
    return errors
