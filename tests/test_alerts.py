"""Tests of apdask.alerts: packet construction, file sink, Confluent framing."""

from __future__ import annotations

import copy
import io
import math
import struct

import fastavro
import numpy as np
import pytest
from astropy.io import fits
from lsst.alert.packet import simulate_alert

from apdask import alerts
from apdask.exceptions import ConfigurationError


@pytest.fixture(scope="module")
def schema():
    return alerts.load_schema()


def _record(schema, short):
    named = {}
    alerts._collect_named(schema.definition, named)
    return named[short]


def _example_row(schema, short, rng, **overrides):
    """A row dict with a value for every field, as numpy scalars like a Table row."""
    row = {}
    for f in _record(schema, short)["fields"]:
        t = f["type"]
        base = [x for x in t if x != "null"][0] if isinstance(t, list) else t
        if base in ("long", "int"):
            row[f["name"]] = np.int64(rng.integers(0, 1000))
        elif base == "float":  # float32 values survive the Avro round trip exactly
            row[f["name"]] = np.float32(rng.normal())
        elif base == "double":
            row[f["name"]] = np.float64(rng.normal())
        elif base == "boolean":
            row[f["name"]] = np.bool_(rng.integers(0, 2))
        elif base == "string":
            row[f["name"]] = "r"
    row.update(overrides)
    return row


def _fits_bytes(value=1.0):
    buf = io.BytesIO()
    fits.PrimaryHDU(np.full((5, 5), value, dtype=np.float32)).writeto(buf)
    return buf.getvalue()


@pytest.fixture()
def packet(schema):
    rng = np.random.default_rng(1)
    sim = simulate_alert(copy.deepcopy(schema.definition))["diaSource"]  # example names and values
    src = dict(sim, psfFlux=float("nan"), ra=10.0, dec=-5.0)
    prv = [_example_row(schema, "diaSource", rng, diaSourceId=i) for i in range(3)]
    forced = [_example_row(schema, "diaForcedSource", rng) for _ in range(4)]
    obj = _example_row(schema, "diaObject", rng, g_psfFluxMean=np.float32("nan"))
    cut = (_fits_bytes(1), _fits_bytes(2), _fits_bytes(3))
    return alerts.make_alert(src, prv, forced, obj, cut, schema=schema)


def test_make_alert_conforms(schema, packet):
    assert fastavro.validation.validate(packet, fastavro.parse_schema(schema.definition))
    assert packet["diaSourceId"] == packet["diaSource"]["diaSourceId"]
    assert packet["diaSource"]["psfFlux"] is None  # NaN -> null
    assert packet["diaObject"]["g_psfFluxMean"] is None
    assert packet["ssSource"] is None and packet["mpc_orbits"] is None
    assert len(packet["prvDiaSources"]) == 3 and len(packet["prvDiaForcedSources"]) == 4
    assert type(packet["prvDiaSources"][0]["visit"]) is int
    assert type(packet["prvDiaSources"][0]["ra"]) is float
    assert type(packet["prvDiaSources"][0]["centroid_flag"]) is bool


def test_missing_nullable_is_none_and_required_errors(schema):
    minimal = {
        "diaSourceId": 1,
        "visit": 2,
        "detector": 3,
        "midpointMjdTai": 60000.0,
        "ra": 1.0,
        "dec": 2.0,
        "x": 3.0,
        "y": 4.0,
        "psfNdata": 0,
        "trailNdata": 0,
        "dipoleNdata": 0,
        "timeProcessedMjdTai": 60000.1,
        "bboxSize": 30,
    }
    alert = alerts.make_alert(minimal, [], [], None, schema=schema)
    assert alert["diaSource"]["psfFlux"] is None and alert["diaObject"] is None
    bad = dict(minimal)
    del bad["bboxSize"]
    with pytest.raises(ValueError, match="bboxSize"):
        alerts.make_alert(bad, [], [], None, schema=schema)
    with pytest.raises(ValueError, match="'ra'"):
        alerts.make_alert(dict(minimal, ra=float("nan")), [], [], None, schema=schema)


def test_file_sink_round_trip_and_overwrite(tmp_path, schema, packet):
    sink = alerts.sink_from_uri(f"file://{tmp_path}")
    path = sink.write(7, 12, [packet, packet])
    assert path == tmp_path / "visit_7" / "7_12.avro"
    back = alerts.read_alerts(tmp_path)
    assert len(back) == 2
    assert back[0]["diaSource"] == packet["diaSource"]
    assert back[0]["cutoutScience"] == packet["cutoutScience"]
    report = alerts.validate_alerts(tmp_path, schema=schema)
    assert report == {"n_alerts": 2, "n_files": 1, "problems": []}
    # overwrite of the same CCD/visit replaces the file, leaves no temp files
    sink.write(7, 12, [packet])
    assert len(alerts.read_alerts(path)) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["7_12.avro"]
    sink.write(7, 13, [packet])
    assert alerts.validate_alerts(tmp_path)["n_files"] == 2


def test_validate_flags_non_fits_cutout(tmp_path, schema, packet):
    bad = dict(packet, cutoutDifference=b"not fits")
    alerts.FileSink(tmp_path, schema=schema, codec="null").write(1, 1, [bad])
    report = alerts.validate_alerts(tmp_path, schema=schema)
    assert report["n_alerts"] == 1
    assert any("cutoutDifference" in p for p in report["problems"])


def test_failed_write_keeps_previous_file(tmp_path, schema, packet):
    sink = alerts.FileSink(tmp_path, schema=schema)
    path = sink.write(1, 2, [packet])
    broken = dict(packet, diaSource=dict(packet["diaSource"], ra="north"))
    with pytest.raises((ValueError, TypeError)):
        sink.write(1, 2, [broken])
    assert len(alerts.read_alerts(path)) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["1_2.avro"]


def test_confluent_round_trip(schema, packet):
    data = alerts.confluent_frame(packet, schema)
    magic, schema_id = struct.unpack(">bi", data[:5])
    assert magic == 0 and schema_id == schema.get_schema_id()
    back = alerts.confluent_unframe(data, schema)
    assert back["diaSource"] == packet["diaSource"]
    assert back["diaObject"] == packet["diaObject"]
    with pytest.raises(ValueError, match="magic"):
        alerts.confluent_unframe(b"\x01" + data[1:], schema)


def test_load_schema_versions():
    assert alerts.load_schema("11.1").definition["name"] == "lsst.v11_1.alert"
    assert alerts.load_schema() is alerts.load_schema()
    with pytest.raises(ConfigurationError, match="99.9"):
        alerts.load_schema("99.9")


def test_kafka_sink_not_implemented():
    with pytest.raises(NotImplementedError):
        alerts.sink_from_uri("kafka://localhost:9092/alerts")


def test_float_values_are_python_floats(schema, packet):
    x = packet["diaSource"]["x"]
    assert isinstance(x, float) and not math.isnan(x)
