"""End to end over the visit graph on the simulated test camera.

Checks real outcomes against the simulator's truth: alert positions and fluxes of
injected transients, schema validity of every packet, and idempotent re-runs.
"""

from io import BytesIO
from pathlib import Path

import fastavro
import numpy as np
import pytest
from astropy.nddata import CCDData
from lsst.alert.packet import Schema

from apdask.alerts.nulls import unexpected_nulls
from apdask.alerts.sinks import read_alerts
from apdask.exceptions import ProductNotFoundError
from apdask.io.butler import Butler
from apdask.pipeline.measure.reliability import load_reliability_model
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, run_visit
from apdask.ppdb import Ppdb, region_for
from apdask.tools.evaluate import load_truth, match_truth


@pytest.fixture(scope="module")
def processed(sim_repo, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("e2e") / "repo"
    shutil.copytree(sim_repo["root"], root)
    repo = str(root)
    reports = []
    for v in sim_repo["visits"]:
        reports.append(run_visit(NextVisit.from_dict(v), repo=repo, timeout=10))
    return {"repo": repo, "reports": reports, "visits": sim_repo["visits"]}


def _alerts(repo, visit):
    return read_alerts(f"{repo}/alerts/visit_{visit}")


def _blended(truth, matched, radius_arcsec=3.0):
    """True where a static source brighter than the transient lies within the radius."""
    static = truth[np.isin(np.asarray(truth["kind"]).astype(str), ("star", "galaxy", "variable"))]
    out = np.zeros(len(matched), bool)
    for k, row in enumerate(matched):
        d = np.hypot(
            (static["ra"] - row["ra"]) * np.cos(np.deg2rad(row["dec"])), static["dec"] - row["dec"]
        )
        near = static[d * 3600 < radius_arcsec]
        out[k] = bool(np.any(np.asarray(near["template_flux"]) > row["flux"]))
    return out


def _bright_flux_errors(processed, blended):
    """Relative flux errors of recovered transients at SNR > 20 (isolated or blended)."""
    repo, rel = processed["repo"], []
    for v in processed["visits"]:
        truth = load_truth(repo, v["visit"])
        m = match_truth(truth, [a["diaSource"] for a in _alerts(repo, v["visit"])])
        bright = (m["flux_meas"] / m["flux_err"] > 20) & (_blended(truth, m["truth"]) == blended)
        rel.extend(np.abs(m["flux_meas"][bright] / m["flux_true"][bright] - 1))
    return np.array(rel)


def test_transients_recovered_at_right_positions(processed):
    repo = processed["repo"]
    for v in processed["visits"]:
        alerts = _alerts(repo, v["visit"])
        assert alerts, f"no alerts for visit {v['visit']}"
        m = match_truth(load_truth(repo, v["visit"]), [a["diaSource"] for a in alerts])
        assert m["n_truth"] >= 10
        assert m["fraction"] >= 0.8, m
        assert np.max(m["sep_arcsec"]) < 0.3


def test_isolated_transient_fluxes_within_10_percent_at_snr_20(processed):
    rel = _bright_flux_errors(processed, blended=False)
    assert len(rel) >= 10
    assert np.all(rel < 0.10), rel


@pytest.mark.xfail(
    strict=True,
    reason="known limit (issue 6): the kernel's photometric scale is fitted on few stamps "
    "on a 512x512 CCD and a 2-3% error leaves a bright neighbour's residual in the fit",
)
def test_blended_transient_fluxes_within_10_percent_at_snr_20(processed):
    rel = _bright_flux_errors(processed, blended=True)
    assert len(rel) >= 1
    assert np.all(rel < 0.10), rel


def test_every_alert_decodes_with_the_official_schema(processed):
    schema = Schema.from_file()
    parsed = fastavro.parse_schema(schema.definition)
    repo = processed["repo"]
    n = 0
    for v in processed["visits"]:
        for path in sorted((Path(repo) / "alerts" / f"visit_{v['visit']}").glob("*.avro")):
            with open(path, "rb") as fh:
                for rec in fastavro.reader(fh, reader_schema=parsed):
                    n += 1
                    assert rec["diaObject"] is not None
                    assert rec["diaSource"]["diaObjectId"] == rec["diaObject"]["diaObjectId"]
                    for key in ("cutoutDifference", "cutoutScience", "cutoutTemplate"):
                        stamp = CCDData.read(BytesIO(rec[key]), format="fits")
                        assert str(stamp.unit) == "nJy"
                        assert 30 <= stamp.shape[0] <= 102
                    # Round trip through lsst.alert.packet's own serializer.
                    assert (
                        schema.deserialize(schema.serialize(rec))["diaSourceId"]
                        == rec["diaSourceId"]
                    )
    assert n == sum(r["n_alerts"] for r in processed["reports"])


def test_reliability_reaches_the_alerts_and_the_ppdb(processed):
    """Issue 16: every alert and every stored DiaSource carries the shipped model's
    ``reliability`` and ``reliabilityVersion``; the simulator's transients score high."""
    version = load_reliability_model().version
    repo = processed["repo"]
    db = Ppdb.open(ensure_ppdb(repo))
    transients = []
    for v in processed["visits"]:
        sources = [a["diaSource"] for a in _alerts(repo, v["visit"])]
        assert all(s["reliabilityVersion"] == version for s in sources)
        rel = np.array([s["reliability"] for s in sources], float)
        assert np.all((rel >= 0) & (rel <= 1))
        m = match_truth(load_truth(repo, v["visit"]), sources)
        ra, dec = np.array([s["ra"] for s in sources]), np.array([s["dec"] for s in sources])
        for t in m["truth"]:
            d = np.hypot((ra - t["ra"]) * np.cos(np.deg2rad(dec)), dec - t["dec"])
            transients.append(rel[int(np.argmin(d))])
        nv = NextVisit.from_dict(v)
        regions = [region_for(nv.camera[d], nv.ra, nv.dec, nv.rotationAngle)
                   for d in nv.detectors]  # fmt: skip
        after = max(s["midpointMjdTai"] for s in sources) + 1.0  # the window ends here
        stored = [db.get_dia_sources(r, None, after) for r in regions]
        rows = {int(i): (r, str(s)) for t in stored
                for i, r, s in zip(t["diaSourceId"], t["reliability"], t["reliabilityVersion"],
                                   strict=True)}  # fmt: skip
        for s in sources:  # the PPDB row holds the alert's value (float32 both)
            assert rows[s["diaSourceId"]] == (pytest.approx(s["reliability"]), version)
    transients = np.array(transients)
    assert len(transients) >= 20
    assert np.mean(transients > 0.5) >= 0.9, np.sort(transients)


def test_second_visit_associates_with_first(processed):
    repo = processed["repo"]
    second = _alerts(repo, processed["visits"][1]["visit"])
    with_history = [a for a in second if a["prvDiaSources"]]
    assert with_history, "persistent transients should carry their earlier DIASources"
    first_ids = {a["diaSourceId"] for a in _alerts(repo, processed["visits"][0]["visit"])}
    assert any(p["diaSourceId"] in first_ids for a in with_history for p in a["prvDiaSources"])


def test_no_field_is_null_by_accident(processed):
    """Issue 16: every null field of every alert (diaSource, diaObject, prvDiaSources,
    prvDiaForcedSources and the packet) is allowed, with its reason, by the one list
    ``apdask.alerts.nulls.NULL_FIELDS`` (the table in docs/alerts.md)."""
    repo, n, n_prv, bad = processed["repo"], 0, 0, {}
    for v in processed["visits"]:
        for a in _alerts(repo, v["visit"]):
            n += 1
            n_prv += len(a["prvDiaSources"] or ())
            for name in unexpected_nulls(a):
                bad.setdefault(name.split("].")[-1], a["diaSourceId"])
    assert n >= 20 and n_prv >= 10  # the second visit's alerts carry history
    assert not bad, f"null and not in apdask.alerts.nulls.NULL_FIELDS: {bad}"


def test_difference_images_come_back_as_ccddata_with_the_alerts_on_them(processed):
    """Issue 15: the difference of every CCD is kept (default products.kinds) and read
    back with its WCS, variance and PSF; each bright alert sits on a positive peak of it
    at the pixel its WCS gives."""
    repo = processed["repo"]
    butler = Butler(repo)
    n_checked = 0
    for rep, v in zip(processed["reports"], processed["visits"], strict=True):
        by_det = {c["detector"]: c for c in rep["ccds"]}
        for det in v["detectors"]:
            assert set(by_det[det]["products"]) == {"difference"}
            ccd = butler.get("difference", visit=v["visit"], detector=det)
            assert ccd.wcs is not None and ccd.wcs.has_celestial
            assert str(ccd.unit) == "nJy"
            assert ccd.psf is not None and ccd.psf.sum() == pytest.approx(1.0, abs=1e-3)
            sigma = np.sqrt(ccd.uncertainty.array)
            for a in _alerts(repo, v["visit"]):
                src = a["diaSource"]
                if src["detector"] != by_det[det]["detector_id"] or src["psfFlux"] < 0:
                    continue
                if src["psfFlux"] / src["psfFluxErr"] < 20:
                    continue
                x, y = ccd.wcs.world_to_pixel_values(src["ra"], src["dec"])
                assert abs(x - src["x"]) < 0.3 and abs(y - src["y"]) < 0.3
                iy, ix = int(round(float(y))), int(round(float(x)))
                box = (slice(iy - 2, iy + 3), slice(ix - 2, ix + 3))
                assert np.max(ccd.data[box] / sigma[box]) > 5.0
                n_checked += 1
    assert n_checked >= 10
    with pytest.raises(ProductNotFoundError, match="this visit has difference_"):
        butler.get("science", visit=processed["visits"][0]["visit"], detector=det)


def _count_rows(repo):
    return Ppdb.open(ensure_ppdb(repo)).apdb.tableRowCount()


def test_rerun_is_idempotent(processed):
    repo = processed["repo"]
    before = _count_rows(repo)
    assert before["DiaSource"] == sum(r["n_alerts"] for r in processed["reports"])
    for v in processed["visits"]:
        rep = run_visit(NextVisit.from_dict(v), repo=repo, timeout=10)
        assert rep["ccds"] == [] and len(rep["skipped"]) == len(v["detectors"])
    assert _count_rows(repo) == before


def test_associate_leaves_the_detect_tasks_table_as_it_was(sim_repo, tmp_path):
    """A task's result is its own: associate adds its columns (ids, processing time) to
    a copy of the detect task's table, not to the table that task returned."""
    import shutil

    from dask.callbacks import Callback
    from dask.utils import key_split

    repo = tmp_path / "repo"
    shutil.copytree(sim_repo["root"], repo)
    kept = {}

    class Keep(Callback):
        def _posttask(self, key, result, dsk, state, id):
            if key_split(key) == "detect":
                kept[key] = (result, list(result.sources.colnames))

    with Keep():
        rep = run_visit(NextVisit.from_dict(sim_repo["visits"][0]), repo=str(repo), timeout=10)
    assert kept and sum(r["n_alerts"] for r in rep["ccds"]) > 0
    for result, names in kept.values():
        assert "diaSourceId" not in names
        assert list(result.sources.colnames) == names
