"""Running visit graphs: the driver shared by ``process-ccd``, ``process-visit`` and ``demo``.

The driver is an I/O edge: it decides which CCDs still need processing (a CCD that
is done, its rows committed and its alerts delivered, is skipped, so re-running is
safe; :func:`pending_detectors`), builds the graph with
:func:`apdask.pipeline.graph.build_visit_graph`, computes it on a scheduler and collects
per-stage timings from the task stream.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import dask
from dask.delayed import Delayed
from dask.utils import key_split

from apdask import config, exceptions
from apdask.alerts.sinks import sink_from_uri
from apdask.config import Locations, PipelineConfig
from apdask.core.memory import keep_freed_memory
from apdask.exceptions import ConfigurationError, WorkerLostError
from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.warm import warm_plugin
from apdask.ppdb import Ppdb, create_ppdb

if TYPE_CHECKING:  # for annotations only: distributed costs ~0.6 s of import
    from distributed import Client

__all__ = [
    "ccd_done",
    "ensure_ppdb",
    "local_cluster",
    "pending_detectors",
    "run_visit",
    "worker_addresses",
]


def ensure_ppdb(repo: str | None = None, ppdb: str | None = None) -> str:
    """Return the PPDB config path, creating an SQLite PPDB under the repo if needed."""
    ppdb = config.get("ppdb.url", ppdb)
    if ppdb:
        return ppdb
    repo = Locations.resolve(repo).repo
    path = os.path.join(repo, "ppdb")
    os.makedirs(path, exist_ok=True)
    cfg_file = os.path.join(path, "apdb.yaml")
    if not os.path.exists(cfg_file):
        create_ppdb(f"sqlite:///{os.path.join(path, 'apdb.db')}", cfg_file)
    return cfg_file


def pending_detectors(
    next_visit: NextVisit, ppdb: str, sink_uri: str, *, repo: str | None = None
) -> list[str]:
    """CCDs of a visit that are not done: processing them again is what is left to do.

    A CCD is done when the sink holds its done record (written after its PPDB rows
    were committed and its alerts delivered, durably spooled or written; see
    :mod:`apdask.alerts.done`) and the PPDB holds its rows (a CCD without alerts
    needs none).  A CCD stored by a run that then crashed is pending: re-running it
    re-sends its alerts from the stored rows without storing them again.

    Parameters
    ----------
    next_visit : apdask.pipeline.nextvisit.NextVisit
    ppdb : str
        The PPDB (config file or URL).
    sink_uri : str
        The alert sink, as the graph gets it (:class:`apdask.config.Locations`).
    repo : str, optional
        The repository, to find the default spool (and with it the done records) of a
        ``kafka://`` URI that names no ``spool_dir``; default ``apdask.repo``.

    Returns
    -------
    list of str
        The pending CCDs' names, in the visit's order.
    """
    if str(sink_uri).startswith("kafka://") and "spool_dir=" not in str(sink_uri):
        with contextlib.suppress(ConfigurationError):  # no repository: the sink's default
            sink_uri = Locations.resolve(repo, ppdb=ppdb, alerts=sink_uri).alerts
    db = Ppdb.open(ppdb, cache=True)  # the schema parse (~1 s) once per process, not per visit
    sink = sink_from_uri(sink_uri)
    todo = []
    try:
        for name in next_visit.detectors:
            if not ccd_done(sink, db, next_visit.visit, next_visit.camera[name].id):
                todo.append(name)
    finally:
        sink.close()
    return todo


def ccd_done(sink: Any, db: Ppdb, visit: int, detector: int) -> bool:
    """Whether one CCD of a visit is done: nothing is left to store or to send.

    Done means the sink holds the CCD's done record (written after its rows were
    committed and its alerts delivered, spooled or written) and the PPDB holds its
    rows (a CCD without alerts needs none).  Shared by :func:`pending_detectors` and
    ``apdask diff --ppdb``.

    Parameters
    ----------
    sink : apdask.alerts.sinks.FileSink or apdask.services.kafka.KafkaSink
        The alert sink (anything with ``is_done``).
    db : apdask.ppdb.Ppdb
    visit, detector : int

    Returns
    -------
    bool
    """
    record = sink.is_done(visit, detector)
    return record is not None and (
        record.get("n_alerts") == 0 or db.contains_visit_detector(visit, detector)
    )


@contextlib.contextmanager
def local_cluster(
    n_workers: int = 2, threads_per_worker: int = 1, memory_limit: str | float = "8GB"
) -> Iterator[Client]:
    """A distributed LocalCluster + Client, the default scheduler for visit graphs."""
    # lazy: distributed costs ~0.6 s of import, and the threaded scheduler needs none
    from distributed import Client, LocalCluster

    if logging.getLogger().getEffectiveLevel() > logging.INFO:
        # distributed gives its own loggers INFO levels; keep them as quiet as the caller
        for name in list(logging.root.manager.loggerDict):
            if name.startswith("distributed"):
                logging.getLogger(name).setLevel(logging.WARNING)
    with (
        LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            memory_limit=memory_limit,
            dashboard_address=":0",
            processes=True,
            silence_logs=logging.WARNING,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(warm_plugin())  # numba kernels loaded before the first image
        yield client


def _stage_times(task_stream):
    totals: dict[str, float] = {}
    for t in task_stream:
        name = key_split(t["key"])
        for start_stop in t.get("startstops", ()):
            if start_stop.get("action") == "compute":
                dt = start_stop["stop"] - start_stop["start"]
                totals[name] = totals.get(name, 0.0) + dt
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def run_visit(
    next_visit: NextVisit,
    *,
    repo: str | None = None,
    ppdb: str | None = None,
    alerts: str | None = None,
    distributor: str | None = None,
    timeout: float | None = None,
    client: Client | None = None,
    detectors: Sequence[str] | None = None,
    images: Mapping[str, Sequence[str]] | None = None,
    replace: bool = False,
    config: PipelineConfig | None = None,
    result_timeout: float | None = None,
    on_ccd: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Process the pending CCDs of one visit and return its report.

    Parameters
    ----------
    next_visit : apdask.pipeline.nextvisit.NextVisit
    repo, ppdb, alerts, distributor, timeout
        As for :func:`apdask.pipeline.graph.build_visit_graph`.
    client : distributed.Client, optional
        Scheduler to run on; without one the threaded scheduler runs the graph.
    detectors : sequence of str, optional
        Restrict to these CCDs.
    images : dict, optional
        Image names per CCD name; default by the simulator's naming convention.
    replace : bool
        Re-process every wanted CCD, replacing its PPDB rows in one transaction
        (default False: CCDs that are done are skipped, see :func:`pending_detectors`).
    config : apdask.config.PipelineConfig, optional
        Stage settings, resolved once here on the driver by default.
    result_timeout : float, optional
        With ``client``: seconds to wait for the visit's result (``TimeoutError``).
    on_ccd : callable, optional
        With ``client``: called with each CCD's report entry as soon as that CCD is
        done (progress, e.g. :class:`apdask.tools.progress.VisitProgress`).

    Returns
    -------
    dict
        The visit report, with ``skipped`` CCDs listed and ``task_seconds`` per stage.
        A CCD whose template or PSF failed has ``error``, ``error_type`` and
        ``exit_code`` in its entry (and is listed in ``failed``); it wrote nothing.

    Raises
    ------
    NoTemplateCoverageError, PsfFitError
        If every processed CCD failed so (the first CCD's error; the message names it).
    WorkerLostError
        With ``client``: Dask gave a task up after its workers died under it more than
        ``distributed.scheduler.allowed-failures`` times (``KilledWorker``).
    """
    # the allocator policy before any scheduler thread allocates (one arena, kept frames)
    keep_freed_memory(enabled=None if config is None else config.keep_freed_memory)
    where = Locations.resolve(
        repo, ppdb=ensure_ppdb(repo, ppdb), alerts=alerts, distributor=distributor, timeout=timeout
    )
    ppdb, alerts = where.ppdb, where.alerts
    wanted = next_visit.detectors if detectors is None else tuple(detectors)
    if replace:
        pending = list(wanted)
    else:
        pending = [d for d in pending_detectors(next_visit, ppdb, alerts) if d in wanted]
    skipped = [d for d in wanted if d not in pending]
    t0 = time.time()
    report = {"visit": next_visit.visit, "n_alerts": 0, "ccds": []}
    stages = {}
    if pending:
        graph = build_visit_graph(
            next_visit, repo=where.repo, ppdb=ppdb, alerts=alerts, distributor=where.distributor,
            timeout=where.timeout, detectors=pending, images=images, replace=replace,
            config=config, workers=None if client is None else worker_addresses(client),
        )  # fmt: skip
        if client is None:
            report = dask.compute(graph, scheduler="threads")[0]
        else:
            # lazy: distributed costs ~0.6 s of import, and the threaded scheduler needs none
            from distributed import KilledWorker, get_task_stream

            try:
                with get_task_stream(client) as ts:
                    report = _compute_with_progress(client, graph, on_ccd, result_timeout)
            except KilledWorker as err:
                raise _worker_lost(next_visit, err) from None
            stages = _stage_times(ts.data)
    report["skipped"] = skipped
    report["wall_s"] = time.time() - t0
    report["task_seconds"] = stages
    _raise_if_all_failed(report)
    return report


