"""Where visits run: a local Dask cluster, or batch jobs on SLURM or HTCondor.

* :func:`open_client` gives a ``distributed.Client``: to a running scheduler when
  an address is given, else to a :func:`apdask.pipeline.run.local_cluster` (the default).
* :func:`submit_visit` is batch mode (DMTN-092 §2.1): one job per CCD of a
  nextVisit (9 for ComCam, 189 for LSSTCam).  Two routes:

  ``via="native"``
      Each job runs ``apdask process-ccd`` with exactly DMTN-092's arguments (CCD,
      boresight RA/Dec, filter, anticipated exposure time, distributor, image
      names).  SLURM gets one ``sbatch --array`` script, one array task per CCD;
      HTCondor gets one submit description with one ``queue`` item per CCD.
  ``via="jobqueue"``
      dask-jobqueue starts one Dask worker job per CCD (``SLURMCluster`` or
      ``HTCondorCluster``) and the driver computes the visit graph on them.

:func:`jobqueue_pool` is the long-lived alternative to one cluster per visit: a warm,
adaptive pool of worker jobs that serves every visit of a night (``apdask listen
--cluster slurm``; ``apdask/services/_batch_pool.py``).

HTCondor is not packaged for this platform (Debian 12), so HTCondor files are
generated and checked but only submitted where ``condor_submit`` exists.  The
choice between the routes is explained in ``docs/operations.md``.

Both routes share the jobs' resources (:func:`job_settings`: the operator's
``jobqueue.yaml`` first); the ``native`` route lives in
``apdask/services/_batch_native.py``, the ``jobqueue`` route in
``_batch_jobqueue.py``, the shared settings in ``_batch_settings.py``.  Every public
name is importable from here.
"""

from __future__ import annotations

import contextlib
import os

from apdask import config
from apdask.exceptions import ConfigurationError
from apdask.services._batch_jobqueue import _submit_jobqueue, jobqueue_cluster
from apdask.services._batch_native import (
    _submit_native,
    ccd_arguments,
    ccd_command,
    htcondor_submit_file,
    slurm_array_script,
)
from apdask.services._batch_pool import PoolSize, jobqueue_pool
from apdask.services._batch_settings import (
    SCHEDULERS,
    VIAS,
    _positive,
    job_settings,
    slurm_memory,
)

__all__ = [
    "PoolSize",
    "SCHEDULERS",
    "VIAS",
    "ccd_arguments",
    "ccd_command",
    "htcondor_submit_file",
    "jobqueue_cluster",
    "jobqueue_pool",
    "job_settings",
    "open_client",
    "slurm_array_script",
    "slurm_memory",
    "submit_visit",
]


@contextlib.contextmanager
def open_client(address=None, n_workers=2, threads_per_worker=1):
    """A ``distributed.Client``: to ``address`` if given, else to a new LocalCluster.

    Parameters
    ----------
    address : str, optional
        Scheduler address, e.g. ``tcp://10.0.0.5:8786``.
    n_workers, threads_per_worker : int, optional
        Size of the LocalCluster made when no address is given.

    Yields
    ------
    distributed.Client
    """
    if address:
        from distributed import Client

        with Client(address) as client:
            yield client
        return
    from apdask.pipeline.run import local_cluster

    with local_cluster(n_workers=n_workers, threads_per_worker=threads_per_worker) as client:
        yield client


