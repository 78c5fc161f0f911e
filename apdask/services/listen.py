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
* Partitions are ``assign()``-ed rather than joined through a consumer group:
  a group join takes about 20 s on some brokers, longer than the nextVisit lead.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from apdask import config
from apdask.core.files import atomic_write
from apdask.exceptions import ApdaskError, ConfigurationError

if TYPE_CHECKING:  # for annotations only: importing them here would load the pipeline
    from distributed import Client

    from apdask.pipeline.nextvisit import NextVisit

__all__ = ["listen", "parse_next_visit"]

log = logging.getLogger(__name__)

_SEEN_MAX = 100_000  # groupIds remembered for de-duplication


def parse_next_visit(value: bytes | str) -> NextVisit:
    """Decode one nextVisit message.

    Parameters
    ----------
    value : bytes or str
        The Kafka message value: a JSON object (``docs/formats.md``).

    Returns
    -------
    apdask.pipeline.nextvisit.NextVisit

    Raises
    ------
    ValueError
        Not UTF-8, not JSON, not an object, or a field is missing or malformed.
    apdask.exceptions.ApdaskError
        Unknown camera or CCD, bad coordinates or filter.
    """
    from apdask.pipeline.nextvisit import NextVisit

    if value is None:
        raise ValueError("empty message; a nextVisit is a JSON object")
    try:
        text = value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)
        d = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not valid JSON ({exc}); a nextVisit is a JSON object") from None
    if not isinstance(d, dict):
        raise ValueError(f"a nextVisit is a JSON object, got {type(d).__name__}")
    try:
        return NextVisit.from_dict(d)
    except ApdaskError:
        raise
    except (TypeError, KeyError, IndexError) as exc:
        raise ValueError(f"malformed field ({exc!r}); see docs/formats.md") from None


def _consumer(kafka, group_id):
    from confluent_kafka import Consumer

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
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, KafkaException, TopicPartition

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


class _Listener:
    """State of one listening session (see :func:`listen`)."""

    def __init__(self, client, *, repo, ppdb, alerts, distributor, timeout):
        self.client = client
        self.kw = {
            "repo": repo,
            "ppdb": ppdb,
            "alerts": alerts,
            "distributor": distributor,
            "timeout": timeout,
        }
        self.seen = OrderedDict()
        self.inflight = {}
        self.summary: dict[str, list[Any]] = {
            "accepted": [],
            "duplicates": [],
            "rejected": [],
            "done": [],
            "failed": [],
        }

    def handle(self, msg):
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        try:
            nv = parse_next_visit(msg.value())
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

    def submit(self, nv):
        from apdask.pipeline.graph import build_visit_graph
        from apdask.pipeline.run import pending_detectors

        t0 = time.time()
        kw = self.kw
        try:
            pending = pending_detectors(nv, kw["ppdb"], kw["alerts"])
            graph = build_visit_graph(
                nv,
                repo=kw["repo"],
                ppdb=kw["ppdb"],
                alerts=kw["alerts"],
                distributor=kw["distributor"],
                timeout=kw["timeout"],
                detectors=pending,
            )
        except (ApdaskError, ValueError, OSError) as exc:
            log.error("visit %s (groupId %s) not started: %s", nv.visit, nv.groupId, exc)
            self.summary["failed"].append({"groupId": nv.groupId, "error": str(exc)})
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
        Cluster to run on; default a LocalCluster of ``workers`` processes.
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
        in the main thread).  In-flight visits are waited for.

    Returns
    -------
    dict
        ``accepted``, ``duplicates`` (groupIds), ``rejected`` (position and error of
        each bad message), ``done`` (per visit: groupId, visit, n_alerts, seconds from
        nextVisit to the last CCD, report path) and ``failed``.

    Raises
    ------
    ConfigurationError
        No repository, or the topic does not appear within ``topic_wait``.
    """
    from apdask.pipeline.run import ensure_ppdb

    repo = _checked_repo(config.get("repo", repo), max_visits, idle_exit)
    ppdb = ensure_ppdb(repo, ppdb)
    alerts = config.get("alerts.sink", alerts) or f"file://{repo}/alerts"
    offset = config.get("listen.offset", offset)
    stop = stop_event or threading.Event()
    restore = _install_signals(stop)
    consumer = _consumer(kafka, config.get("listen.group_id"))
    own = None
    try:
        parts = _assign(consumer, topic, offset, topic_wait)
        log.info("listening on %s topic %s partitions %s from %s", kafka, topic, parts, offset)
        if client is None:
            from apdask.services.batch import open_client

            own = open_client(n_workers=workers)
            client = own.__enter__()
        state = _Listener(
            client, repo=repo, ppdb=ppdb, alerts=alerts, distributor=distributor, timeout=timeout
        )
        _poll_loop(consumer, state, stop, poll_interval, max_visits, idle_exit)
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
        raise ValueError(f"--max-visits must be >= 1, got {max_visits}")
    if idle_exit is not None and not idle_exit > 0:
        raise ValueError(f"--idle-exit must be > 0 seconds, got {idle_exit}")
    return os.path.abspath(repo)


def _poll_loop(
    consumer: Any,
    state: _Listener,
    stop: threading.Event,
    poll_interval: float,
    max_visits: int | None,
    idle_exit: float | None,
) -> None:
    """Hand messages to ``state`` until stopped, done or idle (see :func:`listen`)."""
    last = time.monotonic()
    while True:
        msg = None if stop.is_set() else consumer.poll(poll_interval)
        if msg is not None:
            if msg.error():
                log.warning("Kafka: %s", msg.error())
            else:
                last = time.monotonic()
                state.handle(msg)
        state.reap()
        if state.inflight:
            if stop.is_set():
                time.sleep(poll_interval)
            continue
        if stop.is_set():
            return
        if max_visits is not None and state.finished >= max_visits:
            return
        if idle_exit is not None and time.monotonic() - last > idle_exit:
            log.info("no nextVisit for %.0f s and nothing in flight; exiting", idle_exit)
            return


def _install_signals(stop):
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, _frame):
        log.warning("signal %d: finishing the visits in flight, then exiting", signum)
        stop.set()

    for s in old:
        signal.signal(s, handler)

    def restore():
        for s, h in old.items():
            signal.signal(s, h)

    return restore
