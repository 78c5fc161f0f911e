"""The ``native`` route of :mod:`apdask.services.batch`: scheduler job files per CCD.

Each job runs ``apdask process-ccd`` with exactly DMTN-092's arguments.  SLURM gets
one ``sbatch --array`` script (:func:`slurm_array_script`), HTCondor one submit
description (:func:`htcondor_submit_file`); ``sbatch`` / ``condor_submit`` submit
them and, with ``wait``, the CCDs' exit status and alert counts are collected from
the files the jobs wrote.  Re-exported by :mod:`apdask.services.batch`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from apdask.exceptions import ClusterTimeoutError, JobSubmissionError
from apdask.pipeline.nextvisit import NextVisit
from apdask.services._batch_settings import (
    _jobqueue,
    _mem_mb,
    _need,
    _positive,
    _prologue,
    _settings_record,
    _write,
    job_settings,
    slurm_memory,
)

__all__ = ["ccd_arguments", "ccd_command", "htcondor_submit_file", "slurm_array_script"]


def ccd_arguments(next_visit: NextVisit, detector_name: str, distributor: str) -> list[str]:
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


def ccd_command(
    next_visit: NextVisit,
    detector_name: str,
    *,
    repo: str,
    distributor: str,
    ppdb: str | None = None,
    alerts: str | None = None,
    timeout: float | None = None,
) -> list[str]:
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


def slurm_array_script(
    next_visit: NextVisit,
    commands: Mapping[str, Sequence[str]],
    job_dir: str,
    *,
    partition: str | None = None,
    memory: str | None = None,
    walltime: str | None = None,
    cores: int | None = None,
    account: str | None = None,
) -> str:
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


def htcondor_submit_file(
    next_visit: NextVisit,
    commands: Mapping[str, Sequence[str]],
    job_dir: str,
    *,
    memory: str | None = None,
    cores: int | None = None,
) -> str:
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


def _submit_native(next_visit, scheduler, out, commands, *, partition, memory, walltime, wait,
                   dry_run, wait_timeout):  # fmt: skip
    """Write the visit's job file (``commands``: argv per CCD) and submit it unless ``dry_run``.

    ``out`` is :func:`~apdask.services.batch.submit_visit`'s record (with
    ``job_dir``), completed and returned.
    """
    submit_timeout = _positive("submit_timeout_s", None)
    if scheduler == "htcondor":
        return _submit_htcondor(next_visit, out, commands, memory=memory, dry_run=dry_run,
                                submit_timeout=submit_timeout)  # fmt: skip
    return _submit_slurm(next_visit, out, commands, partition=partition, memory=memory,
                         walltime=walltime, wait=wait, dry_run=dry_run,
                         wait_timeout=wait_timeout, submit_timeout=submit_timeout)  # fmt: skip


def _submit_htcondor(next_visit, out, commands, *, memory, dry_run, submit_timeout):
    """One HTCondor submit description for the visit, given to ``condor_submit``."""
    job_dir = out["job_dir"]
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


def _submit_slurm(next_visit, out, commands, *, partition, memory, walltime, wait, dry_run,
                  wait_timeout, submit_timeout):  # fmt: skip
    """One ``sbatch --array`` script for the visit; with ``wait``, the CCDs' results."""
    job_dir = out["job_dir"]
    names = list(commands)
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