def submit_visit(next_visit, scheduler="slurm", via="native", *, repo, distributor=None,
                 ppdb=None, alerts=None, timeout=None, job_dir=None, partition=None,
                 memory=None, walltime=None, scheduler_host=None, wait=False,
                 dry_run=False, wait_timeout=None, worker_timeout=None):  # fmt: skip
    """Batch mode: run every CCD of ``next_visit`` as a job of ``scheduler``.

    Parameters
    ----------
    next_visit : apdask.pipeline.nextvisit.NextVisit
    scheduler : {"slurm", "htcondor"}
    via : {"native", "jobqueue"}
        ``native``: jobs run ``apdask process-ccd`` (DMTN-092 §2.1).  ``jobqueue``:
        jobs are Dask workers and this process drives the visit graph (it blocks).
    repo : str
        Butler repository.  The PPDB is created before anything is submitted, so
        the CCD jobs never race to create it.
    distributor, ppdb, alerts, timeout
        As for ``apdask process-ccd``; defaults ``file://<repo>/raw``,
        ``<repo>/ppdb/apdb.yaml``, ``file://<repo>/alerts`` and 120 s.
    job_dir : str, optional
        Scripts and logs; default ``apdask.submit.job_dir`` or
        ``<repo>/jobs/visit_<visit>``.
    partition, memory, walltime : optional
        Explicit values over the operator's ``jobqueue.<scheduler>.*``, which win
        over ``apdask.submit.*`` (:func:`job_settings`; the output's ``settings``
        says where each value came from).
    scheduler_host : str, optional
        jobqueue: the address workers reach the scheduler on.
    wait : bool, optional
        ``native`` SLURM: block until every CCD job has finished and collect their
        exit status and alert counts.
    dry_run : bool, optional
        Write the job files, submit nothing.
    wait_timeout : float, optional
        Seconds for the whole visit (native ``wait`` or jobqueue); default
        ``apdask.submit.wait_timeout_s`` (3600).  The jobs are cancelled after it.
    worker_timeout : float, optional
        jobqueue: seconds for the first worker to start; default
        ``apdask.submit.worker_timeout_s`` (300).

    Returns
    -------
    dict
        ``scheduler``, ``via``, ``n_jobs``, ``job_file``, ``job_dir``, ``settings``;
        after submission ``job_id``; with ``wait`` ``ccds`` (rc, n_alerts per CCD),
        ``n_alerts`` and ``failed``; with ``jobqueue`` the visit ``report``.

    Raises
    ------
    ConfigurationError
        No repository, or the scheduler's submit command is missing (the job file
        is still written and named in the message).
    JobSubmissionError
        The scheduler refused the jobs (exit 76); its own message is included.
    ClusterTimeoutError
        No worker started in ``worker_timeout``, or the visit did not finish in
        ``wait_timeout`` (exit 75); the jobs are cancelled.
    ValueError
        Unknown scheduler or route.
    """
    from apdask.pipeline.run import ensure_ppdb

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use --scheduler slurm or htcondor")
    if via not in VIAS:
        raise ValueError(f"unknown route {via!r}; use --via native or jobqueue")
    wait_timeout = _positive("wait_timeout_s", wait_timeout)
    worker_timeout = _positive("worker_timeout_s", worker_timeout)
    repo, distributor, alerts, job_dir = _locations(next_visit, repo, distributor, alerts,
                                                    job_dir)  # fmt: skip
    names = list(next_visit.detectors)
    for name in names:  # every CCD is checked before anything is written
        ccd_arguments(next_visit, name, distributor)
    os.makedirs(job_dir, exist_ok=True)
    ppdb = ensure_ppdb(repo, ppdb)
    commands = {}
    for name in names:
        commands[name] = ccd_command(next_visit, name, repo=repo, distributor=distributor,
                                     ppdb=ppdb, alerts=alerts, timeout=timeout)  # fmt: skip
    out = {"scheduler": scheduler, "via": via, "visit": next_visit.visit,
           "groupId": next_visit.groupId, "n_jobs": len(names), "job_dir": job_dir}  # fmt: skip
    if via == "jobqueue":
        return _submit_jobqueue(next_visit, scheduler, out, repo=repo, ppdb=ppdb, alerts=alerts,
                                distributor=distributor, timeout=timeout, partition=partition,
                                memory=memory, walltime=walltime, dry_run=dry_run,
                                scheduler_host=scheduler_host, wait_timeout=wait_timeout,
                                worker_timeout=worker_timeout)  # fmt: skip
    return _submit_native(next_visit, scheduler, out, commands, partition=partition,
                          memory=memory, walltime=walltime, wait=wait, dry_run=dry_run,
                          wait_timeout=wait_timeout)  # fmt: skip


def _locations(next_visit, repo, distributor, alerts, job_dir):
    """Repository, distributor, alert sink and job directory: given, configured or default."""
    repo = config.get("repo", repo)
    if repo is None or not os.path.isdir(os.path.join(repo, "butler.zarr")):
        msg = f"no Butler repository at {repo}; pass --repo DIR (made by `apdask simulate`)"
        raise ConfigurationError(msg)
    repo = os.path.abspath(repo)
    distributor = config.get("distributor.url", distributor) or f"file://{repo}/raw"
    alerts = config.get("alerts.sink", alerts) or f"file://{repo}/alerts"
    default_dir = os.path.join(repo, "jobs", f"visit_{next_visit.visit}")
    job_dir = os.path.abspath(config.get("submit.job_dir", job_dir) or default_dir)
    return repo, distributor, alerts, job_dir
