"""The ``jobqueue`` route of :mod:`apdask.services.batch`: Dask worker jobs per visit.

:func:`jobqueue_cluster` makes a dask-jobqueue ``SLURMCluster`` or
``HTCondorCluster`` on the operator's ``jobqueue.yaml``; the driver scales it to the
visit, waits for the first worker and computes the visit graph on it.  A refused
submission, a job that never starts or a visit past its time ends with a clear
error, and the jobs are cancelled.  Re-exported by :mod:`apdask.services.batch`.
"""

from __future__ import annotations

import contextlib
import getpass
import logging
import math
import os
import shutil
import subprocess
import time
import warnings

from apdask import config
from apdask.exceptions import ClusterTimeoutError, ConfigurationError, JobSubmissionError
from apdask.services._batch_settings import (
    _JOBQUEUE_KEY,
    SCHEDULERS,
    _jobqueue,
    _need,
    _prologue,
    _settings_record,
    _write,
    job_settings,
    log,
)

__all__ = ["jobqueue_cluster"]


def _check_interface(scheduler, interface, scheduler_options):
    """A clear error for a ``jobqueue.<scheduler>.interface`` this host lacks.

    dask-jobqueue starts the scheduler on that interface unless ``host`` or
    ``interface`` is in ``scheduler_options``; a missing one was a raw traceback.
    """
    if not interface or "host" in scheduler_options or "interface" in scheduler_options:
        return
    import psutil

    names = sorted(psutil.net_if_addrs())
    if interface not in names:
        msg = (f"jobqueue.{scheduler}.interface is {interface!r}, which this machine (where "
               f"the Dask scheduler runs) does not have; its interfaces are {', '.join(names)}. "
               f"Set jobqueue.{scheduler}.interface to one of them, or pass --scheduler-host "
               "ADDRESS (the workers keep the interface)")  # fmt: skip
        raise ConfigurationError(msg)


def jobqueue_cluster(scheduler, *, job_dir, n_jobs=None, partition=None, memory=None,
                     walltime=None, scheduler_host=None, visit=None, cores=None,
                     processes=None, job_name=None):  # fmt: skip
    """A dask-jobqueue cluster on the operator's ``jobqueue.yaml`` (not yet scaled).

    dask-jobqueue reads ``jobqueue.<scheduler>.*`` itself (memory, walltime,
    cores, processes, python, interface, queue, account, job-extra-directives,
    job-script-prologue, scheduler-options, worker-extra-args, log-directory).
    apdask passes only what the operator left unset (its ``apdask.submit.*``
    fallbacks, logged, see :func:`job_settings`) or what was given explicitly, and
    adds to lists rather than replacing them: ``--host`` to the worker arguments
    and ``host`` to the scheduler options when ``scheduler_host`` is given, and an
    ``export APDASK_JOB_PROCESSES=<n>`` prologue line with several processes per
    job (so :func:`apdask._kernels.fused.inner_threads` shares the job's CPUs).

    Parameters
    ----------
    scheduler : {"slurm", "htcondor"}
    job_dir : str
        Log directory of the worker jobs, unless ``jobqueue.<scheduler>.log-directory``.
    n_jobs : int, optional
        Unused here; scale the cluster with ``cluster.scale(jobs=n_jobs)``.
    partition, memory, walltime, cores, processes : optional
        Explicit values over ``jobqueue.yaml`` (see :func:`job_settings`).
    scheduler_host : str, optional
        The address the workers reach the scheduler on (``127.0.0.1`` on a single
        node); default ``apdask.submit.scheduler_host``.
    visit : int, optional
        Used in the job name, ``apdask-<visit>``.
    job_name : str, optional
        The jobs' name instead (the warm pool's, see
        :func:`apdask.services.batch.jobqueue_pool`).

    Returns
    -------
    dask_jobqueue.SLURMCluster or dask_jobqueue.HTCondorCluster
        With ``apdask_settings``: ``{name: (value, source)}``.

    Raises
    ------
    ConfigurationError
        If dask-jobqueue is not installed, or the configuration cannot make a
        cluster (e.g. a network interface this machine lacks).
    """
    try:
        import dask_jobqueue
    except ImportError:
        msg = "dask-jobqueue is not installed; pip install 'apdask[jobqueue]'"
        raise ConfigurationError(msg) from None
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use slurm or htcondor")
    settings = _explicit_settings(scheduler, memory=memory, cores=cores, processes=processes,
                                  walltime=walltime, partition=partition)  # fmt: skip
    if job_name is None:
        job_name = f"apdask-{visit}" if visit is not None else "apdask"
    kw = _cluster_kwargs(scheduler, settings, job_dir=job_dir, scheduler_host=scheduler_host,
                         job_name=job_name)  # fmt: skip
    cls = dask_jobqueue.SLURMCluster if scheduler == "slurm" else dask_jobqueue.HTCondorCluster
    try:
        cluster = cls(**kw)
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        msg = (f"cannot start a dask-jobqueue {scheduler} cluster from jobqueue.{scheduler}.* "
               f"and apdask.submit.*: {err}")  # fmt: skip
        raise ConfigurationError(msg) from err
    cluster.apdask_settings = settings  # type: ignore[union-attr]
    return cluster


