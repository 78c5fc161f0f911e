"""The alert spool: undelivered alerts kept in fsync'd Avro files until replayed.

A spool file is an Avro object-container file (one record per block, deflate)
in ``<spool_dir>/<topic>/<visit>_<detector>_<ns>.avro``.  Its metadata hold the
schema id, the visit and detector, why each alert was not delivered, the
trimming applied and each alert's diaObjectId (the Kafka key under the ``apdask``
conventions; none under ``rubin``).  Any Avro reader
reads it; :func:`replay_spool` delivers it with a
:class:`apdask.services.kafka.KafkaSink` and keeps only what is still not acknowledged.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from pathlib import Path
from typing import Any

from apdask.alerts.avrovec import encode_bytes, encode_long
from apdask.alerts.packets import EncodedAlert
from apdask.alerts.schema import load_schema, schema_id_of, schema_registry
from apdask.alerts.sinks import avro_files
from apdask.core.files import atomic_open, fsync_dir
from apdask.exceptions import AlertDeliveryError

__all__ = ["write_spool", "read_spool", "replay_spool"]


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
    with atomic_open(path) as fh:
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
        "apdask.schema_id": schema_id_of(schema),
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
        encoded.append(EncodedAlert(sid, oid, body, trimmed.get(str(sid))))
    return info, encoded


def _spool_files(spool):
    return avro_files(spool, what="spool file")


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
    from apdask.services.kafka import KafkaSink, parse_kafka_uri

    bootstrap, topic, options = parse_kafka_uri(to_uri)
    files = _spool_files(spool)
    report: dict[str, Any] = {"files": len(files), "delivered": 0, "remaining": 0, "problems": []}
    sinks = {}
    try:
        for fn in files:
            info, encoded = read_spool(fn)
            sid = int(info.get("apdask.schema_id", 0)) or None
            sch = schema or (schema_registry().get_by_id(sid) if sid else load_schema())
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
                fsync_dir(fn.parent)
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
