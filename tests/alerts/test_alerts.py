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
from apdask.alerts.packets import encode_alert, package_alerts
from apdask.alerts.schema import _collect_named, load_schema
from apdask.alerts.sinks import FileSink, read_alerts, sink_from_uri, validate_alerts
from apdask.alerts.wire import confluent_frame, confluent_unframe
from apdask.exceptions import ConfigurationError
from tests.oracles import make_alert, make_cutout


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def _record(schema, short):
    named = {}
    _collect_named(schema.definition, named)
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
    return make_alert(src, prv, forced, obj, cut, schema=schema)


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
    alert = make_alert(minimal, [], [], None, schema=schema)
    assert alert["diaSource"]["psfFlux"] is None and alert["diaObject"] is None
    bad = dict(minimal)
    del bad["bboxSize"]
    with pytest.raises(ValueError, match="bboxSize"):
        make_alert(bad, [], [], None, schema=schema)
    with pytest.raises(ValueError, match="'ra'"):
        make_alert(dict(minimal, ra=float("nan")), [], [], None, schema=schema)


def test_file_sink_round_trip_and_overwrite(tmp_path, schema, packet):
    sink = sink_from_uri(f"file://{tmp_path}")
    res = sink.write(7, 12, [packet, packet])
    path = res.path
    assert path == tmp_path / "visit_7" / "7_12.avro"
    assert (res.delivered, res.spooled) == (2, 0)
    back = read_alerts(tmp_path)
    assert len(back) == 2
    assert back[0]["diaSource"] == packet["diaSource"]
    assert back[0]["cutoutScience"] == packet["cutoutScience"]
    report = validate_alerts(tmp_path, schema=schema)
    assert report == {"n_alerts": 2, "n_files": 1, "problems": []}
    # overwrite of the same CCD/visit replaces the file, leaves no temp files
    sink.write(7, 12, [packet])
    assert len(read_alerts(path)) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["7_12.avro"]
    sink.write(7, 13, [packet])
    assert validate_alerts(tmp_path)["n_files"] == 2


def test_validate_flags_non_fits_cutout(tmp_path, schema, packet):
    bad = dict(packet, cutoutDifference=b"not fits")
    FileSink(tmp_path, schema=schema, codec="null").write(1, 1, [bad])
    report = validate_alerts(tmp_path, schema=schema)
    assert report["n_alerts"] == 1
    assert any("cutoutDifference" in p for p in report["problems"])


def test_failed_write_keeps_previous_file(tmp_path, schema, packet):
    sink = FileSink(tmp_path, schema=schema)
    path = sink.write(1, 2, [packet]).path
    broken = dict(packet, diaSource=dict(packet["diaSource"], ra="north"))
    with pytest.raises((ValueError, TypeError)):
        sink.write(1, 2, [broken])
    assert len(read_alerts(path)) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["1_2.avro"]


def test_confluent_round_trip(schema, packet):
    data = confluent_frame(packet, schema)
    magic, schema_id = struct.unpack(">bi", data[:5])
    assert magic == 0 and schema_id == schema.get_schema_id()
    back = confluent_unframe(data, schema)
    assert back["diaSource"] == packet["diaSource"]
    assert back["diaObject"] == packet["diaObject"]
    with pytest.raises(ValueError, match="magic"):
        confluent_unframe(b"\x01" + data[1:], schema)


def test_load_schema_versions():
    assert load_schema("11.1").definition["name"] == "lsst.v11_1.alert"
    assert load_schema() is load_schema()
    with pytest.raises(ConfigurationError, match="99.9"):
        load_schema("99.9")


def test_kafka_uri_selects_kafka_sink(tmp_path):
    from apdask.services.kafka import KafkaSink

    sink = sink_from_uri(
        f"kafka://localhost:9092/alerts?compression=zstd&delivery_timeout=2.5&spool_dir={tmp_path}"
    )
    assert isinstance(sink, KafkaSink)
    assert (sink.bootstrap, sink.topic, sink.compression) == ("localhost:9092", "alerts", "zstd")
    assert sink.delivery_timeout == 2.5 and sink.spool_dir == tmp_path
    conf = sink._config()
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["compression.type"] == "zstd" and conf["message.timeout.ms"] == 2500
    for bad in ("kafka://localhost:9092", "kafka:///alerts", "kafka://h:1/t?colour=red"):
        with pytest.raises(ConfigurationError):
            sink_from_uri(bad)


