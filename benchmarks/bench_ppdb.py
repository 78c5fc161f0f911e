"""PPDB per CCD: region read, association and write against a populated PPDB (issue 5).

The PPDB is populated (setup, not timed) with ``--objects`` DIAObjects spread
uniformly over a square ``--area-ccds`` CCD widths on a side, centred on one
LSSTCam CCD (R22_S11 by default), ``--sources`` DIASources of them over the past
12 months (``--history-visits`` visits of this field), ``--forced-per-object``
DiaForcedSources per object, ``--object-versions`` DiaObject versions per object
(dax_apdb keeps every version; the region read must skip the closed ones) and
``--drp`` DRP Objects.  Bulk inserts (PostgreSQL ``COPY``, SQLite
``executemany``) populate it, in time order as a PPDB grows.

Density: with the default ``--area-ccds 8`` a CCD's padded region holds about
1/60 of it, ~1,700 DIAObjects and ~17,000 12-month DIASources before the timed
visits add their own: Rubin's peak rate (40,000 DIASources per visit, ~210 per
CCD) times the ~80 visits a field gets in a year.  ``--area-ccds 5`` is a
denser field (~4,400 objects, ~44,000 sources per CCD), ``--area-ccds 16``
about Rubin's average (10,000 DIASources per visit).  The report gives the rows
actually read per CCD.

Then for ``--visits`` successive visits of that CCD (the first is a warm-up,
left out of the medians) it times what a CCD task does, through the public API:

* ``read``: :meth:`apdask.ppdb.database.CcdPpdb.read` of the CCD's padded region as of the
  visit (DIAObjects, their 12-month DIASources and DiaForcedSources, DRP Objects);
* ``associate``: :func:`apdask.pipeline.associate.associate_ccd` of ``--new-sources`` new
  DIASources (``--matched-fraction`` of them at known objects), with the DPDD
  aggregates of every touched object (``match`` is the matching step alone);
* ``write``: :meth:`apdask.ppdb.database.CcdPpdb.store` of the new sources, the new object
  versions and a forced measurement at every known object of the CCD.

Run it on SQLite and on PostgreSQL (a fresh schema, dropped afterwards)::

    .venv/bin/python benchmarks/bench_ppdb.py --backend sqlite postgresql
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import uuid

import numpy as np
from astropy.table import Table

from apdask.core.camera import BANDS, get_camera
from apdask.core.ids import dia_forced_source_ids, dia_source_ids, pack_id
from apdask.pipeline.associate import associate, associate_ccd
from apdask.ppdb import database as ppdb_mod

AS = 1.0 / 3600.0
RA0, DEC0, MJD0 = 30.0, -20.0, 61000.0
PG_URL = "postgresql+psycopg2://postgres@127.0.0.1/test"
TARGET_S = 0.5


# ---------------------------------------------------------------------------
# synthetic history


def _box(det, area_ccds):
    """Centre (ra, dec) and half-sizes (deg of RA, deg of Dec) of the populated square."""
    corners = det.footprint(RA0, DEC0)
    ra_c, dec_c = corners.mean(axis=0)
    half = 0.5 * area_ccds * det.nx * det.pixel_scale * AS
    return ra_c, dec_c, half / np.cos(np.radians(dec_c)), half


def _history(det, args, rng):
    """Columns (dicts of numpy arrays) of the DiaObject, DiaSource and forced rows."""
    n_obj, n_src = args.objects, args.sources
    ra_c, dec_c, h_ra, h_dec = _box(det, args.area_ccds)
    o_ra = ra_c + rng.uniform(-h_ra, h_ra, n_obj)
    o_dec = dec_c + rng.uniform(-h_dec, h_dec, n_obj)
    visit_mjd = MJD0 - 360.0 + np.sort(rng.uniform(0.0, 359.0, args.history_visits))
    visit_band = np.asarray(BANDS)[rng.integers(0, len(BANDS), args.history_visits)]
    # every object has at least one source; the rest land on random objects
    owner = np.concatenate([np.arange(n_obj), rng.integers(0, n_obj, n_src - n_obj)])
    s_visit = rng.integers(0, args.history_visits, n_src)
    order = np.lexsort((s_visit, owner))
    owner, s_visit = owner[order], s_visit[order]
    s_mjd = visit_mjd[s_visit] + rng.uniform(0, 30 / 86400, n_src)
    # ids as the pipeline makes them: (visit, detector, index); visits numbered 1..N
    index = np.zeros(n_src, np.int64)
    for v in np.unique(s_visit):
        sel = s_visit == v
        index[sel] = np.arange(sel.sum())
    s_id = pack_id(s_visit + 1, 0, index)
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    o_id = s_id[first]  # a DIAObject takes the id of the DIASource that created it
    n_per = np.diff(np.r_[first, n_src])
    err = 0.05 * AS
    s_band = visit_band[s_visit]
    flux = rng.lognormal(7.0, 1.0, n_src)
    sources = {
        "diaSourceId": s_id,
        "visit": s_visit + 1,
        "detector": np.zeros(n_src, np.int64) + det.id,
        "diaObjectId": o_id[owner],
        "midpointMjdTai": s_mjd,
        "ra": o_ra[owner] + rng.normal(0, err, n_src) / np.cos(np.radians(o_dec[owner])),
        "raErr": np.full(n_src, err),
        "dec": o_dec[owner] + rng.normal(0, err, n_src),
        "decErr": np.full(n_src, err),
        **_measured(flux, rng),
        "trailNdata": np.zeros(n_src, np.int64),
        "dipoleNdata": np.zeros(n_src, np.int64),
        "timeProcessedMjdTai": s_mjd + 60 / 86400,
        "band": s_band,
        "isDipole": np.zeros(n_src, bool),
        "pixelFlags_bad": np.zeros(n_src, bool),
        "pixelFlags_edge": np.zeros(n_src, bool),
        "pixelFlags_saturated": np.zeros(n_src, bool),
        "pixelFlags_cr": np.zeros(n_src, bool),
    }
    # distinct visits per object: (diaObjectId, visit, detector) is the primary key
    k = min(args.forced_per_object, args.history_visits)
    n_forced = k * n_obj
    f_owner = np.repeat(np.arange(n_obj), k)
    step = args.history_visits // k
    f_visit = (np.repeat(rng.integers(0, args.history_visits, n_obj), k)
               + step * np.tile(np.arange(k), n_obj)) % args.history_visits  # fmt: skip
    f_index = np.zeros(n_forced, np.int64)
    for v in np.unique(f_visit):
        sel = f_visit == v
        f_index[sel] = (1 << 19) + np.arange(sel.sum())
    forced = {
        "diaForcedSourceId": pack_id(f_visit + 1, 0, f_index),
        "diaObjectId": o_id[f_owner],
        "visit": f_visit + 1,
        "detector": np.zeros(n_forced, np.int64) + det.id,
        "ra": o_ra[f_owner],
        "dec": o_dec[f_owner],
        "midpointMjdTai": visit_mjd[f_visit],
        "psfFlux": rng.normal(0, 50, n_forced),
        "psfFluxErr": np.full(n_forced, 50.0),
        "scienceFlux": rng.lognormal(7, 1, n_forced),
        "scienceFluxErr": np.full(n_forced, 60.0),
        "band": visit_band[f_visit],
        "timeProcessedMjdTai": visit_mjd[f_visit] + 60 / 86400,
    }
    objects = _object_versions(o_id, o_ra, o_dec, n_per, owner, s_mjd, s_band, flux, args, rng)
    return objects, sources, forced


def _measured(flux, rng):
    """Synthetic measurement columns of DIASources with PSF fluxes ``flux`` (nJy)."""
    n = len(flux)
    return {
        "x": rng.uniform(0, 4000, n),
        "xErr": np.full(n, 0.25),
        "y": rng.uniform(0, 4000, n),
        "yErr": np.full(n, 0.25),
        "psfFlux": flux,
        "psfFluxErr": 0.05 * flux + 30,
        "psfChi2": rng.uniform(0.5, 2, n),
        "psfNdata": np.full(n, 25),
        "apFlux": flux * 1.02,
        "apFluxErr": 0.05 * flux + 35,
        "scienceFlux": flux * 3,
        "scienceFluxErr": 0.03 * flux + 40,
        "snr": flux / (0.05 * flux + 30),
        "bboxSize": np.full(n, 30),
    }


def _object_versions(o_id, o_ra, o_dec, n_per, owner, s_mjd, s_band, flux, args, rng):
    """Latest plus earlier (closed) versions of each object, as dax_apdb keeps them."""
    n_obj = o_id.size
    last = np.zeros(n_obj)
    np.maximum.at(last, owner, s_mjd)
    firsts = np.full(n_obj, np.inf)
    np.minimum.at(firsts, owner, s_mjd)
    cols = {
        "diaObjectId": o_id,
        "ra": o_ra,
        "raErr": 0.05 * AS / np.sqrt(n_per),
        "dec": o_dec,
        "decErr": 0.05 * AS / np.sqrt(n_per),
        "nDiaSources": n_per,
        "firstDiaSourceMjdTai": firsts,
        "lastDiaSourceMjdTai": last,
    }
    mean_flux = np.bincount(owner, flux, n_obj) / n_per
    for b in BANDS:
        nb = np.bincount(owner[s_band == b], minlength=n_obj)
        has = nb > 0
        for key in ("Mean", "MeanErr", "Sigma", "Min", "Max", "MaxSlope", "ErrMean"):
            values = mean_flux * rng.uniform(0.5, 1.5, n_obj)
            cols[f"{b}_psfFlux{key}"] = np.where(has, values, np.nan)
        cols[f"{b}_psfFluxNdata"] = nb
        cols[f"{b}_fpFluxMean"] = np.where(has, mean_flux, np.nan)
        cols[f"{b}_fpFluxMeanErr"] = np.where(has, 30.0, np.nan)
    # version k (0 = latest) starts k * 3 days before the last detection
    k = np.repeat(np.arange(args.object_versions), n_obj)
    out = {name: np.tile(col, args.object_versions) for name, col in cols.items()}
    start = np.tile(last, args.object_versions) - 3.0 * k
    out["validityStartMjdTai"] = start
    out["validityEndMjdTai"] = np.where(k == 0, np.nan, start + 3.0)
    return out


# ---------------------------------------------------------------------------
# bulk population (setup, not timed)


def _time_ordered(cols, key):
    order = np.argsort(cols[key], kind="stable")
    return {name: np.asarray(v)[order] for name, v in cols.items()}


def _pixel_ids(db, ra, dec):
    return db._pixel_ids(ra, dec)


def _frame(table, cols, n):
    """Columns in table order (only those given), as a list of (name, array)."""
    out = []
    for c in table.columns:
        if c.name in cols:
            v = cols[c.name]
            if v is None:
                continue
            out.append((c.name, np.broadcast_to(np.asarray(v), (n,))))
    return out


def _copy_pg(conn, table, cols, n, chunk=200_000):
    import pandas as pd

    pairs = _frame(table, cols, n)
    names = [p[0] for p in pairs]
    raw = conn.connection.dbapi_connection
    full = f'"{table.schema}"."{table.name}"' if table.schema else f'"{table.name}"'
    collist = ", ".join(f'"{c}"' for c in names)
    with raw.cursor() as cur:
        for lo in range(0, n, chunk):
            df = pd.DataFrame({k: v[lo : lo + chunk] for k, v in pairs})
            buf = io.StringIO()
            df.to_csv(buf, header=False, index=False, float_format="%.17g", na_rep="")
            buf.seek(0)
            cur.copy_expert(f"COPY {full} ({collist}) FROM STDIN WITH (FORMAT csv)", buf)


def _insert_sqlite(conn, table, cols, n, chunk=200_000):
    pairs = _frame(table, cols, n)
    names = [p[0] for p in pairs]
    collist = ", ".join(f'"{c}"' for c in names)
    marks = ", ".join("?" * len(names))
    sql = f'INSERT INTO "{table.name}" ({collist}) VALUES ({marks})'
    raw = conn.connection.dbapi_connection
    for lo in range(0, n, chunk):
        lists = []
        for _, v in pairs:
            part = v[lo : lo + chunk]
            if part.dtype.kind == "f":
                part = np.where(np.isnan(part), None, part).tolist()
            else:
                part = part.tolist()
            lists.append(part)
        raw.executemany(sql, zip(*lists, strict=True))


def populate(db, det, args, rng):
    """Bulk-load the synthetic history; returns the row counts."""
    objects, sources, forced = _history(det, args, rng)
    n_obj = args.objects
    objects["pixelId"] = np.tile(_pixel_ids(db, objects["ra"][:n_obj], objects["dec"][:n_obj]),
                                 args.object_versions)  # fmt: skip
    sources["pixelId"] = _pixel_ids(db, sources["ra"], sources["dec"])
    load = _copy_pg if db.apdb._engine.dialect.name == "postgresql" else _insert_sqlite
    tables = {name: db._table(name) for name in ("DiaObject", "DiaSource", "DiaForcedSource")}
    # rows in the order a PPDB receives them, visit after visit: an object's
    # history is spread over the tables as in production, not clustered
    rows = {
        "DiaObject": _time_ordered(objects, "validityStartMjdTai"),
        "DiaSource": _time_ordered(sources, "midpointMjdTai"),
        "DiaForcedSource": _time_ordered(forced, "midpointMjdTai"),
    }
    with db._engine.begin() as conn:
        for name, cols in rows.items():
            load(conn, tables[name], cols, cols["diaObjectId"].size)
    if args.drp:
        ra_c, dec_c, h_ra, h_dec = _box(det, args.area_ccds)
        drp = Table(
            {
                "objectId": np.arange(1, args.drp + 1, dtype=np.int64),
                "ra": ra_c + rng.uniform(-h_ra, h_ra, args.drp),
                "dec": dec_c + rng.uniform(-h_dec, h_dec, args.drp),
            }
        )
        db.load_drp_objects(drp)
    if db.apdb._engine.dialect.name == "postgresql":
        with db._engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
                t = db._table(name)
                conn.exec_driver_sql(f'VACUUM ANALYZE "{t.schema}"."{t.name}"')
    else:
        with db._engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return {
        "DiaObject_rows": n_obj * args.object_versions,
        "DiaObjects": n_obj,
        "DiaSources": int(sources["diaSourceId"].size),
        "DiaForcedSources": int(forced["diaObjectId"].size),
        "DrpObjects": args.drp,
    }


# ---------------------------------------------------------------------------
# one CCD-visit


def _new_sources(det, objects, visit, mjd, args, rng):
    """This visit's DIASources: some at known objects of the CCD, the rest new."""
    corners = det.footprint(RA0, DEC0)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    n = args.new_sources
    o_ra = np.asarray(objects["ra"], float)
    o_dec = np.asarray(objects["dec"], float)
    on_ccd = np.flatnonzero(
        (o_ra > lo[0]) & (o_ra < hi[0]) & (o_dec > lo[1]) & (o_dec < hi[1])
    )  # fmt: skip
    n_match = min(int(round(args.matched_fraction * n)), on_ccd.size)
    pick = rng.choice(on_ccd, n_match, replace=False)
    err = 0.05 * AS
    ra = np.concatenate([o_ra[pick], rng.uniform(lo[0], hi[0], n - n_match)])
    dec = np.concatenate([o_dec[pick], rng.uniform(lo[1], hi[1], n - n_match)])
    ra = ra + rng.normal(0, err, n) / np.cos(np.radians(dec))
    dec = dec + rng.normal(0, err, n)
    flux = rng.lognormal(7.0, 1.0, n)
    return Table(
        {
            "diaSourceId": dia_source_ids(visit, det.id, n),
            "visit": np.full(n, visit),
            "detector": np.full(n, det.id),
            "midpointMjdTai": np.full(n, mjd),
            "ra": ra,
            "raErr": np.full(n, err),
            "dec": dec,
            "decErr": np.full(n, err),
            **_measured(flux, rng),
            "timeProcessedMjdTai": np.full(n, mjd + 60 / 86400),
            "band": np.full(n, "r"),
            "isDipole": np.zeros(n, bool),
        }
    )


