"""Kafka alert sink against a real Kafka-protocol broker (tansu, see tests/conftest.py).

Round trip with the official schema, partitioning by diaObjectId, oversize alerts,
and zero loss when the broker dies in the middle of a visit (spool + replay).
"""

from __future__ import annotations

import concurrent.futures as cf
import struct
import time
import uuid

import dask
import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from apdask import alerts
from apdask.alerts.packets import package_alerts
from apdask.alerts.schema import _collect_named, load_schema
from apdask.alerts.sinks import sink_from_uri
from apdask.alerts.wire import confluent_unframe
from apdask.cli.main import main
from apdask.core.exposure import Exposure
from apdask.exceptions import ConfigurationError
from apdask.services import consume, kafka, spool
from tests.oracles import make_alert

pytestmark = pytest.mark.service


def _unix_to_mjd_tai(t):
    return 40587.0 + (t + 37.0) / 86400.0  # TAI = UTC + 37 s


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def _named(schema):
    named = {}
    _collect_named(schema.definition, named)
    return named


def _row(schema, short, rng, **overrides):
    row = {}
    for f in _named(schema)[short]["fields"]:
        t = f["type"]
        base = [x for x in t if x != "null"][0] if isinstance(t, list) else t
        if base in ("long", "int"):
            row[f["name"]] = int(rng.integers(0, 1000))
        elif base == "float":
            row[f["name"]] = float(np.float32(rng.normal()))
        elif base == "double":
            row[f["name"]] = float(rng.normal())
        elif base == "boolean":
            row[f["name"]] = bool(rng.integers(0, 2))
        elif base == "string":
            row[f["name"]] = "r"
    row.update(overrides)
    return row


@pytest.fixture(scope="module")
def stamps():
    rng = np.random.default_rng(3)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [10.0, -5.0]
    w.wcs.crpix = [100.0, 100.0]
    w.wcs.cd = [[5.5e-5, 0], [0, 5.5e-5]]
    img = rng.normal(size=(200, 200)).astype(np.float32)
    exp = Exposure(img, img**2, np.zeros(img.shape, np.uint32), w, np.ones((21, 21), np.float32))
    maker = alerts.StampMaker(exp)
    return [maker.stamp(100, 100, 51) for _ in range(3)]


def _visit_packets(schema, stamps, visit, detector, n, n_objects, n_prv=3, seed=0, first=0):
    """``n`` encoded alerts of one CCD with distinct diaSourceIds and a short history."""
    rng = np.random.default_rng(seed)
    sid0 = (visit * 1000 + detector) * 10_000 + first
    src = [
        _row(
            schema,
            "diaSource",
            rng,
            diaSourceId=sid0 + i,
            visit=visit,
            detector=detector,
            diaObjectId=1 + i % n_objects,
            bboxSize=51,
        )  # fmt: skip
        for i in range(n)
    ]
    hist = [
        _row(schema, "diaSource", rng, diaSourceId=10**12 + sid0 + k, diaObjectId=1 + k % n_objects)
        for k in range(n_prv * n_objects)
    ]
    objs = [_row(schema, "diaObject", rng, diaObjectId=1 + k) for k in range(n_objects)]
    return package_alerts(
        Table(rows=src), Table(rows=hist), None, Table(rows=objs), [tuple(stamps)] * n, schema
    )


def _topic(bootstrap, partitions=1):
    name = f"alerts-{uuid.uuid4().hex[:8]}"
    assert kafka.ensure_topic(bootstrap, name, partitions=partitions)
    return name


def _read_all(uri):
    return [(m.partition(), m.offset(), m.key(), dict(m.headers() or ()), v) for m, v in
            consume.consume(uri, from_beginning=True, follow=False, timeout=10)]  # fmt: skip


