"""Alert packets: one Avro record per DIASource with its history and cutouts, built column-wise."""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import fastavro
import fastavro.validation
import numpy as np

from apdask.alerts.avrovec import RecordEncoder, encode_long
from apdask.alerts.schema import (
    _PER_SCHEMA,
    _collect_named,
    _per_schema,
    load_schema,
    parsed_schema,
    schema_id_of,
)
from apdask.alerts.wire import CONFLUENT_HEADER

if TYPE_CHECKING:
    from lsst.alert.packet import Schema

__all__ = ["EncodedAlert", "package_alerts", "encode_alert"]


class EncodedAlert:
    """One alert already serialised as a schemaless Avro body.

    Attributes
    ----------
    diaSourceId, diaObjectId : int or None
        Ids of the triggering DiaSource and its DiaObject (the Kafka key under
        ``alerts.kafka.conventions: apdask``).
    body : bytes
        Schemaless Avro encoding in the schema it was built with.
    trimmed : str or None
        What was cut to make the alert fit the broker's size limit, if anything.
    frame : bytes or None
        The Confluent frame when :func:`package_alerts` built one (``body`` is
        then a memoryview into it).
    """

    __slots__ = ("diaSourceId", "diaObjectId", "body", "trimmed", "frame")

    def __init__(self, diaSourceId, diaObjectId, body, trimmed=None, frame=None):
        self.diaSourceId = diaSourceId
        self.diaObjectId = diaObjectId
        self.body = body
        self.trimmed = trimmed
        self.frame = frame  # optional Confluent frame (header + body), saves a copy on produce

    @classmethod
    def _framed(cls, diaSourceId, diaObjectId, frame):
        """From a Confluent frame; ``body`` is a zero-copy view of it."""
        return cls(diaSourceId, diaObjectId, memoryview(frame)[CONFLUENT_HEADER.size :],
                   frame=frame)  # fmt: skip

    def __reduce__(self):  # memoryview bodies do not pickle: rebuild from the frame
        if self.frame is not None:
            return (
                _unpickle_framed,
                (self.diaSourceId, self.diaObjectId, self.frame, self.trimmed),
            )
        return (EncodedAlert, (self.diaSourceId, self.diaObjectId, bytes(self.body), self.trimmed))

    def __repr__(self):
        return (
            f"EncodedAlert(diaSourceId={self.diaSourceId}, diaObjectId={self.diaObjectId}, "
            f"{len(self.body)} bytes)"
        )

    def decode(self, schema: Schema | None = None) -> dict[str, Any]:
        """Return the packet as a dict (fastavro)."""
        parsed = parsed_schema(load_schema() if schema is None else schema)
        record = fastavro.schemaless_reader(io.BytesIO(self.body), parsed, parsed)
        return cast(dict[str, Any], record)  # an alert is an Avro record


def _unpickle_framed(diaSourceId, diaObjectId, frame, trimmed):
    alert = EncodedAlert._framed(diaSourceId, diaObjectId, frame)
    alert.trimmed = trimmed
    return alert


def encode_alert(
    alert: Mapping[str, Any] | EncodedAlert, schema: Schema | None = None
) -> EncodedAlert:
    """Return an :class:`EncodedAlert` of a packet dict (or pass one through).

    Parameters
    ----------
    alert : dict or EncodedAlert
    schema : lsst.alert.packet.Schema, optional

    Returns
    -------
    EncodedAlert
    """
    if isinstance(alert, EncodedAlert):
        return alert
    schema = load_schema() if schema is None else schema
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed_schema(schema), alert)
    src = alert.get("diaSource") or {}
    oid = src.get("diaObjectId")
    return EncodedAlert(alert["diaSourceId"], oid, buf.getvalue())


class _Packager:
    """Per-schema encoders and the layout of the top-level alert record."""

    def __init__(self, schema):
        definition = schema.definition
        named: dict[str, Any] = {}
        _collect_named(definition, named)
        self.source = RecordEncoder(named["diaSource"])
        self.forced = RecordEncoder(named["diaForcedSource"])
        self.object = RecordEncoder(named["diaObject"])
        self.top = []
        for f in definition["fields"]:
            t = f["type"]
            null_first = isinstance(t, list) and t[0] == "null"
            self.top.append((f["name"], null_first))


def _packager(schema):
    entry = _per_schema(schema)
    if len(entry) == 3:
        entry = (*entry, _Packager(schema))
        _PER_SCHEMA[id(schema)] = entry
    return entry[3]


def _column(table, name):
    if table is None:
        return None
    if hasattr(table, "colnames"):
        return np.asarray(table[name]) if name in table.colnames else None
    col = table.get(name)
    return None if col is None else np.asarray(col)


def _n_rows(table):
    if table is None:
        return 0
    if hasattr(table, "colnames"):
        return len(table)
    return len(next(iter(table.values()))) if table else 0


_CHUNK_ROWS = 4096  # rows encoded at once: keeps the byte matrices cache-sized


def _row_bytes(encoder, table):
    n = _n_rows(table)
    if n == 0:
        return []
    out: list[Any] = []
    if n > _CHUNK_ROWS:
        cols = {f.name: _column(table, f.name) for f in encoder.fields}
        cols = {k: v for k, v in cols.items() if v is not None}
        chunks = [
            ({k: v[a : a + _CHUNK_ROWS] for k, v in cols.items()}, min(_CHUNK_ROWS, n - a))
            for a in range(0, n, _CHUNK_ROWS)
        ]
    else:
        chunks = [(table, n)]
    for sub, m in chunks:
        flat, off = encoder.encode(sub, m)
        off = off.tolist()
        out.extend(flat[off[i] : off[i + 1]] for i in range(m))
    return out


