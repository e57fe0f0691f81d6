"""Pointwise colour augmentations of 8-bit images, exact whichever crop a pixel is read in.

Every stage maps uint8 to uint8 and computes each pixel from that pixel alone, with per-image
parameters, using table lookups and IEEE multiplications and additions in a fixed order: no
``exp``/``log``/``pow`` runs per pixel (their vectorised and scalar forms may differ in the last
bit, and a pixel's lane depends on where the crop starts). So a crop augmented equals the same
part of the whole image augmented, bit for bit.

Stages, in order:

- **HED stain jitter** (Tellez et al. 2018) with scikit-image's stain matrices
  (``skimage.color.hed_from_rgb``/``rgb_from_hed``): optical densities
  ``L_k = log(max(x_k / 255, 1e-6)) / log(1e-6)``, stains ``S = L @ H``, jittered
  ``S' = a * S + b``, back to RGB ``exp(lambda * S' @ R)`` with ``lambda = log(1e-6)``. The map
  is linear in ``L``, so ``rgb_c = exp(B_c) * prod_k exp(A[k, c] * L_k)`` with
  ``A = lambda * H diag(a) R`` and ``B = lambda * b @ R``: three 256-entry tables per output
  channel and two products per pixel. With ``a = 1, b = 0`` it is the identity (``H R = I``).
  (scikit-image's ``rgb2hed`` also clips negative stains to 0; that clip is left out so that the
  map stays linear and the identity stays exact.)
- **Per-channel tone** (brightness, contrast about mid-grey, gamma): one 256-entry table.
- **Saturation and hue**: a 3x3 colour matrix: saturation blends with the luma
  (ITU-R 601 weights), hue rotates the chroma plane of YIQ about the grey axis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ColourParams", "apply_colour", "hed_tables", "mix_matrix", "tone_table"]

_LOG_ADJUST = math.log(1e-6)  # scikit-image's: optical density 1 at an intensity of 1e-6
_LUMA = np.array([0.299, 0.587, 0.114])
# RGB -> YIQ (FCC NTSC): Y the luma, (I, Q) the chroma plane hue turns.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def tone_table(brightness: float, contrast: float, gamma: float) -> np.ndarray:
    """The ``(256,)`` uint8 table of ``x -> 255 * clip((x/255 * b - 1/2) * c + 1/2) ** g``."""
    v = np.arange(256, dtype=np.float64) / 255.0
    v = np.clip((v * brightness - 0.5) * contrast + 0.5, 0.0, 1.0) ** gamma
    return np.rint(v * 255.0).astype(np.uint8)


def mix_matrix(saturation: float, hue_turns: float) -> np.ndarray:
    """The ``(3, 3)`` float32 matrix ``M`` with ``rgb' = M @ rgb``: saturation times
    ``saturation`` (a blend with the luma), then the hue turned by ``hue_turns`` of a turn."""
    sat = saturation * np.eye(3) + (1.0 - saturation) * np.outer(np.ones(3), _LUMA)
    t = 2.0 * math.pi * hue_turns
    turn = np.array([[1.0, 0.0, 0.0], [0.0, math.cos(t), -math.sin(t)],
                     [0.0, math.sin(t), math.cos(t)]])  # fmt: skip
    hue = np.linalg.inv(_YIQ) @ turn @ _YIQ
    return (hue @ sat).astype(np.float32)


def hed_tables(scale: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(T, K)`` for stain jitter ``S' = scale * S + shift`` (each ``(3,)``, in H, E, D order):
    ``T[c, k, v] = exp(A[k, c] * L(v))`` ``(3, 3, 256)`` float64 and ``K[c] = exp(B[c])``, so
    that ``rgb_c = K[c] * T[c, 0, r] * T[c, 1, g] * T[c, 2, b]`` (see the module docstring)."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    density = np.log(np.maximum(np.arange(256) / 255.0, 1e-6)) / _LOG_ADJUST  # (256,) L(v)
    a = _LOG_ADJUST * (hed_from_rgb @ np.diag(scale) @ rgb_from_hed)  # (3 in, 3 out)
    b = _LOG_ADJUST * (shift @ rgb_from_hed)  # (3 out,)
    tables = np.exp(a.T[:, :, None] * density[None, None, :])  # (c, k, v)
    return tables, np.exp(b)


@dataclass(frozen=True, eq=False)
class ColourParams:
    """One image's colour stages (None: the stage is off)."""

    hed: tuple[np.ndarray, np.ndarray] | None = None  # (T (3, 3, 256), K (3,))
    tone: np.ndarray | None = None  # (256,) uint8
    mix: np.ndarray | None = None  # (3, 3) float32

    @property
    def active(self) -> bool:
        return self.hed is not None or self.tone is not None or self.mix is not None


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Float values on the 0..255 scale, rounded half to even and clipped, as uint8."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def apply_colour(crop: np.ndarray, params: ColourParams) -> np.ndarray:
    """The colour stages on a ``(C, h, w)`` uint8 crop (C = 3 for HED and the colour matrix),
    as a new uint8 array."""
    out = crop
    if params.hed is not None:
        tables, k = params.hed
        channels = []
        for c in range(3):  # fixed order: ((K * T0[r]) * T1[g]) * T2[b]
            v = k[c] * tables[c, 0][out[0]]
            v *= tables[c, 1][out[1]]
            v *= tables[c, 2][out[2]]
            v *= 255.0
            channels.append(_to_uint8(v))
        out = np.stack(channels)
    if params.tone is not None:
        out = params.tone[out]
    if params.mix is not None:
        m = params.mix
        x = out.astype(np.float32)
        channels = []
        for c in range(3):  # fixed order: (m0 r + m1 g) + m2 b
            v = m[c, 0] * x[0]
            v += m[c, 1] * x[1]
            v += m[c, 2] * x[2]
            channels.append(_to_uint8(v))
        out = np.stack(channels)
    return out if out is not crop else crop.copy()
