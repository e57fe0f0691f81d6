"""Stopping a run cleanly on SIGTERM (how SLURM and Kubernetes preempt a job) and SIGINT.

The first signal only sets a flag: the training loop sees it between images, writes a
checkpoint at the last optimizer-step boundary and stops with ``EXIT_INTERRUPTED``. A second
signal restores the default action and re-raises it, so the process ends at once (checkpoint
writes are atomic: the previous one stays whole).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from executor import StreamingError

__all__ = ["EXIT_INTERRUPTED", "RunInterruptedError", "StopRequest", "stop_on_signals"]

# sysexits' EX_TEMPFAIL: "try again later", what a requeued job does with --resume.
EXIT_INTERRUPTED = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterruptedError(StreamingError):
    """SIGTERM or SIGINT stopped the run at a step boundary after writing its checkpoint; the
    CLI prints the message and exits with ``EXIT_INTERRUPTED``."""


class StopRequest:
    """Set by the first SIGTERM/SIGINT; ``signal`` names it (``SIGTERM``) or is None."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None:  # the second one: go now, the default way
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signal.Signals(signum).name


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Catch SIGTERM and SIGINT into a ``StopRequest`` while the block runs, then restore the
    previous handlers. Off the main thread (where Python cannot take signals) the request is
    never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request._handle) for s in _SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
