"""Dynamic mode (DMTN-092 §2.2): turn nextVisit events from Kafka into running visits.

:func:`listen` consumes nextVisit JSON messages (``docs/formats.md``) from a Kafka
topic and, for each new visit, immediately submits the per-CCD graphs of
:func:`apdask.pipeline.graph.build_visit_graph` to a Dask cluster with ``client.compute``.
It does not wait for the result, so several visits can be in flight.  Inside the
graph each CCD's prefetch (templates, calibrations, PPDB history) runs at once,
while its fetch task blocks on the distributor until the image is registered;
blocked fetches leave the worker's thread pool (``distributed.secede``), so they
hold no thread.

* A message that is not valid JSON, or not a valid nextVisit (unknown CCD or
  camera, missing field, bad coordinates...), is logged with its partition and
  offset and the reason, and skipped: the listener keeps running.
* A nextVisit whose ``groupId`` was already accepted is logged and ignored, so a
  duplicate announcement is processed once.  CCDs whose PPDB rows and alert file
  already exist are skipped too (see :func:`apdask.pipeline.run.pending_detectors`), which
  makes a restarted listener safe.
* A message larger than ``apdask.listen.max_message_bytes`` (1 MiB) is rejected
  unparsed.  Pending-CCD check plus graph build of one visit are bounded by
  ``apdask.listen.build_timeout_s``; a visit over it fails, the listener goes on.
* SIGTERM or SIGINT stops reading; visits in flight get ``apdask.listen.stop_grace_s``
  to finish, then they are cancelled and reported under ``abandoned`` (a second
  signal abandons them at once); the exit status is then 75.  No further task of an
  abandoned visit starts; one already running on a worker is not interrupted (see
  docs/operations.md, "Stopping").
* Partitions are ``assign()``-ed rather than joined through a consumer group:
  a group join takes about 20 s on some brokers, longer than the nextVisit lead.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaException, TopicPartition

from apdask.config import ListenConfig, get
from apdask.core.files import atomic_write
from apdask.exceptions import ApdaskError, ConfigurationError, UsageError
from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, pending_detectors, worker_addresses
from apdask.services._listen_cluster import check_cluster, listen_cluster
from apdask.services._listen_stop import StopRequest, install_signals

if TYPE_CHECKING:  # for annotations only: importing them here would load the pipeline
    from distributed import Client

    from apdask.pipeline.nextvisit import NextVisit

__all__ = ["listen", "parse_next_visit"]

log = logging.getLogger(__name__)

_SEEN_MAX = 100_000  # groupIds remembered for de-duplication


def parse_next_visit(value: bytes | str | None, max_bytes: int | None = None) -> NextVisit:
    """Decode one nextVisit message.

    Parameters
    ----------
    value : bytes or str
        The Kafka message value: a JSON object (``docs/formats.md``).
    max_bytes : int, optional
        Larger messages are rejected before they are decoded; default
        ``apdask.listen.max_message_bytes`` (1 MiB).

    Returns
    -------
    apdask.pipeline.nextvisit.NextVisit

    Raises
    ------
    apdask.exceptions.UsageError
        Too large, empty, not UTF-8, not JSON, not an object, or a field is missing or
        malformed (a ``ValueError`` too).
    apdask.exceptions.ApdaskError
        Unknown camera or CCD, bad coordinates or filter.
    """
    if value is None:
        raise UsageError("empty message; a nextVisit is a JSON object")
    data = value if isinstance(value, bytes | bytearray) else str(value).encode("utf-8", "replace")
    limit = ListenConfig.resolve(max_message_bytes=max_bytes).max_message_bytes
    if len(data) > limit:
        msg = (
            f"message of {len(data)} bytes exceeds apdask.listen.max_message_bytes = {limit}; "
            "a nextVisit is a small JSON object (raise the limit with --set "
            "listen.max_message_bytes=N only for a trusted producer)"
        )
        raise UsageError(msg)
    try:
        d = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, 4300+ digits, nesting
        text = str(exc)
        text = text if len(text) <= 120 else text[:119] + "…"
        raise UsageError(f"not valid JSON ({text}); a nextVisit is a JSON object") from None
    return NextVisit.from_dict(d)


def _consumer(kafka, group_id):
    return Consumer(
        {
            "bootstrap.servers": kafka,
            "group.id": group_id,
            "enable.auto.commit": False,
            "enable.partition.eof": False,
        }
    )


def _assign(consumer, topic, offset, wait):
    """Assign every partition of ``topic``, waiting up to ``wait`` s for it to exist."""
    start = {"earliest": OFFSET_BEGINNING, "latest": OFFSET_END}.get(offset)
    if start is None:
        raise ValueError(f"offset must be earliest or latest, got {offset!r}")
    deadline = time.monotonic() + wait
    while True:
        try:
            md = consumer.list_topics(topic, timeout=5.0)
            tmd = md.topics.get(topic)
            if tmd is not None and tmd.error is None and tmd.partitions:
                parts = sorted(tmd.partitions)
                consumer.assign([TopicPartition(topic, p, start) for p in parts])
                return parts
            problem = f"topic {topic!r} does not exist"
        except KafkaException as exc:
            problem = f"broker unreachable ({exc})"
        if time.monotonic() >= deadline:
            msg = (
                f"cannot read nextVisit topic {topic!r}: {problem}; create the topic or "
                "check --kafka HOST:PORT"
            )
            raise ConfigurationError(msg)
        log.warning("waiting for nextVisit topic %r: %s", topic, problem)
        time.sleep(1.0)


def _write_report(repo, report):
    path = os.path.join(repo, "visit-reports", f"visit_{report['visit']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(report, indent=1, default=str))
    return path


class _AbandonedError(Exception):
    """The stop grace ran out while a visit's graph was being built."""


