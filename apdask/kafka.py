"""Alert distribution over Kafka with zero loss: producer sink, spool, replay, consumer.

* :class:`KafkaSink` (``kafka://HOST:PORT/TOPIC``) produces one message per alert
  in the Confluent wire format (magic byte 0, big-endian int32 schema id, the
  schemaless Avro body) with an idempotent producer (``acks=all``).  All alerts
  of one CCD are produced, then one poll loop waits for every delivery report
  up to ``alerts.kafka.delivery_timeout``.
* Anything not acknowledged in time (broker down, partition unavailable,
  message too large) is appended to an fsync'd Avro spool file;
  :func:`replay_spool` delivers a spool later and keeps only what was not
  acknowledged.
* An alert larger than the producer's ``max_message_bytes`` gets its cutouts
  trimmed step by step (smaller stamps, then the template, science and
  difference cutouts dropped) until it fits; the step taken is recorded in the
  ``apdask_trimmed`` header and the sink's result.
* :func:`consume` reads a topic with ``assign()`` to explicit partitions (no
  consumer-group join) for ``apdask alerts tail|validate``.

Message key: the ``diaObjectId`` as an 8-byte big-endian signed integer (the
encoding of Kafka's ``LongSerializer``; the ``diaSourceId`` when the source has no
object).  Partitioner: ``murmur2_random``, the Java client's.  Headers (ASCII):
``visit``, ``detector``, ``schema_id``, ``produce_time`` (Unix seconds) and,
for trimmed alerts, ``apdask_trimmed``.

Credentials come only from ``APDASK_KAFKA_USERNAME`` / ``APDASK_KAFKA_PASSWORD``
(with ``APDASK_KAFKA_SASL_MECHANISM``, default ``SCRAM-SHA-512``, and
``APDASK_KAFKA_SECURITY_PROTOCOL``, default ``SASL_SSL``); they are never
logged or shown in ``repr``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import fastavro
import fastavro.validation

from . import alerts as _alerts
from . import config
from ._avrovec import encode_bytes, encode_long
from .exceptions import AlertDeliveryError, ConfigurationError

__all__ = [
    "KafkaSink",
    "parse_kafka_uri",
    "security_config",
    "ensure_topic",
    "write_spool",
    "read_spool",
    "replay_spool",
    "consume",
    "validate_topic",
]

log = logging.getLogger(__name__)

_KEY = struct.Struct(">q")
_FRAME = struct.Struct(">bi")
_GRACE_S = 5.0  # extra wait after message.timeout.ms for the expiry reports
_RECORD_OVERHEAD = 512  # record + header framing allowance below message.max.bytes


# ---------------------------------------------------------------------------
# URI and credentials


def parse_kafka_uri(uri):
    """Split ``kafka://HOST:PORT[,HOST:PORT]/TOPIC[?key=value&...]``.

    Parameters
    ----------
    uri : str

    Returns
    -------
    bootstrap : str
        Comma-separated ``HOST:PORT`` list.
    topic : str
    options : dict of str
        Query parameters (``spool_dir``, ``compression``, ``delivery_timeout``,
        ``max_message_bytes``).

    Raises
    ------
    ConfigurationError
        If host or topic is missing.
    """
    parts = urlsplit(str(uri))
    if parts.scheme != "kafka":
        msg = f"not a kafka:// URI: {uri!r}"
        raise ConfigurationError(msg)
    bootstrap = parts.netloc
    topic = unquote(parts.path.lstrip("/"))
    if not bootstrap or not topic or "/" in topic:
        msg = f"bad Kafka URI {uri!r}; use kafka://HOST:PORT/TOPIC (e.g. kafka://127.0.0.1:9092/alerts)"
        raise ConfigurationError(msg)
    options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(options) - {"spool_dir", "compression", "delivery_timeout", "max_message_bytes"}
    if unknown:
        msg = (
            f"unknown option(s) {sorted(unknown)} in Kafka URI; known: spool_dir, compression, "
            "delivery_timeout, max_message_bytes"
        )
        raise ConfigurationError(msg)
    return bootstrap, topic, options


def security_config(environ=None):
    """librdkafka security settings from the environment (never from config files).

    Parameters
    ----------
    environ : mapping, optional
        Defaults to ``os.environ``.

    Returns
    -------
    dict
        Empty when ``APDASK_KAFKA_USERNAME`` is unset; else ``security.protocol``,
        ``sasl.mechanism``, ``sasl.username`` and ``sasl.password``.

    Raises
    ------
    ConfigurationError
        If only one of username and password is set.
    """
    env = os.environ if environ is None else environ
    user = env.get("APDASK_KAFKA_USERNAME")
    password = env.get("APDASK_KAFKA_PASSWORD")
    if not user and not password:
        return {}
    if not user or not password:
        msg = (
            "set both APDASK_KAFKA_USERNAME and APDASK_KAFKA_PASSWORD for SASL/SCRAM "
            "(one of them is empty)"
        )
        raise ConfigurationError(msg)
    return {
        "security.protocol": env.get("APDASK_KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        "sasl.mechanism": env.get("APDASK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        "sasl.username": user,
        "sasl.password": password,
    }


def _default_spool_dir():
    d = config.get("alerts.spool_dir")
    if d:
        return Path(d)
    repo = config.get("repo")
    return Path(repo) / "alerts-spool" if repo and "://" not in str(repo) else Path("alerts-spool")


def ensure_topic(bootstrap, topic, partitions=1, timeout=10.0):
    """Create ``topic`` if it does not exist (tests, benchmarks, local brokers).

    Parameters
    ----------
    bootstrap : str
    topic : str
    partitions : int
    timeout : float

    Returns
    -------
    bool
        True if the topic was created.
    """
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap, **security_config()})
    if topic in admin.list_topics(timeout=timeout).topics:
        return False
    fut = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    try:
        fut[topic].result(timeout)
    except KafkaException as err:
        if "TOPIC_ALREADY_EXISTS" not in str(err):
            raise
        return False
    return True


# ---------------------------------------------------------------------------
# trimming oversize alerts


def _crop_stamp(stamp, size):
    """Crop a FITS stamp (all 2-D HDUs of the image's shape) to the central ``size``."""
    from astropy.io import fits

    with fits.open(io.BytesIO(stamp)) as hdul:
        shape = hdul[0].data.shape
        if shape[0] <= size:
            return stamp
        off = (shape[0] - size) // 2
        out = []
        for hdu in hdul:
            data = hdu.data
            hdr = hdu.header.copy()
            if data is not None and data.shape == shape:
                data = data[off : off + size, off : off + size]
                for key in ("CRPIX1", "CRPIX2"):
                    if key in hdr:
                        hdr[key] = hdr[key] - off
            if isinstance(hdu, fits.PrimaryHDU):
                out.append(fits.PrimaryHDU(data, header=hdr))
            else:
                out.append(fits.ImageHDU(data, header=hdr, name=hdu.name))
        buf = io.BytesIO()
        fits.HDUList(out).writeto(buf)
        return buf.getvalue()


_CUTOUTS = ("cutoutDifference", "cutoutScience", "cutoutTemplate")


def _trim(alert, limit, schema):
    """Return a trimmed copy of an :class:`EncodedAlert` whose body fits ``limit``.

    Steps, cumulative, stopping at the first that fits: crop the stamps to 63 px,
    to 31 px, drop the template cutout, drop the science cutout, drop the
    difference cutout.  Returns None if the alert is still too large.
    """
    rec = alert.decode(schema)
    steps = []
    plan = [("crop", 63), ("crop", 31)] + [("drop", k) for k in reversed(_CUTOUTS)]
    for kind, arg in plan:
        if kind == "crop":
            changed = False
            for k in _CUTOUTS:
                if rec.get(k) is not None:
                    new = _crop_stamp(rec[k], arg)
                    changed |= new is not rec[k]
                    rec[k] = new
            if not changed:
                continue
            steps.append(f"cutouts cropped to {arg} px")
        else:
            if rec.get(arg) is None:
                continue
            rec[arg] = None
            steps.append(f"{arg} dropped")
        enc = _alerts.encode_alert(rec, schema)
        if len(enc.body) <= limit:
            enc.diaObjectId = alert.diaObjectId
            enc.trimmed = "; ".join(steps)
            return enc
    return None


# ---------------------------------------------------------------------------
# spool: Avro object-container files, one record per block


def _container_header(schema, metadata, codec, sync):
    meta = {"avro.schema": json.dumps(schema.definition).encode(), "avro.codec": codec.encode()}
    meta.update({k: (v if isinstance(v, bytes) else str(v).encode()) for k, v in metadata.items()})
    out = [b"Obj\x01", encode_long(len(meta))]
    for k, v in meta.items():
        out.append(encode_bytes(k.encode()))
        out.append(encode_bytes(v))
    out.append(b"\x00")
    out.append(sync)
    return b"".join(out)


def _write_container(path, schema, bodies, metadata, codec="deflate"):
    """Write bodies as an Avro container (one record per block), fsync, atomic replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sync = os.urandom(16)
    with _alerts._atomic_file(path) as fh:
        fh.write(_container_header(schema, metadata, codec, sync))
        for body in bodies:
            data = body
            if codec == "deflate":
                c = zlib.compressobj(wbits=-15)
                data = c.compress(body) + c.flush()
            fh.write(b"\x02" + encode_long(len(data)) + data + sync)
    return path


def _read_varint(buf, pos):
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    return (result >> 1) ^ -(result & 1), pos


def write_spool(spool_dir, topic, visit, detector, schema, encoded, reasons):
    """Append undelivered alerts to a new fsync'd spool file and return its path.

    Parameters
    ----------
    spool_dir : str or os.PathLike
    topic : str
    visit, detector : int
    schema : lsst.alert.packet.Schema
    encoded : list of EncodedAlert
    reasons : list of str
        Why each alert was not delivered (same order).

    Returns
    -------
    pathlib.Path
        ``<spool_dir>/<topic>/<visit>_<detector>_<ns>.avro``.
    """
    name = f"{int(visit)}_{int(detector)}_{time.time_ns()}.avro"
    path = Path(spool_dir) / topic / name
    metadata = {
        "apdask.topic": topic,
        "apdask.visit": int(visit),
        "apdask.detector": int(detector),
        "apdask.schema_id": _alerts._schema_id(schema),
        "apdask.reasons": json.dumps(reasons),
        "apdask.trimmed": json.dumps({str(a.diaSourceId): a.trimmed for a in encoded if a.trimmed}),
        "apdask.objects": json.dumps([a.diaObjectId for a in encoded]),
    }
    try:
        return _write_container(path, schema, [a.body for a in encoded], metadata)
    except OSError as err:
        msg = (
            f"{len(encoded)} alerts of visit {visit} detector {detector} were not delivered "
            f"and cannot be spooled to {path}: {err}; free disk space or set "
            "apdask.alerts.spool_dir to a writable directory"
        )
        raise AlertDeliveryError(msg) from err


def read_spool(path):
    """Read a spool file written by :func:`write_spool`.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    metadata : dict of str
    encoded : list of EncodedAlert
    """
    data = Path(path).read_bytes()
    if data[:4] != b"Obj\x01":
        msg = f"{path} is not an Avro object-container file"
        raise ValueError(msg)
    pos = 4
    meta = {}
    while True:
        count, pos = _read_varint(data, pos)
        if count == 0:
            break
        if count < 0:
            _, pos = _read_varint(data, pos)
            count = -count
        for _ in range(count):
            n, pos = _read_varint(data, pos)
            k = data[pos : pos + n].decode()
            pos += n
            n, pos = _read_varint(data, pos)
            meta[k] = data[pos : pos + n]
            pos += n
    sync = data[pos : pos + 16]
    pos += 16
    codec = meta.get("avro.codec", b"null").decode()
    bodies = []
    while pos < len(data):
        count, pos = _read_varint(data, pos)
        size, pos = _read_varint(data, pos)
        block = data[pos : pos + size]
        pos += size
        if data[pos : pos + 16] != sync:
            msg = f"{path}: corrupt spool file (sync marker mismatch)"
            raise ValueError(msg)
        pos += 16
        if codec == "deflate":
            block = zlib.decompress(block, -15)
        if count != 1:
            msg = f"{path}: not an apdask spool file (blocks of {count} records)"
            raise ValueError(msg)
        bodies.append(block)
    info = {k: v.decode() for k, v in meta.items() if k.startswith("apdask.")}
    trimmed = json.loads(info.get("apdask.trimmed", "{}"))
    objects = json.loads(info.get("apdask.objects", "[]")) or [None] * len(bodies)
    encoded = []
    for body, oid in zip(bodies, objects, strict=True):
        sid, _ = _read_varint(body, 0)  # diaSourceId is the first field of the alert
        encoded.append(_alerts.EncodedAlert(sid, oid, body, trimmed.get(str(sid))))
    return info, encoded


def _spool_files(spool):
    return _alerts._avro_files(spool, what="spool file")


def replay_spool(spool, to_uri, schema=None):
    """Deliver spooled alerts; remove only the acknowledged ones.

    Each spool file is delivered; when all its alerts are acknowledged it is
    deleted, otherwise it is atomically rewritten with the remainder.

    Parameters
    ----------
    spool : str or os.PathLike
        A spool file or directory (searched recursively for ``*.avro``).
    to_uri : str
        ``kafka://HOST:PORT/TOPIC`` (options as for :class:`KafkaSink`).
    schema : lsst.alert.packet.Schema, optional
        Defaults to the schema whose id the spool file records.

    Returns
    -------
    dict
        ``{"files": int, "delivered": int, "remaining": int, "problems": [str]}``.
    """
    bootstrap, topic, options = parse_kafka_uri(to_uri)
    files = _spool_files(spool)
    report = {"files": len(files), "delivered": 0, "remaining": 0, "problems": []}
    sinks = {}
    try:
        for fn in files:
            info, encoded = read_spool(fn)
            sid = int(info.get("apdask.schema_id", 0)) or None
            sch = schema or (_alerts._registry().get_by_id(sid) if sid else _alerts.load_schema())
            key = id(sch)
            if key not in sinks:
                sinks[key] = KafkaSink(bootstrap, topic, schema=sch, **options)
            sink = sinks[key]
            visit = int(info.get("apdask.visit", 0))
            detector = int(info.get("apdask.detector", 0))
            acked, failed = sink.deliver(visit, detector, encoded)
            report["delivered"] += len(acked)
            report["remaining"] += len(failed)
            for reason in sorted(set(failed.values())):
                report["problems"].append(f"{fn}: {reason}")
            if not failed:
                fn.unlink()
                _alerts._fsync_dir(fn.parent)
            elif acked:
                keep = [encoded[i] for i in sorted(failed)]
                meta = {k: v for k, v in info.items() if k != "apdask.reasons"}
                meta["apdask.reasons"] = json.dumps([failed[i] for i in sorted(failed)])
                meta["apdask.objects"] = json.dumps([a.diaObjectId for a in keep])
                _write_container(fn, sch, [a.body for a in keep], meta)
    finally:
        for s in sinks.values():
            s.close()
    return report


# ---------------------------------------------------------------------------
# the producer sink


class KafkaSink:
    """Publish alerts to a Kafka topic; spool whatever is not acknowledged.

    Parameters
    ----------
    bootstrap : str
        ``HOST:PORT[,HOST:PORT]``.
    topic : str
    schema : lsst.alert.packet.Schema, optional
        Defaults to :func:`apdask.alerts.load_schema`.
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
        Largest message produced (librdkafka ``message.max.bytes``); larger
        alerts are trimmed.  Default ``alerts.kafka.max_message_bytes``.
    producer_config : dict, optional
        Extra librdkafka settings (e.g. ``linger.ms``); never log them.
    """

    def __init__(self, bootstrap, topic, schema=None, spool_dir=None, compression=None,
                 delivery_timeout=None, max_message_bytes=None, producer_config=None):  # fmt: skip
        self.bootstrap = bootstrap
        self.topic = topic
        self.schema = _alerts.load_schema() if schema is None else schema
        self.schema_id = _alerts._schema_id(self.schema)
        self.spool_dir = Path(spool_dir) if spool_dir else _default_spool_dir()
        self.compression = str(config.get("alerts.kafka.compression", compression))
        self.delivery_timeout = float(config.get("alerts.kafka.delivery_timeout", delivery_timeout))
        self.max_message_bytes = int(
            config.get("alerts.kafka.max_message_bytes", max_message_bytes)
        )
        self._extra = dict(producer_config or {})
        self._producer = None
        self._fatal = None

    def __repr__(self):
        return f"KafkaSink('kafka://{self.bootstrap}/{self.topic}')"

    def _config(self):
        linger = int(config.get("alerts.kafka.linger_ms"))
        conf = {
            "bootstrap.servers": self.bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "compression.type": self.compression,
            "linger.ms": linger,
            "batch.size": min(1_000_000, self.max_message_bytes),
            "batch.num.messages": 10_000,
            "message.max.bytes": self.max_message_bytes,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 2_097_151,
            "message.timeout.ms": max(1, int(self.delivery_timeout * 1000)),
            "partitioner": "murmur2_random",
            "error_cb": self._on_error,
        }
        conf.update(self._extra)
        conf.update(security_config())
        return conf

    def _on_error(self, err):
        # never log the configuration: it may hold the SASL password
        if err.fatal():
            self._fatal = err
            log.error("Kafka producer fatal error: %s", err.str())
        else:
            log.debug("Kafka producer: %s", err.str())

    def producer(self):
        """The confluent-kafka Producer, created on first use (recreated after a fatal error)."""
        from confluent_kafka import Producer

        if self._producer is None or self._fatal is not None:
            self._fatal = None
            self._producer = Producer(self._config())
        return self._producer

    def close(self, timeout=None):
        """Wait for outstanding messages (normally none) and drop the producer."""
        if self._producer is not None:
            self._producer.flush(self.delivery_timeout if timeout is None else timeout)
            self._producer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def headers(self, visit, detector):
        """The constant headers of one CCD's messages (``produce_time`` added per call)."""
        return [
            ("visit", str(int(visit)).encode()),
            ("detector", str(int(detector)).encode()),
            ("schema_id", str(self.schema_id).encode()),
        ]

    @staticmethod
    def key(alert):
        """Message key: ``diaObjectId`` (else ``diaSourceId``) as big-endian int64 bytes."""
        oid = alert.diaObjectId if alert.diaObjectId is not None else alert.diaSourceId
        return _KEY.pack(int(oid))

    def deliver(self, visit, detector, encoded):
        """Produce ``encoded`` alerts and wait for every delivery report.

        Oversize alerts are trimmed (``EncodedAlert.trimmed`` says how) first.

        Parameters
        ----------
        visit, detector : int
        encoded : list of EncodedAlert
            Trimmed entries are replaced in place.

        Returns
        -------
        acked : list of int
            Indices acknowledged by the broker.
        failed : dict of int to str
            Index to the reason it was not acknowledged.
        """
        from confluent_kafka import KafkaException

        producer = self.producer()
        acked, failed = [], {}
        pending = set()

        def on_delivery(idx, err, _msg):
            pending.discard(idx)
            if err is None:
                acked.append(idx)
            else:
                failed[idx] = f"{err.name()}: {err.str()}"

        limit = self.max_message_bytes - _RECORD_OVERHEAD
        base = self.headers(visit, detector)
        header = _FRAME.pack(0, self.schema_id)
        start = time.monotonic()
        deadline = start + self.delivery_timeout + _GRACE_S
        for idx, alert in enumerate(encoded):
            if len(alert.body) + 5 > limit:
                small = _trim(alert, limit - 5, self.schema)
                if small is None:
                    failed[idx] = (
                        f"MSG_SIZE_TOO_LARGE: {len(alert.body)} bytes even without cutouts "
                        f"exceeds max_message_bytes={self.max_message_bytes}"
                    )
                    continue
                encoded[idx] = alert = small
            headers = [*base, ("produce_time", f"{time.time():.6f}".encode())]
            if alert.trimmed:
                headers.append(("apdask_trimmed", alert.trimmed.encode()))
            while True:
                try:
                    value = alert.frame
                    if value is None or value[:5] != header:
                        value = header + bytes(alert.body)
                    producer.produce(
                        self.topic, value, self.key(alert), headers=headers,
                        on_delivery=lambda err, msg, i=idx: on_delivery(i, err, msg),
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
        while pending and time.monotonic() < deadline:
            producer.poll(0.05)
        if pending:
            # Requests still in flight outlive message.timeout.ms: purge them so nothing
            # spooled here can still be sent later.  A request the broker already stored
            # may then be delivered twice after replay (at-least-once, never loss).
            with contextlib.suppress(Exception):
                producer.purge(in_queue=True, in_flight=True)
                producer.poll(0.5)
            self._fatal = self._fatal or "purged"  # start afresh on the next write
        for idx in list(pending):
            pending.discard(idx)
            failed[idx] = f"no delivery report within {self.delivery_timeout + _GRACE_S:.0f} s"
        for idx in sorted(failed):  # reports that arrived during the purge are failures
            if idx in acked:
                del failed[idx]
        return sorted(acked), failed

    def write(self, visit, detector, alerts):
        """Publish one CCD's alerts; spool what is not acknowledged.

        Parameters
        ----------
        visit, detector : int
        alerts : iterable of dict or EncodedAlert

        Returns
        -------
        apdask.alerts.SinkResult
            ``delivered``, ``spooled``, ``trimmed`` counts, the spool file (if
            any) and the reasons.

        Raises
        ------
        AlertDeliveryError
            If undelivered alerts cannot be spooled either.
        """
        encoded = [_alerts.encode_alert(a, self.schema) for a in alerts]
        t0 = time.monotonic()
        acked, failed = self.deliver(visit, detector, encoded)
        result = _alerts.SinkResult(
            delivered=len(acked),
            spooled=len(failed),
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


# ---------------------------------------------------------------------------
# consumer side


def consume(uri, from_beginning=True, follow=False, timeout=10.0, idle_timeout=None):
    """Yield ``(message, data)`` from a topic without joining a consumer group.

    Partitions are ``assign()``-ed explicitly.  Without ``follow`` the iteration
    stops once every partition reaches the high watermark seen at the start.

    Parameters
    ----------
    uri : str
        ``kafka://HOST:PORT/TOPIC``.
    from_beginning : bool
        Start at the earliest offset (else only new messages).
    follow : bool
        Keep waiting for new messages.
    timeout : float
        Seconds to wait for metadata and, without ``follow``, for the
        remaining messages.
    idle_timeout : float, optional
        With ``follow``, stop after this many seconds without a message.

    Yields
    ------
    message : confluent_kafka.Message
    data : bytes
        The message value.
    """
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

    bootstrap, topic, _ = parse_kafka_uri(uri)
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"apdask-reader-{os.getpid()}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **security_config(),
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            msg = f"topic {topic!r} not found on {bootstrap}; check the URI or create the topic"
            raise ConfigurationError(msg)
        parts = sorted(md.partitions)
        start = OFFSET_BEGINNING if from_beginning else OFFSET_END
        consumer.assign([TopicPartition(topic, p, start) for p in parts])
        # End of partition comes from the fetch responses (enable.partition.eof): tansu's
        # ListOffsets high watermark lags, the fetch's does not.
        todo = set(parts)
        last = time.monotonic()
        while True:
            msg = consumer.poll(0.2)
            now = time.monotonic()
            if msg is None:
                if follow and idle_timeout is not None and now - last > idle_timeout:
                    return
                if not follow and now - last > timeout:
                    msg = (
                        f"no end of partitions {sorted(todo)} of {topic!r} within {timeout} s; "
                        "is the broker up?"
                    )
                    raise TimeoutError(msg)
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(msg.partition())
                    if not follow and not todo:
                        return
                else:
                    log.warning("Kafka consumer: %s", err.str())
                continue
            last = now
            todo.add(msg.partition())
            yield msg, msg.value()
    finally:
        consumer.close()


def validate_topic(uri, schema=None, timeout=10.0):
    """Decode every message of a topic with the official schema and report problems.

    Each value must be a Confluent frame (magic 0) whose schema id lsst-alert-packet
    knows; its body is decoded with that schema, validated with fastavro and its
    cutouts checked to be FITS.

    Parameters
    ----------
    uri : str
        ``kafka://HOST:PORT/TOPIC``.
    schema : lsst.alert.packet.Schema, optional
        Require this schema (else any shipped schema id is accepted).
    timeout : float

    Returns
    -------
    dict
        ``{"n_alerts", "partitions", "problems"}``.
    """
    problems = []
    n = 0
    per_partition = {}
    registry = _alerts._registry()
    for msg, data in consume(uri, from_beginning=True, follow=False, timeout=timeout):
        n += 1
        where = f"partition {msg.partition()} offset {msg.offset()}"
        per_partition[msg.partition()] = per_partition.get(msg.partition(), 0) + 1
        if data is None or len(data) < 5:
            problems.append(f"{where}: empty or short message")
            continue
        magic, sid = _FRAME.unpack_from(data)
        if magic != 0:
            problems.append(f"{where}: magic byte {magic}, expected 0 (Confluent framing)")
            continue
        try:
            sch = registry.get_by_id(sid) if schema is None else schema
        except KeyError:
            problems.append(f"{where}: schema id {sid} unknown to lsst-alert-packet")
            continue
        if schema is not None and sid != _alerts._schema_id(schema):
            problems.append(f"{where}: schema id {sid}, expected {_alerts._schema_id(schema)}")
            continue
        parsed = _alerts._parsed(sch)
        try:
            buf = io.BytesIO(data)
            buf.seek(5)
            rec = fastavro.schemaless_reader(buf, parsed, parsed)
            if buf.tell() != len(data):
                problems.append(f"{where}: {len(data) - buf.tell()} trailing bytes after the body")
            fastavro.validation.validate(rec, parsed, raise_errors=True)
        except Exception as err:  # noqa: BLE001 - reported
            problems.append(f"{where}: does not decode with schema id {sid}: {err}")
            continue
        for k in _CUTOUTS:
            if rec.get(k) is not None and bytes(rec[k][:6]) != b"SIMPLE":
                problems.append(f"{where}: {k} is not FITS")
        key = msg.key()
        oid = rec["diaSource"].get("diaObjectId")
        expect = _KEY.pack(oid if oid is not None else rec["diaSourceId"])
        if key != expect:
            problems.append(f"{where}: key {key!r} is not the diaObjectId as int64")
    return {"n_alerts": n, "partitions": per_partition, "problems": problems}
