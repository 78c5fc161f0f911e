"""Alert distribution over Kafka with zero loss: producer sink, spool, replay, consumer.

* :class:`KafkaSink` (``kafka://HOST:PORT/TOPIC``) produces one message per alert
  in the Confluent wire format (magic byte 0, big-endian int32 schema id, the
  schemaless Avro body) with an idempotent producer (``acks=all``).  All alerts
  of one CCD are produced, then one poll loop waits for every delivery report
  up to ``alerts.kafka.delivery_timeout``.
* Anything not acknowledged in time (broker down, partition unavailable,
  message too large) is appended to an fsync'd Avro spool file
  (:mod:`apdask.services.spool`); :func:`apdask.services.spool.replay_spool` delivers a spool
  later and keeps only what was not acknowledged.
* An alert larger than the producer's ``max_message_bytes`` gets its cutouts
  trimmed step by step (smaller stamps, then the template, science and
  difference cutouts dropped) until it fits; the step taken is recorded in the
  ``apdask_trimmed`` header and the sink's result.
* :mod:`apdask.services.consume` reads topics back for ``apdask alerts tail|validate``.

Key and headers follow ``alerts.kafka.conventions``:

* ``rubin`` (default), as Rubin's producer (ap_association) sends them: no key,
  and one header, ``producer_timestamp`` (Unix milliseconds, ASCII digits).
  Partitions are then chosen at random per message.
* ``apdask``: the key is the ``diaObjectId`` as an 8-byte big-endian signed
  integer (the encoding of Kafka's ``LongSerializer``; the ``diaSourceId`` when
  the source has no object), so one object's alerts stay ordered in one
  partition; headers (ASCII) ``visit``, ``detector``, ``schema_id`` and
  ``produce_time`` (Unix seconds).

Either way a trimmed alert also carries ``apdask_trimmed``.  Partitioner:
``murmur2_random``, the Java client's.

Credentials come only from ``APDASK_KAFKA_USERNAME`` / ``APDASK_KAFKA_PASSWORD``
(with ``APDASK_KAFKA_SASL_MECHANISM``, default ``SCRAM-SHA-512``, and
``APDASK_KAFKA_SECURITY_PROTOCOL``, default ``SASL_SSL``); they are never
logged or shown in ``repr``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from apdask import config
from apdask.alerts.done import AckJournal, DoneRecords
from apdask.alerts.packets import EncodedAlert, encode_alert
from apdask.alerts.schema import load_schema, schema_id_of
from apdask.alerts.sinks import SinkResult, check_room
from apdask.alerts.wire import CONFLUENT_HEADER
from apdask.core.faults import fault_point
from apdask.exceptions import ConfigurationError
from apdask.services._kafka_admin import (
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    default_spool_dir,
    ensure_topic,
    parse_kafka_uri,
    security_config,
    topic_max_message_bytes,
)
from apdask.services._kafka_trim import CUTOUTS, trim_alert
from apdask.services.spool import read_spool, write_spool

if TYPE_CHECKING:  # the schema class, for annotations only
    from lsst.alert.packet import Schema

__all__ = [
    "CUTOUTS",
    "KAFKA_DEFAULT_MAX_MESSAGE_BYTES",
    "KEY",
    "KafkaSink",
    "parse_kafka_uri",
    "security_config",
    "ensure_topic",
    "topic_max_message_bytes",
]

log = logging.getLogger(__name__)

KEY = struct.Struct(">q")
CONVENTIONS = ("rubin", "apdask")  # alerts.kafka.conventions: key and headers of a message
_GRACE_S = 5.0  # extra wait after message.timeout.ms for the expiry reports
_RECORD_OVERHEAD = 512  # record + header framing allowance below message.max.bytes
_BATCH_OVERHEAD = 65_536  # request + record-batch framing allowance below the topic limit
_TOPIC_LIMITS: dict[
    tuple[str, str], int
] = {}  # (bootstrap, topic) -> max.message.bytes reported by the broker


# ---------------------------------------------------------------------------
# the producer sink


class _SharedProducer:
    """A librdkafka producer and whether it is retired: one a sink owns, or one that the
    sinks of a process with the same settings share (:func:`_shared_producer`).

    Creating a producer costs a connection, a metadata request and the idempotent
    producer's id: 0.4-0.5 s on loopback, per CCD when each CCD made its own
    (docs/performance.md).  Each sink still waits for its own messages' delivery
    reports; a fatal error, or a purge after a delivery timeout, retires the producer
    for every sink, and the next write starts a new one.
    """

    def __init__(self, conf: dict[str, Any]) -> None:
        self.fatal: Any = None
        self.pid = os.getpid()  # a forked child cannot use its parent's librdkafka threads
        self.producer = Producer({**conf, "error_cb": self._on_error})

    def _on_error(self, err: KafkaError) -> None:
        # never log the configuration: it may hold the SASL password
        if err.fatal():
            self.fatal = err
            log.error("Kafka producer fatal error: %s", err.str())
        else:
            log.debug("Kafka producer: %s", err.str())


_SHARED: dict[tuple[tuple[str, str], ...], _SharedProducer] = {}
_SHARED_LOCK = threading.Lock()


def _shared_producer(conf: dict[str, Any]) -> _SharedProducer:
    """The process's producer for ``conf``, made on first use or after it was retired."""
    key = tuple(sorted((k, repr(v)) for k, v in conf.items()))
    with _SHARED_LOCK:
        entry = _SHARED.get(key)
        if entry is None or entry.fatal is not None or entry.pid != os.getpid():
            entry = _SHARED[key] = _SharedProducer(conf)
        return entry


