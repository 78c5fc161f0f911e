"""A warm, adaptive dask-jobqueue pool that serves many visits (``apdask listen --cluster``).

One visit per cluster (``apdask submit --via jobqueue``) pays for job submission,
queueing and worker start-up on every visit, and asks for ``ceil(CCDs / cores)`` jobs
each time.  :func:`jobqueue_pool` instead starts one cluster for the night on the
operator's ``jobqueue.yaml`` and keeps it adaptive between ``apdask.submit.minimum_jobs``
(kept warm while idle) and ``apdask.submit.maximum_jobs``: a nextVisit's graph goes to
workers that are already running (each imported the pipeline when it joined), so its
prefetch starts at once, and a job beyond the
minimum is released only after ``apdask.submit.idle_release_s`` without work, so the
pool does not shrink and regrow between visits.  Re-exported by
:mod:`apdask.services.batch`.

Failures end as on the per-visit route: a refused first submission raises
:class:`~apdask.exceptions.JobSubmissionError` with sbatch's message; no worker within
``apdask.submit.worker_timeout_s`` raises :class:`~apdask.exceptions.ClusterTimeoutError`;
a later refusal (the pool growing) is logged in one line, never as a traceback; a lost
worker's tasks rerun on the others (``tests/faults/test_lost_workers.py``).  The jobs are
cancelled however the pool ends.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from apdask import config
from apdask.exceptions import ConfigurationError
from apdask.pipeline.warm import warm_plugin
from apdask.services._batch_jobqueue import (
    _close,
    _quiet_distributed,
    _StartErrors,
    _wait_for_workers,
    jobqueue_cluster,
)
from apdask.services._batch_settings import SCHEDULERS, _need, _positive, log

__all__ = ["PoolSize", "jobqueue_pool"]


@dataclass(frozen=True)
class PoolSize:
    """The warm pool's bounds, from ``apdask.submit.*`` or explicit values, checked."""

    minimum_jobs: int  #: jobs kept running while idle (the warm part)
    maximum_jobs: int  #: at most this many jobs while visits queue work
    idle_release_s: float  #: a job beyond the minimum goes after this long without work
    worker_timeout_s: float  #: seconds for the first worker to start

    @classmethod
    def resolve(cls, minimum_jobs: int | None = None, maximum_jobs: int | None = None,
                idle_release_s: float | None = None,
                worker_timeout_s: float | None = None) -> PoolSize:  # fmt: skip
        """Read ``apdask.submit.{minimum,maximum}_jobs``, ``idle_release_s`` and
        ``worker_timeout_s``; explicit values (not None) win.

        Raises
        ------
        ConfigurationError
            A bound that is not a whole number >= 1, a minimum over the maximum, or a
            non-positive time; the message names the key.
        """
        lo = _jobs("minimum_jobs", minimum_jobs)
        hi = _jobs("maximum_jobs", maximum_jobs)
        if lo > hi:
            msg = (f"apdask.submit.minimum_jobs ({lo}) exceeds apdask.submit.maximum_jobs "
                   f"({hi}); e.g. --set submit.maximum_jobs={lo}")  # fmt: skip
            raise ConfigurationError(msg)
        return cls(lo, hi, _positive("idle_release_s", idle_release_s),
                   _positive("worker_timeout_s", worker_timeout_s))  # fmt: skip


def _jobs(key: str, value: Any) -> int:
    value = config.get(f"submit.{key}", value)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and float(value).is_integer() and value >= 1):
        msg = (f"apdask.submit.{key} must be a whole number of jobs >= 1 for the warm pool, "
               f"got {value!r}; e.g. --set submit.{key}=2")  # fmt: skip
        raise ConfigurationError(msg)
    return int(value)


@contextlib.contextmanager
def jobqueue_pool(scheduler: str = "slurm", *, job_dir: str, size: PoolSize | None = None,
                  partition: str | None = None, memory: str | None = None,
                  walltime: str | None = None, scheduler_host: str | None = None,
                  job_name: str | None = None) -> Iterator[Any]:  # fmt: skip
    """A long-lived adaptive dask-jobqueue cluster and a ``distributed.Client`` to it.

    Parameters
    ----------
    scheduler : {"slurm", "htcondor"}
    job_dir : str
        Log directory of the worker jobs, unless ``jobqueue.<scheduler>.log-directory``.
    size : PoolSize, optional
        Default :meth:`PoolSize.resolve` (``apdask.submit.*``).
    partition, memory, walltime, scheduler_host
        As for :func:`apdask.services.batch.jobqueue_cluster`: explicit values over the
        operator's ``jobqueue.yaml``, which wins over ``apdask.submit.*``.
    job_name : str, optional
        The jobs' name; default ``apdask-pool-<pid>`` (the jobs are cancelled by it too).

    Yields
    ------
    distributed.Client
        Once the first worker joined; ``client.cluster`` is the dask-jobqueue cluster,
        with ``apdask_settings`` and ``apdask_pool`` (the :class:`PoolSize`).

    Raises
    ------
    ConfigurationError
        dask-jobqueue missing, the submit command not on PATH, a bad setting.
    JobSubmissionError
        The scheduler refused the first jobs (exit 71); its message is included.
    ClusterTimeoutError
        No worker started within ``worker_timeout_s`` (exit 75); the jobs are cancelled.
    """
    from distributed import Client

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use slurm or htcondor")
    size = size or PoolSize.resolve()
    job_name = job_name or f"apdask-pool-{os.getpid()}"
    os.makedirs(job_dir, exist_ok=True)
    _quiet_distributed()
    errors = _StartErrors()
    with errors.installed(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = jobqueue_cluster(scheduler, job_dir=job_dir, partition=partition,
                                   memory=memory, walltime=walltime,
                                   scheduler_host=scheduler_host, job_name=job_name)  # fmt: skip
        try:
            _need("sbatch" if scheduler == "slurm" else "condor_submit",
                  "SLURM" if scheduler == "slurm" else "HTCondor", job_dir)  # fmt: skip
            cluster.apdask_pool = size
            interval = 1.0  # Adaptive's default: a recommendation per second
            cluster.adapt(minimum_jobs=size.minimum_jobs, maximum_jobs=size.maximum_jobs,
                          interval=f"{interval}s",
                          wait_count=max(1, math.ceil(size.idle_release_s / interval)))  # fmt: skip
            with Client(cluster) as client:
                # each worker imports the pipeline and loads the numba kernels on joining
                client.register_plugin(warm_plugin())
                t0 = time.monotonic()
                _wait_for_workers(cluster, client, errors, 1, size.worker_timeout_s, scheduler)
                errors.on_error = _log_refusal(scheduler)
                with contextlib.suppress(Exception):  # no dashboard where it is switched off
                    log.info("Dask dashboard of the warm pool: %s", cluster.dashboard_link)
                log.info("warm pool %s: first worker after %.1f s; %d..%d jobs (%s), idle "
                         "jobs beyond the minimum released after %g s", job_name,
                         time.monotonic() - t0, size.minimum_jobs, size.maximum_jobs,
                         scheduler, size.idle_release_s)  # fmt: skip
                yield client
        finally:
            _close(cluster, scheduler, job_name)


def _log_refusal(scheduler):
    cmd = "sbatch" if scheduler == "slurm" else "condor_submit"

    def say(message):
        log.error("%s refused a job of the warm pool (it keeps its running workers): %s", cmd,
                  message)  # fmt: skip

    return say
