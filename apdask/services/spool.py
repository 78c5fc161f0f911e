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
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apdask.alerts.avrovec import encode_bytes, encode_long
from apdask.alerts.done import AckJournal, DoneRecords
from apdask.alerts.packets import EncodedAlert
from apdask.alerts.schema import load_schema, schema_id_of, schema_registry
from apdask.alerts.sinks import avro_files
from apdask.core.faults import fault_point
from apdask.core.files import atomic_open, fsync_dir
from apdask.exceptions import AlertDeliveryError

if TYPE_CHECKING:  # the schema class, for annotations only
    from lsst.alert.packet import Schema

__all__ = ["write_spool", "read_spool", "replay_spool"]

log = logging.getLogger(__name__)

_TMP_GRACE_S = 60.0  # a spool temporary file younger than this may still be written


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


def _write_container(path, schema, bodies, metadata, codec="deflate", fault=None):
    """Write bodies as an Avro container (one record per block), fsync, atomic replace.

    ``fault`` names the :func:`~apdask.core.faults.fault_point` after the first record
    (tests only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sync = os.urandom(16)
    with atomic_open(path) as fh:
        fh.write(_container_header(schema, metadata, codec, sync))
        for i, body in enumerate(bodies):
            data = body
            if codec == "deflate":
                c = zlib.compressobj(wbits=-15)
                data = c.compress(body) + c.flush()
            fh.write(b"\x02" + encode_long(len(data)) + data + sync)
            if i == 0 and fault:
                fault_point(fault, fh.flush)
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


def write_spool(
    spool_dir: str | os.PathLike[str],
    topic: str,
    visit: int,
    detector: int,
    schema: Schema,
    encoded: Sequence[EncodedAlert],
    reasons: Sequence[str],
) -> Path:
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
        return _write_container(
            path, schema, [a.body for a in encoded], metadata, fault="spool-partial"
        )
    except OSError as err:
        msg = (
            f"{len(encoded)} alerts of visit {visit} detector {detector} were not delivered "
            f"and cannot be spooled to {path}: {err}; free disk space or set "
            "apdask.alerts.spool_dir to a writable directory"
        )
        raise AlertDeliveryError(msg) from err


def read_spool(path: str | os.PathLike[str]) -> tuple[dict[str, str], list[EncodedAlert]]:
    """Read a spool file written by :func:`write_spool`.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    metadata : dict of str
    encoded : list of EncodedAlert

    Raises
    ------
    ValueError
        Not an apdask spool file, or a truncated or corrupt one (e.g. the temporary
        file of an interrupted write); the message names the file.
    """
    data = Path(path).read_bytes()
    if data[:4] != b"Obj\x01":
        msg = f"{path} is not an Avro object-container file"
        raise ValueError(msg)
    try:
        meta, bodies = _parse_container(path, data)
        info = {k: v.decode() for k, v in meta.items() if k.startswith("apdask.")}
        trimmed = json.loads(info.get("apdask.trimmed", "{}"))
        objects = json.loads(info.get("apdask.objects", "[]")) or [None] * len(bodies)
    except (IndexError, zlib.error, UnicodeDecodeError) as err:
        msg = f"{path}: truncated or corrupt spool file ({type(err).__name__}: {err})"
        raise ValueError(msg) from None
    if len(objects) != len(bodies):
        msg = f"{path}: truncated spool file: {len(bodies)} of its {len(objects)} alerts"
        raise ValueError(msg)
    encoded = []
    for body, oid in zip(bodies, objects, strict=True):
        sid, _ = _read_varint(body, 0)  # diaSourceId is the first field of the alert
        encoded.append(EncodedAlert(sid, oid, body, trimmed.get(str(sid))))
    return info, encoded


def _parse_container(path, data):
    """The metadata and the record bodies of a spool container (one record per block)."""
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
    return meta, bodies


def _spool_files(spool):
    return avro_files(spool, what="spool file")


class _Replay:
    """One replay: Kafka sinks by schema, and the report."""

    def __init__(self, to_uri, schema):
        from apdask.services.kafka import parse_kafka_uri  # lazy: kafka imports this module

        self.bootstrap, self.topic, self.options = parse_kafka_uri(to_uri)
        self.schema = schema
        self.sinks = {}
        self.report: dict[str, Any] = {
            "files": 0, "delivered": 0, "remaining": 0, "problems": [], "leftovers": [],
        }  # fmt: skip

    def sink(self, info):
        from apdask.services.kafka import KafkaSink  # lazy: kafka imports this module

        sid = int(info.get("apdask.schema_id", 0)) or None
        sch = self.schema or (schema_registry().get_by_id(sid) if sid else load_schema())
        if id(sch) not in self.sinks:
            self.sinks[id(sch)] = KafkaSink(self.bootstrap, self.topic, schema=sch, **self.options)
        return self.sinks[id(sch)]

    def deliver(self, fn, info, encoded):
        """Deliver one spool's alerts; the indices not acknowledged, with their reasons."""
        visit = int(info.get("apdask.visit", 0))
        detector = int(info.get("apdask.detector", 0))
        sink = self.sink(info)
        # the journal beside the spool file: a CCD re-run later sends none of these again
        journal = AckJournal(Path(fn).parent / "acked")
        acked, failed = sink.deliver(visit, detector, encoded, journal=journal)
        if DoneRecords(Path(fn).parent / "done").read(visit, detector) is not None:
            journal.remove(visit, detector)  # the CCD is done: no re-run will ask
        self.report["delivered"] += len(acked)
        self.report["remaining"] += len(failed)
        for reason in sorted(set(failed.values())):
            self.report["problems"].append(f"{fn}: {reason}")
        return acked, failed

    def keep(self, dest, info, encoded, failed):
        """(Re)write ``dest`` with the alerts not acknowledged."""
        keep = [encoded[i] for i in sorted(failed)]
        meta = {k: v for k, v in info.items() if k != "apdask.reasons"}
        meta["apdask.reasons"] = json.dumps([failed[i] for i in sorted(failed)])
        meta["apdask.objects"] = json.dumps([a.diaObjectId for a in keep])
        _write_container(dest, self.sink(info).schema, [a.body for a in keep], meta)

    def close(self):
        for s in self.sinks.values():
            s.close()