class KafkaSink:
    """Publish alerts to a Kafka topic; spool whatever is not acknowledged.

    Parameters
    ----------
    bootstrap : str
        ``HOST:PORT[,HOST:PORT]``.
    topic : str
    schema : lsst.alert.packet.Schema, optional
        Defaults to :func:`apdask.alerts.schema.load_schema`.
    spool_dir : str or os.PathLike, optional
        Default ``alerts.spool_dir``, else ``<apdask.repo>/alerts-spool``, else
        ``./alerts-spool``.
    compression : str, optional
        ``lz4``, ``zstd``, ``snappy``, ``gzip`` or ``none``; default
        ``alerts.kafka.compression``.
    delivery_timeout : float, optional
        Seconds one CCD's alerts may take to be acknowledged; default
        ``alerts.kafka.delivery_timeout``.
    max_message_bytes : int, optional
        Largest single alert message; larger alerts are trimmed.  Default
        ``alerts.kafka.max_message_bytes``; never more than the topic's
        ``max.message.bytes``.
    batch_bytes : int, optional
        Largest produce batch (librdkafka ``batch.size``), default
        ``alerts.kafka.batch_bytes``.  It is capped, when the producer starts, by
        the topic's ``max.message.bytes`` as the broker reports it (Kafka's
        1,048,588 when it does not), so no batch is ever refused as too large.
        Large batches matter: at 160 KB per alert, 1 MB batches cost the
        producer and broker about half again the CPU of 8 MB ones.
    producer_config : dict, optional
        Extra librdkafka settings (e.g. ``linger.ms``); never log them.
    conventions : {"rubin", "apdask"}, optional
        Message key and headers; default ``alerts.kafka.conventions``.
        ``rubin``: no key, one ``producer_timestamp`` header (Unix ms), as
        Rubin's producer.  ``apdask``: the ``diaObjectId`` key (int64) and the
        ``visit``, ``detector``, ``schema_id`` and ``produce_time`` headers.

    Attributes
    ----------
    done : apdask.alerts.done.DoneRecords
        The done records of the CCDs this sink (topic and spool) fully received,
        in ``<spool_dir>/<topic>/done``; see :meth:`is_done`.

    Raises
    ------
    ConfigurationError
        If ``conventions`` is not one of these.
    """

    @classmethod
    def from_uri(
        cls,
        uri: str,
        *,
        schema: Schema | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
    ) -> Self:
        """The sink of ``kafka://HOST:PORT/TOPIC[?options]`` (see :func:`parse_kafka_uri`)."""
        bootstrap, topic, uri_options = parse_kafka_uri(uri)
        options: dict[str, Any] = dict(uri_options)
        options.setdefault("spool_dir", spool_dir)
        return cls(bootstrap, topic, schema=schema, **options)

    def __init__(self, bootstrap, topic, schema=None, spool_dir=None, compression=None,
                 delivery_timeout=None, max_message_bytes=None, batch_bytes=None,
                 producer_config=None, conventions=None):  # fmt: skip
        self.bootstrap = bootstrap
        self.topic = topic
        self.schema = load_schema() if schema is None else schema
        self.schema_id = schema_id_of(self.schema)
        self.spool_dir = Path(spool_dir) if spool_dir else default_spool_dir()
        self.done = DoneRecords(self.spool_dir / topic / "done")
        self.acks = AckJournal(self.spool_dir / topic / "acked")
        #: Journal acknowledgements in :attr:`acks` (the pipeline sets it, and removes a
        #: CCD's journal once its done record is written; a sink used alone keeps none).
        self.journal = False
        self.compression = str(config.get("alerts.kafka.compression", compression))
        self.delivery_timeout = float(config.get("alerts.kafka.delivery_timeout", delivery_timeout))
        self.max_message_bytes = int(
            config.get("alerts.kafka.max_message_bytes", max_message_bytes)
        )
        self.batch_bytes = int(config.get("alerts.kafka.batch_bytes", batch_bytes))
        self.conventions = str(config.get("alerts.kafka.conventions", conventions))
        if self.conventions not in CONVENTIONS:
            msg = (
                f"alerts.kafka.conventions must be one of {', '.join(CONVENTIONS)}, got "
                f"{self.conventions!r}; e.g. kafka://HOST:PORT/TOPIC?conventions=rubin"
            )
            raise ConfigurationError(msg)
        self.topic_limit = None  # the topic's max.message.bytes, asked when the producer starts
        self._extra = dict(producer_config or {})
        self.shared = bool(config.get("alerts.kafka.shared_producer"))
        self._entry: _SharedProducer | None = None

    def __repr__(self):
        return f"KafkaSink('kafka://{self.bootstrap}/{self.topic}')"

    def _spooled_ids(self, visit: int, detector: int) -> set[int]:
        """The ``diaSourceId`` s of the CCD's complete spool files (written, not replayed)."""
        out: set[int] = set()
        for path in (self.spool_dir / self.topic).glob(f"{int(visit)}_{int(detector)}_*.avro"):
            with contextlib.suppress(Exception):  # unreadable: replay reports it
                out |= {a.diaSourceId for a in read_spool(path)[1]}
        return out

    def preflight(self, nbytes: int) -> None:
        """Check, before the PPDB commit, that the spool could take ``nbytes`` of alerts.

        The broker need not be up (undelivered alerts are spooled), but the spool must
        be writable with room for the CCD's alerts: else the CCD fails with nothing
        stored (:class:`~apdask.exceptions.AlertDeliveryError`, exit 74).
        """
        check_room(self.spool_dir / self.topic, nbytes, "the alert spool")

    def is_done(self, visit: int, detector: int) -> dict[str, Any] | None:
        """The CCD's done record (its alerts were acknowledged or spooled), or None.

        The records are ``<spool_dir>/<topic>/done/visit_<visit>/<visit>_<detector>.json``
        (:class:`apdask.alerts.done.DoneRecords`).
        """
        return self.done.read(visit, detector)

    def _message_limit(self):
        """Largest framed alert that may be produced."""
        limit = self.max_message_bytes
        if self.topic_limit is not None:
            limit = min(limit, self.topic_limit)
        return limit - _RECORD_OVERHEAD

    def _topic_limit(self):
        """The topic's ``max.message.bytes``, asked once per process; Kafka's default if unknown."""
        key = (self.bootstrap, self.topic)
        if key not in _TOPIC_LIMITS:
            limit = topic_max_message_bytes(*key, timeout=min(10.0, self.delivery_timeout))
            if limit is None:  # not cached: the broker may answer the next sink
                return KAFKA_DEFAULT_MAX_MESSAGE_BYTES
            _TOPIC_LIMITS[key] = limit
        return _TOPIC_LIMITS[key]

    def _config(self):
        linger = int(config.get("alerts.kafka.linger_ms"))
        if self.topic_limit is None:
            self.topic_limit = self._topic_limit()
        batch = max(1, min(self.batch_bytes, self.topic_limit - _BATCH_OVERHEAD))
        conf = {
            "bootstrap.servers": self.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": self.compression,
            "linger.ms": linger,
            "batch.size": batch,
            "batch.num.messages": 10_000,
            # librdkafka's request limit; single alerts are held to _message_limit()
            "message.max.bytes": max(batch, self.max_message_bytes) + _BATCH_OVERHEAD,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 2_097_151,
            "message.timeout.ms": max(1, int(self.delivery_timeout * 1000)),
            "partitioner": "murmur2_random",
        }
        conf.update(self._extra)
        conf.update(security_config())
        return conf

    def producer(self) -> Producer:
        """The confluent-kafka Producer, created on first use (recreated after a fatal error).

        With ``alerts.kafka.shared_producer`` (default), the process's producer for these
        settings (:class:`_SharedProducer`), else one of this sink's own.
        """
        entry = self._entry
        if entry is None or entry.fatal is not None or entry.pid != os.getpid():
            conf = self._config()
            entry = self._entry = _shared_producer(conf) if self.shared else _SharedProducer(conf)
        return entry.producer

    def _retire(self, why: str) -> None:
        """Start afresh on the next write (a shared producer: for every sink using it)."""
        if self._entry is not None:
            self._entry.fatal = self._entry.fatal or why

    def close(self, timeout: float | None = None) -> None:
        """Wait for outstanding messages (normally none) and drop the producer.

        A shared producer stays open for the process's next sink; this sink's own
        messages were all reported before :meth:`write` returned.
        """
        if self._entry is not None and not self.shared:
            self._entry.producer.flush(self.delivery_timeout if timeout is None else timeout)
        self._entry = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def headers(self, visit: int, detector: int) -> list[tuple[str, bytes]]:
        """The constant headers of one CCD's messages (the time is added per message).

        Empty with the ``rubin`` conventions; ``visit``, ``detector`` and
        ``schema_id`` with ``apdask``.
        """
        if self.conventions == "rubin":
            return []
        return [
            ("visit", str(int(visit)).encode()),
            ("detector", str(int(detector)).encode()),
            ("schema_id", str(self.schema_id).encode()),
        ]

    def _time_header(self):
        if self.conventions == "rubin":
            return ("producer_timestamp", str(time.time_ns() // 1_000_000).encode())
        return ("produce_time", f"{time.time():.6f}".encode())

    def key(self, alert: EncodedAlert) -> bytes | None:
        """Message key: None (``rubin``), or the ``diaObjectId`` (else ``diaSourceId``) as
        big-endian int64 bytes (``apdask``)."""
        if self.conventions == "rubin":
            return None
        oid = alert.diaObjectId if alert.diaObjectId is not None else alert.diaSourceId
        return KEY.pack(int(oid))

    def deliver(
        self,
        visit: int,
        detector: int,
        encoded: list[EncodedAlert],
        journal: AckJournal | None = None,
    ) -> tuple[list[int], dict[int, str]]:
        """Produce ``encoded`` alerts and wait for every delivery report.

        Oversize alerts are trimmed (``EncodedAlert.trimmed`` says how) first.  With a
        ``journal`` (or :attr:`journal` set: the pipeline's sinks, :attr:`acks`), each
        acknowledged ``diaSourceId`` is appended to the CCD's journal as its report
        arrives, so that a re-run after a crash does not send it again.

        Parameters
        ----------
        visit, detector : int
        encoded : list of EncodedAlert
            Trimmed entries are replaced in place.
        journal : apdask.alerts.done.AckJournal, optional

        Returns
        -------
        acked : list of int
            Indices acknowledged by the broker.
        failed : dict of int to str
            Index to the reason it was not acknowledged.
        """
        if journal is None and not self.journal:
            return self._deliver(visit, detector, encoded, lambda idx: None)
        with (self.acks if journal is None else journal).open(visit, detector) as log_ack:
            return self._deliver(
                visit, detector, encoded, lambda idx: log_ack.add(encoded[idx].diaSourceId)
            )

    def _deliver(
        self,
        visit: int,
        detector: int,
        encoded: list[EncodedAlert],
        on_ack: Callable[[int], None],
    ) -> tuple[list[int], dict[int, str]]:
        producer = self.producer()
        acked: list[int] = []
        failed: dict[int, str] = {}
        pending: set[int] = set()

        def on_delivery(idx: int, err: KafkaError | None, _msg: Message) -> None:
            pending.discard(idx)
            if err is None:
                acked.append(idx)
                on_ack(idx)
            else:
                failed[idx] = f"{err.name()}: {err.str()}"

        limit = self._message_limit()
        base = self.headers(visit, detector)
        header = CONFLUENT_HEADER.pack(0, self.schema_id)
        start = time.monotonic()
        deadline = start + self.delivery_timeout + _GRACE_S
        for idx, alert in enumerate(encoded):
            if len(alert.body) + 5 > limit:
                small = trim_alert(alert, limit - 5, self.schema)
                if small is None:
                    failed[idx] = (
                        f"MSG_SIZE_TOO_LARGE: {len(alert.body)} bytes even without cutouts "
                        f"exceeds the message limit of {limit + _RECORD_OVERHEAD} bytes "
                        f"(max_message_bytes, or the topic's max.message.bytes if smaller)"
                    )
                    continue
                encoded[idx] = alert = small
            headers = [*base, self._time_header()]
            if alert.trimmed:
                headers.append(("apdask_trimmed", alert.trimmed.encode()))
            while True:
                try:
                    value = alert.frame
                    if value is None or value[:5] != header:
                        value = header + bytes(alert.body)
                    producer.produce(
                        self.topic, value, self.key(alert), headers=headers,
                        on_delivery=functools.partial(on_delivery, idx),
                    )  # fmt: skip
                    pending.add(idx)
                    break
                except BufferError:  # local queue full: serve reports, retry
                    if time.monotonic() > deadline:
                        failed[idx] = "local producer queue full until the delivery timeout"
                        break
                    producer.poll(0.05)
                except KafkaException as err:
                    e = err.args[0]
                    failed[idx] = f"{e.name()}: {e.str()}"
                    break
            producer.poll(0)
            if idx == len(encoded) // 2:  # tests only: half of the CCD acknowledged
                fault_point("kafka-partial", lambda: producer.flush(self.delivery_timeout))
        while pending and time.monotonic() < deadline:
            producer.poll(0.05)
        if pending:
            # Requests still in flight outlive message.timeout.ms: purge them so nothing
            # spooled here can still be sent later.  A request the broker already stored
            # may then be delivered twice after replay (at-least-once, never loss).
            with contextlib.suppress(Exception):
                producer.purge(in_queue=True, in_flight=True)
                producer.poll(0.5)
            self._retire("purged")  # start afresh on the next write
        for idx in list(pending):
            pending.discard(idx)
            failed[idx] = f"no delivery report within {self.delivery_timeout + _GRACE_S:.0f} s"
        for idx in sorted(failed):  # reports that arrived during the purge are failures
            if idx in acked:
                del failed[idx]
        return sorted(acked), failed

    def write(
        self, visit: int, detector: int, alerts: Iterable[Mapping[str, Any] | EncodedAlert]
    ) -> SinkResult:
        """Publish one CCD's alerts; spool what is not acknowledged.

        Parameters
        ----------
        visit, detector : int
        alerts : iterable of dict or EncodedAlert

        Returns
        -------
        apdask.alerts.sinks.SinkResult
            ``delivered``, ``spooled``, ``trimmed`` counts, the spool file (if
            any) and the reasons.

        Raises
        ------
        AlertDeliveryError
            If undelivered alerts cannot be spooled either.
        """
        encoded = [encode_alert(a, self.schema) for a in alerts]
        t0 = time.monotonic()
        # a re-run after a crash: what the broker acknowledged, or a spool file holds,
        # is not sent again (the journal, and replay, take care of it)
        sent_before = self.acks.read(visit, detector)
        spooled_before = self._spooled_ids(visit, detector)
        todo = [a for a in encoded if a.diaSourceId not in sent_before | spooled_before]
        if len(todo) < len(encoded):
            log.warning(
                "visit %s detector %s: %d alerts were acknowledged and %d spooled before a "
                "crash; sending the other %d", visit, detector,
                sum(a.diaSourceId in sent_before for a in encoded),
                sum(a.diaSourceId in spooled_before for a in encoded), len(todo),
            )  # fmt: skip
        acked, failed = self.deliver(visit, detector, todo)
        earlier = len(encoded) - len(todo)
        n_spooled_before = sum(a.diaSourceId in spooled_before for a in encoded)
        encoded = todo
        result = SinkResult(
            delivered=len(acked) + earlier - n_spooled_before,
            spooled=len(failed) + n_spooled_before,
            trimmed=[(a.diaSourceId, a.trimmed) for a in encoded if a.trimmed],
            seconds=time.monotonic() - t0,
        )
        if failed:
            idx = sorted(failed)
            reasons = [failed[i] for i in idx]
            result.spool_path = write_spool(
                self.spool_dir, self.topic, visit, detector, self.schema,
                [encoded[i] for i in idx], reasons,
            )  # fmt: skip
            result.problems = sorted(set(reasons))
            log.warning(
                "visit %s detector %s: %d of %d alerts not acknowledged by %s (%s); spooled to %s",
                visit, detector, len(failed), len(encoded), self, result.problems[0],
                result.spool_path,
            )  # fmt: skip
        return result