def _explicit_settings(scheduler, *, memory, cores, processes, walltime, partition):
    """:func:`job_settings` of the explicit values; walltime and partition are SLURM's."""
    explicit = {"memory": memory, "cores": cores, "processes": processes}
    if scheduler == "slurm":
        explicit.update(walltime=walltime, partition=partition)
    else:
        for name, value in (("walltime", walltime), ("partition", partition)):
            if value is not None:
                log.warning("%s %s does not apply to HTCondor jobs; ignored", name, value)
    return job_settings(scheduler, **explicit)


def _cluster_kwargs(scheduler, settings, *, job_dir, scheduler_host, job_name):
    """dask-jobqueue's keyword arguments: what ``jobqueue.yaml`` leaves unset, lists extended."""
    kw = {_JOBQUEUE_KEY[name]: value for name, (value, src) in settings.items()
          if src != "jobqueue" and value is not None}  # fmt: skip
    kw["job_name"] = job_name
    if _jobqueue(scheduler, "log-directory") is None:
        kw["log_directory"] = job_dir
    host = config.get("submit.scheduler_host", scheduler_host)
    scheduler_options = dict(_jobqueue(scheduler, "scheduler-options") or {})
    # the dashboard: dask-jobqueue's default :8787 (the next free port when taken), or
    # jobqueue.<scheduler>.scheduler-options.dashboard_address
    if host:
        scheduler_options["host"] = host
        args = list(_jobqueue(scheduler, "worker-extra-args") or [])
        kw["worker_extra_args"] = [*args, "--host", host]
    kw["scheduler_options"] = scheduler_options
    _check_interface(scheduler, _jobqueue(scheduler, "interface"), scheduler_options)
    n_proc = int(settings["processes"][0] or 1)
    if n_proc > 1:
        kw["job_script_prologue"] = [*_prologue(scheduler), f"export APDASK_JOB_PROCESSES={n_proc}"]
    return kw


_START_FAILURE = "Command exited with non-zero exit code"


