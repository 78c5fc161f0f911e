"""The PPDB failing under a running CCD: PostgreSQL stopped mid-run, a read-only PPDB.

Runnable alone: ``pytest tests/faults``.  Each case asserts a documented exit code
(69, ``PpdbError``), one line on stderr, nothing written (no alerts, no done record,
no rows), and that a re-run once the database is back processes the CCD with its
alerts equal to its PPDB rows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apdask.alerts.sinks import read_alerts
from apdask.ppdb import Ppdb, create_ppdb
from tests import _ppdb_synth as synth

IMAGE = "TestCam_1000_T00_0.fits"


def _process_ccd(repo, distributor, ppdb, timeout):
    cmd = [
        sys.executable, "-m", "apdask.cli", "process-ccd", "--ccd", "T00", "--ra", "150.0",
        "--dec", "-30.0", "--filter", "r", "--exptime", "30", "--distributor",
        f"file://{distributor}", "--image", IMAGE, "--repo", repo, "--timeout", str(timeout),
        "--ppdb", ppdb,
    ]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _alerts(repo):
    path = Path(repo, "alerts", "visit_1000")
    return read_alerts(str(path)) if path.is_dir() else []


@pytest.mark.service
def test_postgresql_stopped_while_a_ccd_waits_for_its_image(repo, tmp_path):
    """The database goes down while ``process-ccd`` waits for its image: the CCD fails
    with exit 69 and one line naming the PPDB, writes nothing; after a restart a re-run
    processes it and its alerts are its PPDB rows."""
    pg = synth.PrivatePostgres()
    try:
        pg.start()
        cfg = create_ppdb(pg.url, str(tmp_path / "apdb.yaml"))
        arriving = tmp_path / "distributor"
        arriving.mkdir()
        proc = _process_ccd(repo, arriving, cfg, timeout=120)
        time.sleep(3.0)  # process-ccd is waiting for its image
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        pg.stop()
        shutil.copy(Path(repo, "raw", IMAGE), arriving / IMAGE)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 69, err[-3000:]
        lines = [x for x in err.splitlines() if x.startswith("apdask: error:")]
        assert len(lines) == 1 and "PPDB" in lines[0], err[-3000:]
        assert "Traceback" not in err
        assert _alerts(repo) == []
        assert not list(Path(repo, "alerts").rglob("*.json"))  # no done record
        pg.start()
        assert Ppdb.open(cfg).contains_visit_detector(1000, 0) is False
        again = _process_ccd(repo, arriving, cfg, timeout=30)
        out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-3000:]
        report = json.loads(out)
        alerts = _alerts(repo)
        assert len(alerts) == report["n_alerts"] > 0
        stored = Ppdb.open(cfg).apdb.tableRowCount()["DiaSource"]
        assert stored == len({a["diaSourceId"] for a in alerts}) == len(alerts)
    finally:
        pg.remove()


def test_read_only_ppdb_fails_process_visit_and_writes_nothing(repo, tmp_path, capsys):
    """Issue 19: a read-only PPDB makes ``process-visit`` exit non-zero (69), not 0."""
    from apdask.cli.main import main

    cfg = create_ppdb(f"sqlite:///{tmp_path / 'ro.db'}", str(tmp_path / "apdb.yaml"))
    text = Path(cfg).read_text()
    Path(cfg).write_text(text.replace("mode=rw", "mode=ro"))  # root ignores file modes
    rc = main(["process-visit", "--next-visit", os.path.join(repo, "visits", "visit_1000.json"),
               "--repo", repo, "--ppdb", cfg, "--workers", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 69, err[-3000:]
    assert "readonly database" in err or "CCD(s) failed" in err
    assert _alerts(repo) == []
