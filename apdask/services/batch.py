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

HTCondor is not packaged for this platform (Debian 12), so HTCondor files are
generated and checked but only submitted where ``condor_submit`` exists.  The
choice between the routes is explained in ``docs/operations.md``.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from typing import Any

import dask.config

from apdask import config
from apdask.core.files import atomic_write
from apdask.exceptions import ClusterTimeoutError, ConfigurationError, JobSubmissionError

log = logging.getLogger("apdask.cluster")

__all__ = [
    "SCHEDULERS",
    "VIAS",
    "ccd_arguments",
    "ccd_command",
    "htcondor_submit_file",
    "jobqueue_cluster",
    "job_settings",
    "open_client",
    "slurm_array_script",
    "slurm_memory",
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
    """HTCondor ``request_memory`` (MiB, rounded down), as dask-jobqueue's HTCondor jobs."""
    from dask.utils import parse_bytes

    return max(1, int(parse_bytes(str(memory)) // 2**20))


def slurm_memory(memory):
    """SLURM ``--mem`` value of ``memory``, exactly as dask-jobqueue writes it.

    Rounded up to whole GiB, else MiB or KiB (``4GB`` -> ``4G``, ``2.5GiB`` ->
    ``3G``, ``500MB`` -> ``477M``), so that both routes of ``apdask submit`` ask
    SLURM for the same memory.
    """
    from dask.utils import parse_bytes

    n = parse_bytes(str(memory))
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{math.ceil(n / size)}{unit}"
    return "1K"


# apdask.submit.<name> -> jobqueue.<scheduler>.<key> of the operator's jobqueue.yaml
_JOBQUEUE_KEY = {"memory": "memory", "walltime": "walltime", "cores": "cores",
                 "processes": "processes", "partition": "queue", "account": "account",
                 "disk": "disk"}  # fmt: skip
_APPLIES = {
    "slurm": ("memory", "walltime", "cores", "processes", "partition", "account"),
    "htcondor": ("memory", "cores", "processes", "disk"),
}


_SAID: set[Any] = set()  # (message, args) already logged: job_settings runs more than once a submit


def _say(level, msg, *args):
    if (msg, args) not in _SAID:
        _SAID.add((msg, args))
        log.log(level, msg, *args)


def _jobqueue(scheduler, key, default=None):
    """The operator's ``jobqueue.<scheduler>.<key>`` (their ``jobqueue.yaml``)."""
    value = dask.config.get(f"jobqueue.{scheduler}.{key}", default)
    return default if value is None else value


def job_settings(scheduler, **explicit):
    """Resources of the batch jobs: the operator's ``jobqueue.yaml`` first.

    For each of memory, walltime, cores, processes, partition (``queue``), account
    (SLURM) and disk (HTCondor): a value given explicitly (``--mem``, ``--walltime``,
    ``--partition``) wins, with a warning when it differs from ``jobqueue.yaml``;
    else ``jobqueue.<scheduler>.<key>`` as dask-jobqueue reads it; else apdask's
    fallback ``apdask.submit.<name>``, logged.  Both routes use these.

    Returns
    -------
    dict
        ``{name: (value, source)}``, source ``"argument"``, ``"jobqueue"`` or ``"apdask"``.
    """
    out = {}
    for name in _APPLIES[scheduler]:
        key = _JOBQUEUE_KEY[name]
        given = explicit.get(name)
        operator = _jobqueue(scheduler, key)
        if given is not None:
            if operator is not None and str(operator) != str(given):
                msg = "%s %s given explicitly overrides jobqueue.%s.%s = %s from jobqueue.yaml"
                _say(logging.WARNING, msg, name, str(given), scheduler, key, str(operator))
            out[name] = (given, "argument")
        elif operator is not None:
            out[name] = (operator, "jobqueue")
        else:
            value = config.get(f"submit.{name}")
            if value is not None:
                _say(logging.INFO, "jobqueue.%s.%s is not set in jobqueue.yaml; apdask uses "
                     "apdask.submit.%s = %s", scheduler, key, name, str(value))  # fmt: skip
            out[name] = (value, "apdask")
    for name, value in explicit.items():
        if value is not None and name not in out:
            msg = "%s %s does not apply to %s jobs; ignored"
            _say(logging.WARNING, msg, name, str(value), scheduler)
    return out


def _settings_record(settings):
    return {name: {"value": v, "from": src} for name, (v, src) in settings.items()}


def _prologue(scheduler):
    """The operator's job script prologue (``job-script-prologue``, else ``env-extra``)."""
    lines = _jobqueue(scheduler, "job-script-prologue") or _jobqueue(scheduler, "env-extra")
    return list(lines or [])


def slurm_array_script(next_visit, commands, job_dir, *, partition=None, memory=None,
                       walltime=None, cores=None, account=None):  # fmt: skip
    """Text of an ``sbatch`` script with one array task per CCD.

    Parameters
    ----------
    next_visit : apdask.pipeline.nextvisit.NextVisit
    commands : dict
        argv list per CCD name, e.g. from :func:`ccd_command`.
    job_dir : str
        Where each task writes ``<ccd>.out`` (the CCD report, JSON), ``<ccd>.err``
        and ``<ccd>.rc`` (its exit status).
    partition, memory, walltime, cores, account : optional
        Explicit values; else ``jobqueue.slurm.*`` (the operator's ``jobqueue.yaml``),
        else ``apdask.submit.*`` (:func:`job_settings`).  The operator's
        ``job-extra-directives`` and ``job-script-prologue`` are added too.

    Returns
    -------
    str
    """
    settings = job_settings("slurm", partition=partition, memory=memory, walltime=walltime,
                            cores=cores, account=account)  # fmt: skip
    value = {name: v for name, (v, _) in settings.items()}
    names = list(commands)
    lines = [
        "#!/bin/bash",
        f"# apdask batch mode (DMTN-092 §2.1): visit {next_visit.visit}, "
        f"groupId {next_visit.groupId}, {len(names)} CCD jobs",
        f"#SBATCH --job-name=apdask-{next_visit.visit}",
        f"#SBATCH --array=0-{len(names) - 1}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={int(value['cores'] or 1)}",
        f"#SBATCH --mem={slurm_memory(value['memory'])}",
        f"#SBATCH --time={value['walltime']}",
        f"#SBATCH --output={job_dir}/slurm-%A_%a.out",
    ]
    if value["partition"]:
        lines.append(f"#SBATCH --partition={value['partition']}")
    if value["account"]:
        lines.append(f"#SBATCH --account={value['account']}")
    lines += [f"#SBATCH {d}" for d in _jobqueue("slurm", "job-extra-directives") or ()]
    lines += _prologue("slurm")
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


def htcondor_submit_file(next_visit, commands, job_dir, *, memory=None, cores=None):
    """Text of an HTCondor submit description: one ``queue`` item per CCD.

    Every CCD runs the same executable; ``$(ccd)`` and ``$(args)`` come from the
    queue list, whose lines are ``<ccd> <arguments...>`` (``args`` takes the rest of
    the line).  Output goes to ``<job_dir>/<ccd>.out`` / ``.err``.  ``memory`` and
    ``cores`` as in :func:`job_settings` (``jobqueue.htcondor.*`` first); the
    operator's ``jobqueue.htcondor.job-extra-directives`` are added.
    """
    settings = job_settings("htcondor", memory=memory, cores=cores)
    memory, cores = settings["memory"][0], int(settings["cores"][0] or 1)
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
        f"request_cpus   = {cores}",
        f"request_memory = {_mem_mb(memory)}",
        "getenv         = True",
        f"batch_name     = apdask-{next_visit.visit}",
    ]
    extra = _jobqueue("htcondor", "job-extra-directives") or {}
    lines += [f"{k} = {v}" for k, v in dict(extra).items()]
    lines.append("queue ccd, args from (")
    for name in names:
        lines.append(f"  {name} " + " ".join(_condor_quote(a) for a in commands[name][1:]))
    lines += [")", ""]
    return "\n".join(lines)


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
                     processes=None):  # fmt: skip
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
        Used in the job name.

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
    explicit = {"memory": memory, "cores": cores, "processes": processes}
    if scheduler == "slurm":
        explicit.update(walltime=walltime, partition=partition)
    else:
        for name, value in (("walltime", walltime), ("partition", partition)):
            if value is not None:
                log.warning("%s %s does not apply to HTCondor jobs; ignored", name, value)
    settings = job_settings(scheduler, **explicit)
    kw = {_JOBQUEUE_KEY[name]: value for name, (value, src) in settings.items()
          if src != "jobqueue" and value is not None}  # fmt: skip
    kw["job_name"] = f"apdask-{visit}" if visit is not None else "apdask"
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
    cls = dask_jobqueue.SLURMCluster if scheduler == "slurm" else dask_jobqueue.HTCondorCluster
    try:
        cluster = cls(**kw)
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        msg = (f"cannot start a dask-jobqueue {scheduler} cluster from jobqueue.{scheduler}.* "
               f"and apdask.submit.*: {err}")  # fmt: skip
        raise ConfigurationError(msg) from err
    cluster.apdask_settings = settings  # type: ignore[union-attr]
    return cluster


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
                                scheduler_host=scheduler_host, wait_timeout=wait_timeout,
                                worker_timeout=worker_timeout)  # fmt: skip
    submit_timeout = _positive("submit_timeout_s", None)
    if scheduler == "htcondor":
        out["settings"] = _settings_record(job_settings("htcondor", memory=memory))
        path = os.path.join(job_dir, f"visit_{next_visit.visit}.sub")
        _write(path, htcondor_submit_file(next_visit, commands, job_dir, memory=memory))
        out["job_file"] = path
        if dry_run:
            return out
        _need("condor_submit", "HTCondor", path)
        proc = _submit(["condor_submit", "-terse", path], submit_timeout, "HTCondor")
        out["job_id"] = proc.stdout.strip()
        return out
    out["settings"] = _settings_record(job_settings("slurm", partition=partition,
                                                    memory=memory, walltime=walltime))  # fmt: skip
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
    proc = _submit(cmd, wait_timeout if wait else submit_timeout, "SLURM")
    out["job_id"] = proc.stdout.strip().split(";")[0]
    if wait:
        ccds = _collect(job_dir, names)
        out["ccds"] = ccds
        out["failed"] = [n for n, c in ccds.items() if c["rc"] != 0]
        out["n_alerts"] = sum(c["n_alerts"] or 0 for c in ccds.values())
        out["wall_s"] = time.time() - t0
    return out


