"""Alert brokers' own consumer code on our alerts, from files and from Kafka (tansu).

The clients are the ``broker-clients`` extra (``pip install --pre -e ".[broker-clients]"``,
see docs/alerts.md); each test skips when its client is not installed, so the default
test environment passes without them.

* Ampel: ``LSSTAlertSupplier`` (from ``FileAlertLoader`` and ``KafkaAlertLoader`` with a
  schema registry), ``LSSTDataPointShaper`` and the general Rubin filter ``DecentVroFilter``.
* Pitt-Google: ``pittgoogle.Alert.from_msg(..., schema_name="lsst")``.
* fink-client: ``AlertReader``, ``get_cutout`` and its Kafka ``AlertConsumer``.
* Confluent: ``AvroDeserializer`` against the ``schema_registry`` fixture.
"""

from __future__ import annotations

import io
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import fastavro
import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from apdask import alerts
from apdask.alerts.schema import _collect_named
from apdask.core.exposure import Exposure
from apdask.pipeline.measure.detection import detect_sources
from apdask.pipeline.measure.reliability import load_reliability_model
from apdask.pipeline.measure.sources import measure_sources
from apdask.services import consume, kafka

N_ALERTS = 6
N_PRV = 3


@pytest.fixture(scope="module")
def schema():
    return alerts.load_schema()


def _columns(schema, short, n, rng, **fixed):
    named = {}
    _collect_named(schema.definition, named)
    cols = {}
    for f in named[short]["fields"]:
        t = f["type"]
        base = [x for x in t if x != "null"][0] if isinstance(t, list) else t
        if base in ("long", "int"):
            cols[f["name"]] = rng.integers(0, 1000, n)
        elif base == "float":
            cols[f["name"]] = rng.normal(1000, 100, n).astype(np.float32)
        elif base == "double":
            cols[f["name"]] = rng.normal(100, 10, n)
        elif base == "boolean":
            cols[f["name"]] = np.zeros(n, bool)
        elif base == "string":
            cols[f["name"]] = np.array(["r"] * n)
    cols.update(fixed)
    return cols


def _reliability(x, y, rng):
    """``reliability`` of point sources (S/N ~ 20) at ``(x, y)`` on a 200 x 200 difference,
    detected and measured by the pipeline: our real transients, as the model scores them."""
    yy, xx = np.mgrid[-7:8, -7:8]
    psf = np.exp(-0.5 * (xx**2 + yy**2) / 1.8**2)
    psf /= psf.sum()
    img = rng.normal(0, 100, (200, 200))
    for xi, yi in zip(np.rint(x).astype(int), np.rint(y).astype(int), strict=True):
        img[yi - 7 : yi + 8, xi - 7 : xi + 8] += 20 * 100 * np.sqrt(4 * np.pi * 1.8**2) * psf
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cdelt = [-5.55e-5, 5.55e-5]
    e = Exposure(img.astype(np.float32), np.full(img.shape, 1e4, np.float32),
                 np.zeros(img.shape, np.uint32), w, psf.astype(np.float32))  # fmt: skip
    tab = measure_sources(e, None, None, detect_sources(e), visit=90, detector=4, band="g",
                          mjd=61000.2)  # fmt: skip
    near = [int(np.argmin(np.hypot(tab["x"] - a, tab["y"] - b))) for a, b in zip(x, y, strict=True)]
    return np.asarray(tab["reliability"][near], np.float32)