def _forced(objects, det, visit, mjd, rng):
    n = len(objects)
    return Table(
        {
            "diaForcedSourceId": dia_forced_source_ids(visit, det.id, n),
            "diaObjectId": np.asarray(objects["diaObjectId"], np.int64),
            "ra": np.asarray(objects["ra"], float),
            "dec": np.asarray(objects["dec"], float),
            "visit": np.full(n, visit),
            "detector": np.full(n, det.id),
            "midpointMjdTai": np.full(n, mjd),
            "psfFlux": rng.normal(0, 50, n),
            "psfFluxErr": np.full(n, 50.0),
            "scienceFlux": rng.lognormal(7, 1, n),
            "scienceFluxErr": np.full(n, 60.0),
            "band": np.full(n, "r"),
            "timeProcessedMjdTai": np.full(n, mjd + 60 / 86400),
        }
    )


def run_visits(config_path, det, args, rng, prof=None):
    rows = []
    for i in range(args.visits):
        if prof is not None and i == 1:
            prof.enable()
        visit = 1_000 + i
        mjd = MJD0 + i * 0.01
        t0 = time.perf_counter()
        view = ppdb_mod.Ppdb.for_ccd(config_path, det, RA0, DEC0, cache=True)
        history = view.read(mjd)
        t1 = time.perf_counter()
        sources = _new_sources(det, history["objects"], visit, mjd, args, rng)
        forced = _forced(history["objects"], det, visit, mjd, rng)
        t2 = time.perf_counter()
        matched = associate(sources, history["objects"])
        t3 = time.perf_counter()
        out = associate_ccd(sources, history, mjd, forced)
        t4 = time.perf_counter()
        stored = view.store(
            mjd, out["objects"], out["sources"], forced, visit=visit,
            drp_matches=out["drp_matches"],
        )  # fmt: skip
        t5 = time.perf_counter()
        assert stored, "the CCD was not stored"
        assert np.array_equal(matched, out["matched"])
        rows.append(
            {
                "visit": visit,
                "read_s": t1 - t0,
                "match_s": t3 - t2,
                "associate_s": t4 - t3,
                "write_s": t5 - t4,
                "total_s": (t1 - t0) + (t4 - t3) + (t5 - t4),
                "read_objects": len(history["objects"]),
                "read_sources": len(history["sources"]),
                "read_forced": len(history["forced"]),
                "read_drp": len(history["drp"]),
                "new_sources": len(sources),
                "matched": int(np.sum(out["matched"] >= 0)),
                "written_objects": len(out["objects"]),
                "written_forced": len(forced),
                "written_drp_matches": len(out["drp_matches"]),
            }
        )
    return rows