def _positive(key, value):
    """``value`` or ``apdask.submit.<key>``, checked to be a positive number of seconds."""
    value = config.get(f"submit.{key}", value)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or math.isinf(value):
        msg = f"apdask.submit.{key} must be > 0 seconds, got {value!r}; e.g. 300"
        raise ConfigurationError(msg)
    return value


def _write(path, text):
    atomic_write(path, text)


def _text(data):
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def _submit(cmd, timeout, scheduler):
    """Run ``sbatch`` / ``condor_submit``; the scheduler's refusal or a timeout ends it.

    A submission that printed no job id was refused: :class:`JobSubmissionError`
    with the scheduler's own message.  ``sbatch --wait`` that printed a job id and
    exits non-zero means jobs ran and some failed: the caller collects them.  Past
    ``timeout`` the command is killed and the jobs it submitted are cancelled.
    """
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as err:
        job_id = _text(err.stdout).strip().split(";")[0]
        if job_id and scheduler == "SLURM":
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(["scancel", job_id], capture_output=True, timeout=60, check=False)
        msg = (f"{shlex.join(cmd)} did not finish within {timeout:.0f} s "
               f"(apdask.submit.wait_timeout_s / submit_timeout_s)"
               + (f"; job {job_id} was cancelled" if job_id else ""))  # fmt: skip
        raise ClusterTimeoutError(msg) from None
    if not proc.stdout.strip():
        reason = proc.stderr.strip() or f"no job id and exit status {proc.returncode}"
        msg = f"{scheduler} refused the visit's jobs ({shlex.join(cmd)}): {reason}"
        raise JobSubmissionError(msg)
    return proc


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

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None and record.args and isinstance(record.args, dict):
            exc = record.args.get("exception")
        if isinstance(exc, RuntimeError) and _START_FAILURE in str(exc):
            self.errors.append(exc)
            return False
        return True

    def message(self):
        text = str(self.errors[0])
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
    """Keep distributed's and dask-jobqueue's INFO lines off stderr unless ``-v``."""
    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        for name in [*logging.root.manager.loggerDict, "distributed", "dask_jobqueue"]:
            if name.startswith(("distributed", "dask_jobqueue")):
                logging.getLogger(name).setLevel(logging.WARNING)


def _submit_jobqueue(next_visit, scheduler, out, *, repo, ppdb, alerts, distributor, timeout,
                     partition, memory, walltime, dry_run, scheduler_host, wait_timeout,
                     worker_timeout):  # fmt: skip
    from distributed import Client

    from apdask.pipeline.run import run_visit

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
            # one thread per CCD: a job of `cores` threads takes that many CCDs at once
            threads = max(1, int(cluster.apdask_settings["cores"][0] or 1))
            out["n_ccds"] = out["n_jobs"]
            out["n_jobs"] = math.ceil(out["n_ccds"] / threads)
            if config.get("submit.adaptive"):  # start small, grow with the visit's tasks
                lo = max(1, min(int(config.get("submit.minimum_jobs") or 1), out["n_jobs"]))
                cluster.adapt(minimum_jobs=lo, maximum_jobs=out["n_jobs"])
                out["adaptive"] = {"minimum_jobs": lo, "maximum_jobs": out["n_jobs"]}
            else:
                cluster.scale(jobs=out["n_jobs"])
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
        finally:
            _close(cluster, scheduler, f"apdask-{next_visit.visit}")
    return out
