"""Where visits run: a local Dask cluster, or batch jobs on SLURM or HTCondor.

* :func:`open_client` gives a ``distributed.Client``: to a running scheduler when
  an address is given, else to a :func:`apdask.run.local_cluster` (the default).
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

HTCondor is not packaged for this platform (Debian 12), so HTCondor files are
generated and checked but only submitted where ``condor_submit`` exists.  The
choice between the routes is explained in ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from apdask import config
from apdask.core.files import atomic_write
from apdask.exceptions import ConfigurationError

__all__ = [
    "SCHEDULERS",
    "VIAS",
    "ccd_arguments",
    "ccd_command",
    "htcondor_submit_file",
    "jobqueue_cluster",
    "open_client",
    "slurm_array_script",
    "submit_visit",
]

SCHEDULERS = ("slurm", "htcondor")
VIAS = ("native", "jobqueue")


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


def ccd_arguments(next_visit, detector_name, distributor):
    """DMTN-092 §2.1 arguments of one CCD's command, from a nextVisit.

    Returns
    -------
    list of str
        ``--ccd --ra --dec --filter --exptime --distributor`` and one ``--image``
        per snap.
    """
    det = next_visit.camera[detector_name]  # UnknownDetectorError names valid CCDs
    args = [
        "--ccd", det.name, "--ra", repr(next_visit.ra), "--dec", repr(next_visit.dec),
        "--filter", next_visit.filters, "--exptime", repr(next_visit.duration),
        "--distributor", distributor,
    ]  # fmt: skip
    for name in next_visit.image_names(det.name):
        args += ["--image", name]
    return args


def _apdask_executable():
    """The ``apdask`` console script of this environment, else ``python -m apdask.cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "apdask")
    if os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-m", "apdask.cli"]


def ccd_command(next_visit, detector_name, *, repo, distributor, ppdb=None, alerts=None,
                timeout=None):  # fmt: skip
    """The full ``apdask process-ccd`` command line (argv list) of one CCD."""
    cmd = [*_apdask_executable(), "process-ccd",
           *ccd_arguments(next_visit, detector_name, distributor), "--repo", repo]  # fmt: skip
    if ppdb:
        cmd += ["--ppdb", ppdb]
    if alerts:
        cmd += ["--alerts", alerts]
    if timeout is not None:
        cmd += ["--timeout", repr(float(timeout))]
    return cmd