def test_conventions_from_config():
    import dask

    alert = alerts.EncodedAlert(5, 7, b"")
    sink = kafka.KafkaSink("127.0.0.1:9", "t")
    assert sink.conventions == "rubin" and sink.key(alert) is None and sink.headers(1, 2) == []
    assert sink._time_header()[0] == "producer_timestamp"
    with dask.config.set({"apdask.alerts.kafka.conventions": "apdask"}):
        sink = kafka.KafkaSink("127.0.0.1:9", "t")
    assert sink.key(alert) == struct.pack(">q", 7)
    assert [k for k, _ in sink.headers(1, 2)] == ["visit", "detector", "schema_id"]
    assert sink._time_header()[0] == "produce_time"


def test_unknown_conventions_are_refused():
    with pytest.raises(ConfigurationError, match="conventions must be one of rubin, apdask"):
        alerts.sink_from_uri("kafka://127.0.0.1:9/t?conventions=rubn")


@pytest.mark.parametrize("conventions", ["rubin", "apdask"])
def test_round_trip_official_schema(kafka_broker, schema, stamps, tmp_path, capsys, conventions):
    from lsst.alert.packet import Schema

    official = Schema.from_file()  # lsst.alert.packet's own, independent of apdask's cache
    rng = np.random.default_rng(5)
    packets = [
        make_alert(
            _row(
                schema,
                "diaSource",
                rng,
                diaSourceId=500 + i,
                visit=7,
                detector=3,
                diaObjectId=90 + i,
                bboxSize=51,
            ),
            [_row(schema, "diaSource", rng, diaSourceId=100 + 2 * i + k) for k in range(2)],
            [_row(schema, "diaForcedSource", rng) for _ in range(3)],
            _row(schema, "diaObject", rng, diaObjectId=90 + i),
            stamps,
            schema=schema,
        )  # fmt: skip
        for i in range(20)
    ]
    topic = _topic(kafka_broker)
    uri = f"kafka://{kafka_broker}/{topic}?spool_dir={tmp_path / 'spool'}"
    if conventions == "apdask":
        uri += "&conventions=apdask"
    t0 = time.time()
    with sink_from_uri(uri) as sink:
        res = sink.write(7, 3, packets)
    assert (res.delivered, res.spooled, res.spool_path) == (20, 0, None)
    assert not (tmp_path / "spool").exists()
    got = _read_all(uri)
    assert len(got) == 20
    by_id = {p["diaSourceId"]: p for p in packets}
    for _, _, key, headers, value in got:
        assert value[:5] == struct.pack(">bi", 0, 1101)  # Confluent framing, schema id 1101
        back = official.deserialize(value[5:])
        want = by_id.pop(back["diaSourceId"])
        assert back == want  # every field, cutout bytes included
        if conventions == "rubin":  # as Rubin's producer: no key, one header (Unix ms)
            assert key is None and list(headers) == ["producer_timestamp"]
            ms = headers["producer_timestamp"]
            assert ms.isdigit() and t0 * 1000 - 1 <= int(ms) <= time.time() * 1000 + 1
            continue
        assert key == struct.pack(">q", want["diaSource"]["diaObjectId"])
        assert headers["visit"] == b"7" and headers["detector"] == b"3"
        assert headers["schema_id"] == b"1101"
        assert t0 - 1 <= float(headers["produce_time"]) <= time.time() + 1
        assert "apdask_trimmed" not in headers
    assert not by_id
    assert consume.validate_topic(f"kafka://{kafka_broker}/{topic}") == {
        "n_alerts": 20, "partitions": {0: 20}, "problems": []
    }  # fmt: skip
    # CLI: independent reader paths
    capsys.readouterr()
    assert main(["alerts", "validate", f"kafka://{kafka_broker}/{topic}"]) == 0
    assert '"n_alerts": 20' in capsys.readouterr().out
    assert main(["alerts", "tail", f"kafka://{kafka_broker}/{topic}", "--from-beginning"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 20 and all("visit=7 det=3" in line for line in lines)


def test_partitioning_by_dia_object_id(kafka_broker, schema, stamps, tmp_path):
    topic = _topic(kafka_broker, partitions=4)
    uri = f"kafka://{kafka_broker}/{topic}?spool_dir={tmp_path}&conventions=apdask"
    enc = _visit_packets(schema, stamps[:1] * 3, visit=11, detector=1, n=48, n_objects=8)
    with sink_from_uri(uri) as sink:
        assert sink.write(11, 1, enc).delivered == 48
    got = _read_all(uri)
    assert len(got) == 48
    part_of = {}
    order = {}
    for part, offset, key, _, value in got:
        oid = struct.unpack(">q", key)[0]
        back = confluent_unframe(value, schema)
        assert back["diaSource"]["diaObjectId"] == oid
        assert part_of.setdefault(oid, part) == part  # one object -> one partition
        order.setdefault(oid, []).append((offset, back["diaSourceId"]))
    assert len(part_of) == 8 and len(set(part_of.values())) > 1
    for seq in order.values():  # produce order kept within an object
        assert [s for _, s in sorted(seq)] == sorted(s for _, s in seq)


def test_sinks_of_one_process_share_one_producer(kafka_broker, schema, stamps, tmp_path):
    """CCDs of one worker publish through one producer (no connect per CCD); each sink
    still counts only its own delivery reports, and every alert arrives once."""
    topic = _topic(kafka_broker)
    uri = f"kafka://{kafka_broker}/{topic}?spool_dir={tmp_path}"

    def publish(detector):
        enc = _visit_packets(schema, stamps[:1] * 3, 12, detector, n=20 + detector, n_objects=4)
        with sink_from_uri(uri) as sink:
            res = sink.write(12, detector, enc)
            return sink.producer(), res.delivered

    with cf.ThreadPoolExecutor(3) as pool:
        got = list(pool.map(publish, (1, 2, 3)))
    assert [n for _, n in got] == [21, 22, 23]  # each sink: its own messages only
    assert got[0][0] is got[1][0] is got[2][0]  # one producer
    assert len(_read_all(uri)) == 21 + 22 + 23
    with dask.config.set({"apdask.alerts.kafka.shared_producer": False}):
        own = [publish(d)[0] for d in (4, 5)]
    assert own[0] is not own[1] and got[0][0] not in own


def test_oversize_alert_trimmed_and_recorded(kafka_broker, schema, stamps, tmp_path):
    topic = _topic(kafka_broker)
    uri = f"kafka://{kafka_broker}/{topic}?spool_dir={tmp_path}&max_message_bytes=70000"
    enc = _visit_packets(schema, stamps, visit=12, detector=2, n=2, n_objects=2)
    assert all(len(a.body) > 115_000 for a in enc)  # three 51x51 stamps with PSF
    with sink_from_uri(uri) as sink:
        res = sink.write(12, 2, enc)
    assert (res.delivered, res.spooled) == (2, 0)
    assert len(res.trimmed) == 2
    note = res.trimmed[0][1]
    assert "cropped to 31 px" in note
    got = _read_all(uri)
    assert len(got) == 2
    for _, _, _, headers, value in got:
        assert len(value) <= 70_000
        assert headers["apdask_trimmed"].decode() == note
        back = confluent_unframe(value, schema)
        kept = [k for k in kafka.CUTOUTS if back[k] is not None]
        assert kept and all(back[k][:6] == b"SIMPLE" for k in kept)
        assert all(f"{k} dropped" in note for k in kafka.CUTOUTS if k not in kept)
    assert res.as_dict()["trimmed"] == 2


def test_batches_and_alerts_held_to_the_topic_limit(kafka_broker, schema, stamps, tmp_path):
    # a topic created without max.message.bytes is taken at Kafka's default
    bare = f"bare-{uuid.uuid4().hex[:8]}"
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_broker})
    admin.create_topics([NewTopic(bare, num_partitions=1, replication_factor=1)])[bare].result(10)
    assert kafka.topic_max_message_bytes(kafka_broker, bare) is None
    with sink_from_uri(f"kafka://{kafka_broker}/{bare}?spool_dir={tmp_path}") as sink:
        assert sink._config()["batch.size"] <= kafka.KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    # a topic that accepts 300 kB batches: 20 alerts of ~150 kB need several batches,
    # and the sink's 1 MB default alert limit is lowered to the topic's
    topic = f"tight-{uuid.uuid4().hex[:8]}"
    assert kafka.ensure_topic(kafka_broker, topic, max_message_bytes=300_000)
    assert kafka.topic_max_message_bytes(kafka_broker, topic) == 300_000
    enc = _visit_packets(schema, stamps, visit=14, detector=1, n=20, n_objects=20)
    uri = f"kafka://{kafka_broker}/{topic}?spool_dir={tmp_path}&batch_bytes=8000000"
    with sink_from_uri(uri) as sink:
        res = sink.write(14, 1, enc)
        conf = sink._config()
    assert (res.delivered, res.spooled, len(res.trimmed)) == (20, 0, 0)
    assert conf["batch.size"] <= 300_000
    got = _read_all(uri)
    assert sorted(confluent_unframe(v, schema)["diaSourceId"] for *_, v in got) == sorted(
        a.diaSourceId for a in enc
    )
    # an alert over the topic's limit is trimmed to fit it, not refused by the broker
    small = f"small-{uuid.uuid4().hex[:8]}"
    assert kafka.ensure_topic(kafka_broker, small, max_message_bytes=100_000)
    uri = f"kafka://{kafka_broker}/{small}?spool_dir={tmp_path}"  # alert limit 1 MB by default
    with sink_from_uri(uri) as sink:
        res = sink.write(15, 1, enc[:2])
    assert (res.delivered, res.spooled, len(res.trimmed)) == (2, 0, 2)
    assert all(len(v) <= 100_000 for *_, v in _read_all(uri))


