"""Exact area-average resampling along one axis, shared by slides and volumes.

Output pixel ``i`` of an axis of ``size`` input px resampled to ``out`` px (``size >= out``)
is the mean of the input interval ``[i size / out, (i+1) size / out)``, fractional pixels
weighted by their overlap. The weights are exact integer ratios of global coordinates, so the
output pixels of a region equal the same pixels of a whole-axis resampling bit for bit: a
source resampled region by region streams exactly as its resampled pixels held in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["Taps", "area_taps", "resample_axis", "round_ratio"]


def area_taps(
    start: int, stop: int, size: int, out: int
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Area-average taps of output pixels ``[start, stop)`` of an axis of ``size`` level px
    resampled to ``out`` px (``size >= out``).

    Output pixel ``i`` covers level interval ``[i size / out, (i+1) size / out)``; level pixel
    ``j`` contributes its overlap with it, ``num / size`` with the integer
    ``num = min((j+1) out, (i+1) size) - max(j out, i size)`` (the nums of a pixel sum to
    ``size``), so taps depend on ``i`` and ``j`` only, never on the region read.

    Returns:
        ``(index, num, lo, hi)``: ``index[k, i]`` is tap k's level pixel relative to ``lo``,
        ``num[k, i]`` its integer weight (int64), ``[lo, hi)`` the level pixels needed.
    """
    i = np.arange(start, stop, dtype=np.int64)
    first = (i * size) // out
    last = -((-(i + 1) * size) // out)  # ceil, exclusive
    n_taps = int((last - first).max())
    j = first[None, :] + np.arange(n_taps, dtype=np.int64)[:, None]  # (K, n)
    num = np.clip(np.minimum((j + 1) * out, (i + 1) * size) - np.maximum(j * out, i * size), 0,
                  None)  # fmt: skip
    lo, hi = int(first[0]), int(last[-1])
    index = np.minimum(j, hi - 1) - lo  # taps past the interval have weight 0
    return index, num, lo, hi


Taps = tuple[np.ndarray, np.ndarray, int, int]  # (index, num, lo, hi) of area_taps


def resample_axis(data: np.ndarray, axis: int, taps: Taps, size: int, out: int
                   ) -> tuple[np.ndarray, int]:  # fmt: skip
    """The output pixels of ``taps`` (``area_taps``; ``data``'s ``axis`` holds its level px
    ``[lo, hi)``) as ``sum_k num[k] * data[index[k]]``, and the denominator (``size``) that
    makes it a mean. Integer data is summed exactly in integers (so in any order, with the
    narrowest type that cannot overflow); float data in float64 in tap order with weights
    ``num / size`` (denominator 1)."""
    exact = data.dtype.kind in "ui"
    if exact:
        # The largest sum in magnitude (signed data, e.g. CT in HU, is negative too).
        bound = max(abs(int(data.max(initial=0))), abs(int(data.min(initial=0)))) * size
        work: Any = np.int32 if bound < 2**31 else np.int64
    else:
        work = np.float64
    if size % out == 0:  # whole footprints of f level px each: strided slices, weight out
        f = size // out  # (the region read starts at level px start * f = lo)
        view = np.moveaxis(data, axis, 0)
        n = taps[0].shape[1]
        acc = view[0 : n * f : f].astype(work)
        for k in range(1, f):
            acc += view[k : k + n * f : f]
        acc = np.moveaxis(acc, 0, axis)
        return (acc * out, size) if exact else (acc * (out / size), 1)
    index, num, _, _ = taps
    shape = [1] * data.ndim
    shape[axis] = -1
    acc = None
    for k in range(index.shape[0]):
        weight = num[k].astype(work) if exact else num[k] / size
        term = np.take(data, index[k], axis=axis).astype(work) * weight.reshape(shape)
        acc = term if acc is None else acc + term
    assert acc is not None
    return acc, (size if exact else 1)


def round_ratio(total: np.ndarray, count: int) -> np.ndarray:
    """``total / count`` rounded half up, in exact integer arithmetic (``total >= 0``)."""
    return (2 * total + count) // (2 * count)
