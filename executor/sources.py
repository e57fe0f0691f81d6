"""Image sources: what the engine streams from when the image is not a tensor in memory.

Note: [Sources]
    A pass needs, per tile, only the crop ``image[..., tile.input_slices()]``. An
    ``ImageSource`` is anything that can produce that crop on demand: its ``shape`` is the
    ``(N, C, *spatial)`` of the image it stands for, and ``read(region)`` returns that region as
    a new host tensor. A whole-slide image read region by region from disk is one (see
    ``tileplan.run.slides``); ``TensorSource`` wraps an in-memory tensor. The engine reads the
    same regions in both passes, so streaming a source is bit-identical to streaming the tensor
    of its pixels, provided ``read`` returns the same pixels for a pixel whichever region it is
    read in (a decoder that decodes whole compressed tiles does; a resampler must compute each
    output pixel from global coordinates only).

Note: [Read-ahead]
    ``CropReader`` reads the crops of a pass in its tile order on one background thread,
    ``ahead`` crops ahead of the tile being computed, so decoding overlaps compute. Host memory
    holds at most ``ahead + 1`` crops besides the output map. Decoders that release the GIL
    (libjpeg through OpenSlide's ctypes calls, imagecodecs) run truly in parallel with the
    compute threads.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, runtime_checkable

import torch

from executor.errors import GeometryError
from executor.geometry import Tile

__all__ = ["CropReader", "ImageSource", "TensorSource", "image_version"]


@runtime_checkable
class ImageSource(Protocol):
    """An image the engine can stream from by regions (see [Sources]).

    Attributes:
        shape: ``(N, C, *spatial)`` of the image, in px.
        dtype: dtype of the tensors ``read`` returns.
    """

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def read(self, region: Sequence[slice]) -> torch.Tensor:
        """The pixels of ``region`` (one ``slice(start, stop)`` per spatial axis, in range) as a
        new ``(N, C, *region)`` host tensor of ``dtype``."""
        ...


class TensorSource:
    """An in-memory tensor seen as an ``ImageSource`` (reads are copies of its regions)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    def read(self, region: Sequence[slice]) -> torch.Tensor:
        return self.tensor[(..., *region)].clone()


def image_version(image: torch.Tensor | ImageSource) -> int:
    """A tensor's in-place version counter; a source is read-only (0), unless it says
    otherwise with a ``version`` attribute."""
    if isinstance(image, torch.Tensor):
        return image._version
    return int(getattr(image, "version", 0))


class CropReader:
    """The host crops of a pass over ``tiles``, in order, read ``ahead`` tiles in advance on
    one background thread for a source (see [Read-ahead]); a tensor's crops are views.

    Use as a context manager; leaving it cancels reads not yet started and waits for the
    running one, so no thread outlives the pass (an exception in the pass included).

    Raises (from ``next``): whatever ``source.read`` raised, or ``GeometryError`` when a read
    returns a crop of the wrong shape.
    """

    def __init__(
        self, image: torch.Tensor | ImageSource, tiles: Iterable[Tile], *, ahead: int = 2
    ) -> None:
        self.image = image
        self._tiles: Iterator[Tile] = iter(tiles)
        self._ahead = max(1, ahead)
        self._pending: deque[tuple[Tile, concurrent.futures.Future[torch.Tensor]]] = deque()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        if not isinstance(image, torch.Tensor):
            self._pool = concurrent.futures.ThreadPoolExecutor(1, "tileplan-read")

    def __enter__(self) -> CropReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __iter__(self) -> Iterator[tuple[Tile, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[Tile, torch.Tensor]:
        if isinstance(self.image, torch.Tensor):
            tile = next(self._tiles)
            return tile, self.image[(..., *tile.input_slices())]
        self._fill()
        if not self._pending:
            raise StopIteration
        tile, future = self._pending.popleft()
        self._fill()  # the next read starts before this crop is computed on
        crop = future.result()
        _check_crop(crop, self.image, tile)
        return tile, crop

    def _fill(self) -> None:
        assert self._pool is not None
        source = self.image
        assert not isinstance(source, torch.Tensor)
        while len(self._pending) < self._ahead:
            tile = next(self._tiles, None)
            if tile is None:
                return
            region = tuple(tile.input_slices())
            self._pending.append((tile, self._pool.submit(source.read, region)))


def _check_crop(crop: torch.Tensor, source: ImageSource, tile: Tile) -> None:
    expected = (*source.shape[:2], *(s.stop - s.start for s in tile.input_slices()))
    if tuple(crop.shape) != expected or crop.dtype != source.dtype:
        raise GeometryError(
            f"{type(source).__name__}.read returned {tuple(crop.shape)} {crop.dtype} for a "
            f"region that needs {expected} {source.dtype}; fix the source's read()"
        )