class _StartErrors(logging.Filter):
    """Catch dask-jobqueue's failed job submissions before they print as tracebacks.

    A refused ``sbatch`` inside ``cluster.scale`` ends in a background task whose
    RuntimeError tornado / asyncio log as "Exception in callback" / "Task
    exception was never retrieved".  This filter keeps those errors (for the
    driver to raise as :class:`JobSubmissionError`) and drops the log records.
    """

    def __init__(self):
        super().__init__()
        self.errors = []
        self.on_error = None  # a long-lived pool logs each later refusal in one line

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.args and isinstance(record.args, dict):
            exc = record.args.get("exception")
        if isinstance(exc, RuntimeError) and _START_FAILURE in str(exc):
            if len(self.errors) < 100:  # bounded: the first ones say why
                self.errors.append(exc)
            if self.on_error is not None:
                self.on_error(self.message(exc))
            return False
        return True

    def message(self, exc=None):
        text = str(self.errors[0] if exc is None else exc)
        if "stderr:" in text:
            text = text.split("stderr:", 1)[1]
        return " ".join(text.split())

    @contextlib.contextmanager
    def installed(self):
        loggers = [logging.getLogger(n) for n in ("tornado.application", "asyncio")]
        for lg in loggers:
            lg.addFilter(self)
        try:
            yield self
        finally:
            for lg in loggers:
                lg.removeFilter(self)


def _pending_reasons(cluster):
    """``squeue``'s state and reason of the cluster's SLURM jobs (why they pend)."""
    ids = [str(j.job_id) for j in cluster.workers.values() if getattr(j, "job_id", None)]
    if not ids or shutil.which("squeue") is None:
        return ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        proc = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"],
                              capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
        lines = [" ".join(line.split()) for line in proc.stdout.splitlines() if line.strip()]
        if lines:
            return "; squeue: " + ", ".join(lines)
    return ""


def _wait_for_workers(cluster, client, errors, n, timeout, scheduler):
    """Until ``n`` workers joined; a refused submission or ``timeout`` ends it."""
    deadline = time.monotonic() + timeout
    while True:
        if errors.errors:
            cmd = "sbatch" if scheduler == "slurm" else "condor_submit"
            msg = f"{cmd} refused the worker jobs: {errors.message()}"
            raise JobSubmissionError(msg)
        if len(client.scheduler_info(n_workers=-1).get("workers", {})) >= n:
            return
        if time.monotonic() > deadline:
            msg = (f"no Dask worker job started within {timeout:.0f} s "
                   f"(apdask.submit.worker_timeout_s){_pending_reasons(cluster)}; the jobs "
                   "were cancelled. If they pend, see docs/operations.md (Running on your "
                   "cluster)")  # fmt: skip
            raise ClusterTimeoutError(msg)
        time.sleep(0.5)