def test_untrimmable_alert_spooled_then_replayed(kafka_broker, schema, stamps, tmp_path):
    topic = _topic(kafka_broker)
    small = _visit_packets(schema, [None] * 3, visit=13, detector=0, n=1, n_objects=1, n_prv=0)
    big = _visit_packets(schema, [None] * 3, visit=13, detector=0, n=1, n_objects=1, n_prv=8,
                         seed=1, first=1)  # fmt: skip
    tight = f"kafka://{kafka_broker}/{topic}?spool_dir={tmp_path}&max_message_bytes=2500"
    assert len(small[0].body) < 2000 < 2500 < len(big[0].body)
    with sink_from_uri(tight) as sink:
        res = sink.write(13, 0, [big[0]])
    assert (res.delivered, res.spooled) == (0, 1)
    assert "MSG_SIZE_TOO_LARGE" in res.problems[0]
    # a spool holding one deliverable and one too-large alert: replay keeps only the latter
    info, spooled = spool.read_spool(res.spool_path)
    assert [a.diaSourceId for a in spooled] == [big[0].diaSourceId]
    spool.write_spool(tmp_path, topic, 13, 0, schema, [small[0], big[0]], ["test", "test"])
    files = sorted(tmp_path.rglob("*.avro"))
    assert len(files) == 2
    rep = spool.replay_spool(files[1], tight)
    assert (rep["delivered"], rep["remaining"]) == (1, 1)
    _, left = spool.read_spool(files[1])
    assert [a.diaSourceId for a in left] == [big[0].diaSourceId]
    rep = spool.replay_spool(tmp_path, f"kafka://{kafka_broker}/{topic}")
    assert (rep["files"], rep["delivered"], rep["remaining"]) == (2, 2, 0)
    assert not list(tmp_path.rglob("*.avro"))
    ids = sorted(confluent_unframe(v, schema)["diaSourceId"] for *_, v in _read_all(tight))
    assert ids == sorted([small[0].diaSourceId, big[0].diaSourceId, big[0].diaSourceId])


