"""Threads of the fused passes: numba's parallel loops and BLAS inside one task."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

import dask.config
import numba
import threadpoolctl

__all__ = ["in_thread", "inner_threads", "one_blas_thread"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def allocated_cpus() -> int:
    """CPUs this process may use: its allocation, never the machine's core count.

    The smaller of the affinity mask (``os.sched_getaffinity``: cgroups, ``taskset``,
    SLURM's task/affinity plugin) and SLURM's ``SLURM_CPUS_PER_TASK`` (else
    ``SLURM_CPUS_ON_NODE``) inside a SLURM job, whose affinity may be the whole
    node when SLURM confines no tasks.  1 where the platform has no affinity mask.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity mask on this platform (macOS)
        n = 1
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        try:
            slurm = int(os.environ[var])
        except (KeyError, ValueError):
            continue
        if slurm >= 1:
            n = min(n, slurm)
            break
    return max(1, n)


def _worker_share(cpus: int) -> int | None:
    """Threads per task on the Dask worker running this code, or None outside one.

    A worker runs ``nthreads`` tasks at once, so each task gets its share of the
    CPUs (``APDASK_JOB_PROCESSES`` worker processes of a dask-jobqueue job share
    the job's CPUs; :func:`apdask.services.batch.jobqueue_cluster` sets it).
    """
    try:
        # lazy: distributed costs ~0.6 s of import, and only a Dask worker has one
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    nthreads = max(
        1, int(getattr(worker.state, "nthreads", 0) or getattr(worker, "nthreads", 1) or 1)
    )
    try:
        procs = max(1, int(os.environ.get("APDASK_JOB_PROCESSES", "1")))
    except ValueError:
        procs = 1
    return max(1, cpus // (nthreads * procs))


#: Per thread: a count that :func:`inner_threads` gives instead (set in the threads
#: :func:`in_thread` starts).
_local = threading.local()


def inner_threads() -> int:
    """Threads for the parallel loops and FFTs inside one task.

    Configuration ``apdask.compute.inner_threads`` when set.  Else the allocation
    (:func:`allocated_cpus`), on a Dask worker divided by the worker's ``nthreads``
    (the tasks it runs at once), and capped by ``OMP_NUM_THREADS`` when set (dask's
    nanny sets it to 1 in worker processes, so that several worker processes on one
    allocation do not oversubscribe it).  Never
    ``os.cpu_count()``: inside a one-CPU SLURM job on a 64-core node that would
    start 64 threads.
    """
    mine = getattr(_local, "threads", None)
    if mine is not None:
        return int(mine)
    configured = dask.config.get("apdask.compute.inner_threads", None)
    if configured is not None:
        return max(1, int(configured))
    cpus = allocated_cpus()
    share = _worker_share(cpus)
    n = cpus if share is None else share
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


def in_thread(fn: Callable[..., _R], *args: Any) -> Callable[[], _R]:
    """``fn(*args)`` started in a thread of its own when this task has two threads or
    more (:func:`inner_threads`), else called when its result is asked for.

    Returns the call that gives the result (waiting for it, and raising what ``fn``
    raised).  For work that a task can do beside its own and that releases the GIL
    (FFTs, NumPy on large arrays, ``nogil`` numba kernels), while the task's own
    thread runs no parallel pass: in that thread :func:`inner_threads` is 1, so its
    numba passes and FFTs take one core (two parallel passes at once on two cores
    would leave each waiting at its barrier for a thread the other holds).
    """
    if inner_threads() < 2:
        return functools.partial(fn, *args)

    def beside() -> _R:
        _local.threads = 1
        try:
            return fn(*args)
        finally:
            _local.threads = None

    pool = ThreadPoolExecutor(1, thread_name_prefix="apdask-task")
    future = pool.submit(beside)
    pool.shutdown(wait=False)
    return future.result