def replay_spool(
    spool: str | os.PathLike[str],
    to_uri: str,
    schema: Schema | None = None,
    tmp_grace_s: float = _TMP_GRACE_S,
) -> dict[str, Any]:
    """Deliver spooled alerts; remove only the acknowledged ones; pick up or clean leftovers.

    First the temporary files that interrupted writes left in a spool directory
    (``.<name>.<random>.tmp``, see :mod:`apdask.core.files`) are handled: a complete
    spool write whose CCD has no done record is delivered like a spool file and the
    CCD recorded as done (what was not acknowledged becomes the spool file it was to
    be); anything else is removed: an incomplete write (its CCD, without a done
    record, is re-sent by re-running it), a write whose CCD has been re-sent since,
    an interrupted rewrite of a spool file that is still there, or an interrupted
    done record.  Each case is reported under ``leftovers`` and logged.  Then each
    spool file is delivered; when all its alerts are acknowledged it is deleted,
    otherwise it is atomically rewritten with the remainder.

    Parameters
    ----------
    spool : str or os.PathLike
        A spool file or directory (searched recursively for ``*.avro``).
    to_uri : str
        ``kafka://HOST:PORT/TOPIC`` (options as for :class:`KafkaSink`).
    schema : lsst.alert.packet.Schema, optional
        Defaults to the schema whose id the spool file records.
    tmp_grace_s : float
        Temporary files younger than this (seconds) are left alone: a writer may
        still own them.

    Returns
    -------
    dict
        ``{"files": int, "delivered": int, "remaining": int, "problems": [str],
        "leftovers": [{"path", "action", "why"}]}``; ``action`` is ``delivered``,
        ``spooled`` (not all acknowledged: the rest is now the spool file
        ``spool_path``, replayed next time), ``removed``, ``kept`` or ``gone``.
    """
    run = _Replay(to_uri, schema)
    try:
        # Leftovers first: whether the file a temporary one was to replace is still
        # there tells a rewrite (its file intact) from a first write.
        for tmp in _leftovers(spool):
            entry = _handle_leftover(run, tmp, tmp_grace_s)
            log.warning("spool leftover %s: %s (%s)", tmp, entry["action"], entry["why"])
            run.report["leftovers"].append(entry)
        respooled = {Path(e["spool_path"]) for e in run.report["leftovers"] if "spool_path" in e}
        files = [fn for fn in _spool_files(spool) if fn not in respooled]  # not twice
        run.report["files"] = len(files)
        for fn in files:
            info, encoded = read_spool(fn)
            acked, failed = run.deliver(fn, info, encoded)
            if not failed:
                fn.unlink()
                fsync_dir(fn.parent)
            elif acked:
                run.keep(fn, info, encoded, failed)
    finally:
        run.close()
    return run.report


