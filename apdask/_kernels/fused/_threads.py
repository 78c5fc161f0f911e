"""Threads of the fused passes: numba's parallel loops and BLAS inside one task."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import numba
import threadpoolctl

__all__ = ["inner_threads", "one_blas_thread"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def inner_threads() -> int:
    """Threads for the parallel loops and FFTs inside one task.

    ``OMP_NUM_THREADS`` when set (dask's nanny sets it to 1 in worker processes, so
    that processes × threads do not oversubscribe the cores), else every core.
    """
    n = os.cpu_count() or 1
    try:
        return max(1, min(int(os.environ.get("OMP_NUM_THREADS", n)), n))
    except ValueError:
        return n


_blas: Any = None


def one_blas_thread(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``fn`` with BLAS limited to one thread (a cached ``threadpoolctl`` controller).

    The pipeline's BLAS calls are small matrix products, and OpenBLAS's workers,
    once woken, spin for about 0.1 s after each call: on 2 cores that took a core
    from the FFT tiles and numba loops that followed, and doubled the kernel fit's
    time at random.  Parallelism comes from :func:`inner_threads` instead.
    """

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        global _blas
        if _blas is None:
            _blas = threadpoolctl.ThreadpoolController()
        with _blas.limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return run


def _threads(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a numba-parallel wrapper with :func:`inner_threads` threads."""

    def run(*args: Any, **kwargs: Any) -> Any:
        numba.set_num_threads(min(inner_threads(), numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        return fn(*args, **kwargs)

    run.__name__, run.__doc__ = fn.__name__, fn.__doc__
    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run
