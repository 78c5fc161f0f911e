"""A CCD whose subtraction QA warned is flagged on every DiaSource: PPDB rows and alerts.

apdask marks such DiaSources with ``pixelFlags_suspect`` and ``pixelFlags_suspectCenter``
(``apdask.pipeline.quality.QA_WARN_FLAGS``; docs/alerts.md).  A passing CCD keeps them
as measured (false: apdask never sets the SUSPECT mask plane).
"""

from __future__ import annotations

import json
import os

import dask
import numpy as np
import sqlalchemy

from apdask import read_alerts
from apdask.cli.main import main
from apdask.pipeline.quality import QA_WARN_FLAGS, flag_sources
from apdask.ppdb import Ppdb
from tests.cli.test_cli import _ccd_args


def _rows(repo, detector):
    db = Ppdb.open(os.path.join(repo, "ppdb", "apdb.yaml"))
    cols = ", ".join(QA_WARN_FLAGS)
    query = f"SELECT diaSourceId, {cols} FROM DiaSource WHERE detector = {int(detector)}"
    with db._engine.connect() as conn:
        return conn.execute(sqlalchemy.text(query)).fetchall()


def _alert_flags(repo, detector):
    path = os.path.join(repo, "alerts", "visit_1000", f"1000_{detector}.avro")
    return [[a["diaSource"][c] for c in QA_WARN_FLAGS] for a in read_alerts(path)]


def _no_warning_levels():
    """Every ``*_warn`` level at its ``*_fail`` level: a CCD that does not fail passes."""
    qa = dask.config.get("apdask.subtract.qa")
    return {
        f"apdask.subtract.qa.{k}": qa[k[: -len("_warn")] + "_fail"]
        for k in qa
        if k.endswith("_warn")
    }


def test_warned_ccd_flags_every_diasource_in_the_ppdb_and_the_alerts(repo, capsys):
    with dask.config.set(_no_warning_levels()):
        assert main(_ccd_args(repo, "T00")) == 0
    passed = json.loads(capsys.readouterr().out)["ccds"][0]
    assert passed["qa"]["status"] == "pass"
    # the same pipeline, with a noise-ratio warning level no subtraction meets
    with dask.config.set({"apdask.subtract.qa.noise_ratio_warn": 1e-6}):
        assert main(_ccd_args(repo, "T01")) == 0
    warned = json.loads(capsys.readouterr().out)["ccds"][0]
    assert warned["qa"]["status"] == "warn" and "noise_ratio" in warned["qa"]["reasons"]

    ok_rows, warn_rows = _rows(repo, passed["detector_id"]), _rows(repo, warned["detector_id"])
    assert len(ok_rows) == passed["n_sources"] > 0
    assert len(warn_rows) == warned["n_sources"] > 0
    assert not any(any(r[1:]) for r in ok_rows)  # a passing CCD: nothing flagged
    assert all(all(r[1:]) for r in warn_rows)  # a warned CCD: every row, both columns
    ok_alerts = _alert_flags(repo, passed["detector_id"])
    warn_alerts = _alert_flags(repo, warned["detector_id"])
    assert len(ok_alerts) == passed["n_alerts"] and len(warn_alerts) == warned["n_alerts"] > 0
    assert not np.any(ok_alerts) and np.all(warn_alerts)


def test_flag_sources_marks_only_warned_or_failed_records():
    from astropy.table import Table

    for status, want in (("pass", False), ("warn", True), ("fail", True)):
        tab = Table({"x": [1.0, 2.0], "pixelFlags_suspect": [False, False]})
        flag_sources(tab, {"status": status})
        assert list(tab["pixelFlags_suspect"]) == [want, want]
        assert ("pixelFlags_suspectCenter" in tab.colnames) == want
    tab = Table({"x": [1.0]})
    assert flag_sources(tab, None) is tab and tab.colnames == ["x"]
