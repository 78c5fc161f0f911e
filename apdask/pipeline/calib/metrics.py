"""Publication of calibration reports: a JSON file per frame and a metrics sink."""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any
from urllib.parse import urlparse

from apdask.core.files import atomic_write
from apdask.exceptions import ApdaskError, ConfigurationError

__all__ = ["MetricsDeliveryError", "publish_metrics"]


class MetricsDeliveryError(ApdaskError):
    """The calibration metrics could not be published; they were spooled to a file."""

    exit_code = 74  # EX_IOERR


def _atomic_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=1, default=float) + "\n")


def _append_line(path, line):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def publish_metrics(
    report: dict[str, Any], uri: str, spool: str | None = None, timeout: float = 10.0
) -> str:
    """Publish a calibration report to a metrics sink.

    Parameters
    ----------
    report : dict
        The report of :func:`process_calib` (one JSON message).
    uri : str
        ``file://PATH`` (or a plain path): append one JSON line to PATH.
        ``kafka://HOST:PORT/TOPIC``: produce one message, key ``<instrument>/<ccd>``,
        with an idempotent producer, and wait for its delivery report.
    spool : str, optional
        JSON Lines file a failed Kafka delivery is appended to.
    timeout : float, optional
        Seconds to wait for Kafka delivery.

    Returns
    -------
    str
        Where the metrics went.

    Raises
    ------
    MetricsDeliveryError
        If Kafka did not acknowledge the message (it is then in ``spool``).
    ConfigurationError
        For an unusable URI.
    """
    line = json.dumps(report, default=float, separators=(",", ":"))
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "kafka":
        topic = parsed.path.lstrip("/")
        if not parsed.netloc or not topic or "/" in topic:
            msg = f"metrics sink {uri!r} must look like kafka://HOST:PORT/TOPIC"
            raise ConfigurationError(msg)
        return _produce(parsed.netloc, topic, report, line, spool, timeout)
    if parsed.scheme not in ("", "file"):
        msg = f"unsupported metrics sink {uri!r}; use file://PATH or kafka://HOST:PORT/TOPIC"
        raise ConfigurationError(msg)
    path = parsed.path if parsed.scheme == "file" else uri
    _append_line(path, line)
    return f"file://{os.path.abspath(path)}"


def _produce(
    servers: str,
    topic: str,
    report: dict[str, Any],
    line: str,
    spool: str | None,
    timeout: float,
) -> str:
    # lazy: only a Kafka metrics sink needs the client
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []
    try:
        producer = Producer(
            {
                "bootstrap.servers": servers,
                "enable.idempotence": True,
                "acks": "all",
                "message.timeout.ms": int(timeout * 1000),
            }
        )
        key = f"{report.get('instrument')}/{report.get('detector')}"

        def on_delivery(err: Any, _msg: Any) -> None:
            if err:
                errors.append(str(err))

        producer.produce(topic, value=line.encode(), key=key.encode(), on_delivery=on_delivery)
        left = producer.flush(timeout)
    except (KafkaException, BufferError) as exc:
        errors.append(str(exc))
        left = 1
    if left or errors:
        where = ""
        if spool:
            _append_line(spool, line)
            where = f"; the report was spooled to {spool}"
        msg = (
            f"calibration metrics were not delivered to kafka://{servers}/{topic} "
            f"({'; '.join(errors) or 'no acknowledgement'}){where}"
        )
        raise MetricsDeliveryError(msg)
    return f"kafka://{servers}/{topic}"
