"""Tests of apdask.ppdb over SQLite (and PostgreSQL with the ``service`` marker)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from astropy.table import Table

from apdask import ppdb
from apdask.associate import associate, update_objects
from apdask.camera import get_camera
from apdask.exceptions import PpdbError
from apdask.ids import dia_forced_source_ids, dia_source_ids

RA, DEC, MJD = 10.0, -5.0, 60000.0
VISIT, DET = 1234, 4


@pytest.fixture(scope="module")
def detector():
    return get_camera("comcam")[DET]


@pytest.fixture()
def db(tmp_path):
    return ppdb.Ppdb.open(ppdb.create_ppdb(f"sqlite:///{tmp_path}/apdb.db"))


def _catalogs(detector, visit=VISIT, mjd=MJD, n=5, outside=True):
    """Sources on the CCD (plus one far outside the region), objects, forced."""
    corners = detector.footprint(RA, DEC)
    ra = np.linspace(corners[:, 0].min(), corners[:, 0].max(), n + 2)[1:-1]
    dec = np.linspace(corners[:, 1].min(), corners[:, 1].max(), n + 2)[1:-1]
    if outside:
        ra, dec = np.append(ra, RA + 5.0), np.append(dec, DEC)
    m = ra.size
    sources = Table(
        {
            "diaSourceId": dia_source_ids(visit, detector.id, m),
            "visit": np.full(m, visit),
            "detector": np.full(m, detector.id),
            "midpointMjdTai": np.full(m, mjd),
            "ra": ra,
            "dec": dec,
            "raErr": np.full(m, 1e-5),
            "decErr": np.full(m, 1e-5),
            "x": np.linspace(10, 4000, m),
            "y": np.linspace(10, 3900, m),
            "psfFlux": np.linspace(100, 600, m),
            "psfFluxErr": np.full(m, 10.0),
            "psfNdata": np.full(m, 25),
            "bboxSize": np.full(m, 30),
            "timeProcessedMjdTai": np.full(m, mjd + 0.001),
            "band": np.full(m, "r"),
            "isDipole": np.zeros(m, bool),
            "snr": np.full(m, np.nan),
            "extraColumn": np.arange(m),  # dropped on store
        }
    )
    matched = associate(sources, Table({"diaObjectId": [], "ra": [], "dec": []}), 1.0)
    objects, sources = update_objects(matched, sources, Table(), None, mjd=mjd)
    forced = Table(
        {
            "diaForcedSourceId": dia_forced_source_ids(visit, detector.id, m),
            "diaObjectId": objects["diaObjectId"],
            "ra": ra,
            "dec": dec,
            "visit": np.full(m, visit),
            "detector": np.full(m, detector.id),
            "psfFlux": np.full(m, 5.0),
            "psfFluxErr": np.full(m, 1.0),
            "midpointMjdTai": np.full(m, mjd),
            "band": np.full(m, "r"),
            "timeProcessedMjdTai": np.full(m, mjd + 0.001),
        }
    )
    return objects, sources, forced


def test_create_is_idempotent(tmp_path):
    url = f"sqlite:///{tmp_path}/apdb.db"
    path = ppdb.create_ppdb(url)
    assert path == str(tmp_path / "apdb.yaml")
    assert ppdb.create_ppdb(url) == path
    assert isinstance(ppdb.Ppdb.open(path), ppdb.Ppdb)
    assert isinstance(ppdb.Ppdb.open(url), ppdb.Ppdb)


def test_open_uninitialised_gives_clear_error(tmp_path):
    with pytest.raises(PpdbError, match="apdask ppdb create"):
        ppdb.Ppdb.open(f"sqlite:///{tmp_path}/missing.db")
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(PpdbError, match="apdask ppdb create"):
        ppdb.Ppdb.open(f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(PpdbError, match="does not exist"):
        ppdb.Ppdb.open(str(tmp_path / "nope.yaml"))


def test_empty_reads_have_all_columns(db, detector):
    region = ppdb.region_for(detector, RA, DEC)
    objects = db.get_dia_objects(region)
    assert len(objects) == 0 and len(objects.colnames) == 84
    assert objects["diaObjectId"].dtype == np.int64
    assert objects["u_psfFluxNdata"].dtype.kind == "i"
    assert objects["ra"].unit == "deg"
    sources = db.get_dia_sources(region, None, MJD)
    assert len(sources.colnames) == 104 and sources["psfFlux"].unit == "nJy"
    assert sources["psfFlux"].dtype == np.float32
    forced = db.get_dia_forced_sources(region, [], MJD)
    assert len(forced) == 0 and "psfFlux" in forced.colnames


def test_store_and_read_back(db, detector):
    objects, sources, forced = _catalogs(detector)
    region = ppdb.region_for(detector, RA, DEC)
    assert not db.contains_visit_detector(VISIT, DET)
    assert db.store(MJD, objects, sources, forced) is True
    assert db.contains_visit_detector(VISIT, DET)

    got = db.get_dia_objects(region)
    assert len(got) == len(objects) - 1  # the one outside the region is not returned
    assert set(got["diaObjectId"]) == set(objects["diaObjectId"][:-1])
    assert got["ra"].unit == "deg" and got["r_psfFluxMean"].unit == "nJy"
    assert got["ra"].description.startswith("Right ascension")
    assert np.all(got["r_psfFluxNdata"] == 1) and np.all(got["g_psfFluxNdata"] == 0)
    assert np.all(got["validityStartMjdTai"] == MJD)

    src = db.get_dia_sources(region, None, MJD + 1)
    assert len(src) == len(sources) - 1
    assert src["psfFlux"].unit == "nJy" and src["midpointMjdTai"].unit == "d"
    assert np.all(np.isnan(src["snr"]))  # NaN stored as null, read back as NaN
    assert src["band"][0] == "r" and not src["isDipole"][0]
    assert np.all(src["trailNdata"] == 0) and np.all(src["dipoleNdata"] == 0)
    by_id = db.get_dia_sources(region, objects["diaObjectId"][:2], MJD + 1)
    assert len(by_id) == 2

    fs = db.get_dia_forced_sources(region, None, MJD + 1)
    assert len(fs) == len(forced) - 1 and np.all(fs["psfFlux"] == 5.0)


def test_restore_is_noop(db, detector):
    objects, sources, forced = _catalogs(detector)
    region = ppdb.region_for(detector, RA, DEC)
    assert db.store(MJD, objects, sources, forced)
    before = (len(db.get_dia_objects(region)), len(db.get_dia_sources(region, None, MJD)))
    assert db.store(MJD, objects, sources, forced) is False
    after = (len(db.get_dia_objects(region)), len(db.get_dia_sources(region, None, MJD)))
    assert before == after


def test_history_window(db, detector):
    objects, sources, forced = _catalogs(detector, outside=False)
    db.store(MJD, objects, sources, forced)
    region = ppdb.region_for(detector, RA, DEC)
    ids = objects["diaObjectId"]
    assert len(db.get_dia_sources(region, None, MJD + 300)) == len(sources)
    assert len(db.get_dia_sources(region, None, MJD + 400)) == 0  # > 12 months
    assert len(db.get_dia_forced_sources(region, ids, MJD + 300)) == len(forced)
    assert len(db.get_dia_forced_sources(region, ids, MJD + 400)) == 0


def test_new_object_version_replaces_old(db, detector):
    objects, sources, forced = _catalogs(detector, outside=False, n=2)
    db.store(MJD, objects, sources, forced)
    region = ppdb.region_for(detector, RA, DEC)
    current = db.get_dia_objects(region)
    history = db.get_dia_sources(region, current["diaObjectId"], MJD + 1)
    _, new_sources, new_forced = _catalogs(
        detector, visit=VISIT + 1, mjd=MJD + 1, outside=False, n=2
    )
    matched = associate(new_sources, current, 1.0)
    assert np.all(matched >= 0)
    objs2, srcs2 = update_objects(matched, new_sources, current, history, mjd=MJD + 1)
    new_forced["diaObjectId"] = srcs2["diaObjectId"]
    assert db.store(MJD + 1, objs2, srcs2, new_forced)
    latest = db.get_dia_objects(region)
    assert len(latest) == 2 and np.all(latest["nDiaSources"] == 2)
    assert np.all(latest["validityStartMjdTai"] == MJD + 1)


def test_missing_required_column_is_named(db, detector):
    objects, sources, forced = _catalogs(detector)
    del sources["bboxSize"]
    with pytest.raises(PpdbError, match="bboxSize"):
        db.store(MJD, objects, sources, forced)


def test_region_padding(detector):
    small = ppdb.region_for(detector, RA, DEC, padding_arcsec=0.0)
    big = ppdb.region_for(detector, RA, DEC)
    assert big.contains(small)


@pytest.mark.service
def test_postgresql_round_trip(detector):
    pytest.importorskip("psycopg2")
    import sqlalchemy

    url = "postgresql+psycopg2://postgres@127.0.0.1/test"
    namespace = f"apdask_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{namespace}"'))
    except sqlalchemy.exc.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable: {err}")
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = ppdb.create_ppdb(url, f"{tmp}/apdb.yaml", namespace=namespace)
            assert ppdb.create_ppdb(url, f"{tmp}/apdb.yaml", namespace=namespace) == path
            db = ppdb.Ppdb.open(path)
            objects, sources, forced = _catalogs(detector)
            region = ppdb.region_for(detector, RA, DEC)
            assert db.store(MJD, objects, sources, forced)
            assert not db.store(MJD, objects, sources, forced)
            assert len(db.get_dia_objects(region)) == len(objects) - 1
            assert len(db.get_dia_sources(region, None, MJD)) == len(sources) - 1
            db2 = ppdb.Ppdb.open(url, namespace=namespace)
            assert db2.contains_visit_detector(VISIT, DET)
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA "{namespace}" CASCADE'))
        engine.dispose()


@pytest.mark.service
def test_postgresql_uninitialised_namespace():
    pytest.importorskip("psycopg2")
    url = "postgresql+psycopg2://postgres@127.0.0.1/test"
    with pytest.raises(PpdbError, match="apdask ppdb create"):
        ppdb.Ppdb.open(url, namespace=f"missing_{uuid.uuid4().hex[:8]}")


def test_unreachable_server_is_wrapped_after_retries():
    pytest.importorskip("psycopg2")
    with pytest.raises(PpdbError, match="after 3 tries"):
        ppdb.Ppdb.open("postgresql+psycopg2://postgres@127.0.0.1:1/test")