@pytest.fixture(scope="module")
def encoded(schema):
    """Alerts as the pipeline packages them: ``package_alerts`` with ``StampMaker`` cutouts,
    ``N_PRV`` earlier detections, forced photometry, and the ``reliability`` that the
    shipped model gives point sources measured at the alerts' positions."""
    rng = np.random.default_rng(16)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [52.0, -28.0]  # high galactic latitude
    w.wcs.crpix = [100.0, 100.0]
    w.wcs.cd = [[-5.55e-5, 0.0], [0.0, 5.55e-5]]
    psf = np.full((15, 15), 1 / 225, np.float32)
    exps = []
    for _ in range(3):
        img = rng.normal(0, 100, (200, 200)).astype(np.float32)
        exps.append(Exposure(img, np.full(img.shape, 1e4, np.float32),
                             np.zeros(img.shape, np.uint32), w, psf))  # fmt: skip
    oid = np.arange(1, N_ALERTS + 1, dtype=np.int64) * 1000
    x, y = rng.uniform(40, 160, N_ALERTS), rng.uniform(40, 160, N_ALERTS)
    ra, dec = w.all_pix2world(x, y, 0)
    mjd = 61000.2
    sources = _columns(
        schema,
        "diaSource",
        N_ALERTS,
        rng,
        diaSourceId=oid + 1,
        diaObjectId=oid,
        visit=np.full(N_ALERTS, 90),
        detector=np.full(N_ALERTS, 4),
        x=x,
        y=y,
        ra=ra,
        dec=dec,
        midpointMjdTai=np.full(N_ALERTS, mjd),
        bboxSize=np.full(N_ALERTS, 31),
        band=np.array(["g"] * N_ALERTS),
        snr=np.full(N_ALERTS, 20.0),
        psfFlux=np.full(N_ALERTS, 5000.0, np.float32),
        reliability=_reliability(x, y, rng),
        reliabilityVersion=np.array([load_reliability_model().version] * N_ALERTS),
        isNegative=np.zeros(N_ALERTS, bool),
    )
    k = N_ALERTS * N_PRV
    hist = _columns(
        schema,
        "diaSource",
        k,
        rng,
        diaSourceId=np.repeat(oid, N_PRV) + 2 + np.tile(np.arange(N_PRV), N_ALERTS),
        diaObjectId=np.repeat(oid, N_PRV),
        visit=np.tile(np.arange(10, 10 + N_PRV), N_ALERTS),
        midpointMjdTai=mjd - 1.0 - np.tile(np.arange(N_PRV), N_ALERTS),
        ra=np.repeat(ra, N_PRV),
        dec=np.repeat(dec, N_PRV),
        band=np.array(["r"] * k),
        reliability=np.repeat(sources["reliability"], N_PRV),
    )
    forced = _columns(
        schema,
        "diaForcedSource",
        k,
        rng,
        diaForcedSourceId=np.arange(k) + 10**9,
        diaObjectId=np.repeat(oid, N_PRV),
        visit=np.tile(np.arange(10, 10 + N_PRV), N_ALERTS),
        midpointMjdTai=mjd - 1.0 - np.tile(np.arange(N_PRV), N_ALERTS),
        band=np.array(["r"] * k),
    )
    objects = _columns(schema, "diaObject", N_ALERTS, rng, diaObjectId=oid, ra=ra, dec=dec,
                       nDiaSources=np.full(N_ALERTS, N_PRV + 1))  # fmt: skip
    makers = [alerts.StampMaker(e) for e in exps]
    cut = [tuple(m.stamp(a, b, 31) for m in makers) for a, b in zip(x, y, strict=True)]
    return alerts.package_alerts(Table(sources), Table(hist), Table(forced), Table(objects), cut,
                                 schema=schema)  # fmt: skip


@pytest.fixture(scope="module")
def packets(schema, encoded):
    return {a.diaSourceId: a.decode(schema) for a in encoded}


@pytest.fixture(scope="module")
def alert_dir(tmp_path_factory, schema, encoded):
    """One Avro container file per alert (Ampel's ``FileAlertLoader`` reads one each)
    plus the CCD's ``FileSink`` file in a directory of its own."""
    root = tmp_path_factory.mktemp("broker-alerts")
    parsed = fastavro.parse_schema(schema.definition)
    for a in encoded:
        with open(root / f"{a.diaSourceId}.avro", "wb") as fh:
            fastavro.writer(fh, parsed, [a.decode(schema)])
    alerts.FileSink(root / "sink", schema=schema).write(90, 4, encoded)
    return root


