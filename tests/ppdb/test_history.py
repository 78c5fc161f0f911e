"""apdask.ppdb.history against a PPDB filled by a real run of the test camera.

Both visits of the simulated repository go through the visit graph, into an SQLite PPDB
and into a PostgreSQL one; the history of a persistent transient must then be its light
curve, one DIASource per visit, with the very fluxes its alerts carried.
"""

from __future__ import annotations

import contextlib
import shutil

import numpy as np
import pytest

from apdask.alerts.sinks import read_alerts
from apdask.exceptions import DiaObjectNotFoundError, NoDetectionsWarning
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, run_visit
from apdask.ppdb import Ppdb, object_history, visit_tables
from tests import _ppdb_synth as synth


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.service)]
)
def processed(request, sim_repo, tmp_path_factory):
    """Both visits run into a PPDB of the repository (SQLite) or of PostgreSQL."""
    root = tmp_path_factory.mktemp("history") / "repo"
    shutil.copytree(sim_repo["root"], root)
    repo = str(root)
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            config = ensure_ppdb(repo)
        else:
            config = stack.enter_context(synth.pg_ppdb(root.parent / "apdb.yaml"))
        for v in sim_repo["visits"]:
            run_visit(NextVisit.from_dict(v), repo=repo, ppdb=config, timeout=10)
        visits = [v["visit"] for v in sim_repo["visits"]]
        alerts = {v: read_alerts(f"{repo}/alerts/visit_{v}") for v in visits}
        yield {"ppdb": Ppdb.open(config), "visits": visits, "alerts": alerts}


def _persistent(processed):
    """diaObjectId -> {visit: alert diaSource} of objects alerted in every visit."""
    by_obj: dict[int, dict[int, dict]] = {}
    for visit, alerts in processed["alerts"].items():
        for a in alerts:
            by_obj.setdefault(a["diaSource"]["diaObjectId"], {})[visit] = a["diaSource"]
    return {k: v for k, v in by_obj.items() if len(v) == len(processed["visits"])}


def test_light_curve_of_a_persistent_transient_matches_its_alerts(processed):
    ppdb, visits = processed["ppdb"], processed["visits"]
    persistent = _persistent(processed)
    assert len(persistent) >= 5, "the simulation has persistent transients in both visits"
    for oid, alerted in persistent.items():
        hist = object_history(ppdb, oid)
        assert set(hist) == {"objects", "sources", "forced"}
        src = hist["sources"]
        assert list(src["visit"]) == visits  # one row per visit, in time order
        assert np.all(np.diff(src["midpointMjdTai"]) > 0)
        assert set(src["diaObjectId"]) == {oid}
        for row in src:
            alert = alerted[int(row["visit"])]
            assert row["diaSourceId"] == alert["diaSourceId"]
            assert row["band"] == alert["band"]
            for col in ("psfFlux", "psfFluxErr", "midpointMjdTai", "ra", "dec", "snr"):
                assert row[col] == pytest.approx(alert[col], rel=1e-6), col
        # one DiaObject version per visit, each closed when the next one starts
        obj = hist["objects"]
        assert list(obj["nDiaSources"]) == list(range(1, len(visits) + 1))
        np.testing.assert_allclose(obj["validityStartMjdTai"], src["midpointMjdTai"])
        np.testing.assert_allclose(obj["validityEndMjdTai"][:-1], obj["validityStartMjdTai"][1:])
        assert np.isnan(obj["validityEndMjdTai"][-1])
        # forced photometry at every visit after the first detection
        assert list(hist["forced"]["visit"]) == visits[1:]
        assert set(hist["forced"]["diaObjectId"]) == {oid}


def test_tables_carry_the_schema_columns_units_and_descriptions(processed):
    ppdb = processed["ppdb"]
    oid = next(iter(_persistent(processed)))
    hist = object_history(ppdb, np.int64(oid))  # numpy integers are ids too
    for key, table_name in (("objects", "DiaObject"), ("sources", "DiaSource"),
                            ("forced", "DiaForcedSource")):  # fmt: skip
        assert hist[key].colnames == ppdb.columns(table_name)
        assert hist[key].meta["diaObjectId"] == oid
    src = hist["sources"]
    assert str(src["psfFlux"].unit) == "nJy" and str(src["ra"].unit) == "deg"
    assert "Point Source" in src["psfFlux"].description
    assert str(hist["forced"]["psfFlux"].unit) == "nJy"


def test_visit_tables_hold_what_the_visit_alerted(processed):
    ppdb = processed["ppdb"]
    for visit, alerts in processed["alerts"].items():
        tables = visit_tables(ppdb, visit)
        src = tables["sources"]
        assert sorted(src["diaSourceId"]) == sorted(a["diaSourceId"] for a in alerts)
        assert set(src["visit"]) == {visit}
        by_id = {a["diaSourceId"]: a["diaSource"] for a in alerts}
        flux = np.array([by_id[i]["psfFlux"] for i in src["diaSourceId"]])
        np.testing.assert_allclose(src["psfFlux"], flux, rtol=1e-6)
        # the DiaObject versions written by the visit: one per object it detected
        obj = tables["objects"]
        assert sorted(obj["diaObjectId"]) == sorted(set(src["diaObjectId"]))
        np.testing.assert_allclose(obj["validityStartMjdTai"], src["midpointMjdTai"][0])
        assert set(tables["forced"]["visit"]) <= {visit}
    first, second = processed["visits"][:2]
    assert len(visit_tables(ppdb, first)["forced"]) == 0  # nothing known before it
    assert len(visit_tables(ppdb, second)["forced"]) > 0


def test_visit_tables_of_one_detector(processed):
    ppdb, visit = processed["ppdb"], processed["visits"][-1]
    whole = visit_tables(ppdb, visit)
    dets = sorted(set(whole["sources"]["detector"]))
    assert len(dets) == 2
    parts = [visit_tables(ppdb, visit, detector=d) for d in dets]
    for d, part in zip(dets, parts, strict=True):
        assert set(part["sources"]["detector"]) == {d}
        assert set(part["forced"]["detector"]) <= {d}
        assert part["sources"].meta == {"visit": visit, "detector": d}
    for key in ("sources", "forced", "objects"):
        assert sum(len(p[key]) for p in parts) == len(whole[key]), key


def test_unknown_object_and_bad_ids_say_what_to_give(processed):
    ppdb = processed["ppdb"]
    with pytest.raises(DiaObjectNotFoundError, match="no DiaObject 12345 in the PPDB"):
        object_history(ppdb, 12345)
    assert DiaObjectNotFoundError.exit_code == 66
    with pytest.raises(TypeError, match="dia_object_id must be an integer"):
        object_history(ppdb, "268435456000")
    with pytest.raises(TypeError, match=r"detector must be an integer.*\.id"):
        visit_tables(ppdb, processed["visits"][0], detector="T00")
    with pytest.warns(NoDetectionsWarning, match="no DiaSource or DiaForcedSource of visit 99"):
        empty = visit_tables(ppdb, 99)
    assert [len(t) for t in empty.values()] == [0, 0, 0]
    assert empty["sources"].colnames == ppdb.columns("DiaSource")