class _Listener:
    """State of one listening session (see :func:`listen`)."""

    def __init__(self, client, stop, cfg, **kw):
        self.client = client
        self.stop = stop
        self.cfg = cfg
        self.kw = kw  # repo, ppdb, alerts, distributor, timeout
        self.seen = OrderedDict()
        self.inflight = {}
        self.summary: dict[str, list[Any]] = {
            "accepted": [],
            "duplicates": [],
            "rejected": [],
            "done": [],
            "failed": [],
            "abandoned": [],
        }

    def handle(self, msg):
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        try:
            nv = parse_next_visit(msg.value(), self.cfg.max_message_bytes)
        except (ValueError, ApdaskError) as exc:
            log.error("rejected nextVisit at %s: %s; the listener keeps running", where, exc)
            self.summary["rejected"].append({"at": where, "error": str(exc)})
            return
        if nv.groupId in self.seen:
            log.warning(
                "duplicate nextVisit groupId=%s at %s ignored (first seen at %s)",
                nv.groupId,
                where,
                self.seen[nv.groupId],
            )
            self.summary["duplicates"].append(nv.groupId)
            return
        self.seen[nv.groupId] = where
        while len(self.seen) > _SEEN_MAX:
            self.seen.popitem(last=False)
        self.summary["accepted"].append(nv.groupId)
        self.submit(nv)

    def _checker(self, nv):
        """The build's time bound: ``build_timeout_s`` and the stop grace."""
        limit = self.cfg.build_timeout_s
        deadline = time.monotonic() + limit

        def check():
            if self.stop.expired():
                raise _AbandonedError("the stop grace ran out while its graph was built")
            if time.monotonic() > deadline:
                msg = (
                    f"checking its CCDs and building its graph took more than "
                    f"apdask.listen.build_timeout_s = {limit:g} s ({len(nv.detectors)} CCDs); "
                    "raise it with --set listen.build_timeout_s=S or give the listener a "
                    "faster machine"
                )
                raise TimeoutError(msg)

        return check

    def submit(self, nv):
        t0 = time.time()
        kw = self.kw
        check = self._checker(nv)
        try:
            pending = pending_detectors(nv, kw["ppdb"], kw["alerts"], repo=kw.get("repo"))
            check()
            workers = worker_addresses(self.client)  # each CCD's chain stays on one
            graph = build_visit_graph(nv, **kw, detectors=pending, check=check, workers=workers)
            check()
        except _AbandonedError as exc:
            self._abandoned(nv, str(exc))
            return
        except (ApdaskError, ValueError, OSError) as exc:  # TimeoutError is an OSError
            log.error("visit %s (groupId %s) not started: %s", nv.visit, nv.groupId, exc)
            self.summary["failed"].append(
                {"groupId": nv.groupId, "visit": nv.visit, "error": str(exc)}
            )
            return
        if not pending:
            log.info("visit %s (groupId %s) already processed; nothing to do", nv.visit, nv.groupId)
            self.summary["done"].append(
                {
                    "groupId": nv.groupId,
                    "visit": nv.visit,
                    "n_alerts": 0,
                    "skipped": list(nv.detectors),
                }
            )
            return
        future = self.client.compute(graph)
        self.inflight[nv.groupId] = (nv, future, t0)
        log.info(
            "visit %s (groupId %s): %d CCD graphs submitted %.3f s after the nextVisit arrived",
            nv.visit,
            nv.groupId,
            len(pending),
            time.time() - t0,
        )

    def _abandoned(self, nv, reason):
        log.error(
            "visit %s (groupId %s) abandoned: %s; re-run it with `apdask process-visit "
            "--next-visit FILE` (its nextVisit is in the summary)",
            nv.visit,
            nv.groupId,
            reason,
        )
        self.summary["abandoned"].append(
            {"groupId": nv.groupId, "visit": nv.visit, "reason": reason, "nextVisit": nv.to_dict()}
        )

    def abandon(self):
        """Cancel every visit in flight (the stop grace ran out)."""
        for gid in list(self.inflight):
            nv, future, _ = self.inflight.pop(gid)
            future.cancel()
            why = "the stop grace (apdask.listen.stop_grace_s) ran out before it finished"
            self._abandoned(nv, why if not self.stop.now else "stopped by a second signal")

    def reap(self):
        for gid in [g for g, (_, f, _) in self.inflight.items() if f.done()]:
            nv, future, t0 = self.inflight.pop(gid)
            try:
                report = future.result()
            except Exception as exc:  # noqa: BLE001 - any task error fails this visit only
                log.error(
                    "visit %s (groupId %s) failed: %s: %s", nv.visit, gid, type(exc).__name__, exc
                )
                err = f"{type(exc).__name__}: {exc}"
                self.summary["failed"].append({"groupId": gid, "visit": nv.visit, "error": err})
                continue
            finally:
                future.release()
            report["nextvisit_to_done_s"] = time.time() - t0
            path = _write_report(self.kw["repo"], report)
            log.info(
                "visit %s (groupId %s) done: %d alerts from %d CCDs, %.1f s after "
                "nextVisit; report %s",
                nv.visit,
                gid,
                report["n_alerts"],
                len(report["ccds"]),
                report["nextvisit_to_done_s"],
                path,
            )
            self.summary["done"].append(
                {
                    "groupId": gid,
                    "visit": nv.visit,
                    "n_alerts": report["n_alerts"],
                    "nextvisit_to_done_s": report["nextvisit_to_done_s"],
                    "report": path,
                    "failed_ccds": list(report.get("failed", [])),
                }
            )

    @property
    def finished(self):
        return len(self.summary["done"]) + len(self.summary["failed"])