def test_broker_killed_mid_visit_loses_nothing(tansu, schema, stamps, tmp_path, capsys):
    spool_dir = tmp_path / "spool"
    topic = _topic(tansu.address, partitions=2)
    uri = f"kafka://{tansu.address}/{topic}?spool_dir={spool_dir}&delivery_timeout=1.5"
    ccds = {d: _visit_packets(schema, stamps, 21, d, n=25, n_objects=10, seed=d) for d in range(3)}
    generated = sorted(a.diaSourceId for enc in ccds.values() for a in enc)
    assert len(set(generated)) == 75

    def ids(values):
        return [confluent_unframe(v, schema)["diaSourceId"] for *_, v in values]

    with sink_from_uri(uri) as sink:
        first = sink.write(21, 0, ccds[0])
    assert (first.delivered, first.spooled) == (25, 0)
    before = ids(_read_all(uri))
    assert len(before) == 25
    tansu.kill()  # mid-visit: CCDs 1 and 2 are still to come
    results = []
    for d in (1, 2):
        with sink_from_uri(uri) as sink:
            results.append(sink.write(21, d, ccds[d]))
    assert [(r.delivered, r.spooled) for r in results] == [(0, 25), (0, 25)]
    assert all(r.spool_path.exists() for r in results)
    assert len(list(spool_dir.rglob("*.avro"))) == 2
    tansu.start()  # memory storage: the restarted broker is empty
    kafka.ensure_topic(tansu.address, topic, partitions=2)
    capsys.readouterr()
    to = f"kafka://{tansu.address}/{topic}"
    assert main(["alerts", "replay", str(spool_dir), "--to", to]) == 0
    out = capsys.readouterr().out
    assert '"delivered": 50' in out and '"remaining": 0' in out
    assert not list(spool_dir.rglob("*.avro"))
    after = ids(_read_all(uri))
    assert len(before) + len(after) == 75
    assert sorted(before + after) == generated  # each diaSourceId exactly once