# ---------------------------------------------------------------------------
# leftovers of interrupted writes


def _leftovers(spool):
    """Temporary files of interrupted atomic writes below a spool directory."""
    p = Path(spool)
    return sorted(p.rglob(".*.tmp")) if p.is_dir() else []


def _tmp_target(tmp):
    """The file an atomic write's temporary file ``.<name>.<random>.tmp`` was to become."""
    return tmp.with_name(tmp.name[1 : -len(".tmp")].rsplit(".", 1)[0])


def _remove(tmp, why):
    tmp.unlink(missing_ok=True)
    fsync_dir(tmp.parent)
    return {"path": str(tmp), "action": "removed", "why": why}


def _handle_leftover(run, tmp, grace):
    """Pick up or remove one temporary file; the report entry says what and why."""
    entry = {"path": str(tmp), "action": "kept"}
    try:
        age = time.time() - tmp.stat().st_mtime
    except FileNotFoundError:
        return {**entry, "action": "gone", "why": "renamed or removed by its writer meanwhile"}
    if age < grace:
        return {**entry, "why": f"written {age:.0f} s ago: its writer may still own it"}
    dest = _tmp_target(tmp)
    if dest.suffix == ".json":
        return _remove(tmp, "an interrupted done record; its CCD is re-sent by a re-run")
    parts = dest.stem.split("_")
    if dest.suffix != ".avro" or len(parts) != 3 or not all(p.isdigit() for p in parts):
        return {**entry, "why": "not the temporary file of a spool write"}
    if dest.exists():
        return _remove(tmp, f"an interrupted rewrite of {dest.name}, which is intact")
    visit, detector = int(parts[0]), int(parts[1])
    done = DoneRecords(tmp.parent / "done")
    if done.read(visit, detector) is not None:
        return _remove(tmp, f"visit {visit} detector {detector} was re-sent since (done record)")
    try:
        info, encoded = read_spool(tmp)
    except ValueError as err:
        return _remove(
            tmp,
            f"an incomplete spool write ({err}); visit {visit} detector {detector} has no "
            "done record: re-run it (apdask process-ccd or process-visit) to re-send its "
            "alerts from the PPDB",
        )
    acked, failed = run.deliver(tmp, info, encoded)
    if failed:
        run.keep(dest, info, encoded, failed)
    done.write(visit, detector, sink=f"kafka://{run.bootstrap}/{run.topic}",
               delivered=len(acked), spooled=len(failed),
               spool_path=str(dest) if failed else None, picked_up=str(tmp))  # fmt: skip
    why = (
        f"a complete spool write of visit {visit} detector {detector}, interrupted before "
        "its rename: delivered"
    )
    if failed:
        why += f", {len(failed)} alerts not acknowledged spooled to {dest.name}"
    out = _remove(tmp, why)
    out["action"] = "spooled" if failed else "delivered"
    if failed:
        out["spool_path"] = str(dest)
    return out