def _summary(rows):
    timed = rows[1:] if len(rows) > 1 else rows
    out = {}
    for key in ("read_s", "match_s", "associate_s", "write_s", "total_s"):
        v = np.array([r[key] for r in timed])
        out[key] = {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}
    last = rows[-1]
    out["per_ccd"] = {k: v for k, v in last.items() if not k.endswith("_s") and k != "visit"}
    out["visits_timed"] = len(timed)
    return out


@contextlib.contextmanager
def _backend(name, tmp, args):
    if name == "sqlite":
        yield ppdb_mod.create_ppdb(f"sqlite:///{tmp}/apdb.db")
        return
    import sqlalchemy

    namespace = f"apdask_bench_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(args.pg_url)
    try:
        yield ppdb_mod.create_ppdb(args.pg_url, f"{tmp}/apdb.yaml", namespace=namespace)
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        engine.dispose()


def bench(name, args):
    det = get_camera("lsstcam")[args.ccd]
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory() as tmp, _backend(name, tmp, args) as path:
        t0 = time.perf_counter()
        db = ppdb_mod.Ppdb.open(path, cache=True)
        counts = populate(db, det, args, rng)
        t_pop = time.perf_counter() - t0
        load0 = os.getloadavg()
        if args.profile:  # cProfile of the timed visits, on stderr
            import cProfile
            import pstats

            prof = cProfile.Profile()
            rows = run_visits(path, det, args, rng, prof)
            pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
        else:
            rows = run_visits(path, det, args, rng)
        load1 = os.getloadavg()
    summary = _summary(rows)
    return {
        "backend": name,
        "populated": counts,
        "populate_s": t_pop,
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in load1],
        **summary,
        "meets_target": summary["total_s"]["median"] <= TARGET_S,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", nargs="+", default=["sqlite", "postgresql"],
                   choices=["sqlite", "postgresql"])  # fmt: skip
    p.add_argument("--pg-url", default=PG_URL, help="PostgreSQL URL; a fresh schema is used")
    p.add_argument("--ccd", default="R22_S11")
    p.add_argument("--objects", type=int, default=100_000)
    p.add_argument("--sources", type=int, default=1_000_000)
    p.add_argument("--area-ccds", type=float, default=8.0,
                   help="side of the populated square in CCD widths")  # fmt: skip
    p.add_argument("--history-visits", type=int, default=80)
    p.add_argument("--object-versions", type=int, default=2)
    p.add_argument("--forced-per-object", type=int, default=3)
    p.add_argument("--drp", type=int, default=100_000)
    p.add_argument("--new-sources", type=int, default=1000)
    p.add_argument("--matched-fraction", type=float, default=0.8)
    p.add_argument("--visits", type=int, default=6, help="CCD-visits; the first is a warm-up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="cProfile the timed visits (stderr)")
    args = p.parse_args(argv)
    if args.sources < args.objects:
        p.error("--sources must be >= --objects (every object has a source)")
    report = {
        "ccd": args.ccd,
        "boresight": [RA0, DEC0],
        "history_months": 12,
        "area_ccds": args.area_ccds,
        "target_total_s": TARGET_S,
        "results": [bench(name, args) for name in args.backend],
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
