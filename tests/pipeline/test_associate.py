"""Tests of apdask.associate: optimal matching and DiaObject aggregates."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from apdask.pipeline.associate import associate, nearest_drp_objects, update_objects

AS = 1.0 / 3600.0


def _src(ra, dec, ids=None, **cols):
    n = len(ra)
    t = Table(
        {
            "diaSourceId": ids if ids is not None else np.arange(100, 100 + n),
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
        }
    )
    for k, v in cols.items():
        t[k] = v
    return t


def _obj(ra, dec, ids):
    return Table(
        {
            "diaObjectId": np.asarray(ids, np.int64),
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
        }
    )


def test_simple_and_unmatched():
    objects = _obj([10.0, 10.0 + 10 * AS], [0.0, 0.0], [1, 2])
    sources = _src([10.0 + 0.2 * AS, 10.0 + 10.1 * AS, 11.0], [0.0, 0.0, 0.0])
    assert associate(sources, objects, radius_arcsec=1.0).tolist() == [1, 2, -1]
    # beyond the radius: no match
    assert associate(_src([10.0 + 1.5 * AS], [0.0]), objects, 1.0).tolist() == [-1]


def test_empty_inputs():
    objects = _obj([10.0], [0.0], [1])
    assert associate(_src([], []), objects, 1.0).dtype == np.int64
    assert len(associate(_src([], []), objects, 1.0)) == 0
    assert associate(_src([10.0], [0.0]), _obj([], [], []), 1.0).tolist() == [-1]


def test_optimal_beats_greedy():
    # object 1 at x=0, object 2 at x=0.6"; source A at 0.4" (nearest: obj 2, 0.2"),
    # source B at 1.1" (only obj 2 within 1"). Greedy gives A->2, B unmatched;
    # the optimal assignment gives A->1 (0.4"), B->2 (0.5").
    objects = _obj([0.0, 0.6 * AS], [0.0, 0.0], [1, 2])
    sources = _src([0.4 * AS, 1.1 * AS], [0.0, 0.0])
    assert associate(sources, objects, radius_arcsec=1.0).tolist() == [1, 2]


def test_ra_wrap():
    objects = _obj([359.99999], [0.0], [5])
    assert associate(_src([0.00001], [0.0]), objects, 1.0).tolist() == [5]


def test_large_catalog_matches_truth():
    # Speed is measured in benchmarks/bench_association.py, not asserted here.
    rng = np.random.default_rng(0)
    n_obj = 100_000
    ora = rng.uniform(0, 1.0, n_obj)
    odec = rng.uniform(0, 1.0, n_obj)
    objects = _obj(ora, odec, np.arange(n_obj))
    pick = rng.choice(n_obj, 1000, replace=False)
    sources = _src(ora[pick] + rng.normal(0, 0.1 * AS, 1000), odec[pick])
    out = associate(sources, objects, 1.0)
    assert np.mean(out == pick) > 0.99


def test_update_objects_aggregates():
    # object 7 has two previous g-band sources; this visit adds a third; one new source
    history = Table(
        {
            "diaObjectId": [7, 7],
            "ra": [10.0, 10.0],
            "dec": [0.0, 0.0],
            "midpointMjdTai": [60000.0, 60001.0],
            "band": ["g", "g"],
            "psfFlux": [100.0, 200.0],
            "psfFluxErr": [10.0, 20.0],
        }
    )
    sources = _src(
        [10.0, 20.0],
        [0.0, 0.0],
        ids=[501, 502],
        midpointMjdTai=[60003.0, 60003.0],
        band=["g", "r"],
        psfFlux=[50.0, 30.0],
        psfFluxErr=[10.0, 3.0],
    )
    objects = _obj([10.0], [0.0], [7])
    matched = np.array([7, -1])
    forced = Table(
        {"diaObjectId": [7, 7], "band": ["g", "g"], "psfFlux": [1.0, 3.0], "psfFluxErr": [1.0, 1.0]}
    )
    objs, srcs = update_objects(matched, sources, objects, history, forced, mjd=60003.0)
    assert srcs["diaObjectId"].tolist() == [7, 502]
    assert objs["diaObjectId"].tolist() == [7, 502]
    o = objs[0]
    f = np.array([100.0, 200.0, 50.0])
    e = np.array([10.0, 20.0, 10.0])
    w = 1 / e**2
    assert o["nDiaSources"] == 3 and o["g_psfFluxNdata"] == 3 and o["r_psfFluxNdata"] == 0
    assert o["g_psfFluxMean"] == pytest.approx(np.sum(w * f) / np.sum(w))
    assert o["g_psfFluxMeanErr"] == pytest.approx(np.sqrt(1 / np.sum(w)))
    assert o["g_psfFluxSigma"] == pytest.approx(np.std(f, ddof=1))
    assert (o["g_psfFluxMin"], o["g_psfFluxMax"]) == (50.0, 200.0)
    assert o["g_psfFluxMaxSlope"] == pytest.approx(100.0)  # +100/d beats -75/d
    assert o["g_psfFluxErrMean"] == pytest.approx(np.mean(e))
    assert o["g_fpFluxMean"] == pytest.approx(2.0)
    assert o["g_fpFluxMeanErr"] == pytest.approx(np.sqrt(0.5))
    assert np.isnan(o["r_psfFluxMean"])
    assert (o["firstDiaSourceMjdTai"], o["lastDiaSourceMjdTai"]) == (60000.0, 60003.0)
    assert o["ra"] == pytest.approx(10.0) and o["dec"] == pytest.approx(0.0, abs=1e-12)
    new = objs[1]
    assert new["nDiaSources"] == 1 and new["r_psfFluxNdata"] == 1
    assert new["r_psfFluxMean"] == pytest.approx(30.0)
    assert new["validityStartMjdTai"] == 60003.0
    assert objs["g_psfFluxNdata"].dtype.kind == "i"


def test_update_objects_empty():
    objs, srcs = update_objects(
        np.zeros(0, np.int64), _src([], []), _obj([], [], []), None, mjd=60000.0
    )
    assert len(objs) == 0 and len(srcs) == 0 and "u_psfFluxNdata" in objs.colnames


def test_nearest_drp_objects():
    ids, dist = nearest_drp_objects(
        [10.0, 50.0],
        [0.0, 0.0],
        [10.0, 10.0 + 2 * AS, 10.0 + 9 * AS],
        [0.0, 0.0, 0.0],
        [11, 12, 13],
        k=3,
        radius_arcsec=5.0,
    )
    assert ids.tolist() == [[11, 12, -1], [-1, -1, -1]]
    assert dist[0, 1] == pytest.approx(2.0, rel=1e-6)
    assert np.isnan(dist[1]).all()


def test_nan_positions_never_match():
    objects = _obj([10.0, np.nan], [0.0, 0.0], [1, 2])
    sources = _src([np.nan, 10.0], [0.0, 0.0])
    assert associate(sources, objects, 1.0).tolist() == [-1, 1]


def test_first_detection_kept_from_existing_object():
    objects = _obj([10.0], [0.0], [7])
    objects["firstDiaSourceMjdTai"] = [59000.0]
    sources = _src(
        [10.0],
        [0.0],
        ids=[9],
        midpointMjdTai=[60000.0],
        band=["g"],
        psfFlux=[1.0],
        psfFluxErr=[1.0],
    )
    objs, _ = update_objects(np.array([7]), sources, objects, None, mjd=60000.0)
    assert objs["firstDiaSourceMjdTai"][0] == 59000.0
    assert objs["lastDiaSourceMjdTai"][0] == 60000.0


def test_matches_dense_optimal_assignment_across_ra_wrap():
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(3)
    n_obj, n_src = 3000, 300
    ora = (rng.uniform(-0.01, 0.01, n_obj)) % 360.0
    odec = rng.uniform(-0.01, 0.01, n_obj)
    objects = _obj(ora, odec, np.arange(n_obj) + 10)
    pick = rng.choice(n_obj, n_src, replace=False)
    sra = (ora[pick] + rng.normal(0, 0.4 * AS, n_src)) % 360.0
    sdec = odec[pick] + rng.normal(0, 0.4 * AS, n_src)
    got = associate(_src(sra, sdec), objects, 1.0)
    # brute force: dense chi2 matrix (equal default errors -> separation squared)
    dra = ((sra[:, None] - ora[None, :] + 180) % 360 - 180) * np.cos(np.radians(sdec[:, None]))
    sep2 = (dra**2 + (sdec[:, None] - odec[None, :]) ** 2) * 3600**2
    cost = np.where(sep2 <= 1.0, sep2, 1e12)
    r, c = linear_sum_assignment(cost)
    want = np.full(n_src, -1)
    ok = cost[r, c] < 1e12
    want[r[ok]] = c[ok] + 10
    assert np.mean(got == want) > 0.99, np.mean(got == want)  # differences: radius edge only
    assert np.sum(got >= 0) > 0.9 * n_src
