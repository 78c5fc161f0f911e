"""The official Rubin alert schema (lsst-alert-packet) and its parsed, cached record specs."""

from __future__ import annotations

import functools
import math
from typing import Any

import fastavro
import fastavro.validation
import numpy as np
from lsst.alert.packet import Schema, SchemaRegistry

from apdask import config
from apdask.exceptions import ConfigurationError

__all__ = ["load_schema"]


@functools.lru_cache(maxsize=1)
def schema_registry() -> SchemaRegistry:
    return SchemaRegistry.all_schemas_from_filesystem()


@functools.lru_cache(maxsize=16)
def _load_schema(version):
    if version is None:
        return Schema.from_file()
    registry = schema_registry()
    try:
        return registry.get_by_version(str(version))
    except KeyError:
        known = sorted(registry.known_versions, key=lambda v: tuple(int(p) for p in v.split(".")))
        msg = (
            f"unknown alert schema version {version!r}; lsst-alert-packet ships "
            f"{', '.join(known)}. Set apdask.alerts.schema_version to one of these "
            "(or null for the newest)."
        )
        raise ConfigurationError(msg) from None


def load_schema(version: str | None = None) -> Schema:
    """Return the ``lsst.alert.packet`` schema of the given version (cached).

    Parameters
    ----------
    version : str, optional
        Schema version such as ``"11.1"``; defaults to configuration
        ``alerts.schema_version`` and, when that is null, to the newest schema
        shipped with lsst-alert-packet.

    Returns
    -------
    lsst.alert.packet.Schema
        The schema; ``.definition`` is the resolved Avro dict.

    Raises
    ------
    ConfigurationError
        If the version is not shipped by the installed lsst-alert-packet.
    """
    version = config.get("alerts.schema_version", version)
    return _load_schema(None if version is None else str(version))


_PER_SCHEMA: dict[int, Any] = {}  # id(schema) -> (schema, parsed Avro schema, _AlertSpec)


def _per_schema(schema):
    entry = _PER_SCHEMA.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = (schema, fastavro.parse_schema(schema.definition), _AlertSpec(schema))
        _PER_SCHEMA[id(schema)] = entry
    return entry


def parsed_schema(schema: Schema) -> dict[str, Any]:
    return _per_schema(schema)[1]


def schema_id_of(schema: Schema) -> int:
    return int(schema.get_schema_id())


def _to_float(v):
    f = float(v)
    return None if math.isnan(f) else f


def _to_int(v):
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return None
        if not float(v).is_integer():
            msg = f"expected an integer, got {v!r}"
            raise ValueError(msg)
    return int(v)


def _to_bool(v):
    if isinstance(v, float | np.floating) and math.isnan(v):
        return None
    return bool(v)


def _to_str(v):
    if isinstance(v, bytes | np.bytes_):
        return v.decode()
    if isinstance(v, float | np.floating) and math.isnan(v):
        return None
    return str(v)


def _to_bytes(v):
    return bytes(v)


_PRIMITIVE = {
    "long": _to_int,
    "int": _to_int,
    "float": _to_float,
    "double": _to_float,
    "boolean": _to_bool,
    "string": _to_str,
    "bytes": _to_bytes,
}


def _collect_named(avro_type, named):
    """Record every named record type below ``avro_type`` in ``named``."""
    if isinstance(avro_type, list):
        for t in avro_type:
            _collect_named(t, named)
    elif isinstance(avro_type, dict):
        kind = avro_type.get("type")
        if kind == "record":
            named[avro_type["name"]] = avro_type
            named[avro_type["name"].rsplit(".", 1)[-1]] = avro_type
            for f in avro_type["fields"]:
                _collect_named(f["type"], named)
        elif kind == "array":
            _collect_named(avro_type["items"], named)
        elif kind in _PRIMITIVE:
            pass


class _RecordSpec:
    """Precomputed field list of one Avro record: ``(name, convert, nullable)``."""

    def __init__(self, record, named):
        self.name = record["name"]
        self.fields = []
        for f in record["fields"]:
            t = f["type"]
            nullable = isinstance(t, list) and "null" in t
            if isinstance(t, list):
                non_null = [x for x in t if x != "null"]
                t = non_null[0] if len(non_null) == 1 else non_null
            if isinstance(t, dict) and t.get("type") in _PRIMITIVE:
                t = t["type"]
            if isinstance(t, str) and t in _PRIMITIVE:
                conv = _PRIMITIVE[t]
            else:
                conv = None  # nested record/array: handled by make_alert
            self.fields.append((f["name"], conv, nullable))

    def build(self, row):
        out: dict[str, Any] = {}
        get = row.get
        for name, conv, nullable in self.fields:
            v = get(name)
            if v is None or v is np.ma.masked:
                if not nullable:
                    msg = (
                        f"{self.name}: required field {name!r} is missing or null; "
                        "fill it in the catalog before building alerts"
                    )
                    raise ValueError(msg)
                out[name] = None
                continue
            try:
                v = conv(v) if conv is not None else v
            except (TypeError, ValueError) as err:
                msg = f"{self.name}.{name}: cannot convert {v!r}: {err}"
                raise ValueError(msg) from None
            if v is None and not nullable:
                msg = (
                    f"{self.name}: required field {name!r} is NaN; "
                    "a non-nullable field needs a finite value"
                )
                raise ValueError(msg)
            out[name] = v
        return out


class _AlertSpec:
    def __init__(self, schema):
        definition = schema.definition
        named: dict[str, Any] = {}
        _collect_named(definition, named)
        self.top = [f["name"] for f in definition["fields"]]

        def spec(short):
            return _RecordSpec(named[short], named) if short in named else None

        self.dia_source = spec("diaSource")
        self.forced = spec("diaForcedSource")
        self.dia_object = spec("diaObject")


def _alert_spec(schema):
    return _per_schema(schema)[2]
