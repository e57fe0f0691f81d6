"""Gaussian noise from a counter-based generator: a pixel's noise is a function of (key,
channel, global row, global column), so every tile that reads a pixel adds the same value,
halos included.

The counter is the pixel's index in the augmented image, ``(c * H + y) * W + x`` (voxels
alike); the
generator is SplitMix64's finaliser of ``counter + key * golden`` (a bijection of 64-bit
integers with good avalanche, Steele et al. 2014), in wrapping uint64 arithmetic. Its top 16
bits index a table of the standard normal's quantiles at ``(i + 1/2) / 65536``: a Gaussian
quantised to 65536 levels (tails at +-4.3 sigma), with no transcendental function per pixel.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np

__all__ = ["gaussian_noise", "normal_quantiles"]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@cache
def normal_quantiles() -> np.ndarray:
    """``(65536,)`` float64: the standard normal's quantile at ``(i + 1/2) / 65536``."""
    from scipy.special import ndtri

    table = ndtri((np.arange(65536, dtype=np.float64) + 0.5) / 65536.0)
    table.setflags(write=False)
    return table


def _splitmix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def gaussian_noise(key: int, channels: int, shape: Sequence[int],
                   region: Sequence[slice]) -> np.ndarray:  # fmt: skip
    """Standard normal noise ``(channels, *region)`` float64 of ``region`` (one slice per
    axis) of an image of spatial ``shape``, for the 64-bit ``key``. The counter is the pixel's
    index in the image, channel first: ``((c * H) + y) * W + x`` (and so on for more axes)."""
    n = len(shape)
    counter = np.arange(channels, dtype=np.uint64).reshape(-1, *([1] * n))
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the generator means it to
        for axis, (s, size) in enumerate(zip(region, shape, strict=True)):
            coords = np.arange(s.start, s.stop, dtype=np.uint64)
            counter = counter * np.uint64(size) + coords.reshape(
                1, *[-1 if k == axis else 1 for k in range(n)]
            )
        bits = _splitmix(counter + np.uint64(key % 2**64) * _GOLDEN)
    return normal_quantiles()[(bits >> np.uint64(48)).astype(np.int64)]