def _mem_mb(memory):
    from dask.utils import parse_bytes

    return max(1, int(parse_bytes(str(memory)) // 2**20))


def slurm_array_script(next_visit, commands, job_dir, *, partition=None, memory=None,
                       walltime=None):  # fmt: skip
    """Text of an ``sbatch`` script with one array task per CCD.

    Parameters
    ----------
    next_visit : apdask.visit.NextVisit
    commands : dict
        argv list per CCD name, e.g. from :func:`ccd_command`.
    job_dir : str
        Where each task writes ``<ccd>.out`` (the CCD report, JSON), ``<ccd>.err``
        and ``<ccd>.rc`` (its exit status).
    partition, memory, walltime : optional
        Default ``apdask.submit.partition``, ``.memory``, ``.walltime``.

    Returns
    -------
    str
    """
    memory = config.get("submit.memory", memory)
    walltime = config.get("submit.walltime", walltime)
    partition = config.get("submit.partition", partition)
    names = list(commands)
    lines = [
        "#!/bin/bash",
        f"# apdask batch mode (DMTN-092 §2.1): visit {next_visit.visit}, "
        f"groupId {next_visit.groupId}, {len(names)} CCD jobs",
        f"#SBATCH --job-name=apdask-{next_visit.visit}",
        f"#SBATCH --array=0-{len(names) - 1}",
        "#SBATCH --ntasks=1",
        "#SBATCH --cpus-per-task=1",
        f"#SBATCH --mem={_mem_mb(memory)}M",
        f"#SBATCH --time={walltime}",
        f"#SBATCH --output={job_dir}/slurm-%A_%a.out",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += ["set -u", f"JOBDIR={shlex.quote(job_dir)}", 'case "$SLURM_ARRAY_TASK_ID" in']
    for i, name in enumerate(names):
        lines.append(f"  {i}) CCD={name}; set -- {shlex.join(commands[name])} ;;")
    lines += [
        '  *) echo "no CCD for array index $SLURM_ARRAY_TASK_ID" >&2; exit 64 ;;',
        "esac",
        '"$@" >"$JOBDIR/$CCD.out" 2>"$JOBDIR/$CCD.err"',
        "rc=$?",
        'echo "$rc" >"$JOBDIR/$CCD.rc"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)


def _condor_quote(arg):
    arg = str(arg).replace('"', '""').replace("'", "''")
    return f"'{arg}'" if any(c.isspace() for c in arg) else arg


def htcondor_submit_file(next_visit, commands, job_dir, *, memory=None):
    """Text of an HTCondor submit description: one ``queue`` item per CCD.

    Every CCD runs the same executable; ``$(ccd)`` and ``$(args)`` come from the
    queue list, whose lines are ``<ccd> <arguments...>`` (``args`` takes the rest of
    the line).  Output goes to ``<job_dir>/<ccd>.out`` / ``.err``.
    """
    memory = config.get("submit.memory", memory)
    names = list(commands)
    exe = commands[names[0]][0]
    lines = [
        f"# apdask batch mode (DMTN-092 §2.1): visit {next_visit.visit}, "
        f"groupId {next_visit.groupId}, {len(names)} CCD jobs",
        "universe       = vanilla",
        f"executable     = {exe}",
        'arguments      = "$(args)"',
        f"output         = {job_dir}/$(ccd).out",
        f"error          = {job_dir}/$(ccd).err",
        f"log            = {job_dir}/condor.log",
        "request_cpus   = 1",
        f"request_memory = {_mem_mb(memory)}",
        "getenv         = True",
        f"batch_name     = apdask-{next_visit.visit}",
        "queue ccd, args from (",
    ]
    for name in names:
        lines.append(f"  {name} " + " ".join(_condor_quote(a) for a in commands[name][1:]))
    lines += [")", ""]
    return "\n".join(lines)


def jobqueue_cluster(scheduler, *, job_dir, n_jobs=None, partition=None, memory=None,
                     walltime=None, scheduler_host=None, visit=None):  # fmt: skip
    """A dask-jobqueue cluster of one-core, one-worker jobs (not yet scaled).

    Parameters
    ----------
    scheduler : {"slurm", "htcondor"}
    job_dir : str
        Log directory of the worker jobs.
    n_jobs : int, optional
        Unused here; scale the cluster with ``cluster.scale(jobs=n_jobs)``.
    partition, memory, walltime, scheduler_host : optional
        Default ``apdask.submit.*``.  ``scheduler_host`` is the address the workers
        reach the scheduler on (``127.0.0.1`` on a single node).
    visit : int, optional
        Used in the job name.

    Returns
    -------
    dask_jobqueue.SLURMCluster or dask_jobqueue.HTCondorCluster

    Raises
    ------
    ConfigurationError
        If dask-jobqueue is not installed.
    """
    try:
        import dask_jobqueue
    except ImportError:
        msg = "dask-jobqueue is not installed; pip install 'apdask[jobqueue]'"
        raise ConfigurationError(msg) from None
    memory = config.get("submit.memory", memory)
    walltime = config.get("submit.walltime", walltime)
    partition = config.get("submit.partition", partition)
    host = config.get("submit.scheduler_host", scheduler_host)
    kw = {
        "cores": 1, "processes": 1, "memory": memory, "log_directory": job_dir,
        "job_name": f"apdask-{visit}" if visit is not None else "apdask",
        "python": sys.executable,
    }  # fmt: skip
    if host:
        kw["scheduler_options"] = {"host": host, "dashboard_address": None}
        kw["worker_extra_args"] = ["--host", host]
    else:
        kw["scheduler_options"] = {"dashboard_address": None}
    if scheduler == "slurm":
        return dask_jobqueue.SLURMCluster(queue=partition, walltime=walltime, **kw)
    if scheduler == "htcondor":
        return dask_jobqueue.HTCondorCluster(disk="1GB", **kw)
    raise ValueError(f"unknown scheduler {scheduler!r}; use slurm or htcondor")


def _need(binary, scheduler, path):
    if shutil.which(binary) is None:
        msg = (f"{binary} is not on PATH, so nothing was submitted to {scheduler}; the job "
               f"file is {path}: submit it where {scheduler} runs, or pass --dry-run")  # fmt: skip
        raise ConfigurationError(msg)


def _collect(job_dir, names):
    """Per-CCD exit status and alert count from the files the jobs wrote."""
    out = {}
    for name in names:
        rc_path = os.path.join(job_dir, f"{name}.rc")
        rc = None
        if os.path.exists(rc_path):
            with open(rc_path) as f:
                rc = int(f.read().strip())
        n_alerts = None
        with (
            contextlib.suppress(OSError, ValueError, TypeError),
            open(os.path.join(job_dir, f"{name}.out")) as f,
        ):
            n_alerts = int(json.load(f).get("n_alerts"))
        out[name] = {"rc": rc, "n_alerts": n_alerts}
    return out


def submit_visit(next_visit, scheduler="slurm", via="native", *, repo, distributor=None,
                 ppdb=None, alerts=None, timeout=None, job_dir=None, partition=None,
                 memory=None, walltime=None, scheduler_host=None, wait=False,
                 dry_run=False, wait_timeout=3600.0):  # fmt: skip
    """Batch mode: run every CCD of ``next_visit`` as a job of ``scheduler``.

    Parameters
    ----------
    next_visit : apdask.visit.NextVisit
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
    partition, memory, walltime, scheduler_host : optional
        Default ``apdask.submit.*``.
    wait : bool, optional
        ``native`` SLURM: block until every CCD job has finished and collect their
        exit status and alert counts.
    dry_run : bool, optional
        Write the job files, submit nothing.
    wait_timeout : float, optional
        Seconds to wait with ``wait=True``.

    Returns
    -------
    dict
        ``scheduler``, ``via``, ``n_jobs``, ``job_file``, ``job_dir``; after
        submission ``job_id``; with ``wait`` ``ccds`` (rc, n_alerts per CCD),
        ``n_alerts`` and ``failed``; with ``jobqueue`` the visit ``report``.

    Raises
    ------
    ConfigurationError
        No repository, or the scheduler's submit command is missing (the job file
        is still written and named in the message).
    ValueError
        Unknown scheduler or route.
    """
    from apdask.pipeline.run import ensure_ppdb

    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; use --scheduler slurm or htcondor")
    if via not in VIAS:
        raise ValueError(f"unknown route {via!r}; use --via native or jobqueue")
    repo = config.get("repo", repo)
    if repo is None or not os.path.isdir(os.path.join(repo, "butler.zarr")):
        msg = f"no Butler repository at {repo}; pass --repo DIR (made by `apdask simulate`)"
        raise ConfigurationError(msg)
    repo = os.path.abspath(repo)
    distributor = config.get("distributor.url", distributor) or f"file://{repo}/raw"
    alerts = config.get("alerts.sink", alerts) or f"file://{repo}/alerts"
    default_dir = os.path.join(repo, "jobs", f"visit_{next_visit.visit}")
    job_dir = os.path.abspath(config.get("submit.job_dir", job_dir) or default_dir)
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
                                scheduler_host=scheduler_host)  # fmt: skip
    if scheduler == "htcondor":
        path = os.path.join(job_dir, f"visit_{next_visit.visit}.sub")
        _write(path, htcondor_submit_file(next_visit, commands, job_dir, memory=memory))
        out["job_file"] = path
        if dry_run:
            return out
        _need("condor_submit", "HTCondor", path)
        proc = _run(["condor_submit", "-terse", path], 120)
        out["job_id"] = proc.stdout.strip()
        return out
    path = os.path.join(job_dir, f"visit_{next_visit.visit}.sbatch")
    script = slurm_array_script(next_visit, commands, job_dir, partition=partition,
                                memory=memory, walltime=walltime)  # fmt: skip
    _write(path, script)
    out["job_file"] = path
    if dry_run:
        return out
    _need("sbatch", "SLURM", path)
    for name in names:  # stale results of an earlier submission
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(job_dir, f"{name}.rc"))
    t0 = time.time()
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + [path]
    proc = _run(cmd, wait_timeout if wait else 120, check=not wait)
    out["job_id"] = proc.stdout.strip().split(";")[0]
    if wait:
        ccds = _collect(job_dir, names)
        out["ccds"] = ccds
        out["failed"] = [n for n, c in ccds.items() if c["rc"] != 0]
        out["n_alerts"] = sum(c["n_alerts"] or 0 for c in ccds.values())
        out["wall_s"] = time.time() - t0
    return out


def _write(path, text):
    atomic_write(path, text)


def _run(cmd, timeout, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        msg = (f"{shlex.join(cmd)} failed with status {proc.returncode}: "
               f"{proc.stderr.strip() or proc.stdout.strip()}")  # fmt: skip
        raise ConfigurationError(msg)
    return proc


def _submit_jobqueue(next_visit, scheduler, out, *, repo, ppdb, alerts, distributor, timeout,
                     partition, memory, walltime, dry_run, scheduler_host):  # fmt: skip
    from distributed import Client

    from apdask.pipeline.run import run_visit

    job_dir = out["job_dir"]
    cluster = jobqueue_cluster(scheduler, job_dir=job_dir, partition=partition, memory=memory,
                               walltime=walltime, scheduler_host=scheduler_host,
                               visit=next_visit.visit)  # fmt: skip
    with cluster:
        ext = "sbatch" if scheduler == "slurm" else "sub"
        path = os.path.join(job_dir, f"worker.{ext}")
        _write(path, cluster.job_script())
        out["job_file"] = path
        if dry_run:
            return out
        _need("sbatch" if scheduler == "slurm" else "condor_submit",
              "SLURM" if scheduler == "slurm" else "HTCondor", path)  # fmt: skip
        cluster.scale(jobs=out["n_jobs"])
        with Client(cluster) as client:
            t0 = time.time()
            report = run_visit(next_visit, repo=repo, ppdb=ppdb, alerts=alerts,
                               distributor=distributor, timeout=timeout, client=client)  # fmt: skip
            out["report"] = report
            out["n_alerts"] = report["n_alerts"]
            out["wall_s"] = time.time() - t0
    return out