def worker_addresses(client: Client) -> list[str]:
    """The client's workers now, sorted: each CCD's chain prefers one of them
    (:func:`apdask.pipeline.graph.build_visit_graph`)."""
    return sorted(client.scheduler_info(n_workers=-1).get("workers", {}))


def _compute_with_progress(client, graph, on_ccd, timeout):
    """The visit report; ``on_ccd`` sees each CCD's entry as it completes.

    The CCDs' report tasks are part of the visit graph: asking for them too adds no
    work, only futures to wait on.
    """
    if on_ccd is None:
        return client.compute(graph).result(timeout=timeout)
    from distributed import as_completed  # lazy: distributed costs ~0.6 s of import

    keys = [k for k in graph.dask if isinstance(k, str) and k.startswith("report-")]
    futures = client.compute([graph, *(Delayed(k, graph.dask) for k in keys)])
    deadline = None if timeout is None else time.monotonic() + timeout
    for fut in as_completed(futures[1:], timeout=timeout):
        on_ccd(fut.result())
    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
    return futures[0].result(timeout=left)


def _worker_lost(next_visit, err):
    """The :class:`~apdask.exceptions.WorkerLostError` of a visit given up by Dask."""
    key = getattr(err, "task", None) or (err.args[0] if err.args else "?")
    limit = getattr(err, "allowed_failures", None)
    if limit is None:
        limit = dask.config.get("distributed.scheduler.allowed-failures")
    msg = (f"visit {next_visit.visit}: Dask workers died while running {key} more than "
           f"distributed.scheduler.allowed-failures = {limit} times, so the visit was given "
           "up; re-run it (apdask process-visit or submit with the same nextVisit): the CCDs "
           "already stored and delivered are skipped, a CCD stored without its alerts gets "
           "them")  # fmt: skip
    return WorkerLostError(msg)


def _raise_if_all_failed(report):
    """A visit of which no CCD could be processed is an error: raise the first CCD's.

    Failed CCDs of a visit whose other CCDs were processed are only reported (and
    logged), so one CCD without a template does not cost the visit its alerts.
    """
    ccds = report.get("ccds", [])
    failed = [c for c in ccds if c.get("error_type")]
    if not ccds or len(failed) < len(ccds):
        return
    cls = getattr(exceptions, failed[0]["error_type"], exceptions.ApdaskError)
    if not (isinstance(cls, type) and issubclass(cls, exceptions.ApdaskError)):
        cls = exceptions.ApdaskError
    msg = failed[0]["error"]
    if len(failed) > 1:
        others = ", ".join(f"{c['detector']} ({c['error_type']})" for c in failed[1:])
        msg += f"; no CCD of the visit was processed, also failed: {others}"
    raise cls(msg)
