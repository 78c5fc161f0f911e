"""The Confluent wire format: a magic byte and a schema id in front of the Avro body."""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import fastavro
import fastavro.validation

from apdask.alerts.schema import load_schema, parsed_schema, schema_id_of

if TYPE_CHECKING:  # the schema class, for annotations only
    from lsst.alert.packet import Schema

__all__ = ["CONFLUENT_HEADER", "confluent_frame", "confluent_unframe"]

#: The Confluent wire header: magic byte 0, then the schema id as big-endian int32.
CONFLUENT_HEADER = struct.Struct(">bi")


def confluent_frame(alert: Mapping[str, Any], schema: Schema | None = None) -> bytes:
    """Serialise one alert in the Confluent wire format.

    Parameters
    ----------
    alert : dict
    schema : lsst.alert.packet.Schema, optional

    Returns
    -------
    bytes
        Magic byte 0, the schema id as big-endian int32, then the schemaless
        Avro body.
    """
    schema = load_schema() if schema is None else schema
    buf = io.BytesIO()
    buf.write(CONFLUENT_HEADER.pack(0, schema_id_of(schema)))
    fastavro.schemaless_writer(buf, parsed_schema(schema), alert)
    return buf.getvalue()


def confluent_unframe(data: bytes, schema: Schema | None = None) -> dict[str, Any]:
    """Decode bytes produced by :func:`confluent_frame`.

    Parameters
    ----------
    data : bytes
    schema : lsst.alert.packet.Schema, optional

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        On a wrong magic byte or a schema id different from ``schema``'s.
    """
    schema = load_schema() if schema is None else schema
    if len(data) < CONFLUENT_HEADER.size:
        msg = f"Confluent frame too short ({len(data)} bytes)"
        raise ValueError(msg)
    magic, schema_id = CONFLUENT_HEADER.unpack_from(data)
    if magic != 0:
        msg = f"not a Confluent frame: magic byte {magic}, expected 0"
        raise ValueError(msg)
    if schema_id != schema_id_of(schema):
        msg = (
            f"frame carries schema id {schema_id} but the reader schema has id "
            f"{schema_id_of(schema)}; load the matching schema version"
        )
        raise ValueError(msg)
    buf = io.BytesIO(data)
    buf.seek(CONFLUENT_HEADER.size)
    parsed = parsed_schema(schema)
    return cast(dict[str, Any], fastavro.schemaless_reader(buf, parsed, parsed))