def _groups(ids):
    """``{id: [row indices]}`` of an integer column, rows in table order (nulls skipped)."""
    if ids is None or len(ids) == 0:
        return {}
    ids = np.asarray(ids)
    if ids.dtype.kind == "f":
        keep = np.flatnonzero(~np.isnan(ids))
        ids = ids[keep].astype(np.int64)
    else:
        keep = np.arange(len(ids))
        ids = ids.astype(np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    cuts = np.flatnonzero(np.diff(sorted_ids)) + 1
    rows = keep[order].tolist()
    starts = [0, *cuts.tolist()]
    ends = [*cuts.tolist(), len(rows)]
    keys = sorted_ids[starts].tolist()
    return {k: rows[a:b] for k, a, b in zip(keys, starts, ends, strict=True)}


def _array_block(items):
    if not items:
        return b"\x02\x00"  # union branch 1 (array), empty array
    return b"\x02" + encode_long(len(items)) + b"".join(items) + b"\x00"


def _add_nullable_bytes(parts, b):
    """Append a ``["null", "bytes"]`` value without copying the (large) bytes."""
    if b is None:
        parts.append(b"\x00")
    else:
        b = b if isinstance(b, bytes) else bytes(b)
        parts.append(b"\x02" + encode_long(len(b)))
        parts.append(b)


def package_alerts(
    sources: Any,
    history: Any = None,
    forced_history: Any = None,
    objects: Any = None,
    cutouts: Any = None,
    schema: Schema | None = None,
) -> list[EncodedAlert]:
    """Build and serialise the alerts of one CCD, column-wise.

    Byte-identical to ``make_alert`` followed by ``fastavro.schemaless_writer``,
    but about 20 times faster for realistic histories: every table is encoded
    once with numpy (see ``apdask.alerts.avrovec``) and each alert is assembled from
    byte slices.

    Parameters
    ----------
    sources : astropy.table.Table or mapping of columns
        The triggering DiaSources, one alert each (schema column names).
    history : Table or mapping, optional
        Previous DiaSources (may include ``sources``); rows of the alert's
        ``diaObjectId`` other than the alert's own ``diaSourceId`` become
        ``prvDiaSources``.
    forced_history : Table or mapping, optional
        Previous DiaForcedSources, grouped by ``diaObjectId`` into
        ``prvDiaForcedSources``.
    objects : Table or mapping, optional
        The (updated) DiaObjects, matched by ``diaObjectId``.
    cutouts : sequence of (bytes or None) triples, optional
        ``(difference, science, template)`` FITS stamps per source.
    schema : lsst.alert.packet.Schema, optional

    Returns
    -------
    list of EncodedAlert
        In the order of ``sources``; each carries its Confluent ``frame`` too.

    Raises
    ------
    ValueError
        If a required field is missing or NaN; the message names it.
    """
    schema = load_schema() if schema is None else schema
    pk = _packager(schema)
    n = _n_rows(sources)
    if n == 0:
        return []
    src_bytes = _row_bytes(pk.source, sources)
    src_ids = _column(sources, "diaSourceId").astype(np.int64).tolist()
    oid_col = _column(sources, "diaObjectId")
    src_oids = [None] * n if oid_col is None else oid_col.tolist()
    hist_bytes = _row_bytes(pk.source, history)
    hist_groups = _groups(_column(history, "diaObjectId")) if hist_bytes else {}
    hist_ids = _column(history, "diaSourceId").tolist() if hist_bytes else []
    forced_bytes = _row_bytes(pk.forced, forced_history)
    forced_groups = _groups(_column(forced_history, "diaObjectId")) if forced_bytes else {}
    obj_bytes = _row_bytes(pk.object, objects)
    obj_index: dict[Any, int] = {}
    if obj_bytes:
        for i, v in enumerate(_column(objects, "diaObjectId").tolist()):
            obj_index[int(v)] = i
    if cutouts is None:
        cutouts = [(None, None, None)] * n
    elif len(cutouts) != n:
        msg = f"got {len(cutouts)} cutout triples for {n} sources; give one per source"
        raise ValueError(msg)
    out = []
    header = CONFLUENT_HEADER.pack(0, schema_id_of(schema))
    for i in range(n):
        sid = src_ids[i]
        oid = src_oids[i]
        if oid is not None and oid == oid:
            oid = int(oid)
        else:
            oid = None
        diff, sci, tmpl = cutouts[i]
        prv = [hist_bytes[j] for j in hist_groups.get(oid, ()) if hist_ids[j] != sid]
        frc = [forced_bytes[j] for j in forced_groups.get(oid, ())]
        oi = obj_index.get(oid)
        parts = [header]
        for name, null_first in pk.top:
            if name == "diaSourceId":
                parts.append(encode_long(sid))
            elif name == "diaSource":
                parts.append(src_bytes[i])
            elif name == "prvDiaSources":
                parts.append(_array_block(prv))
            elif name == "prvDiaForcedSources":
                parts.append(_array_block(frc))
            elif name == "diaObject":
                parts.append(b"\x00" if oi is None else b"\x02" + obj_bytes[oi])
            elif name == "cutoutDifference":
                _add_nullable_bytes(parts, diff)
            elif name == "cutoutScience":
                _add_nullable_bytes(parts, sci)
            elif name == "cutoutTemplate":
                _add_nullable_bytes(parts, tmpl)
            elif null_first:
                parts.append(b"\x00")
            else:
                msg = f"alert field {name!r} is required by the schema but apdask cannot fill it"
                raise ValueError(msg)
        out.append(EncodedAlert._framed(sid, oid, b"".join(parts)))
    return out