def test_sasl_credentials_only_from_env_and_never_shown(monkeypatch):
    from apdask.services import kafka

    monkeypatch.delenv("APDASK_KAFKA_USERNAME", raising=False)
    monkeypatch.delenv("APDASK_KAFKA_PASSWORD", raising=False)
    assert kafka.security_config() == {}
    monkeypatch.setenv("APDASK_KAFKA_USERNAME", "broker-user")
    with pytest.raises(ConfigurationError, match="APDASK_KAFKA_PASSWORD") as err:
        kafka.security_config()
    assert "broker-user" not in str(err.value)
    monkeypatch.setenv("APDASK_KAFKA_PASSWORD", "s3cret-pw")
    conf = kafka.security_config()
    assert conf["sasl.mechanism"] == "SCRAM-SHA-512" and conf["sasl.password"] == "s3cret-pw"
    sink = sink_from_uri("kafka://localhost:9092/alerts")
    assert sink._config()["sasl.username"] == "broker-user"
    assert "s3cret" not in repr(sink) and "s3cret" not in str(vars(sink))


def _rows_table(schema, short, n, rng, **cols):
    rows = [_example_row(schema, short, rng) for _ in range(n)]
    for k, v in cols.items():
        for r, x in zip(rows, v, strict=True):
            r[k] = x
    return rows


def test_package_alerts_is_byte_identical_to_make_alert(schema):
    from astropy.table import Table

    rng = np.random.default_rng(2)
    src = _rows_table(schema, "diaSource", 4, rng, diaSourceId=[11, 12, 13, 14],
                      diaObjectId=[1, 2, 3, 1])  # fmt: skip
    src[1]["psfFlux"] = np.float32("nan")  # nullable NaN -> null
    src[2]["ra"] = -1.5e300  # extreme double
    src[3]["diaObjectId"] = 1
    hist = _rows_table(schema, "diaSource", 6, rng, diaSourceId=[1, 2, 3, 4, 5, 14],
                       diaObjectId=[1, 1, 2, 9, 1, 1])  # fmt: skip
    hist[0]["visit"] = -(2**62)  # negative and large longs through the zig-zag varint
    fields = _record(schema, "diaSource")["fields"]
    flag = next(f["name"] for f in fields if f["type"] == ["null", "boolean"])
    hist[3][flag] = None  # a null in a nullable boolean column (object column)
    hist[1]["visit"] = 2**62
    forced = _rows_table(schema, "diaForcedSource", 3, rng, diaObjectId=[1, 2, 2])
    objs = _rows_table(schema, "diaObject", 2, rng, diaObjectId=[1, 2])
    cut = [(_fits_bytes(i), None, _fits_bytes(-i)) for i in range(4)]
    enc = package_alerts(Table(rows=src), Table(rows=hist), Table(rows=forced),
                                Table(rows=objs), cut, schema=schema)  # fmt: skip
    assert [a.diaSourceId for a in enc] == [11, 12, 13, 14]
    for i, row in enumerate(src):
        oid = row["diaObjectId"]
        ref = make_alert(
            row,
            [h for h in hist if h["diaObjectId"] == oid and h["diaSourceId"] != row["diaSourceId"]],
            [f for f in forced if f["diaObjectId"] == oid],
            next((o for o in objs if o["diaObjectId"] == oid), None),
            cut[i],
            schema=schema,
        )
        assert enc[i].body == encode_alert(ref, schema).body
        assert enc[i].diaObjectId == oid
    assert enc[0].frame[:5] == struct.pack(">bi", 0, 1101) and enc[0].frame[5:] == enc[0].body
    import pickle

    back = pickle.loads(pickle.dumps(enc[0]))  # to and from dask workers
    assert back.body == enc[0].body and back.diaObjectId == enc[0].diaObjectId
    assert enc[1].decode(schema)["diaSource"]["psfFlux"] is None
    assert enc[2].decode(schema)["diaObject"] is None  # object 3 not given
    # a required field NaN is refused with its name, as in make_alert
    bad = Table(rows=src)
    bad["dec"][0] = np.nan
    with pytest.raises(ValueError, match="'dec'"):
        package_alerts(bad, schema=schema)