def _close(cluster, scheduler="slurm", job_name=None):
    """Close a jobqueue cluster, cancelling its jobs, also after failed submissions.

    dask-jobqueue cancels the jobs it knows; a job still pending in the queue when
    the cluster closes can be missed on a loaded machine, so SLURM jobs of the
    cluster's name are cancelled by name as well (bounded).
    """
    with contextlib.suppress(Exception):
        cluster.scale(0)
    try:
        cluster.close(timeout=60)
    except Exception as err:  # a job that never started has no state to close  # noqa: BLE001
        log.debug("closing the jobqueue cluster: %r", err)
    if scheduler == "slurm" and job_name and shutil.which("scancel"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(["scancel", "--name", job_name, "--user", getpass.getuser()],
                           capture_output=True, timeout=30, check=False)  # fmt: skip


def _quiet_distributed():
    """Keep distributed's and dask-jobqueue's INFO lines off stderr unless ``-v``.

    distributed sets its loggers' levels when it is first imported, so it is imported
    before they are lowered.
    """
    import distributed  # noqa: F401

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        for name in [*logging.root.manager.loggerDict, "distributed", "dask_jobqueue"]:
            if name.startswith(("distributed", "dask_jobqueue")):
                logging.getLogger(name).setLevel(logging.WARNING)


def _submit_jobqueue(next_visit, scheduler, out, *, repo, ppdb, alerts, distributor, timeout,
                     partition, memory, walltime, dry_run, scheduler_host, wait_timeout,
                     worker_timeout):  # fmt: skip
    """The ``jobqueue`` route of :func:`~apdask.services.batch.submit_visit`.

    ``out`` is its record (with ``job_dir``), completed and returned.  The cluster
    is closed and its jobs cancelled however this ends.
    """
    job_dir = out["job_dir"]
    _quiet_distributed()
    errors = _StartErrors()
    with errors.installed(), warnings.catch_warnings():
        # the dashboard moves to a free port when 8787 is taken: reported in "dashboard"
        warnings.filterwarnings("ignore", message="Port .* is already in use")
        cluster = jobqueue_cluster(
            scheduler, job_dir=job_dir, partition=partition, memory=memory, walltime=walltime,
            scheduler_host=scheduler_host, visit=next_visit.visit,
        )  # fmt: skip
        try:
            out["settings"] = _settings_record(cluster.apdask_settings)
            with contextlib.suppress(Exception):  # no dashboard where it is switched off
                out["dashboard"] = cluster.dashboard_link
                log.info("Dask dashboard: %s", out["dashboard"])
            ext = "sbatch" if scheduler == "slurm" else "sub"
            path = os.path.join(job_dir, f"worker.{ext}")
            _write(path, cluster.job_script())
            out["job_file"] = path
            if dry_run:
                return out
            _need("sbatch" if scheduler == "slurm" else "condor_submit",
                  "SLURM" if scheduler == "slurm" else "HTCondor", path)  # fmt: skip
            _scale(cluster, out)
            _drive_visit(cluster, errors, next_visit, scheduler, out, repo=repo, ppdb=ppdb,
                         alerts=alerts, distributor=distributor, timeout=timeout,
                         wait_timeout=wait_timeout, worker_timeout=worker_timeout)  # fmt: skip
        finally:
            _close(cluster, scheduler, f"apdask-{next_visit.visit}")
    return out


def _scale(cluster, out):
    """Ask for the visit's jobs: one thread per CCD, so a job of ``cores`` takes that many."""
    threads = max(1, int(cluster.apdask_settings["cores"][0] or 1))
    out["n_ccds"] = out["n_jobs"]
    out["n_jobs"] = math.ceil(out["n_ccds"] / threads)
    if config.get("submit.adaptive"):  # start small, grow with the visit's tasks
        lo = max(1, min(int(config.get("submit.minimum_jobs") or 1), out["n_jobs"]))
        cluster.adapt(minimum_jobs=lo, maximum_jobs=out["n_jobs"])
        out["adaptive"] = {"minimum_jobs": lo, "maximum_jobs": out["n_jobs"]}
    else:
        cluster.scale(jobs=out["n_jobs"])


def _drive_visit(cluster, errors, next_visit, scheduler, out, *, repo, ppdb, alerts,
                 distributor, timeout, wait_timeout, worker_timeout):  # fmt: skip
    """Once the first worker joined, compute the visit on the cluster; its report to ``out``."""
    from distributed import Client

    from apdask.pipeline.run import run_visit

    with Client(cluster) as client:
        t0 = time.time()
        _wait_for_workers(cluster, client, errors, 1, worker_timeout, scheduler)
        out["worker_start_s"] = time.time() - t0
        try:
            report = run_visit(next_visit, repo=repo, ppdb=ppdb, alerts=alerts,
                               distributor=distributor, timeout=timeout, client=client,
                               result_timeout=wait_timeout)  # fmt: skip
        except TimeoutError as err:
            if isinstance(err, ClusterTimeoutError | ConfigurationError):
                raise
            if errors.errors:
                msg = f"worker jobs refused: {errors.message()}"
                raise JobSubmissionError(msg) from None
            msg = (f"the visit did not finish within {wait_timeout:.0f} s "
                   f"(apdask.submit.wait_timeout_s){_pending_reasons(cluster)}; the "
                   "jobs were cancelled")  # fmt: skip
            raise ClusterTimeoutError(msg) from None
        out["report"] = report
        out["n_alerts"] = report["n_alerts"]
        out["wall_s"] = time.time() - t0
