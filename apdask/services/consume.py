"""Reading alert topics: :func:`consume` and :func:`validate_topic`.

Partitions are ``assign()``-ed explicitly, so no consumer-group join (which
takes many seconds on some brokers) is needed; ``apdask alerts tail|validate``
use these.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import fastavro
import fastavro.validation
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_END,
    Consumer,
    KafkaError,
    Message,
    TopicPartition,
)

from apdask.alerts.schema import parsed_schema, schema_id_of, schema_registry
from apdask.alerts.wire import CONFLUENT_HEADER
from apdask.exceptions import ConfigurationError
from apdask.services.kafka import CUTOUTS, KEY, parse_kafka_uri, security_config

if TYPE_CHECKING:  # the schema class, for annotations only
    from lsst.alert.packet import Schema

__all__ = ["consume", "validate_topic"]

log = logging.getLogger(__name__)


def consume(
    uri: str,
    from_beginning: bool = True,
    follow: bool = False,
    timeout: float = 10.0,
    idle_timeout: float | None = None,
) -> Iterator[tuple[Message, bytes | None]]:
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
    data : bytes or None
        The message value (None for a message without one).
    """
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
            text = f"topic {topic!r} not found on {bootstrap}; check the URI or create the topic"
            raise ConfigurationError(text)
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
                    text = (
                        f"no end of partitions {sorted(todo)} of {topic!r} within {timeout} s; "
                        "is the broker up?"
                    )
                    raise TimeoutError(text)
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


def validate_topic(uri: str, schema: Schema | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """Decode every message of a topic with the official schema and report problems.

    Each value must be a Confluent frame (magic 0) whose schema id lsst-alert-packet
    knows; its body is decoded with that schema, validated with fastavro and its
    cutouts checked to be FITS.  A message either has no key and a
    ``producer_timestamp`` header (Rubin's conventions) or the ``diaObjectId``
    key (apdask's); visit, detector and ids are read from the Avro body, never
    from headers.

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
    per_partition: dict[int, int] = {}
    reg = schema_registry()
    for msg, data in consume(uri, from_beginning=True, follow=False, timeout=timeout):
        n += 1
        where = f"partition {msg.partition()} offset {msg.offset()}"
        part = cast(int, msg.partition())  # a fetched message's: never None (only errors' are)
        per_partition[part] = per_partition.get(part, 0) + 1
        if data is None or len(data) < 5:
            problems.append(f"{where}: empty or short message")
            continue
        magic, sid = CONFLUENT_HEADER.unpack_from(data)
        if magic != 0:
            problems.append(f"{where}: magic byte {magic}, expected 0 (Confluent framing)")
            continue
        try:
            sch = reg.get_by_id(sid) if schema is None else schema
        except KeyError:
            problems.append(f"{where}: schema id {sid} unknown to lsst-alert-packet")
            continue
        if schema is not None and sid != schema_id_of(schema):
            problems.append(f"{where}: schema id {sid}, expected {schema_id_of(schema)}")
            continue
        parsed = parsed_schema(sch)
        try:
            buf = io.BytesIO(data)
            buf.seek(5)
            rec: dict[str, Any] = fastavro.schemaless_reader(buf, parsed, parsed)  # type: ignore[assignment]
            if buf.tell() != len(data):
                problems.append(f"{where}: {len(data) - buf.tell()} trailing bytes after the body")
            fastavro.validation.validate(rec, parsed, raise_errors=True)
        except Exception as err:  # noqa: BLE001 - reported
            problems.append(f"{where}: does not decode with schema id {sid}: {err}")
            continue
        for k in CUTOUTS:
            if rec.get(k) is not None and bytes(rec[k][:6]) != b"SIMPLE":
                problems.append(f"{where}: {k} is not FITS")
        key = msg.key()
        if key is not None:  # no key: Rubin's conventions; a key must be apdask's
            oid = rec["diaSource"].get("diaObjectId")
            expect = KEY.pack(oid if oid is not None else rec["diaSourceId"])
            if key != expect:
                problems.append(f"{where}: key {key!r} is not the diaObjectId as int64")
        headers = dict(msg.headers() or ())
        if key is None and "producer_timestamp" not in headers:
            problems.append(f"{where}: no key and no producer_timestamp header")
    return {"n_alerts": n, "partitions": per_partition, "problems": problems}
