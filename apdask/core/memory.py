"""Keep freed full-frame arrays in the process heap (glibc ``mallopt``).

A 4k × 4k CCD makes dozens of 64–70 MB temporaries (images, masks, Fourier
transforms).  glibc serves every allocation above its mmap threshold (at most
32 MB by default) with a fresh ``mmap`` and unmaps it on free, so the kernel
zeroes and faults in every page of every new array: on the 2-core benchmark
machine that was 0.3–0.7 s of system time per CCD, a third of the subtraction.
Raising the threshold and the trim threshold keeps freed frames in the heap, to
be reused by the next CCD without page faults.  The price: a worker process keeps
its peak heap (about 1.6 GB per CCD in flight) instead of returning it between
CCDs.  Controlled by ``apdask.compute.keep_freed_memory`` (default true).

One heap (``M_ARENA_MAX = 1``): glibc gives each thread that allocates its own
arena, and with freed memory kept, every scheduler thread kept its own copy of a
CCD's frames: a long-running process grew to 3.0–3.2 GB per CCD in flight
(``benchmarks/bench_ccd.py``, docs/performance.md).  One arena held it at 2.1 GB
with the same CPU time (the full frames are allocated by one thread at a time).
"""

from __future__ import annotations

import ctypes
import ctypes.util

from apdask import config

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_done = None


def keep_freed_memory(threshold: int = 1 << 30, *, enabled: bool | None = None) -> bool:
    """Serve allocations up to ``threshold`` bytes from the heap and keep freed memory.

    Idempotent and cheap after the first call; does nothing (returns False) when
    disabled (``enabled=False``, or ``apdask.compute.keep_freed_memory`` when
    ``enabled`` is None) or where the C library has no ``mallopt`` (not glibc).

    Returns
    -------
    bool
        Whether the allocator settings are in effect in this process.
    """
    global _done
    if _done is not None:
        return _done
    if not config.get("compute.keep_freed_memory", enabled):
        _done = False
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        _done = False
        return _done
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
                 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
                 and mallopt(_M_ARENA_MAX, 1) == 1)  # fmt: skip
    return _done
