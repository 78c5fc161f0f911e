"""Resources of the batch jobs, shared by both routes of :mod:`apdask.services.batch`.

The operator's ``jobqueue.yaml`` (``jobqueue.<scheduler>.*``) first, apdask's
``apdask.submit.*`` fallbacks second (:func:`job_settings`); the SLURM and
HTCondor memory units; the checks and the job-file write both routes make.
Re-exported by :mod:`apdask.services.batch`.
"""

from __future__ import annotations

import logging
import math
import shutil
from typing import Any

import dask.config
from dask.utils import parse_bytes

from apdask import config
from apdask.core.files import atomic_write
from apdask.exceptions import ConfigurationError

log = logging.getLogger("apdask.cluster")

SCHEDULERS = ("slurm", "htcondor")
VIAS = ("native", "jobqueue")


def _mem_mb(memory):
    """HTCondor ``request_memory`` (MiB, rounded down), as dask-jobqueue's HTCondor jobs."""
    return max(1, int(parse_bytes(str(memory)) // 2**20))


def slurm_memory(memory: str | int) -> str:
    """SLURM ``--mem`` value of ``memory``, exactly as dask-jobqueue writes it.

    Rounded up to whole GiB, else MiB or KiB (``4GB`` -> ``4G``, ``2.5GiB`` ->
    ``3G``, ``500MB`` -> ``477M``), so that both routes of ``apdask submit`` ask
    SLURM for the same memory.
    """
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


def job_settings(scheduler: str, **explicit: Any) -> dict[str, tuple[Any, str]]:
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


def _need(binary, scheduler, path):
    if shutil.which(binary) is None:
        msg = (f"{binary} is not on PATH, so nothing was submitted to {scheduler}; the job "
               f"file is {path}: submit it where {scheduler} runs, or pass --dry-run")  # fmt: skip
        raise ConfigurationError(msg)
