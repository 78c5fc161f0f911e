"""Kafka plumbing of :mod:`apdask.services.kafka`: URIs, credentials, spool location, topics.

Public names are importable from :mod:`apdask.services.kafka` as before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from apdask import config
from apdask.exceptions import ConfigurationError

__all__ = [
    "KAFKA_DEFAULT_MAX_MESSAGE_BYTES",
    "default_spool_dir",
    "ensure_topic",
    "parse_kafka_uri",
    "security_config",
    "topic_max_message_bytes",
]

log = logging.getLogger("apdask.services.kafka")

KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588  # a topic's max.message.bytes when not set


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
        ``max_message_bytes``, ``batch_bytes``, ``conventions``).

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
    known = {"spool_dir", "compression", "delivery_timeout", "max_message_bytes", "batch_bytes",
             "conventions"}  # fmt: skip
    unknown = set(options) - known
    if unknown:
        msg = f"unknown option(s) {sorted(unknown)} in Kafka URI; known: {', '.join(sorted(known))}"
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


def default_spool_dir():
    """The Kafka sink's spool directory when its URI names none (see :class:`KafkaSink`)."""
    d = config.get("alerts.spool_dir")
    if d:
        return Path(d)
    repo = config.get("repo")
    return Path(repo) / "alerts-spool" if repo and "://" not in str(repo) else Path("alerts-spool")


def ensure_topic(bootstrap, topic, partitions=1, timeout=10.0, max_message_bytes=None):
    """Create ``topic`` if it does not exist (tests, benchmarks, local brokers).

    Parameters
    ----------
    bootstrap : str
    topic : str
    partitions : int
    timeout : float
    max_message_bytes : int, optional
        The topic's ``max.message.bytes``: the largest record batch the broker
        accepts, which bounds the producer's batches.  Default
        ``alerts.kafka.batch_bytes``.

    Returns
    -------
    bool
        True if the topic was created.
    """
    limit = int(config.get("alerts.kafka.batch_bytes", max_message_bytes))
    admin = AdminClient({"bootstrap.servers": bootstrap, **security_config()})
    if topic in admin.list_topics(timeout=timeout).topics:
        return False
    new = NewTopic(topic, num_partitions=partitions, replication_factor=1,
                   config={"max.message.bytes": str(limit)})  # fmt: skip
    fut = admin.create_topics([new])
    try:
        fut[topic].result(timeout)
    except KafkaException as err:
        if "TOPIC_ALREADY_EXISTS" not in str(err):
            raise
        return False
    return True


def topic_max_message_bytes(bootstrap, topic, timeout=10.0):
    """The broker's limit on one record batch of ``topic`` (``max.message.bytes``).

    Parameters
    ----------
    bootstrap : str
    topic : str
    timeout : float

    Returns
    -------
    int or None
        The topic's ``max.message.bytes``, or None when the broker does not
        report it or cannot be asked; producers then assume Kafka's default,
        1,048,588 (``KAFKA_DEFAULT_MAX_MESSAGE_BYTES``), which any default
        Kafka topic accepts.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap, **security_config()})
    try:
        fut = admin.describe_configs([ConfigResource("topic", topic)], request_timeout=timeout)
        entries = next(iter(fut.values())).result(timeout)
        return int(entries["max.message.bytes"].value)
    except Exception as err:  # missing topic or setting, old broker, no ACL
        log.debug("max.message.bytes of %s unknown (%s); assuming Kafka's default", topic, err)
        return None
