"""An ``executor.ImageSource`` read from a file: the shared life cycle of slide and volume
sources. The file is opened on the first read (or by ``open``, e.g. on a read-ahead thread)
and kept open, one read at a time, until ``close``; a source pickles without its handle, so
it can be sent to worker processes."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch

from tileplan.run.pixels import ImageReadError

__all__ = ["FileSource", "Reader"]


class Reader(Protocol):
    """An open file's reader: whatever ``FileSource._open_reader`` returns."""

    def close(self) -> None: ...


class FileSource:
    """Base of sources read from a file. Subclasses set ``shape``, implement ``read`` (calling
    ``self._reading()`` under ``self._lock``), ``_open_reader`` and ``_state`` (the keyword
    arguments that make the same source again)."""

    def __init__(self) -> None:
        self._reader: Any = None
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def path(self) -> Path:
        raise NotImplementedError

    def read(self, region: Any) -> torch.Tensor:
        raise NotImplementedError

    def _open_reader(self) -> Reader:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _reading(self) -> Any:
        """The open reader (opened now if need be); call with ``self._lock`` held."""
        if self._reader is None:
            with self._decoding("opening it"):
                self._reader = self._open_reader()
        return self._reader

    @contextlib.contextmanager
    def _decoding(self, what: str) -> Iterator[None]:
        """Turn whatever a decoder or the file system raises while doing ``what`` (e.g.
        ``level 0, region y 0:512 x 512:1024 px``) into a one-line ``ImageReadError``."""
        try:
            yield
        except ImageReadError:
            raise
        except Exception as err:  # decoders raise their own kinds (Jpeg8Error, zlib.error, ...)
            reason = " ".join(str(err).split()) or "no reason given"
            raise ImageReadError(f"'{self.path}' failed to read at {what}: "
                                 f"{type(err).__name__}: {reason}") from err  # fmt: skip

    def open(self) -> FileSource:
        """Open the file now (decoding it for a whole-image format), e.g. on a thread ahead of
        its turn; reads open it otherwise."""
        with self._lock:
            self._reading()
        return self

    def read_all(self) -> torch.Tensor:
        """The whole region as one ``(1, C, *spatial)`` tensor (tests and small regions)."""
        return self.read(tuple(slice(0, n) for n in self.shape[2:]))

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable for worker processes: no handle
        return self._state()

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]
