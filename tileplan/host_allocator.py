"""One CPU allocator setting for the planner's measurements and for training, so that a run's
peak is the peak its plan was measured at.

glibc's malloc by default raises its mmap threshold each time a large buffer is freed (up to
32 MiB) and from then on serves buffers below it from its heap, where freed memory stays cached
and fragments as a streamed step cycles through tiles and segments of different sizes. Measured
on ResNet-18, 4096², a 3-segment plan (``bench/bench_resilience.py peak``): a step peaked at
2.36 GiB RSS under the default against 1.36 GiB with the threshold fixed at 1 MiB, which returns
every buffer of 1 MiB or more to the system when it is freed. Fixing it costs page faults on
fresh pages (a step 33% slower with 4 KiB pages); transparent huge pages for tensors of 2 MiB or
more (PyTorch's ``THP_MEM_ALLOC_ENABLE``, where the system allows them per process) take that
back.

The planner's measuring child and ``tileplan train`` on CPU call :func:`use_host_allocator`;
the plan records :data:`HOST_ALLOCATOR` (``provenance.host_allocator``) so that training can
say when a plan was measured under another setting. The setting is process-wide and one-way
(glibc cannot return to its dynamic threshold), so only entry points call it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

__all__ = [
    "HOST_ALLOCATOR", "HOST_ALLOCATOR_ENV", "MMAP_THRESHOLD_BYTES", "OPT_OUT_ENV", "THP_ENV",
    "host_allocator", "use_host_allocator",
]  # fmt: skip

log = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 1 << 20  # buffers at or above it are mmapped and unmapped when freed
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # read once by PyTorch, at its first CPU allocation
OPT_OUT_ENV = "TILEPLAN_HOST_ALLOCATOR"  # "default": leave the allocator as it is
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)

# The same setting as environment variables, for a process started with them (benchmarks).
HOST_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES), THP_ENV: "1"}

# What a plan records as the setting its CPU measurements ran under.
HOST_ALLOCATOR = f"glibc malloc, mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB"


@functools.cache
def use_host_allocator() -> str:
    """Fix glibc's mmap threshold for this process and ask PyTorch for huge pages; return the
    setting in force (:data:`HOST_ALLOCATOR`), or ``""`` where malloc is not glibc's.

    Idempotent. Huge pages (for tensors of 2 MiB or more) follow only if PyTorch has not
    allocated CPU memory before (it reads its switch once); a user's own
    ``THP_MEM_ALLOC_ENABLE`` is kept. With
    ``TILEPLAN_HOST_ALLOCATOR=default`` in the environment it changes nothing (faster CPU steps,
    about 1.2x in ``bench/bench_resilience.py peak``, at a peak the plan does not promise).
    """
    if os.environ.get(OPT_OUT_ENV, "").lower() == "default":
        log.info("%s=default: the CPU allocator keeps glibc's default setting", OPT_OUT_ENV)
        return ""
    os.environ.setdefault(THP_ENV, "1")
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: the CPU allocator keeps its default setting")
        return ""
    if libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        log.warning("glibc refused mallopt(M_MMAP_THRESHOLD); CPU peaks may exceed the plan's")
        return ""
    log.debug("CPU allocator: %s", HOST_ALLOCATOR)
    return HOST_ALLOCATOR


def host_allocator() -> str:
    """The setting :func:`use_host_allocator` gives on this platform and in this environment
    (``""``: none, or opted out), without applying it."""
    if os.environ.get(OPT_OUT_ENV, "").lower() == "default":
        return ""
    return HOST_ALLOCATOR if _glibc() is not None else ""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """This process's C library, if it is glibc (which has ``gnu_get_libc_version``)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
