"""The smallest image a streamed trunk takes, and the refusal of an image below it."""

from __future__ import annotations

from collections.abc import Sequence

from executor import GeometryError, StreamingCNN
from tileplan.run.advice import Fix, UnusableImageError
from tileplan.units import format_shape

__all__ = ["refusal", "smallest_image", "too_small"]

_SCAN_LIMIT = 1 << 15  # px per axis searched for the smallest size (far above any trunk's)


def _takes(scnn: StreamingCNN, shape: Sequence[int]) -> bool:
    try:
        scnn.tile_grids(tuple(shape))
    except GeometryError:
        return False
    return True


def smallest_image(scnn: StreamingCNN, like: Sequence[int]) -> tuple[int, ...]:
    """Per axis, the smallest length the trunk streams with the other axes long (at least
    1024, or ``like``'s): the first length that gives a non-empty output and merges maps of
    equal lengths, searched upwards from 1 px."""
    large = tuple(max(n, 1024) for n in like)  # other axes long enough not to be the reason
    found = []
    for ax in range(len(like)):
        shape = list(large)
        n = 1
        while n <= _SCAN_LIMIT:
            shape[ax] = n
            if _takes(scnn, shape):
                break
            n += 1
        found.append(n)
    return tuple(found)


def too_small(scnn: StreamingCNN, size: Sequence[int], *, volumes: bool, reading: str,
              resampled: bool = True) -> UnusableImageError | None:  # fmt: skip
    """The refusal of an image of ``size`` the trunk cannot stream (``refusal``), or None when
    it can."""
    if _takes(scnn, size):
        return None
    return refusal(scnn, size, volumes=volumes, reading=reading, resampled=resampled)


def refusal(scnn: StreamingCNN, size: Sequence[int], *, volumes: bool, reading: str,
            resampled: bool = True) -> UnusableImageError:  # fmt: skip
    """Why an image of ``size`` (px or voxels as read, at ``reading``, e.g. ``2 µm/px``) that
    the trunk cannot stream is refused: its size and the smallest the model takes.
    ``resampled``: volumes are resampled to a spacing (a finer one gives more voxels);
    otherwise they are read as stored and no spacing makes them larger."""
    need = smallest_image(scnn, size)
    unit = "voxels" if volumes else "px"
    fact = (f"is {format_shape(size)} {unit} as read ({reading}), and the model needs at least "
            f"{format_shape(need)} {unit}")  # fmt: skip
    if volumes:
        fixes = [Fix("resample it to a finer --spacing", ("--spacing",))] if resampled else []
        return UnusableImageError(fact, *fixes)
    return UnusableImageError(fact, Fix("read it at a finer --mpp", ("--mpp",)),
                              Fix("a lower --level", ("--level",)))  # fmt: skip
