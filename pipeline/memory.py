"""Process memory housekeeping for the large in-memory steps."""

from __future__ import annotations

import ctypes

__all__ = ["trim_heap"]


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc ``malloc_trim``).

    Freed memory stays in the process's malloc arenas and counts in its RSS; a later
    step's allocations then raise the peak on top of it. Two places in a full compute
    need this: after the statistics' worker threads (their arenas of their own, whose
    free space the main thread does not reuse: about 0.8 GB at 10M administrations) and
    after the flag refresh (the flags' text).
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