def test_file_sink_writes_encoded_alerts(tmp_path, schema, packet):
    enc = encode_alert(packet, schema)
    res = FileSink(tmp_path, schema=schema).write(3, 4, [enc, enc, enc])
    assert res.delivered == 3
    back = read_alerts(res.path)
    assert len(back) == 3 and back[2]["diaSource"] == packet["diaSource"]
    assert validate_alerts(tmp_path, schema=schema)["problems"] == []


def test_stamp_maker_matches_make_cutout():
    from astropy.nddata import CCDData
    from astropy.wcs import WCS

    from apdask.core.exposure import MASK, Exposure

    rng = np.random.default_rng(4)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [60.5, 40.25]
    w.wcs.cd = [[-5.5e-5, 1e-7], [2e-7, 5.5e-5]]
    img = rng.normal(size=(120, 100)).astype(np.float32)
    msk = rng.integers(0, 2 * max(MASK.values()), size=img.shape).astype(np.uint32)
    exp = Exposure(img, img**2, msk, w, rng.random((15, 15)).astype(np.float32))
    maker = alerts.StampMaker(exp)
    where = [(50.2, 60.7, 51), (3.0, 118.4, 31), (99.6, 0.0, 102)]
    prepared = alerts.StampMaker(exp)  # one WCS call for all the local WCSs
    prepared.prepare(np.array([w_[0] for w_ in where]), np.array([w_[1] for w_ in where]))
    for x, y, size in where:
        fast, ref = maker.stamp(x, y, size), make_cutout(exp, x, y, size)
        assert fast == ref  # byte for byte, edges (NaN, NO_DATA) included
        assert prepared.stamp(np.float64(x), y, size) == ref
    stamp = maker.stamp(3.0, 118.4, 31)
    ccd = CCDData.read(io.BytesIO(stamp), format="fits")
    assert ccd.unit == "nJy" and ccd.shape == (31, 31)
    assert ccd.psf is not None and ccd.psf.shape == (15, 15)  # the PSFIMAGE extension
    # Rubin's cutout conventions: exposure pixel (0-based) = CUTMIN + FITS pixel, and the
    # WCS reference point is the source (CRPIX on it, CRVAL its sky position)
    assert (ccd.meta["CUTMINX"], ccd.meta["CUTMINY"]) == (3 - 15 - 1, 118 - 15 - 1)
    assert ccd.wcs.wcs.crpix == pytest.approx([3.0 + 13, 118.4 - 102])
    assert ccd.wcs.wcs.crval == pytest.approx(w.all_pix2world([[3.0, 118.4]], 0)[0], abs=1e-12)
    with fits.open(io.BytesIO(stamp)) as hdul:
        assert (hdul["MASK"].data[-1] == MASK["NO_DATA"]).all()  # rows off the CCD
        assert hdul["MASK"].data.dtype == np.uint8  # all planes fit; BITPIX = 8
        hdr = hdul["MASK"].header
        planes = {v: 1 << int(k[7:]) for k, v in hdr.items() if k.startswith("MASKBIT")}
        assert planes == MASK
        assert (hdul["MASK"].data[:17, 12:] == msk[103:, :19]).all()  # pixel values kept
        assert np.isnan(hdul[0].data[-1]).all()


def test_float_values_are_python_floats(schema, packet):
    x = packet["diaSource"]["x"]
    assert isinstance(x, float) and not math.isnan(x)


def _stamp_exposure(rng, wcs):
    from apdask.core.exposure import MASK, Exposure

    img = rng.normal(size=(90, 110)).astype(np.float32)
    msk = rng.integers(0, 2 * max(MASK.values()), size=img.shape).astype(np.uint32)
    psf = rng.random((17, 17)).astype(np.float32)
    return Exposure(img, (img**2 + 1).astype(np.float32), msk, wcs, psf)