def listen(
    kafka: str,
    topic: str,
    *,
    repo: str | None = None,
    ppdb: str | None = None,
    alerts: str | None = None,
    distributor: str | None = None,
    timeout: float | None = None,
    client: Client | None = None,
    workers: int = 2,
    max_visits: int | None = None,
    idle_exit: float | None = None,
    offset: str | None = None,
    poll_interval: float = 0.2,
    topic_wait: float = 60.0,
    stop_event: threading.Event | None = None,
    max_message_bytes: int | None = None,
    build_timeout: float | None = None,
    stop_grace: float | None = None,
    cluster: str = "local",
    cluster_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Consume nextVisit events and run each new visit on a Dask cluster.

    Parameters
    ----------
    kafka : str
        Bootstrap servers, ``HOST:PORT``.
    topic : str
        The nextVisit topic; all its partitions are assigned.
    repo, ppdb, alerts, distributor, timeout
        As for :func:`apdask.pipeline.run.run_visit`; ``repo`` is required and the PPDB is
        created up front if it does not exist.
    client : distributed.Client, optional
        Cluster to run on; default the listener's own (``cluster``).
    max_visits : int, optional
        Return once this many accepted visits have finished (done or failed).
    idle_exit : float, optional
        Return after this many seconds without a message and with nothing in flight.
    offset : {"latest", "earliest"}, optional
        Where to start reading; default ``apdask.listen.offset`` (``latest``).
    poll_interval : float, optional
        Seconds each ``poll`` waits.
    topic_wait : float, optional
        Seconds to wait for the topic to exist before giving up.
    stop_event : threading.Event, optional
        Set it to stop the listener (SIGTERM and SIGINT do the same when it runs
        in the main thread).  In-flight visits are waited for, up to ``stop_grace``.
    max_message_bytes : int, optional
        Larger messages are rejected unparsed; default ``apdask.listen.max_message_bytes``.
    build_timeout : float, optional
        Seconds one visit's pending-CCD check and graph build may take, else that visit
        fails; default ``apdask.listen.build_timeout_s``.
    stop_grace : float, optional
        Seconds the visits in flight get after a stop request, then they are cancelled
        and listed under ``abandoned``; default ``apdask.listen.stop_grace_s``.
    cluster : {"local", "slurm", "htcondor"}, optional
        Without ``client``: ``local``, a LocalCluster of ``workers`` processes; else a
        warm, adaptive dask-jobqueue pool of ``apdask.submit.minimum_jobs`` to
        ``maximum_jobs`` worker jobs on the operator's ``jobqueue.yaml``, started before
        the first message is read and kept between visits
        (:func:`apdask.services.batch.jobqueue_pool`).
    cluster_options : dict, optional
        The pool's ``partition``, ``memory``, ``walltime`` and ``scheduler_host``.

    Returns
    -------
    dict
        ``accepted``, ``duplicates`` (groupIds), ``rejected`` (position and error of
        each bad message), ``done`` (per visit: groupId, visit, n_alerts, seconds from
        nextVisit to the last CCD, report path), ``failed`` and ``abandoned`` (groupId,
        visit, reason and the nextVisit, to re-run it with ``process-visit``).

    Raises
    ------
    ConfigurationError
        No repository, the topic does not appear within ``topic_wait``, or an
        ``apdask.listen.*`` or pool ``apdask.submit.*`` setting out of range.
    JobSubmissionError, ClusterTimeoutError
        The pool's first worker jobs were refused, or none started in time.
    """
    cfg = ListenConfig.resolve(
        offset=offset,
        max_message_bytes=max_message_bytes,
        build_timeout_s=build_timeout,
        stop_grace_s=stop_grace,
    )
    repo = _checked_repo(get("repo", repo), max_visits, idle_exit)
    pool = check_cluster(cluster, client, cluster_options)
    ppdb = ensure_ppdb(repo, ppdb)
    alerts = get("alerts.sink", alerts) or f"file://{repo}/alerts"
    stop = StopRequest(stop_event or threading.Event(), cfg.stop_grace_s)
    restore = install_signals(stop)
    consumer = _consumer(kafka, cfg.group_id)
    own = None
    try:
        if client is None:  # first: "listening on" means ready to run visits
            own = listen_cluster(cluster, pool, workers=workers, repo=repo,
                                 options=cluster_options)  # fmt: skip
            client = own.__enter__()
        parts = _assign(consumer, topic, cfg.offset, topic_wait)
        log.info("listening on %s topic %s partitions %s from %s", kafka, topic, parts, cfg.offset)
        state = _Listener(
            client, stop, cfg, repo=repo, ppdb=ppdb, alerts=alerts, distributor=distributor,
            timeout=timeout,
        )  # fmt: skip
        _poll_loop(consumer, state, poll_interval, max_visits, idle_exit)
        return state.summary
    finally:
        consumer.close()
        if own is not None:
            own.__exit__(None, None, None)
        restore()


def _checked_repo(repo: str | None, max_visits: int | None, idle_exit: float | None) -> str:
    """The absolute repository path, after checking it and the exit conditions."""
    if repo is None or not os.path.isdir(os.path.join(repo, "butler.zarr")):
        msg = f"no Butler repository at {repo}; pass --repo DIR (made by `apdask simulate`)"
        raise ConfigurationError(msg)
    if max_visits is not None and max_visits < 1:
        raise UsageError(f"--max-visits must be >= 1, got {max_visits}")
    if idle_exit is not None and not (0 < idle_exit < float("inf")):
        raise UsageError(f"--idle-exit must be a finite number of seconds > 0, got {idle_exit}")
    return os.path.abspath(repo)


def _poll_loop(
    consumer: Any,
    state: _Listener,
    poll_interval: float,
    max_visits: int | None,
    idle_exit: float | None,
) -> None:
    """Hand messages to ``state`` until stopped, done or idle (see :func:`listen`)."""
    stop = state.stop
    last = time.monotonic()
    while True:
        msg = None if stop.requested else consumer.poll(poll_interval)
        if msg is not None:
            if msg.error():
                log.warning("Kafka: %s", msg.error())
            else:
                last = time.monotonic()
                state.handle(msg)
        state.reap()
        if state.inflight:
            if stop.expired():
                state.abandon()
                return
            if stop.requested:
                time.sleep(poll_interval)
            continue
        if stop.requested:
            return
        if max_visits is not None and state.finished >= max_visits:
            return
        if idle_exit is not None and time.monotonic() - last > idle_exit:
            log.info("no nextVisit for %.0f s and nothing in flight; exiting", idle_exit)
            return
