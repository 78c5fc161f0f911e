"""Tests of apdask.ppdb over SQLite (and PostgreSQL with the ``service`` marker)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from astropy.table import Table

from apdask.core.camera import get_camera
from apdask.core.ids import dia_forced_source_ids, dia_source_ids
from apdask.core.records import CcdRows
from apdask.exceptions import PpdbError
from apdask.pipeline.associate import associate, update_objects
from apdask.ppdb import database as ppdb
from tests import _ppdb_synth as synth

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
            # the URL a user types (SQLAlchemy would want psycopg 3 for it; issue 19)
            plain = ppdb.Ppdb.open("postgresql://postgres@127.0.0.1/test", namespace=namespace)
            assert plain.contains_visit_detector(VISIT, DET)
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


# ---------------------------------------------------------------------------
# issue 5: CCD interface, DRP objects, as-of reads, replace semantics, versions


def _sqlite_config(tmp_path):
    return ppdb.create_ppdb(f"sqlite:///{tmp_path}/apdb.db")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.service)])
def any_config(request, tmp_path):
    """A fresh PPDB on SQLite, or in a unique PostgreSQL schema dropped afterwards."""
    if request.param == "sqlite":
        yield _sqlite_config(tmp_path)
        return
    with synth.pg_ppdb(tmp_path / "apdb.yaml") as path:
        yield path


def test_for_ccd_region_from_boresight_and_name(tmp_path, detector):
    view = ppdb.Ppdb.for_ccd(_sqlite_config(tmp_path), detector.name, RA, DEC, camera="comcam")
    assert view.detector.id == DET
    assert view.region.contains(ppdb.region_for(detector, RA, DEC, padding_arcsec=0.0))
    assert not view.region.contains(ppdb.region_for(detector, RA, DEC, padding_arcsec=60.0))
    hist = view.read(MJD)
    assert set(hist) == {"objects", "sources", "forced", "drp"}
    assert hist["objects"]["ra"].unit == "deg" and len(hist["drp"]) == 0
    with pytest.raises(ValueError, match="camera="):
        ppdb.Ppdb.for_ccd(_sqlite_config(tmp_path), detector.name, RA, DEC)


def test_drp_objects_load_and_region_read(any_config, detector):
    view = ppdb.Ppdb.for_ccd(any_config, detector, RA, DEC)
    pra, pdec = synth.field(detector, RA, DEC, n=10)
    drp = Table({"objectId": np.arange(10) + 10**12, "ra": pra + synth.AS, "dec": pdec})
    drp.add_row((7, RA + 5.0, DEC))  # far outside the CCD
    assert view.ppdb.load_drp_objects(drp) == 11
    assert view.ppdb.load_drp_objects(drp) == 11  # reload: replaced, not duplicated
    got = view.read(MJD)["drp"]
    assert got["objectId"].tolist() == sorted(drp["objectId"][:10].tolist())
    assert got["ra"].unit == "deg"
    # a new DIAObject records its nearest DRP Objects
    stored, out = synth.run_ccd(view, VISIT, MJD, (pra, pdec))
    assert stored and len(out["new_objects"]) == 13
    matches = view.ppdb.get_drp_matches(out["new_objects"]["diaObjectId"])
    assert len(matches) == 10 and matches["dist"].unit == "arcsec"
    assert np.all(matches["dist"] == pytest.approx(1.0, abs=0.3))
    assert set(matches["objectId"]) == set(drp["objectId"][:10])


def test_replace_rerun_leaves_ppdb_identical(any_config, detector):
    other = get_camera("comcam")[DET + 1]
    views = [ppdb.Ppdb.for_ccd(any_config, d, RA, DEC) for d in (detector, other)]
    db = views[0].ppdb
    pos = [synth.field(v.detector, RA, DEC, n=6) for v in views]
    for k, visit in enumerate((VISIT, VISIT + 1)):
        for v, p in zip(views, pos, strict=True):
            assert synth.run_ccd(v, visit, MJD + k, p)[0]
    done = synth.dump(db)
    assert len(done["DiaObject"]) == 2 * (9 + 9) and len(done["DiaForcedSource"]) == 2 * 9
    # default: a stored CCD is skipped
    assert synth.run_ccd(views[0], VISIT + 1, MJD + 1, pos[0])[0] is False
    # replace: the whole visit again, in reverse CCD order
    for v, p in reversed(list(zip(views, pos, strict=True))):
        assert synth.run_ccd(v, VISIT + 1, MJD + 1, p, replace=True)[0]
    again = synth.dump(db)
    for name in synth.TABLES:
        import pandas as pd

        pd.testing.assert_frame_equal(done[name], again[name])
    # the earlier visit's versions were superseded: replacing it is refused
    with pytest.raises(PpdbError, match="superseded by later visits"):
        synth.run_ccd(views[0], VISIT, MJD, pos[0], replace=True)
    assert synth.dump(db)["DiaSource"].equals(again["DiaSource"])


def test_ccd_rows_are_what_the_ccd_stored(any_config, detector):
    """A re-run re-sends a committed CCD's alerts from these rows (issue 19): its
    DiaSources and the DiaObject versions of its visit, also after a later visit."""
    other = get_camera("comcam")[DET + 1]
    views = [ppdb.Ppdb.for_ccd(any_config, d, RA, DEC) for d in (detector, other)]
    db = views[0].ppdb
    pos = synth.field(detector, RA, DEC, n=4)
    _, first = synth.run_ccd(views[0], VISIT, MJD, pos)
    synth.run_ccd(views[1], VISIT, MJD, synth.field(other, RA, DEC, n=3))
    synth.run_ccd(views[0], VISIT + 1, MJD + 1, pos)  # supersedes the objects' versions
    rows = db.get_ccd_rows(VISIT, DET, MJD)
    assert isinstance(rows, CcdRows)
    want = sorted(int(i) for i in first["sources"]["diaSourceId"])
    assert rows.sources["diaSourceId"].tolist() == want
    assert set(rows.sources["visit"]) == {VISIT} and set(rows.sources["detector"]) == {DET}
    assert rows.sources["ra"].unit == "deg"
    oids = sorted(int(i) for i in first["objects"]["diaObjectId"])
    assert rows.objects["diaObjectId"].tolist() == oids
    assert np.all(rows.objects["validityStartMjdTai"] == MJD)  # not visit + 1's
    assert np.allclose(rows.objects["ra"], np.sort(first["objects"], order="diaObjectId")["ra"])
    empty = db.get_ccd_rows(VISIT + 5, DET, MJD + 5)
    assert len(empty.sources) == 0 and len(empty.objects) == 0


def test_as_of_read_ignores_the_visit_itself(tmp_path, detector):
    view = ppdb.Ppdb.for_ccd(_sqlite_config(tmp_path), detector, RA, DEC)
    pos = synth.field(detector, RA, DEC, n=4)
    synth.run_ccd(view, VISIT, MJD, pos)
    synth.run_ccd(view, VISIT + 1, MJD + 1, pos)
    before = view.read(MJD + 1)
    latest = view.read(MJD + 1, as_of=False)
    assert np.all(before["objects"]["validityStartMjdTai"] == MJD)
    assert len(before["sources"]) == 7 and set(before["sources"]["visit"]) == {VISIT}
    assert len(latest["sources"]) == 14
    assert len(latest["objects"]) == 10  # 4 updated + 3 + 3 new


def test_fp_flux_means_include_this_visits_forced_sources(tmp_path, detector):
    view = ppdb.Ppdb.for_ccd(_sqlite_config(tmp_path), detector, RA, DEC)
    pos = synth.field(detector, RA, DEC, n=3)
    for k in range(3):
        synth.run_ccd(view, VISIT + k, MJD + k, pos)
    objects = view.ppdb.get_dia_objects(view.region)
    first = objects[np.isin(objects["diaObjectId"], dia_source_ids(VISIT, DET, 3))]
    oid = np.asarray(first["diaObjectId"])
    # forced at visits VISIT+1 and VISIT+2: psfFlux = oid % 97 + visit % 7, err 2
    want = oid % 97 + ((VISIT + 1) % 7 + (VISIT + 2) % 7) / 2
    assert np.allclose(first["r_fpFluxMean"], want)
    assert np.allclose(first["r_fpFluxMeanErr"], np.sqrt(2.0))
    assert first["r_fpFluxMean"].unit == "nJy"


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    import sqlalchemy

    path = _sqlite_config(tmp_path)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path}/apdb.db")
    with engine.begin() as conn:
        conn.execute(
            sqlalchemy.text("UPDATE metadata SET value = '99.0.0' WHERE name = 'version:schema'")
        )
    engine.dispose()
    with pytest.raises(PpdbError, match="incompatible schema version.*99.0.0"):
        ppdb.Ppdb.open(path)