@pytest.fixture(scope="module")
def schema_registry(schema):
    """A minimal Confluent schema-registry endpoint serving lsst-alert-packet's schema.

    ``GET /schemas/ids/<id>`` answers ``{"schema": ..., "schemaType": "AVRO"}`` for the
    schema's registered id (1101 for v11.1); anything else is 404.
    """
    sid = int(schema.get_schema_id())
    body = json.dumps({"schema": json.dumps(schema.definition), "schemaType": "AVRO"}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in (f"/schemas/ids/{sid}", f"/schemas/ids/{sid}/schema"):
                data = body if not path.endswith("/schema") else json.dumps(schema.definition)
                data = data if isinstance(data, bytes) else data.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            msg = json.dumps({"error_code": 40403, "message": "Schema not found"}).encode()
            self.send_response(404)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def topic(kafka_broker, encoded, tmp_path_factory):
    """The alerts published by ``KafkaSink`` with its defaults (Rubin's conventions)."""
    name = f"brokers-{uuid.uuid4().hex[:8]}"
    kafka.ensure_topic(kafka_broker, name, partitions=2)
    spool = tmp_path_factory.mktemp("spool")
    with alerts.sink_from_uri(f"kafka://{kafka_broker}/{name}?spool_dir={spool}") as sink:
        assert sink.write(90, 4, encoded).delivered == N_ALERTS
    return name


def _messages(kafka_broker, topic):
    return [m for m, _ in consume.consume(f"kafka://{kafka_broker}/{topic}", timeout=10)]


# ---------------------------------------------------------------------------
# Confluent


@pytest.mark.service
def test_confluent_avro_deserializer(kafka_broker, topic, schema_registry, packets):
    pytest.importorskip("confluent_kafka.schema_registry.avro")
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    deser = AvroDeserializer(SchemaRegistryClient({"url": schema_registry}))
    msgs = _messages(kafka_broker, topic)
    assert len(msgs) == N_ALERTS
    for m in msgs:
        assert m.key() is None and [k for k, _ in m.headers()] == ["producer_timestamp"]
        rec = deser(m.value(), SerializationContext(topic, MessageField.VALUE))
        assert rec == packets[rec["diaSourceId"]]


# ---------------------------------------------------------------------------
# Ampel


def _ampel(monkeypatch, loader):
    """Ampel's supplier and shaper classes, with ``loader`` registered as an auxiliary unit
    (as ``DevAmpelContext.register_unit`` does) so the supplier can build it by name."""
    pytest.importorskip("ampel.lsst.alert.LSSTAlertSupplier")
    from ampel.base.AuxUnitRegister import AuxUnitRegister
    from ampel.lsst.alert.LSSTAlertSupplier import LSSTAlertSupplier
    from ampel.lsst.ingest.LSSTDataPointShaper import LSSTDataPointShaper

    if loader == "file":
        from ampel.alert.load.FileAlertLoader import FileAlertLoader as Loader
    else:
        from ampel.kafka.KafkaAlertLoader import KafkaAlertLoader as Loader
    monkeypatch.setitem(AuxUnitRegister._dyn, Loader.__name__, Loader)
    return LSSTAlertSupplier, LSSTDataPointShaper


def _check_ampel_alerts(got, packets, shaper_cls):
    assert sorted(a.id for a in got) == sorted(packets)
    from ampel.log.AmpelLogger import AmpelLogger

    shaper = shaper_cls(logger=AmpelLogger.get_logger())
    for a in got:
        p = packets[a.id]
        assert a.stock == p["diaObject"]["diaObjectId"]
        dps = shaper.process(a.datapoints, stock=a.stock)
        tags = [t for dp in dps for t in dp["tag"] if t in ("LSST_DP", "LSST_FP", "LSST_OBJ")]
        # the new source, one point per earlier visit (forced photometry preferred), the object
        assert tags.count("LSST_DP") == 1 and tags.count("LSST_OBJ") == 1
        assert tags.count("LSST_FP") == N_PRV
        src = next(dp for dp in dps if "LSST_DP" in dp["tag"])
        assert src["body"]["diaSourceId"] == a.id and "LSST_G" in src["tag"]


def _file_supplier(supplier_cls, alert_dir):
    files = sorted(str(p) for p in alert_dir.glob("*.avro"))
    loader = {"unit": "FileAlertLoader", "config": {"files": files}}
    return supplier_cls(loader=loader, deserialize="avro")


def test_ampel_supplier_and_shaper_from_files(alert_dir, packets, monkeypatch):
    supplier_cls, shaper_cls = _ampel(monkeypatch, "file")
    supplier = _file_supplier(supplier_cls, alert_dir)
    _check_ampel_alerts(list(supplier), packets, shaper_cls)


@pytest.mark.service
@pytest.mark.timeout(180)
def test_ampel_supplier_from_kafka_with_registry(
    kafka_broker, topic, schema_registry, packets, monkeypatch
):
    pytest.importorskip("ampel.kafka.KafkaAlertLoader")
    supplier_cls, shaper_cls = _ampel(monkeypatch, "kafka")
    config = {
        "bootstrap": kafka_broker, "topics": [topic], "group_name": f"ampel-{uuid.uuid4().hex[:6]}",
        "avro_schema": {"registry": schema_registry}, "timeout": 30,
        "kafka_consumer_properties": {"auto.offset.reset": "earliest"},
    }  # fmt: skip
    loader = {"unit": "KafkaAlertLoader", "config": config}
    supplier = supplier_cls(loader=loader, deserialize=None)
    got = []
    with supplier:  # subscribes: the group join takes about 23 s on tansu
        for a in supplier:
            got.append(a)
            if len(got) == N_ALERTS:
                break
    _check_ampel_alerts(got, packets, shaper_cls)
    assert all(a.extra["kafka"]["key"] is None for a in got)


def _decent_vro_filter():
    pytest.importorskip("ampel.lsst.t0.DecentVroFilter")
    from ampel.log.AmpelLogger import AmpelLogger
    from ampel.lsst.t0.DecentVroFilter import DecentVroFilter

    # the required settings given loosely; everything else (min_reliability_per_source = 0,
    # min_reliability = 0, no flag checks) at its default
    flt = DecentVroFilter(
        logger=AmpelLogger.get_logger(), min_ndet=1, max_ndet=None, min_tspan=0.0,
        max_tspan=100.0, min_abs_gal_lat=10.0, gaia_rs=0.0,
    )  # fmt: skip
    flt.post_init()  # as AuxUnitRegister.new_unit does
    return flt


def test_ampel_decent_vro_filter_accepts_real_transients(alert_dir, packets, monkeypatch):
    supplier_cls, _ = _ampel(monkeypatch, "file")
    flt = _decent_vro_filter()
    supplier = _file_supplier(supplier_cls, alert_dir)
    # the default min_reliability_per_source = 0 compares every DiaSource's reliability
    # with '>=' (a TypeError while it was null); our transients score high
    assert all(p["diaSource"]["reliability"] > 0.5 for p in packets.values())
    assert all(flt.process(a) for a in supplier)


# ---------------------------------------------------------------------------
# Pitt-Google


def _pittgoogle_check(values, packets):
    pittgoogle = pytest.importorskip("pittgoogle")
    from pittgoogle.types_ import PubsubMessageLike

    seen = set()
    for value in values:
        alert = pittgoogle.Alert.from_msg(PubsubMessageLike(data=value), schema_name="lsst")
        d = alert.dict
        want = packets[d["diaSourceId"]]
        assert d == want
        assert alert.sourceid == want["diaSourceId"]
        assert alert.objectid == want["diaObject"]["diaObjectId"]
        seen.add(d["diaSourceId"])
    assert seen == set(packets)


def test_pittgoogle_from_msg_from_files(encoded, packets):
    _pittgoogle_check([bytes(a.frame) for a in encoded], packets)


@pytest.mark.service
def test_pittgoogle_from_msg_from_kafka(kafka_broker, topic, packets):
    _pittgoogle_check([m.value() for m in _messages(kafka_broker, topic)], packets)


# ---------------------------------------------------------------------------
# fink-client


def test_fink_alert_reader_and_cutouts(alert_dir, packets):
    pytest.importorskip("fink_client")
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from fink_client.avro_utils import AlertReader
    from fink_client.botlib import get_cutout

    ccd_file = next((alert_dir / "sink").rglob("*.avro"))  # the FileSink's file of the CCD
    got = AlertReader(str(ccd_file)).to_list()
    assert sorted(a["diaSourceId"] for a in got) == sorted(packets)
    assert len(AlertReader(str(alert_dir)).to_list()) == N_ALERTS  # one file per alert
    for a in got:
        assert a == packets[a["diaSourceId"]]
        for kind in ("Difference", "Science", "Template"):
            png, status = get_cutout(cutout=a[f"cutout{kind}"], kind=kind, gzipped=False)
            assert status == 200 and png.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


class _WithoutConfluentHeader:
    """A Kafka message whose value lacks the 5-byte Confluent header: Fink's own format."""

    def __init__(self, msg):
        self._msg = msg

    def __getattr__(self, name):
        return getattr(self._msg, name)

    def value(self):
        return self._msg.value()[5:]


@pytest.mark.service
@pytest.mark.timeout(180)
def test_fink_consumer_reads_the_topic_with_default_key_settings(
    kafka_broker, topic, packets, schema, tmp_path
):
    """fink-client's ``AlertConsumer`` (its own Kafka settings: group subscribe, earliest)
    takes our messages' key (none, Rubin's conventions; the old 8-byte key raised
    UnicodeDecodeError).  Its value decoder reads Fink's re-published format, bare Avro
    without the Confluent header that Rubin's producer and ours put first, so the framed
    values decode only once the 5 header bytes are skipped."""
    pytest.importorskip("fink_client")
    from fink_client.consumer import AlertConsumer

    avsc = tmp_path / "lsst.avsc"
    avsc.write_text(json.dumps(schema.definition))
    conf = {"bootstrap.servers": kafka_broker, "group.id": f"fink-{uuid.uuid4().hex[:6]}"}
    msgs = []
    with AlertConsumer([topic], conf, survey="lsst", schema_path=str(avsc)) as consumer:
        for _ in range(60):
            msgs += [m for m in consumer._consumer.consume(N_ALERTS, 2.0) if not m.error()]
            if len(msgs) >= N_ALERTS:
                break
        assert len(msgs) == N_ALERTS
        got = {}
        for m in msgs:
            assert m.key() is None
            t, alert, key = consumer.process_message(_WithoutConfluentHeader(m))
            assert (t, key) == (topic, "")
            got[alert["diaSourceId"]] = alert
            try:  # the framed value as it is on the topic: not Fink's format
                framed = consumer.process_message(m)[1]
            except (IndexError, EOFError, ValueError, UnicodeDecodeError, OverflowError):
                framed = None
            assert framed != packets[alert["diaSourceId"]]
    assert got == packets


def test_stamp_bytes_read_by_astropy_as_brokers_do(packets):
    """What fink's and Pitt-Google's cutout helpers do: the primary HDU is the image."""
    from astropy.io import fits

    a = next(iter(packets.values()))
    with fits.open(io.BytesIO(a["cutoutDifference"])) as hdul:
        assert hdul[0].data.shape == (31, 31) and hdul[0].header["BUNIT"] == "nJy"
        assert [h.name for h in hdul] == ["PRIMARY", "MASK", "UNCERT", "PSFIMAGE"]


@pytest.mark.service
@pytest.mark.timeout(600)
def test_brokers_decode_a_processed_ccd(repo, kafka_broker, schema_registry, tmp_path, monkeypatch):
    """The pipeline's own alerts (``process-ccd --alerts kafka://``, Rubin's conventions)
    through Confluent's, Pitt-Google's, Ampel's and fink-client's decoding paths."""
    from lsst.alert.packet import Schema

    from apdask.cli.main import main
    from tests.cli.test_cli import _ccd_args

    pytest.importorskip("confluent_kafka.schema_registry.avro")
    pittgoogle = pytest.importorskip("pittgoogle")
    pytest.importorskip("fink_client")
    supplier_cls, shaper_cls = _ampel(monkeypatch, "file")
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext
    from fink_client.avro_utils import AlertReader
    from pittgoogle.types_ import PubsubMessageLike

    name = f"ccd-{uuid.uuid4().hex[:8]}"
    kafka.ensure_topic(kafka_broker, name, partitions=2)
    assert main([*_ccd_args(repo), "--alerts", f"kafka://{kafka_broker}/{name}"]) == 0
    msgs = _messages(kafka_broker, name)
    assert msgs
    official = Schema.from_file()
    want = {}
    deser = AvroDeserializer(SchemaRegistryClient({"url": schema_registry}))
    parsed = fastavro.parse_schema(official.definition)
    for m in msgs:
        rec = official.deserialize(m.value()[5:])
        want[rec["diaSourceId"]] = rec
        assert deser(m.value(), SerializationContext(name, MessageField.VALUE)) == rec
        alert = pittgoogle.Alert.from_msg(PubsubMessageLike(data=m.value()), schema_name="lsst")
        assert alert.dict == rec and alert.sourceid == rec["diaSourceId"]
        with open(tmp_path / f"{rec['diaSourceId']}.avro", "wb") as fh:
            fastavro.writer(fh, parsed, [rec])
    got = list(_file_supplier(supplier_cls, tmp_path))
    assert sorted(a.id for a in got) == sorted(want)
    from ampel.log.AmpelLogger import AmpelLogger

    shaper = shaper_cls(logger=AmpelLogger.get_logger())
    for a in got:
        dps = shaper.process(a.datapoints, stock=a.stock)
        src = [dp["body"]["diaSourceId"] for dp in dps if "LSST_DP" in dp["tag"]]
        assert a.id in src and a.stock == want[a.id]["diaObject"]["diaObjectId"]
    fink = {a["diaSourceId"]: a for a in AlertReader(str(tmp_path)).to_list()}
    assert fink == want
