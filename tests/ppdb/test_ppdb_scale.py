"""The survey-scale fast paths give exactly what the straightforward paths give.

* DPDD aggregates, vectorised over objects, against a per-object reference loop
  (the implementation they replaced);
* the PostgreSQL ``COPY`` store against dax_apdb's own inserts: identical table
  contents, row for row and column for column.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from apdask.core.geometry import unit_vectors
from apdask.pipeline.associate import BANDS, update_objects

AS = 1.0 / 3600.0


# ---------------------------------------------------------------------------
# reference aggregates: one object at a time


def _ref_weighted_mean(values, errors):
    good = np.isfinite(values)
    v = values[good]
    if v.size == 0:
        return np.nan, np.nan
    e = errors[good]
    if np.all(np.isfinite(e) & (e > 0)):
        w = 1.0 / e**2
        return float(np.sum(w * v) / np.sum(w)), float(np.sqrt(1.0 / np.sum(w)))
    mean = float(np.mean(v))
    err = float(np.std(v, ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan
    return mean, err


def _ref_flux(mjd, flux, err):
    good = np.isfinite(flux)
    mjd, flux, err = mjd[good], flux[good], err[good]
    n = int(flux.size)
    out = {"psfFluxNdata": n}
    if n == 0:
        for key in ("Mean", "MeanErr", "Sigma", "Min", "Max", "MaxSlope", "ErrMean"):
            out[f"psfFlux{key}"] = np.nan
        return out
    out["psfFluxMean"], out["psfFluxMeanErr"] = _ref_weighted_mean(flux, err)
    out["psfFluxSigma"] = float(np.std(flux, ddof=1)) if n > 1 else np.nan
    out["psfFluxMin"], out["psfFluxMax"] = float(np.min(flux)), float(np.max(flux))
    finite_err = err[np.isfinite(err)]
    out["psfFluxErrMean"] = float(np.mean(finite_err)) if finite_err.size else np.nan
    slope = np.nan
    if n > 1:
        o = np.argsort(mjd, kind="stable")
        dt, df = np.diff(mjd[o]), np.diff(flux[o])
        ok = dt > 0
        if ok.any():
            s = df[ok] / dt[ok]
            slope = float(s[np.argmax(np.abs(s))])
    out["psfFluxMaxSlope"] = slope
    return out


def _ref_position(ra, dec, ra_err, dec_err):
    ok = np.isfinite(ra_err) & np.isfinite(dec_err) & (ra_err > 0) & (dec_err > 0)
    w = 2.0 / (ra_err**2 + dec_err**2) if ok.all() else np.ones(ra.size)
    v = (w[:, None] * unit_vectors(ra, dec)).sum(axis=0)
    mra = float(np.degrees(np.arctan2(v[1], v[0])) % 360.0)
    mdec = float(np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1]))))
    if not ok.all():
        return mra, mdec, np.nan, np.nan
    return mra, mdec, np.sqrt(1 / np.sum(1 / ra_err**2)), np.sqrt(1 / np.sum(1 / dec_err**2))


def _reference(object_ids, allsrc, forced, previous_first):
    rows = {}
    for oid in dict.fromkeys(object_ids.tolist()):
        s = allsrc[np.asarray(allsrc["diaObjectId"]) == oid]
        f = forced[np.asarray(forced["diaObjectId"]) == oid]
        mjd = np.asarray(s["midpointMjdTai"], float)
        ra, dec, ra_e, dec_e = _ref_position(
            np.asarray(s["ra"], float), np.asarray(s["dec"], float),
            np.asarray(s["raErr"], float), np.asarray(s["decErr"], float),
        )  # fmt: skip
        row = {"ra": ra, "dec": dec, "raErr": ra_e, "decErr": dec_e, "nDiaSources": len(s)}
        times = mjd[np.isfinite(mjd)]
        row["firstDiaSourceMjdTai"] = float(np.fmin(times.min(), previous_first.get(oid, np.nan)))
        row["lastDiaSourceMjdTai"] = float(times.max())
        for b in BANDS:
            sel = np.asarray(s["band"]) == b
            flux = np.asarray(s["psfFlux"], float)[sel]
            for key, val in _ref_flux(
                mjd[sel], flux, np.asarray(s["psfFluxErr"], float)[sel]
            ).items():
                row[f"{b}_{key}"] = val
            fsel = np.asarray(f["band"]) == b
            mean, err = _ref_weighted_mean(
                np.asarray(f["psfFlux"], float)[fsel], np.asarray(f["psfFluxErr"], float)[fsel]
            )
            row[f"{b}_fpFluxMean"], row[f"{b}_fpFluxMeanErr"] = mean, err
        rows[oid] = row
    return rows


def _messy_catalogs(seed):
    """Sources in several bands with NaN fluxes, NaN/zero errors and tied times."""
    rng = np.random.default_rng(seed)
    n_obj, n_hist, n_new = 60, 700, 80
    ids = np.arange(1, n_obj + 1) * 10
    ra0, dec0 = rng.uniform(359.9, 360.1, n_obj) % 360.0, rng.uniform(-5, 5, n_obj)

    def sources(n, owner, mjd):
        flux = rng.normal(100, 80, n)
        flux[rng.random(n) < 0.05] = np.nan
        err = rng.uniform(5, 20, n)
        err[rng.random(n) < 0.02] = np.nan
        err[rng.random(n) < 0.02] = 0.0
        ra_err = np.full(n, 0.1 * AS)
        ra_err[rng.random(n) < 0.01] = np.nan
        return Table(
            {
                "diaObjectId": ids[owner],
                "ra": (ra0[owner] + rng.normal(0, 0.1 * AS, n)) % 360.0,
                "dec": dec0[owner] + rng.normal(0, 0.1 * AS, n),
                "raErr": ra_err,
                "decErr": np.full(n, 0.12 * AS),
                "midpointMjdTai": mjd,
                "band": np.asarray(list(BANDS) + ["x"])[rng.integers(0, len(BANDS) + 1, n)],
                "psfFlux": flux,
                "psfFluxErr": err,
            }
        )

    hist = sources(n_hist, rng.integers(0, n_obj, n_hist), 60000 + rng.integers(0, 40, n_hist))
    owner = rng.integers(0, n_obj + 20, n_new)  # some sources create new objects
    matched = np.where(owner < n_obj, ids[np.minimum(owner, n_obj - 1)], -1)
    new = sources(n_new, np.minimum(owner, n_obj - 1), np.full(n_new, 60050.0))
    new.remove_column("diaObjectId")
    new["diaSourceId"] = np.arange(n_new) + 10_000
    forced = Table(
        {
            "diaObjectId": ids[rng.integers(0, n_obj, 500)],
            "band": np.asarray(BANDS)[rng.integers(0, len(BANDS), 500)],
            "psfFlux": np.where(rng.random(500) < 0.05, np.nan, rng.normal(0, 30, 500)),
            "psfFluxErr": np.where(rng.random(500) < 0.03, np.nan, rng.uniform(1, 9, 500)),
        }
    )
    objects = Table({"diaObjectId": ids, "firstDiaSourceMjdTai": np.full(n_obj, 59000.0)})
    objects["firstDiaSourceMjdTai"][::2] = np.nan
    return matched, new, objects, hist, forced


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_aggregates_match_reference(seed):
    matched, new, objects, hist, forced = _messy_catalogs(seed)
    out, src = update_objects(matched, new, objects, hist, forced, mjd=60050.0)
    allsrc = Table(
        {k: np.concatenate([np.asarray(hist[k]), np.asarray(src[k])]) for k in hist.colnames}
    )
    previous = dict(
        zip(objects["diaObjectId"].tolist(), objects["firstDiaSourceMjdTai"].tolist(), strict=True)
    )
    want = _reference(np.asarray(src["diaObjectId"]), allsrc, forced, previous)
    assert out["diaObjectId"].tolist() == list(want)
    assert np.all(out["validityStartMjdTai"] == 60050.0)
    # the catalogs do exercise the awkward branches
    assert np.isnan(out["raErr"]).any() and np.isfinite(out["raErr"]).any()
    assert (out["g_psfFluxNdata"] == 0).any() and (out["g_psfFluxNdata"] > 2).any()
    for name in want[next(iter(want))]:
        got = np.asarray(out[name])
        ref = np.array([row[name] for row in want.values()])
        if name.endswith("Ndata") or name == "nDiaSources":
            assert got.dtype.kind == "i" and got.tolist() == ref.tolist(), name
        else:
            np.testing.assert_allclose(got, ref, rtol=1e-11, atol=0, equal_nan=True, err_msg=name)


# ---------------------------------------------------------------------------
# bulk writes and reads against dax_apdb's own


RA, DEC, MJD0 = 30.0, -20.0, 61000.0


def _awkward(sources, visit):
    """Exercise every value class the bulk paths translate: NaN, ±inf, huge and
    tiny floats, float32 rounding, nulls in integer, boolean and text columns,
    empty and quoted text."""
    n = len(sources)
    rng = np.random.default_rng(visit)
    out = Table(sources, copy=True)
    flux = rng.normal(1000, 300, n) * 10.0 ** rng.integers(-30, 30, n)
    flux[::7] = np.nan
    flux[1] = np.inf
    flux[2] = -np.inf
    out["psfFlux"] = flux
    out["apFlux"] = np.full(n, 0.1)  # float32 column: 0.1 is not exact
    ss = np.ma.MaskedArray(np.arange(n, dtype=np.int64) + (1 << 40), mask=np.arange(n) % 3 == 0)
    out["ssObjectId"] = ss
    out["trailAlgorithm"] = np.ma.MaskedArray(
        np.arange(n, dtype=np.int32), mask=np.arange(n) % 2 == 0
    )
    flags = np.ma.MaskedArray(np.arange(n) % 2 == 1, mask=np.arange(n) % 5 == 0)
    out["centroid_flag"] = flags
    out["isNegative"] = np.zeros(n, bool)
    version = np.array(["", 'v"1,2"', "x y", "r2"] * n, dtype=object)[:n]
    out["reliabilityVersion"] = np.ma.MaskedArray(version.astype(str), mask=np.arange(n) % 4 == 3)
    out["snr"] = np.full(n, 5e-324)  # subnormal double
    return out


def _run_visits(path, bulk):
    import dask

    from apdask.core.camera import get_camera
    from apdask.pipeline.associate import associate_ccd
    from apdask.ppdb import database as ppdb
    from tests import _ppdb_synth as synth

    det = get_camera("lsstcam")["R22_S11"]
    with dask.config.set({"apdask.ppdb.bulk": bulk}):
        db = ppdb.Ppdb.open(path)
        view = ppdb.CcdPpdb(db, det, ppdb.region_for(det, RA, DEC))
        pos = synth.field(det, RA, DEC, n=12)
        reads = []
        for visit, replace in ((1, False), (2, False), (2, True), (3, False)):
            mjd = MJD0 + visit
            history = view.read(mjd)
            reads.append(history)
            sources = _awkward(synth.sources_for(det, visit, mjd, pos), visit)
            forced = synth.forced_for(history["objects"], det, visit, mjd)
            if len(forced):
                forced["psfFlux"][0] = np.nan
                forced["band"][-1] = "g"
            out = associate_ccd(sources, history, mjd, forced)
            stored = view.store(
                mjd, out["objects"], out["sources"], forced, visit=visit, replace=replace,
                drp_matches=out["drp_matches"],
            )  # fmt: skip
            assert stored
        reads.append(view.read(MJD0 + 4))
        return synth.dump(db), reads


def _assert_same_tables(a, b):
    assert a.colnames == b.colnames
    for name in a.colnames:
        ca, cb = a[name], b[name]
        assert ca.dtype == cb.dtype, name
        assert ca.unit == cb.unit and ca.description == cb.description, name
        ma, mb = np.ma.getmaskarray(ca), np.ma.getmaskarray(cb)
        assert np.array_equal(ma, mb), name
        va, vb = np.asarray(np.ma.getdata(ca))[~ma], np.asarray(np.ma.getdata(cb))[~mb]
        if va.dtype.kind == "f":
            assert np.array_equal(va, vb, equal_nan=True), name
        else:
            assert np.array_equal(va, vb), name


def _compare_paths(make_path, binary=False):
    import pandas as pd

    from apdask.ppdb.fast import copy_stats

    slow, slow_reads = _run_visits(make_path("slow"), bulk=False)
    before = dict(copy_stats)
    fast, fast_reads = _run_visits(make_path("fast"), bulk=True)
    # the bulk path really ran: every stored row went through COPY/executemany
    assert copy_stats["copy_rows"] > before["copy_rows"]
    assert copy_stats["fallback_rows"] == before["fallback_rows"]
    for name in ("DiaObject", "DiaSource", "DiaForcedSource"):  # each table in bulk
        assert copy_stats[name] - before.get(name, 0) >= len(fast[name]) > 0, name
    if binary:  # PostgreSQL: the binary COPY took every table
        assert copy_stats["binary_rows"] - before["binary_rows"] == (
            copy_stats["copy_rows"] - before["copy_rows"]
        )
    assert len(fast["DiaSource"]) == 3 * 15 and len(fast["DiaForcedSource"]) > 0
    src = fast["DiaSource"]
    assert src["ssObjectId"].isna().any() and src["ssObjectId"].notna().any()
    assert (src["reliabilityVersion"] == "").any() and src["reliabilityVersion"].isna().any()
    assert np.isinf(src["psfFlux"].astype(float)).any()
    for name in slow:
        pd.testing.assert_frame_equal(fast[name], slow[name], check_exact=True)
    for ra, rb in zip(slow_reads, fast_reads, strict=True):
        for key in ("objects", "sources", "forced", "drp"):
            _assert_same_tables(ra[key], rb[key])
    assert len(fast_reads[-1]["sources"]) == 3 * 15
    # and the bulk read equals dax_apdb's read on the same database
    import dask

    with dask.config.set({"apdask.ppdb.bulk": False}):
        again = _run_reads_only(make_path("fast"))
    _assert_same_tables(again["sources"], fast_reads[-1]["sources"])
    _assert_same_tables(again["forced"], fast_reads[-1]["forced"])


def _run_reads_only(path):
    from apdask.core.camera import get_camera
    from apdask.ppdb import database as ppdb

    det = get_camera("lsstcam")["R22_S11"]
    view = ppdb.CcdPpdb(ppdb.Ppdb.open(path), det, ppdb.region_for(det, RA, DEC))
    return view.read(MJD0 + 4)


def test_bulk_paths_identical_sqlite(tmp_path):
    from apdask.ppdb import database as ppdb

    paths = {}

    def make(kind):
        if kind not in paths:
            paths[kind] = ppdb.create_ppdb(f"sqlite:///{tmp_path}/{kind}/apdb.db")
        return paths[kind]

    _compare_paths(make)


@pytest.mark.service
def test_bulk_paths_identical_postgresql(tmp_path):
    import contextlib

    from tests._ppdb_synth import pg_ppdb

    with contextlib.ExitStack() as stack:
        paths = {}

        def make(kind):
            if kind not in paths:
                cfg = tmp_path / kind / "apdb.yaml"
                paths[kind] = stack.enter_context(pg_ppdb(cfg, "apdask_bulk"))
            return paths[kind]

        _compare_paths(make, binary=True)
