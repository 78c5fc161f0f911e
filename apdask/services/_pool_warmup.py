"""The warm pool's worker plugin: import the pipeline on each worker as it joins.

A fresh worker spends about 2-3 s importing the pipeline (numpy, astropy, numba
kernels, dax_apdb) inside the first task it runs; on the warm pool
(:func:`apdask.services.batch.jobqueue_pool`) that cost is paid when the worker joins,
not by the first visit.  Kept apart so that importing :mod:`apdask.services.batch`
does not import ``distributed``.
"""

from __future__ import annotations

import importlib
import logging
import time

from distributed import WorkerPlugin

__all__ = ["WarmUp"]

log = logging.getLogger("apdask.cluster")

_MODULES = ("apdask.pipeline.graph", "apdask.pipeline.run")


class WarmUp(WorkerPlugin):
    """Import the modules a visit's tasks need when the worker starts."""

    name = "apdask-warm-up"

    def setup(self, worker):
        t0 = time.monotonic()
        for module in _MODULES:
            importlib.import_module(module)
        log.info("worker %s: pipeline imported in %.1f s", worker.address, time.monotonic() - t0)