def test_process_ccd_publishes_decodable_alerts(repo, kafka_broker, tmp_path, capsys):
    """A simulated CCD processed with a kafka:// sink; an independent reader decodes it all."""
    import json

    from lsst.alert.packet import Schema

    from tests.cli.test_cli import _ccd_args

    topic = _topic(kafka_broker, partitions=2)
    uri = f"kafka://{kafka_broker}/{topic}"
    capsys.readouterr()
    t0 = time.time()
    assert main([*_ccd_args(repo), "--alerts", uri]) == 0
    t1 = time.time()
    report = json.loads(capsys.readouterr().out)
    ccd = report["ccds"][0] if "ccds" in report else report
    n = ccd["n_alerts"]
    assert n > 0 and (ccd["alerts_delivered"], ccd["alerts_spooled"]) == (n, 0)
    official = Schema.from_file()
    got = _read_all(uri)
    assert len(got) == n
    ids = set()
    for _, _, key, headers, value in got:
        assert value[:5] == struct.pack(">bi", 0, official.get_schema_id())
        alert = official.deserialize(value[5:])
        assert alert["diaSource"]["visit"] == 1000  # visit and detector come from the body
        assert key is None and list(headers) == ["producer_timestamp"]  # Rubin's conventions
        assert t0 * 1000 <= int(headers["producer_timestamp"]) <= t1 * 1000
        # the wall clock (TAI) when the packet was made, and the exposure time
        mjd = alert["diaSource"]["timeProcessedMjdTai"]
        assert _unix_to_mjd_tai(t0) <= mjd <= _unix_to_mjd_tai(t1)
        assert alert["diaSource"]["exposureTime"] == pytest.approx(ccd["exptime"])
        assert alert["cutoutDifference"][:6] == b"SIMPLE"
        ids.add(alert["diaSourceId"])
    assert len(ids) == n
    assert consume.validate_topic(uri)["problems"] == []
