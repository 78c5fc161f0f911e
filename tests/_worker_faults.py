"""A Dask worker preload that loses its worker at a chosen point of a visit (fault tests).

Loaded with ``--preload tests._worker_faults`` (``jobqueue.<scheduler>.worker-extra-args``)
or ``distributed.worker.preload``; it does nothing unless ``APDASK_FAULT_MODE`` is set.
The first time, over all workers, that a task whose key starts with
``APDASK_FAULT_KEY`` (default ``store-``: the CCD's PPDB transaction) finishes, its
worker is lost *before it can tell the scheduler*: the plugin's ``transition`` hook runs
inside the worker's state machine, ahead of the task-finished message.  So the PPDB
rows are committed and the alerts are not yet written, the worst point for a rerun.

``APDASK_FAULT_MODE``
    ``sigkill``: SIGKILL to the worker process (its nanny starts a new one);
    ``scancel``: ``scancel $SLURM_JOB_ID`` of the worker's own job, then the worker
    blocks until SLURM ends it (SIGTERM, SIGKILL after ``KillWait``).
``APDASK_FAULT_MARK``
    A file created with ``O_EXCL`` by the one worker that acts (so it happens once);
    it records the key, the mode, the pid and the SLURM job id.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from distributed import WorkerPlugin

MODES = ("sigkill", "scancel")


class LoseWorker(WorkerPlugin):
    """Lose this worker once a ``key_prefix`` task finishes, once over all workers."""

    def __init__(self, mode: str, mark: str, key_prefix: str = "store-"):
        if mode not in MODES:
            raise ValueError(f"APDASK_FAULT_MODE must be one of {MODES}, got {mode!r}")
        self.mode, self.mark, self.key_prefix = mode, mark, key_prefix

    def transition(self, key, start, finish, **kwargs):
        if finish != "memory" or not str(key).startswith(self.key_prefix):
            return
        try:
            fd = os.open(self.mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:  # another worker acted already
            return
        job = os.environ.get("SLURM_JOB_ID")
        with os.fdopen(fd, "w") as f:
            json.dump({"key": str(key), "mode": self.mode, "pid": os.getpid(), "job": job}, f)
        if self.mode == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        if job is None:
            raise RuntimeError("APDASK_FAULT_MODE=scancel needs a SLURM job")
        subprocess.run(["scancel", job], check=False, timeout=60)
        time.sleep(600)  # hold the worker (and its result) until SLURM ends the job


async def dask_setup(worker):
    """Install :class:`LoseWorker` when ``APDASK_FAULT_MODE`` is set."""
    mode = os.environ.get("APDASK_FAULT_MODE")
    if mode:
        plugin = LoseWorker(mode, os.environ["APDASK_FAULT_MARK"],
                            os.environ.get("APDASK_FAULT_KEY", "store-"))  # fmt: skip
        await worker.plugin_add(plugin, name="apdask-lose-worker")
