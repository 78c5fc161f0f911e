"""Where ``apdask listen`` runs its visits: its own LocalCluster, or a warm jobqueue pool.

``--cluster local`` (the default) starts a LocalCluster of ``--workers`` processes;
``--cluster slurm`` / ``htcondor`` starts a long-lived adaptive dask-jobqueue pool on
the operator's ``jobqueue.yaml`` (:func:`apdask.services.batch.jobqueue_pool`) that
serves every visit, so each nextVisit's prefetch starts on running workers.  Both are
checked before the listener connects to Kafka.  See :func:`apdask.services.listen.listen`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

from apdask.exceptions import UsageError
from apdask.services.batch import PoolSize, jobqueue_pool, open_client

__all__ = ["CLUSTERS", "check_cluster", "listen_cluster"]

CLUSTERS = ("local", "slurm", "htcondor")
_FLAGS = {"partition": "--partition", "memory": "--mem", "walltime": "--walltime",
          "scheduler_host": "--scheduler-host"}  # fmt: skip
_OPTIONS = tuple(_FLAGS)


def check_cluster(cluster: str, client: Any, options: Mapping[str, Any] | None) -> PoolSize | None:
    """The pool's size for ``cluster`` (None for ``local``), checked before anything starts.

    Raises
    ------
    UsageError
        An unknown cluster, a pool together with ``client`` (``--scheduler-address``),
        an unknown pool option, or a pool option with ``local``.
    ConfigurationError
        A bad ``apdask.submit.*`` pool setting (:class:`~apdask.services.batch.PoolSize`).
    """
    if cluster not in CLUSTERS:
        raise UsageError(f"unknown cluster {cluster!r}; use --cluster {' | '.join(CLUSTERS)}")
    unknown = sorted(set(options or {}) - set(_OPTIONS))
    if unknown:
        raise UsageError(f"unknown cluster option(s) {unknown}; use {list(_OPTIONS)}")
    if cluster == "local":
        given = [_FLAGS[k] for k, v in (options or {}).items() if v is not None]
        if given:
            msg = f"{', '.join(given)} apply only to --cluster slurm or htcondor, not local"
            raise UsageError(msg)
        return None
    if client is not None:
        msg = (f"--cluster {cluster} starts its own warm pool of worker jobs; drop "
               "--scheduler-address, or drop --cluster to use that scheduler")  # fmt: skip
        raise UsageError(msg)
    return PoolSize.resolve()


@contextlib.contextmanager
def listen_cluster(cluster: str, size: PoolSize | None, *, workers: int, repo: str,
                   options: Mapping[str, Any] | None = None):  # fmt: skip
    """A ``distributed.Client`` to the listener's own cluster (closed on exit).

    The pool's job logs go to ``<repo>/jobs/listen`` unless ``apdask.submit.job_dir`` or
    ``jobqueue.<scheduler>.log-directory`` says otherwise.
    """
    if cluster == "local":
        with open_client(n_workers=workers) as client:
            yield client
        return
    from apdask import config

    job_dir = os.path.abspath(config.get("submit.job_dir") or os.path.join(repo, "jobs", "listen"))
    with jobqueue_pool(cluster, job_dir=job_dir, size=size, **dict(options or {})) as client:
        yield client