def test_stamp_is_what_ccddata_writes_and_reads():
    """A stamp has the HDUs, names and cards of astropy's ``CCDData.write`` (as Rubin's
    cutouts), and ``CCDData.read`` gives image, variance and PSF back."""
    from astropy.nddata import CCDData, VarianceUncertainty
    from astropy.wcs import WCS

    rng = np.random.default_rng(8)
    w = WCS(naxis=2)  # a CCD WCS whose reference point is off the CCD, as a real one may be
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [35.0, -4.5]
    w.wcs.crpix = [-180.6, 2100.0]
    w.wcs.cd = [[-5.5e-5, 3e-8], [-2e-8, -5.5e-5]]
    exp = _stamp_exposure(rng, w)
    x, y, size = 40.3, 51.8, 31
    ours = alerts.StampMaker(exp).stamp(x, y, size)
    got = CCDData.read(io.BytesIO(ours), format="fits")
    x0, y0 = 40 - 15, 52 - 15
    want_img = exp.image[y0 : y0 + size, x0 : x0 + size]
    want_var = exp.variance[y0 : y0 + size, x0 : x0 + size]
    assert np.array_equal(got.data, want_img) and got.unit == "nJy"
    assert isinstance(got.uncertainty, VarianceUncertainty)
    assert np.array_equal(got.uncertainty.array, want_var)
    assert np.array_equal(got.psf, exp.psf)
    assert np.array_equal(got.mask, exp.mask[y0 : y0 + size, x0 : x0 + size] != 0)
    # the same cutout as Rubin builds it: CCDData with the stamp's WCS and cutMin meta
    ref = CCDData(
        want_img, unit="nJy", uncertainty=VarianceUncertainty(want_var), psf=exp.psf,
        mask=got.mask, wcs=got.wcs, meta={"cutMinX": x0 - 1, "cutMinY": y0 - 1},
    )  # fmt: skip
    buf = io.BytesIO()
    ref.write(buf, format="fits")
    with fits.open(io.BytesIO(ours)) as a, fits.open(io.BytesIO(buf.getvalue())) as b:
        assert [h.name for h in a] == [h.name for h in b] == [
            "PRIMARY", "MASK", "UNCERT", "PSFIMAGE"
        ]  # fmt: skip
        for ha, hb in zip(a, b, strict=True):
            assert ha.data.shape == hb.data.shape
            if ha.name != "MASK":  # ours keeps the bit planes; CCDData's is 0/1
                assert ha.data.dtype == hb.data.dtype and np.array_equal(ha.data, hb.data)
        assert (a["MASK"].data != 0).tolist() == b["MASK"].data.astype(bool).tolist()
        assert a["UNCERT"].header["UTYPE"] == b["UNCERT"].header["UTYPE"]
        for key in ("BUNIT", "CUTMINX", "CUTMINY", "CTYPE1", "CTYPE2", "RADESYS"):
            assert a[0].header[key] == b[0].header[key], key
        wa, wb = WCS(a[0].header), WCS(b[0].header)  # CCDData writes PC + CDELT, we write CD
        assert wa.wcs.crpix == pytest.approx(wb.wcs.crpix, rel=1e-12)
        assert wa.wcs.crval == pytest.approx(wb.wcs.crval, rel=1e-12)
        assert wa.pixel_scale_matrix == pytest.approx(wb.pixel_scale_matrix, rel=1e-9)
    # the local WCS is the CCD's to well below a milliarcsecond over the stamp
    yy, xx = np.mgrid[0:size, 0:size]
    ra, dec = got.wcs.all_pix2world(xx.ravel(), yy.ravel(), 0)
    ra0, dec0 = w.all_pix2world(xx.ravel() + x0, yy.ravel() + y0, 0)
    sep = np.hypot((ra - ra0) * np.cos(np.radians(dec0)), dec - dec0) * 3.6e6
    assert sep.max() < 0.1  # mas
    assert got.wcs.wcs.crpix == pytest.approx([x - x0 + 1, y - y0 + 1])
