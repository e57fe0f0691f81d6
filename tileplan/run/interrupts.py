"""Stopping a run cleanly on SIGTERM (how SLURM and Kubernetes preempt a job) and SIGINT.

The first signal only sets a flag: the training loop sees it between images, writes a
checkpoint at the last optimizer-step boundary and stops with ``EXIT_INTERRUPTED``. A second
signal (more than ``DUPLICATE_WINDOW_S`` later: one preemption often arrives twice) restores
the default action and re-raises it, so the process ends at once (checkpoint writes are
atomic: the previous one stays whole).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

from executor import StreamingError

__all__ = [
    "DUPLICATE_WINDOW_S", "EXIT_INTERRUPTED", "RunInterruptedError", "StopRequest",
    "stop_on_signals",
]  # fmt: skip

# sysexits' EX_TEMPFAIL: "try again later", what a requeued job does with --resume.
EXIT_INTERRUPTED = 75
# Signals this soon after the first count as the same one (seconds).
DUPLICATE_WINDOW_S = 2.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class RunInterruptedError(StreamingError):
    """SIGTERM or SIGINT stopped the run at a step boundary after writing its checkpoint; the
    CLI prints the message and exits with ``EXIT_INTERRUPTED``."""


class StopRequest:
    """Set by the first SIGTERM/SIGINT; ``signal`` names it (``SIGTERM``) or is None."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._at = 0.0  # monotonic time of the first signal

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signal is None:
            self.signal, self._at = signal.Signals(signum).name, now
            return
        if now - self._at < DUPLICATE_WINDOW_S:
            # The same preemption delivered twice: a scheduler signals every process of a job
            # and torchrun forwards what it gets to its workers.
            return
        signal.signal(signum, signal.SIG_DFL)  # a second one: go now, the default way
        os.kill(os.getpid(), signum)


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
