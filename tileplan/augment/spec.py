"""The ``--augment`` spec: which augmentations, how strong, parsed and checked in one place.

A spec is a comma-separated list of names with optional strengths, ``flip,rot90,hed:0.05``,
or ``default`` (the recommended set, ``DEFAULT_SPEC``; ``default,noise,hed:0.1`` adds to it
    and overrides its strengths), or
``none``. Each name's strength has
a default and an allowed range (``OPS``); an unknown name or a strength out of range is one
``AugmentError`` line naming the token and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["DEFAULT_SPEC", "OPS", "AugmentError", "Op", "parse_spec"]

Kind = Literal["remap", "pointwise", "interpolated"]


class AugmentError(ValueError):
    """An augmentation spec, or an image, that cannot be augmented as asked (one line)."""


@dataclass(frozen=True)
class Op:
    """One augmentation a spec may name.

    Attributes:
        name: the spec's name for it.
        kind: ``remap`` (pixels move, none change), ``pointwise`` (each pixel from itself and
            per-image parameters, or its global coordinate) or ``interpolated`` (pixels
            resampled from a continuous map).
        default: the strength without ``:S``; None for an op that takes none.
        low, high: the allowed strengths (``low < S <= high``).
        what: what the strength means (help and errors).
    """

    name: str
    kind: Kind
    default: float | None
    low: float = 0.0
    high: float = 0.0
    what: str = ""


# In the order they are applied to an output pixel: geometry first (where the pixel comes
# from), then colour (HED, per-channel, saturation/hue), then noise and cutout.
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            "scale",
            "remap",
            0.1,
            0.0,
            0.5,
            "the read resolution (mpp) times a factor in [1-S, 1+S]",
        ),  # fmt: skip
        Op("crop", "remap", 0.9, 0.0, 1.0, "a crop of S times each side at a random offset"),
        Op("flip", "remap", None, what="horizontal and vertical flips, each with p = 1/2"),
        Op("rot90", "remap", None, what="rotation by 0, 90, 180 or 270 degrees"),
        Op("transpose", "remap", None, what="transposition with p = 1/2"),
        Op("dihedral", "remap", None, what="one of the 8 symmetries of the square"),
        Op("rotate", "interpolated", 180.0, 0.0, 180.0, "rotation by an angle in [-S, S] degrees"),
        Op(
            "elastic",
            "interpolated",
            8.0,
            0.0,
            32.0,
            "displacements of S px (std) on a 64 px grid, bilinear between",
        ),  # fmt: skip
        Op(
            "hed",
            "pointwise",
            0.05,
            0.0,
            0.5,
            "stain jitter: H, E, D scaled by [1-S, 1+S] and shifted by [-S, S]",
        ),  # fmt: skip
        Op("brightness", "pointwise", 0.1, 0.0, 1.0, "intensity times a factor in [1-S, 1+S]"),
        Op("contrast", "pointwise", 0.1, 0.0, 1.0, "contrast about mid-grey times [1-S, 1+S]"),
        Op("gamma", "pointwise", 0.1, 0.0, 0.9, "intensity to a power in [1-S, 1+S]"),
        Op("saturation", "pointwise", 0.1, 0.0, 1.0, "saturation times a factor in [1-S, 1+S]"),
        Op("hue", "pointwise", 0.02, 0.0, 0.5, "hue turned by [-S, S] of a full turn"),
        Op(
            "intensity",
            "pointwise",
            0.1,
            0.0,
            1.0,
            "values times [1-S, 1+S] plus [-S, S] (of 255 for 8-bit images)",
        ),
        Op(
            "noise",
            "pointwise",
            0.02,
            0.0,
            0.5,
            "Gaussian noise of std S (of the full range) per pixel",
        ),  # fmt: skip
        Op("cutout", "pointwise", 0.1, 0.0, 0.5, "one box of S times each side, filled"),
    )
}

DEFAULT_SPEC = "dihedral,brightness:0.1,contrast:0.1,saturation:0.1,hue:0.02,hed:0.05"


def _allowed() -> str:
    return ", ".join(OPS)


def parse_spec(text: str) -> dict[str, float | None]:
    """``{name: strength}`` in application order for ``text`` (``default``/``none``/empty
    included); strengths default as ``OPS`` says.

    Raises:
        AugmentError: an unknown name, a repeated one, a strength that is not a number, is given
            to an op that takes none, or is out of its range.
    """
    text = text.strip()
    if text.lower() in ("", "none"):
        return {}
    asked: dict[str, float | None] = {}
    tokens = [t.strip() for t in text.split(",")]
    if "default" in (t.lower() for t in tokens):  # the recommended set, and more named with it
        tokens = [t for t in tokens if t.lower() != "default"]
        named = {t.partition(":")[0].strip().lower() for t in tokens}
        tokens += [t for t in DEFAULT_SPEC.split(",") if t.partition(":")[0] not in named]
    for token in tokens:
        name, _, value = token.partition(":")
        name = name.strip().lower()
        op = OPS.get(name)
        if op is None:
            raise AugmentError(f"unknown augmentation {token!r}; use a comma-separated "
                               f"list of {_allowed()} (or 'default')")  # fmt: skip
        if name in asked:
            raise AugmentError(f"{name!r} is named twice; name each augmentation once")
        if op.default is None:
            if value:
                raise AugmentError(f"{token!r}: {name} takes no strength ({op.what})")
            asked[name] = None
            continue
        try:
            strength = float(value) if value else op.default
        except ValueError:
            raise AugmentError(f"{token!r}: the strength {value!r} is not a number; "
                               f"{name} takes {op.low:g} < S <= {op.high:g}") from None  # fmt: skip
        if not op.low < strength <= op.high:
            raise AugmentError(f"{token!r}: {name} takes a strength "
                               f"{op.low:g} < S <= {op.high:g} ({op.what})")  # fmt: skip
        asked[name] = strength
    return {name: asked[name] for name in OPS if name in asked}


def canonical(text: str) -> str:
    """The spec as one canonical string (application order, every strength written), or ``""``
    for none: what a run records and a resumed run compares."""
    parsed = parse_spec(text)
    return ",".join(n if s is None else f"{n}:{s:g}" for n, s in parsed.items())
