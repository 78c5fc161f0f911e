"""Alert packets in Rubin's official Avro schema, their wire format and their sinks."""

from apdask.alerts.packets import EncodedAlert, encode_alert, package_alerts
from apdask.alerts.schema import load_schema
from apdask.alerts.sinks import FileSink, SinkResult, read_alerts, sink_from_uri, validate_alerts
from apdask.alerts.stamps import StampMaker
from apdask.alerts.wire import confluent_frame, confluent_unframe

__all__ = [
    "EncodedAlert",
    "FileSink",
    "SinkResult",
    "StampMaker",
    "confluent_frame",
    "confluent_unframe",
    "encode_alert",
    "load_schema",
    "package_alerts",
    "read_alerts",
    "sink_from_uri",
    "validate_alerts",
]
