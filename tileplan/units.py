"""Units: parsing and formatting of byte sizes and image shapes."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["GIB", "MIB", "format_bytes", "format_shape", "parse_bytes", "parse_shape"]

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


def parse_shape(text: str | int, n_axes: int = 2) -> tuple[int, ...]:
    """``'8192'`` -> (8192, 8192); ``'6000x9000'`` -> (6000, 9000) (H x W).

    Raises:
        ValueError: not a positive shape.
    """
    parts = str(text).lower().replace("×", "x").split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"'{text}' is not a size; write 8192 or 6000x9000 (H x W)") from None
    if len(values) == 1:
        values = values * n_axes
    if len(values) != n_axes or min(values) < 1:
        raise ValueError(f"'{text}' is not a {n_axes}-axis size of positive integers")
    return values


def format_shape(shape: Sequence[int]) -> str:
    """``(6000, 9000)`` -> ``'6000x9000'`` (H x W, px or positions)."""
    return "x".join(str(v) for v in shape)
