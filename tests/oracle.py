"""The correctness oracle: conventional backprop with the same weights (DESIGN §3.1).

Tolerances live here and nowhere else. Errors are relative per tensor,
``max|actual - expected| / max|expected|``.

* float64: streaming is exact up to reassociation, so it is compared with conventional
  backprop directly: error ≤ ``RTOL_FLOAT64`` (1e-10).
* float32 and lower (including autocast): conventional backprop is itself inexact, and how
  inexact depends on the CPU's kernels (a float32 gradient of an early layer sums millions of
  terms with cancellation). So both the streamed and the conventional result are judged against
  a float64 reference of the same weights and image, and the streamed error may be at most
  ``ERROR_FACTOR`` times the conventional error plus a floor of a few rounding units:
  ``err(streamed) ≤ ERROR_FACTOR · err(conventional) + FLOOR[dtype]``.
  This means the same thing on every CPU: streaming is as accurate as the conventional pass.
  (How accurate streaming is in low precision also depends on how many crops overlap each
  position; see tests/executor/test_real_networks.py.)
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from executor import SegmentedStreamingCNN, StreamingCNN

RTOL_FLOAT64 = 1e-10
ERROR_FACTOR = 2.0
# Rounding noise in a parameter gradient is eps times the terms it sums, which are of the size
# of the trunk's gradients; a gradient that cancels far below that (the bias of a convolution
# before a BatchNorm with batch statistics, whose mean subtraction removes it; a LayerNorm
# over two channels) keeps that noise. So each is judged against its own largest value or
# this fraction of the trunk's largest parameter gradient, whichever is larger: 1e-10 of it is
# still about 50 eps of the largest gradient, and a missing contribution still shows.
CANCELLED = 1e-4
# Rounding noise: below this (relative to the largest value) two correct computations of the
# same tensor differ by rounding alone, whatever their ratio. float32 results are long float32
# reductions (errors of tens of eps are routine); autocast results are dominated by rounding
# the operands to the low-precision dtype once (a few eps).
FLOOR: dict[torch.dtype, float] = {
    torch.float32: 32 * torch.finfo(torch.float32).eps,  # 3.8e-6
    torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps,  # 3.1e-2
    torch.float16: 4 * torch.finfo(torch.float16).eps,  # 3.9e-3
}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| (0/0 counts as 0)."""
    diff = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_exact(
    actual: torch.Tensor, expected: torch.Tensor, what: str, scale: float | None = None
) -> float:
    """float64: ``actual`` equals ``expected`` up to reassociation; returns the error.

    ``scale``: the trunk's largest parameter gradient; the difference is judged against
    ``CANCELLED`` of it when that is larger than ``max|expected|`` (see ``CANCELLED``)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = rel_error(actual, expected)
    if scale is not None and expected.double().abs().max().item() < CANCELLED * scale:
        err = (actual.double() - expected.double()).abs().max().item() / (CANCELLED * scale)
    assert err <= RTOL_FLOAT64, f"{what}: relative error {err:.3e} > {RTOL_FLOAT64:.0e}"
    return err


@dataclass(frozen=True)
class Judged:
    """One tensor in low precision, judged against a float64 reference."""

    streamed: float  # relative error of the streamed result vs float64
    conventional: float  # relative error of the conventional result vs float64
    bound: float  # what the streamed error may be


def assert_as_accurate(
    streamed: torch.Tensor,
    conventional: torch.Tensor,
    reference: torch.Tensor,
    dtype: torch.dtype,
    what: str,
) -> Judged:
    """Low precision: ``streamed`` is about as close to the float64 ``reference`` as the
    conventional result is."""
    for t in (streamed, conventional):
        assert t.shape == reference.shape, f"{what}: shape {t.shape} != {reference.shape}"
    e_s, e_c = rel_error(streamed, reference), rel_error(conventional, reference)
    bound = ERROR_FACTOR * e_c + FLOOR[dtype]
    assert e_s <= bound, (
        f"{what}: streamed error {e_s:.3e} vs float64 exceeds {ERROR_FACTOR:g} x the "
        f"conventional error {e_c:.3e} + {FLOOR[dtype]:.1e}"
    )
    return Judged(e_s, e_c, bound)


@dataclass(frozen=True)
class Comparison:
    """Relative errors of one streaming-vs-conventional comparison, per tensor.

    In float64 each value is the streamed error against conventional backprop; in lower
    precision it is a ``Judged`` pair against the float64 reference.
    """

    n_tiles: int
    errors: dict[str, float | Judged]

    @property
    def worst(self) -> float:
        """The largest streamed error (vs conventional in float64, vs float64 otherwise)."""
        return max(e.streamed if isinstance(e, Judged) else e for e in self.errors.values())

    @property
    def worst_conventional(self) -> float | None:
        """The largest conventional error vs float64 (None in float64)."""
        judged = [e.conventional for e in self.errors.values() if isinstance(e, Judged)]
        return max(judged) if judged else None


def _head(out: torch.Tensor) -> torch.Tensor:
    """A non-trivial scalar loss of the trunk output, fixed by a seeded weighting."""
    gen = torch.Generator().manual_seed(1234)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device, out.dtype)
    return (torch.tanh(out) * w).sum() + 0.5 * (out.float() ** 2).mean().to(out.dtype)


@dataclass(frozen=True)
class _Result:
    output: torch.Tensor
    grads: dict[str, torch.Tensor]
    input_grad: torch.Tensor | None


def _autocast(trunk: nn.Module, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if amp_dtype is None:
        return contextlib.nullcontext()
    device = next(trunk.parameters()).device.type
    return torch.autocast(device, dtype=amp_dtype)


def _grads(trunk: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, p in trunk.named_parameters():
        if p.grad is not None:
            yield name, p.grad.detach().clone()


def _conventional(
    trunk: nn.Module,
    image: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    input_grad: bool,
    amp_dtype: torch.dtype | None,
) -> _Result:
    trunk.zero_grad(set_to_none=True)
    x = image.clone().requires_grad_(input_grad)
    with _autocast(trunk, amp_dtype):
        out = trunk(x)
    head(out).backward()
    return _Result(out.detach(), dict(_grads(trunk)), x.grad if input_grad else None)


def _streamed(
    trunk: nn.Module,
    image: torch.Tensor,
    tile_shape: int | Sequence[int],
    head: Callable[[torch.Tensor], torch.Tensor],
    input_grad: bool,
    amp_dtype: torch.dtype | None,
    streaming_kwargs: dict[str, object],
) -> tuple[_Result, int]:
    trunk.zero_grad(set_to_none=True)
    segments = streaming_kwargs.pop("segments", None)
    scnn: StreamingCNN | SegmentedStreamingCNN
    if segments is not None:  # a chain (executor.chain); tile_shape is unused
        scnn = SegmentedStreamingCNN(
            trunk,
            segments,
            input_grad=input_grad,
            amp_dtype=amp_dtype,  # type: ignore[arg-type]
            **streaming_kwargs,  # type: ignore[arg-type]
        )
        n_tiles = sum(g.n_tiles for g in scnn.tile_grids(image.shape[2:]))
    else:
        scnn = StreamingCNN(
            trunk, tile_shape, input_grad=input_grad, amp_dtype=amp_dtype, **streaming_kwargs
        )
        n_tiles = scnn.tile_grid(image.shape[2:]).n_tiles
    out = scnn.forward(image)
    out.requires_grad_()
    head(out).backward()
    g = scnn.backward(image, out.grad)
    return _Result(out.detach(), dict(_grads(trunk)), g), n_tiles


def compare_with_conventional(
    trunk: nn.Module,
    image: torch.Tensor,
    tile_shape: int | Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    amp_dtype: torch.dtype | None = None,
    head: Callable[[torch.Tensor], torch.Tensor] = _head,
    input_grad: bool = True,
    **streaming_kwargs: object,
) -> Comparison:
    """Run ``trunk`` conventionally and streamed on ``image``; assert every tensor agrees.

    Args:
        dtype: parameters and image dtype (float64 or float32).
        amp_dtype: run both passes under autocast with this dtype (parameters stay ``dtype``);
            judged against float64 like float32.
        segments: (keyword) stream as a chain of ``SegmentSpec`` instead of one tile shape
            (``tile_shape`` is then unused); ``n_tiles`` counts every segment's tiles.
    """
    trunk = trunk.to(dtype)
    image = image.to(dtype)
    before = copy.deepcopy(trunk)  # running statistics as they were, for the reference
    conventional_trunk = copy.deepcopy(trunk)
    conv = _conventional(conventional_trunk, image, head, input_grad, amp_dtype)
    stream, n_tiles = _streamed(
        trunk, image, tile_shape, head, input_grad, amp_dtype, streaming_kwargs
    )
    missing = set(conv.grads) - set(stream.grads)
    assert not missing, f"streaming left no gradient for {sorted(missing)}"
    pairs = {"output": (stream.output, conv.output)}
    pairs |= {f"grad of {n}": (stream.grads[n], g) for n, g in conv.grads.items()}
    if input_grad:
        pairs["input grad"] = (stream.input_grad, conv.input_grad)
    # Batch norm with batch statistics updates its running statistics once per forward call.
    pairs |= {
        f"buffer {n}": (b, dict(conventional_trunk.named_buffers())[n])
        for n, b in trunk.named_buffers()
        if b.is_floating_point()
    }

    if dtype == torch.float64 and amp_dtype is None:
        largest = max((g.abs().max().item() for g in conv.grads.values()), default=0.0)
        errors = {
            what: assert_exact(s, c, what, largest if what.startswith("grad of") else None)
            for what, (s, c) in pairs.items()
        }  # fmt: skip
        return Comparison(n_tiles, errors)

    reference = before.double()
    ref = _conventional(reference, image.double(), head, input_grad, None)
    refs = {"output": ref.output, "input grad": ref.input_grad}
    refs |= {f"grad of {n}": g for n, g in ref.grads.items()}
    refs |= {f"buffer {n}": b for n, b in reference.named_buffers() if b.is_floating_point()}
    low = amp_dtype or dtype
    errors = {
        what: assert_as_accurate(s, c, refs[what], low, what) for what, (s, c) in pairs.items()
    }
    return Comparison(n_tiles, errors)
