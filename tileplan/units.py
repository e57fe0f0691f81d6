"""Units: parsing and formatting of byte sizes and image shapes."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = [
    "GIB", "MIB", "broadcast_shape", "format_bytes", "format_shape", "parse_bytes", "parse_shape",
    "parse_spacing",
]  # fmt: skip

MIB = 1024**2
GIB = 1024**3  # bytes per GiB

_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
    "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1024, "mib": MIB, "gib": GIB,
    "tib": 1024**4,
}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``'10GiB'``, ``'16GB'``, ``'512MiB'``, ``'1e9'`` -> bytes.

    Raises:
        ValueError: not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"'{text}' is not a memory size; write e.g. 10GiB, 16GB or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float | None) -> str:
    """Bytes as GiB (or MiB below 1 GiB) with one decimal."""
    if n is None:
        return "-"
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"


def parse_shape(text: str | int, n_axes: int | None = None) -> tuple[int, ...]:
    """``'8192'`` -> (8192,) or, with ``n_axes``, (8192,) * n_axes; ``'6000x9000'`` -> (6000,
    9000) (H x W); ``'64x256x256'`` -> (64, 256, 256) (D x H x W, a volume). A single size
    stands for every axis of the model (``broadcast_shape``).

    Raises:
        ValueError: not a positive shape, or not ``n_axes`` sizes (nor one) when that is given.
    """
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"'{text}' is not a size; write 8192, 6000x9000 (H x W) or 64x512x512 (D x H x W)"
        ) from None
    if min(values) < 1 or len(values) > 3:
        raise ValueError(f"'{text}' is not a size of 1 to 3 positive integers")
    return values if n_axes is None else broadcast_shape(values, n_axes, str(text))


def broadcast_shape(shape: Sequence[int], n_axes: int, shown: str | None = None) -> tuple[int, ...]:
    """``shape`` with one size per spatial axis: a single size repeated ``n_axes`` times.

    Raises:
        ValueError: ``shape`` has another number of axes (a 2-D size for a volume model).
    """
    values = tuple(int(v) for v in shape)
    if len(values) == 1:
        return values * n_axes
    if len(values) != n_axes:
        what = {2: "H x W (an image)", 3: "D x H x W (a volume)"}.get(n_axes, f"{n_axes} sizes")
        raise ValueError(
            f"'{shown or format_shape(values)}' has {len(values)} axes but the model takes "
            f"{n_axes} spatial axes: give {what}, or one size for all"
        )
    return values


def parse_spacing(text: str) -> tuple[float, float, float]:
    """``'2'`` -> (2, 2, 2); ``'3x1x1'`` -> (3, 1, 1): mm per voxel, D x H x W.

    Raises:
        ValueError: not one or three positive finite numbers.
    """
    try:
        values = tuple(float(v) for v in str(text).lower().replace("×", "x").split("x"))
    except ValueError:
        values = ()
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3 or not all(v > 0 and math.isfinite(v) for v in values):
        raise ValueError(f"'{text}' is not a voxel spacing; write 2 or 3x1x1 (mm, D x H x W)")
    return values  # type: ignore[return-value]


def format_shape(shape: Sequence[int]) -> str:
    """``(6000, 9000)`` -> ``'6000x9000'`` (H x W, px or positions)."""
    return "x".join(str(v) for v in shape)
