"""Concurrent CCD writers and killed writers, on SQLite and on PostgreSQL.

Writers are separate processes forked from the test process, which has
imported everything and opened the PPDB beforehand (dax_apdb's engine pools no
connections, so a forked child makes its own).  Each child reads its CCD's
history as of the visit, associates and stores a synthetic catalog, or stores
catalogs the parent prepared: no pixels, so 189 of them fit on two cores.

`make test` runs this module in a pytest process of its own: after scipy.fft has
run with several workers in a process, its pocketfft thread pool joins its threads
in a fork handler, and that can hang under load.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import time

import dask
import numpy as np
import pandas as pd
import pytest
from astropy.table import Table, vstack

from apdask.core.camera import get_camera
from apdask.pipeline.associate import associate_ccd
from apdask.ppdb import database as ppdb
from tests import _ppdb_synth as synth

PG_URL = synth.PG_URL
RA, DEC, MJD0 = 30.0, -20.0, 61000.0
_CTX = multiprocessing.get_context("fork")
_SHARED = {}


_pg_engine = synth.pg_engine


@pytest.fixture
def pg_config(tmp_path):
    """A PPDB in a fresh PostgreSQL schema, dropped afterwards."""
    with synth.pg_ppdb(tmp_path / "apdb.yaml", "apdask_cc") as path:
        yield path


def _max_connections(engine):
    import sqlalchemy

    with engine.connect() as conn:
        return int(conn.execute(sqlalchemy.text("SHOW max_connections")).scalar_one())


@pytest.fixture
def pg_writers_config(tmp_path):
    """A PPDB for one writer per LSSTCam CCD at once: 189 clients.

    The running server is used when its ``max_connections`` allows them (CI
    raises it, see ``.ci/run``); otherwise a private cluster of the same
    PostgreSQL installation is started for the test with a higher limit.
    """

    engine = _pg_engine()
    need = 189 + 20
    try:
        enough = _max_connections(engine) >= need
    finally:
        engine.dispose()
    if enough:
        with synth.pg_ppdb(tmp_path / "apdb.yaml", "apdask_cc") as path:
            yield path, PG_URL
        return
    with synth.private_postgres(need + 40) as url:
        yield ppdb.create_ppdb(url, tmp_path / "apdb.yaml", namespace="apdask_cc"), url


@pytest.fixture
def sqlite_config(tmp_path):
    return ppdb.create_ppdb(f"sqlite:///{tmp_path}/apdb.db")


def _open_shared(path):
    """Open once in the parent and warm every lazily built piece before forking."""
    db = ppdb.Ppdb.open(path)
    for name in synth.TABLES:
        db._table(name)
    db.columns("DiaObject")
    return db


def _hold_open(inside, marks):
    """Make this process's stores wait, rows written and transaction open, for
    every other writer to get there too (``inside`` is a barrier of all)."""
    from lsst.dax.apdb.sql import ApdbSql

    original = ApdbSql._storeDiaForcedSources  # the last insert of ApdbSql.store

    def store_then_wait(self, *args, **kwargs):
        original(self, *args, **kwargs)
        marks["inside"] = time.time()
        inside.wait(timeout=180)

    ApdbSql._storeDiaForcedSources = store_then_wait


def _child(det_id, visit, mjd, barrier, inside, results):
    db, camera = _SHARED["db"], _SHARED["camera"]
    det = camera[det_id]
    view = ppdb.CcdPpdb(db, det, ppdb.region_for(det, RA, DEC))
    pos = synth.field(det, RA, DEC, n=8)
    payload = _SHARED.get("payload", {}).get(det_id)
    marks = {"inside": np.nan}
    if inside is not None:
        _hold_open(inside, marks)
    try:
        barrier.wait(timeout=120)
        t0 = time.time()
        if payload is None:  # the whole CCD: read, associate, store
            stored, out = synth.run_ccd(view, visit, mjd, pos)
            n = len(out["sources"])
        else:  # catalogs prepared by the parent: only the write runs here
            objects, sources, forced, matches = payload
            stored = view.store(mjd, objects, sources, forced, visit=visit, drp_matches=matches)
            n = len(sources)
        done = time.time()
        results.put((det_id, bool(stored), n, done - t0, None, marks["inside"], done))
    except Exception as err:  # reported to the parent, which fails the test
        results.put((det_id, False, 0, 0.0, f"{type(err).__name__}: {err}", np.nan, np.nan))


def _run_visit_in_processes(db, camera, det_ids, visit, mjd, payload=None, hold=False):
    """All CCDs of a visit as separate processes released together by a barrier.

    Processes are forked from this one, which has imported and opened
    everything; each makes its own database connection.  With ``hold`` each
    transaction, once its rows are written, waits for all the others before
    committing.
    """
    _SHARED.update(db=db, camera=camera, payload=payload or {})
    barrier = _CTX.Barrier(len(det_ids))
    inside = _CTX.Barrier(len(det_ids)) if hold else None
    results = _CTX.Queue()
    procs = [
        _CTX.Process(target=_child, args=(d, visit, mjd, barrier, inside, results)) for d in det_ids
    ]
    t0 = time.time()
    gc.collect()
    gc.freeze()  # keep children from copying the parent's heap on write
    try:
        for p in procs:
            p.start()
    finally:
        gc.unfreeze()
    out = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    wall = time.time() - t0
    errors = [r for r in out if r[4] is not None]
    assert not errors, errors[:5]
    assert all(p.exitcode == 0 for p in procs)
    return out, wall


def _deadlocks(engine):
    import sqlalchemy

    with engine.connect() as conn:
        q = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        return int(conn.execute(sqlalchemy.text(q)).scalar_one())


def _check_visit_rows(db, det_ids, visits, n_per_ccd):
    data = synth.dump(db)
    for name, df in data.items():
        assert not df.duplicated(synth.KEYS[name]).any(), name
    src = data["DiaSource"]
    want = {(v, d) for v in visits for d in det_ids}
    got = src.groupby(["visit", "detector"]).size()
    assert set(got.index) == want
    assert (got == n_per_ccd).all()
    objects = data["DiaObject"]
    latest = objects[objects["validityEndMjdTai"].isna()]
    assert latest["diaObjectId"].is_unique
    # every source's object has exactly one open version
    assert set(src["diaObjectId"]) == set(latest["diaObjectId"])
    return data


def _prepare_visit(camera, det_ids, visit, mjd, state):
    """Per-CCD catalogs of a visit, associated in memory against ``state``.

    ``state`` maps detector id to the history a PPDB read would return; it is
    updated with this visit's output, so the parent never has to read the PPDB
    and each writer process only writes.
    """
    payload = {}
    for det_id in det_ids:
        det = camera[det_id]
        history = state.get(det_id) or {
            "objects": Table({"diaObjectId": np.zeros(0, np.int64), "ra": [], "dec": []}),
            "sources": None,
            "forced": None,
            "drp": None,
        }
        sources = synth.sources_for(det, visit, mjd, synth.field(det, RA, DEC, n=8))
        forced = synth.forced_for(history["objects"], det, visit, mjd)
        out = associate_ccd(sources, history, mjd, forced)
        payload[det_id] = (out["objects"], out["sources"], forced, out["drp_matches"])
        old = history["objects"]
        keep = ~np.isin(np.asarray(old["diaObjectId"]), np.asarray(out["objects"]["diaObjectId"]))
        parts = [t for t in (history["sources"], out["sources"]) if t is not None]
        state[det_id] = {
            "objects": vstack([old[keep][["diaObjectId", "ra", "dec"]], out["objects"]]),
            "sources": vstack(parts, metadata_conflicts="silent"),
            "forced": None,
            "drp": None,
        }
    return payload


@pytest.mark.service
def test_lsstcam_visit_189_writers_postgresql(pg_writers_config):
    """A whole LSSTCam visit, then a second one that updates every object.

    189 writer processes, one per CCD, each with its own connection, are
    released together by a barrier; each stores its CCD's catalogs (prepared by
    the parent: the read/associate path is exercised by the SQLite test and the
    benchmark) in one transaction, which then waits for all the others to have
    written their rows before it commits: 189 transactions open at once.
    """
    config_path, url = pg_writers_config
    camera = get_camera("lsstcam")
    det_ids = [d.id for d in camera.detectors]
    assert len(det_ids) == 189
    db = _open_shared(config_path)
    engine = _pg_engine(url)
    dead0 = _deadlocks(engine)
    state = {}
    t0 = time.time()
    pay1 = _prepare_visit(camera, det_ids, 1, MJD0, state)
    t_prep = time.time() - t0
    first, wall1 = _run_visit_in_processes(db, camera, det_ids, 1, MJD0, pay1, hold=True)
    pay2 = _prepare_visit(camera, det_ids, 2, MJD0 + 1, state)
    second, wall2 = _run_visit_in_processes(db, camera, det_ids, 2, MJD0 + 1, pay2, hold=True)
    assert all(r[1] for r in first + second)
    for out in (first, second):  # every transaction was open while all had written
        assert max(r[5] for r in out) < min(r[6] for r in out)
    n_per_ccd = 8 + 3
    data = _check_visit_rows(db, det_ids, (1, 2), n_per_ccd)
    objects = data["DiaObject"]
    # visit 1 created 11 objects per CCD; visit 2 updated 8 and created 3
    assert len(objects) == 189 * (11 + 11)
    assert int(objects["validityEndMjdTai"].notna().sum()) == 189 * 8
    assert len(data["DiaForcedSource"]) == 189 * 11  # visit 2 at visit 1's objects
    assert _deadlocks(engine) == dead0
    engine.dispose()
    per = np.median([r[3] for r in first + second])
    print(
        f"189 writers: visit 1 {wall1:.1f} s, visit 2 {wall2:.1f} s wall; {per:.2f} s per "
        f"writer; preparing visit 1 {t_prep:.1f} s"
    )


def test_lsstcam_visit_189_writers_sqlite(sqlite_config):
    """The same two LSSTCam visits on SQLite: 189 writer processes released at once.

    SQLite takes one writer at a time, so the transactions queue on apdask's write
    lock (a ``flock`` beside the database) instead of being open together, with the
    DEFAULT settings (30 s busy timeout, 3 tries, 300 s lock deadline); nothing may
    be lost, duplicated or left as a second open object version.
    """
    camera = get_camera("lsstcam")
    det_ids = [d.id for d in camera.detectors]
    assert dask.config.get("apdask.ppdb.sqlite_timeout_s") == 30.0  # the defaults, not raised
    db = _open_shared(sqlite_config)
    state = {}
    pay1 = _prepare_visit(camera, det_ids, 1, MJD0, state)
    first, wall1 = _run_visit_in_processes(db, camera, det_ids, 1, MJD0, pay1)
    pay2 = _prepare_visit(camera, det_ids, 2, MJD0 + 1, state)
    second, wall2 = _run_visit_in_processes(db, camera, det_ids, 2, MJD0 + 1, pay2)
    assert all(r[1] for r in first + second)
    data = _check_visit_rows(db, det_ids, (1, 2), 8 + 3)
    objects = data["DiaObject"]
    assert len(objects) == 189 * (11 + 11)
    assert int(objects["validityEndMjdTai"].notna().sum()) == 189 * 8
    assert len(data["DiaForcedSource"]) == 189 * 11
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"189 SQLite writers: visit 1 {wall1:.1f} s, visit 2 {wall2:.1f} s wall; load {load}")


def test_concurrent_writers_sqlite(sqlite_config):
    camera = get_camera("lsstcam")
    det_ids = [d.id for d in camera.detectors[:6]]
    db = _open_shared(sqlite_config)
    for visit in (1, 2):
        out, _ = _run_visit_in_processes(db, camera, det_ids, visit, MJD0 + visit)
        assert all(r[1] for r in out)
    data = _check_visit_rows(db, det_ids, (1, 2), 11)
    assert len(data["DiaObject"]) == 6 * 22


# ---------------------------------------------------------------------------
# a writer killed in the middle of its transaction


def _killable_child(path, det_id, visit, mjd, replace, ready):
    from lsst.dax.apdb.sql import ApdbSql

    original = ApdbSql._storeDiaSources

    def stall(self, *args, **kwargs):
        original(self, *args, **kwargs)  # rows written, transaction still open
        ready.send("inside")
        time.sleep(120)

    ApdbSql._storeDiaSources = stall
    db = _SHARED["db"]
    det = _SHARED["camera"][det_id]
    view = ppdb.CcdPpdb(db, det, ppdb.region_for(det, RA, DEC))
    synth.run_ccd(view, visit, mjd, synth.field(det, RA, DEC, n=8), replace=replace)


def _kill_mid_store(db, camera, det_id, visit, mjd, replace):
    _SHARED.update(db=db, camera=camera)
    here, there = _CTX.Pipe()
    proc = _CTX.Process(target=_killable_child, args=(None, det_id, visit, mjd, replace, there))
    proc.start()
    assert here.poll(90), "writer never reached the middle of its transaction"
    assert here.recv() == "inside"
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL


def _assert_same(a, b):
    for name in synth.TABLES:
        pd.testing.assert_frame_equal(a[name], b[name], check_dtype=False)


def _kill_and_rerun(path):
    camera = get_camera("lsstcam")
    det = camera["R22_S11"]
    db = _open_shared(path)
    view = ppdb.CcdPpdb(db, det, ppdb.region_for(det, RA, DEC))
    pos = synth.field(det, RA, DEC, n=8)
    assert synth.run_ccd(view, 1, MJD0, pos)[0]
    before = synth.dump(db)
    _kill_mid_store(db, camera, det.id, 2, MJD0 + 1, replace=False)
    _assert_same(synth.dump(db), before)  # the killed transaction left nothing
    assert not db.contains_visit_detector(2, det.id)
    assert synth.run_ccd(view, 2, MJD0 + 1, pos)[0]  # the re-run
    done = synth.dump(db)
    assert len(done["DiaSource"]) == 22 and not done["DiaSource"]["diaSourceId"].duplicated().any()
    # killed during a replace (after its deletes): the previous state survives
    _kill_mid_store(db, camera, det.id, 2, MJD0 + 1, replace=True)
    _assert_same(synth.dump(db), done)
    assert synth.run_ccd(view, 2, MJD0 + 1, pos, replace=True)[0]
    _assert_same(synth.dump(db), done)
    assert np.all(synth.dump(db)["DiaObject"].groupby("diaObjectId").size() <= 2)


def test_killed_writer_sqlite(sqlite_config):
    _kill_and_rerun(sqlite_config)


@pytest.mark.service
def test_killed_writer_postgresql(pg_config):
    _kill_and_rerun(pg_config)
