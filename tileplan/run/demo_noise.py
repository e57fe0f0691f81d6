"""Deterministic noise for synthetic slides: 64-bit hashes of lattice cells and cubic
B-spline fields over them, functions of (seed, global position) alone, so a region renders
identically whichever tiles it is split into."""

from __future__ import annotations

import numpy as np

__all__ = [
    "GOLDEN", "bspline", "hash_cells", "mix_array", "mix_int", "octave_grid", "octave_points",
    "spline_grid", "subkey", "uniform01",
]  # fmt: skip

# 64-bit hashing (splitmix64 finaliser).
_MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_M3 = 0xD6E8FEB86659FD93
_U64_GOLDEN, _U64_M1, _U64_M2, _U64_M3 = (np.uint64(v) for v in (GOLDEN, _M1, _M2, _M3))


def mix_int(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _M1) & _MASK64
    z = ((z ^ (z >> 27)) * _M2) & _MASK64
    return z ^ (z >> 31)


def mix_array(z: np.ndarray) -> np.ndarray:
    """The same finaliser as :func:`mix_int`, in place on a uint64 array (wraps mod 2**64)."""
    z ^= z >> np.uint64(30)
    z *= _U64_M1
    z ^= z >> np.uint64(27)
    z *= _U64_M2
    z ^= z >> np.uint64(31)
    return z


def subkey(key: int, salt: int) -> int:
    return mix_int(key ^ mix_int(salt * GOLDEN + 1))


def hash_cells(key: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """64-bit hash of ``(key, row, col)``; ``rows`` and ``cols`` broadcast (int64)."""
    hr = rows.astype(np.uint64) * _U64_GOLDEN
    hr ^= np.uint64(key)
    mix_array(hr)
    z = hr ^ (cols.astype(np.uint64) * _U64_M3)
    return mix_array(z)


def uniform01(z: np.ndarray) -> np.ndarray:
    """Hashes to float32 uniform in [-1, 1) (exactly: 24-bit fractions)."""
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)


def bspline(u: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline weights of positions ``u`` on a lattice of ``spacing``.

    Returns ``(k, w)``: the first of the four lattice nodes each position depends on (int64,
    the nodes are ``k .. k + 3``) and their weights, float64 ``(4,) + u.shape``.
    """
    p = u / spacing
    base = np.floor(p)
    f = p - base
    f2 = f * f
    f3 = f2 * f
    g = 1.0 - f
    w = np.stack([g * g * g, 3.0 * f3 - 6.0 * f2 + 4.0, -3.0 * f3 + 3.0 * f2 + 3.0 * f + 1.0, f3])
    w /= 6.0
    return base.astype(np.int64) - 1, w


def spline_grid(
    values: np.ndarray,
    origin: tuple[int, int],
    ky: tuple[np.ndarray, np.ndarray],
    kx: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """Separable B-spline of lattice ``values`` ``(C, ny, nx)`` on a grid of positions.

    ``origin`` is the lattice index of ``values[:, 0, 0]``; ``ky``/``kx`` come from
    :func:`_bspline` for the rows and columns. Each output value is the same fixed-order sum
    of the same products whatever the grid, so results do not depend on how a region is cut.
    """
    (by, wy), (bx, wx) = ky, kx
    cols = bx - origin[1]
    wx = wx.astype(values.dtype)
    rows_pass = wx[0] * values[:, :, cols]
    for b in range(1, 4):
        rows_pass += wx[b] * values[:, :, cols + b]
    rows = by - origin[0]
    wy = wy.astype(values.dtype)[:, :, None]
    out = wy[0] * rows_pass[:, rows]
    for a in range(1, 4):
        out += wy[a] * rows_pass[:, rows + a]
    return out


def octave_grid(key: int, uy: np.ndarray, ux: np.ndarray, spacing: float) -> np.ndarray:
    """Value noise (B-spline of hashed lattice values in [-1, 1)) on the grid ``uy x ux``."""
    ky, kx = bspline(uy, spacing), bspline(ux, spacing)
    y0, x0 = int(ky[0].min()), int(kx[0].min())
    lat_rows = np.arange(y0, int(ky[0].max()) + 4, dtype=np.int64)
    lat_cols = np.arange(x0, int(kx[0].max()) + 4, dtype=np.int64)
    lattice = uniform01(hash_cells(key, lat_rows[:, None], lat_cols[None, :])).astype(np.float64)
    return spline_grid(lattice[None], (y0, x0), ky, kx)[0]


def octave_points(key: int, uy: np.ndarray, ux: np.ndarray, spacing: float) -> np.ndarray:
    """:func:`octave_grid` at scattered points (equal up to rounding)."""
    (by, wy), (bx, wx) = bspline(uy, spacing), bspline(ux, spacing)
    out = np.zeros(np.broadcast_shapes(uy.shape, ux.shape))
    for a in range(4):
        for b in range(4):
            out += wy[a] * wx[b] * uniform01(hash_cells(key, by + a, bx + b))
    return out
