"""Zero loss across a crash: ``process-ccd`` killed with SIGKILL at named points, then re-run.

Runnable alone: ``pytest tests/faults``.  Each case runs ``apdask process-ccd`` on the
simulated test camera in a subprocess with ``APDASK_FAULT`` naming one kill point
(:mod:`apdask.core.faults`, a test-only hook), checks that the process died there,
runs the CCD again without the fault (and ``apdask alerts replay`` where a spool was
involved), reads the sink back and checks:

* the PPDB holds each of the CCD's DiaSources once: the re-run re-sent the alerts
  without storing again;
* every ``diaSourceId`` the PPDB holds is in the alerts, and no other; after
  de-duplication on ``diaSourceId`` the alerts equal the PPDB rows;
* duplicates (Kafka) appear only where the broker had acknowledged or the spool held
  alerts before the crash; where nothing had been sent, every alert arrives exactly
  once;
* a third run finds the CCD done and skips it.

A ``process-ccd`` on the test camera takes about 5 s; the suite about 2 minutes.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy

from apdask.alerts.schema import load_schema
from apdask.alerts.sinks import read_alerts
from apdask.alerts.wire import confluent_unframe
from apdask.core.faults import FAULT_ENV, FAULT_POINTS
from apdask.ppdb import Ppdb
from apdask.services import consume, kafka
from tests import _ppdb_synth as synth

VISIT, DETECTOR = 1000, 0  # TestCam_1000_T00_0.fits


def _dead_address():
    """A loopback address where nothing listens (a broker that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def _apdask(*args, fault=None, timeout=300):
    """Run the ``apdask`` command in a subprocess; returns the CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        assert fault in FAULT_POINTS
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "apdask.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


def _process_ccd(repo, alerts, ppdb=None, fault=None):
    args = [
        "process-ccd", "--ccd", "T00", "--ra", "150.0", "--dec", "-30.0", "--filter", "r",
        "--exptime", "30", "--distributor", f"file://{repo}/raw",
        "--image", "TestCam_1000_T00_0.fits", "--repo", repo, "--timeout", "2",
        "--alerts", alerts,
    ]  # fmt: skip
    if ppdb is not None:
        args += ["--ppdb", ppdb]
    return _apdask(*args, fault=fault)


def _killed(proc, point):
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    assert f"fault injected: {point}" in proc.stderr


def _ok(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    return json.loads(proc.stdout)


def _stored_sources(ppdb, mjd):
    """The CCD's DiaSources in the PPDB, as ``{diaSourceId: row}``."""
    rows = Ppdb.open(ppdb).get_ccd_rows(VISIT, DETECTOR, mjd).sources
    return {int(r["diaSourceId"]): r for r in rows}


def _kafka_alerts(uri):
    """Every alert on the topic, one entry per message (duplicates kept)."""
    schema = load_schema()
    got = consume.consume(uri, from_beginning=True, follow=False, timeout=10)
    return [confluent_unframe(value, schema) for _, value in got]


def _check_equal(alerts, stored):
    """After de-duplication on diaSourceId the alerts are the PPDB's rows."""
    by_id = {a["diaSourceId"]: a for a in alerts}
    assert sorted(by_id) == sorted(stored)
    for sid, a in by_id.items():
        row, src = stored[sid], a["diaSource"]
        assert (src["visit"], src["detector"]) == (VISIT, DETECTOR)
        assert src["diaObjectId"] == int(row["diaObjectId"])
        assert a["diaObject"]["diaObjectId"] == src["diaObjectId"]
        for key in ("ra", "dec", "psfFlux"):
            assert src[key] == pytest.approx(float(row[key]), rel=1e-6), key
        assert a["cutoutDifference"][:6] == b"SIMPLE"


@pytest.fixture
def ppdb_path(request, tmp_path):
    """``None`` (the repository's SQLite PPDB) or a PostgreSQL PPDB in a fresh schema."""
    if request.param == "sqlite":
        yield None
        return
    with synth.pg_ppdb(tmp_path / "apdb.yaml", prefix="faults") as path:
        yield str(path)


# point, broker down during the killed run (so its alerts are spooled), PPDB; where
# the re-run finds the alerts: "sent" (it delivers them, the acknowledged ones of the
# killed run counted, not re-sent) or "spooled" (a complete spool file holds them all:
# the re-run sends none, replay delivers them).  No case leaves a duplicate.
KAFKA_CASES = [
    pytest.param("ppdb-committed", False, "sqlite", "sent", id="ppdb-committed"),
    pytest.param("kafka-partial", False, "sqlite", "sent", id="kafka-partial"),
    pytest.param("spool-partial", True, "sqlite", "sent", id="spool-partial"),
    pytest.param("sink-written", True, "sqlite", "spooled", id="spool-written"),
    pytest.param("kafka-partial", False, "postgresql", "sent", id="kafka-partial-pg"),
]


@pytest.mark.service
@pytest.mark.parametrize(("point", "broker_down", "ppdb_path", "where"), KAFKA_CASES,
                         indirect=["ppdb_path"])  # fmt: skip
def test_kafka_sink_loses_nothing_across_a_kill(
    repo, sim_repo, kafka_broker, ppdb_path, tmp_path, point, broker_down, where
):
    topic = f"faults-{uuid.uuid4().hex[:8]}"
    assert kafka.ensure_topic(kafka_broker, topic, partitions=2)
    spool = tmp_path / "spool"
    uri = f"kafka://{kafka_broker}/{topic}?spool_dir={spool}"
    first = uri
    if broker_down:
        first = f"kafka://{_dead_address()}/{topic}?spool_dir={spool}&delivery_timeout=1"
    _killed(_process_ccd(repo, first, ppdb_path, fault=point), point)
    ppdb = ppdb_path or f"{repo}/ppdb/apdb.yaml"
    stored = _stored_sources(ppdb, sim_repo["visits"][0]["mjd"])
    n = len(stored)
    assert n > 0  # the kill points are all after the commit
    leftovers = sorted(spool.rglob(".*.tmp"))
    assert bool(leftovers) == (point == "spool-partial")  # the hidden file of the kill

    rerun = _process_ccd(repo, uri, ppdb_path)
    report = _ok(rerun)
    (ccd,) = report["ccds"]
    assert ccd["stored"] is False and ccd["alerts_resent"] is True  # not stored again
    spooled = n if where == "spooled" else 0
    assert (ccd["n_alerts"], ccd["alerts_delivered"], ccd["alerts_spooled"]) == (
        n, n - spooled, spooled
    )  # fmt: skip
    if point == "kafka-partial":  # the killed run's acknowledgements were journalled
        assert "alerts were acknowledged and 0 spooled before a crash" in rerun.stderr
    assert Path(ccd["done_record"]).is_relative_to(spool / topic / "done")
    assert sorted(_stored_sources(ppdb, sim_repo["visits"][0]["mjd"])) == sorted(stored)

    for tmp in leftovers:  # older than replay's grace for writers still at work
        os.utime(tmp, (tmp.stat().st_atime - 3600, tmp.stat().st_mtime - 3600))
    replay = _apdask("alerts", "replay", str(spool), "--to", uri)
    assert replay.returncode == 0, replay.stderr[-3000:]
    rep = json.loads(replay.stdout)
    assert rep["remaining"] == 0
    assert [e["action"] for e in rep["leftovers"]] == ["removed"] * len(leftovers)
    assert not list(spool.rglob(".*.tmp")) and not list(spool.rglob("*.avro"))

    alerts = _kafka_alerts(uri)
    counts = collections.Counter(a["diaSourceId"] for a in alerts)
    assert set(counts) == set(stored)  # every stored diaSourceId, and no other
    assert max(counts.values()) == 1, counts.most_common(3)  # exactly once on the topic
    assert rep["delivered"] == spooled
    _check_equal(alerts, stored)

    again = _ok(_process_ccd(repo, uri, ppdb_path))
    assert again["skipped"] == ["T00"] and again["ccds"] == []


@pytest.mark.parametrize("point", ["ppdb-committed", "sink-written"])
def test_file_sink_loses_nothing_across_a_kill(repo, sim_repo, point):
    alerts = f"file://{repo}/alerts"
    _killed(_process_ccd(repo, alerts, fault=point), point)
    ppdb = f"{repo}/ppdb/apdb.yaml"
    # The re-sent alerts are made from the stored rows, not from the re-run's own
    # measurements: change the stored fluxes and the alerts must carry the change.
    engine = sqlalchemy.create_engine(f"sqlite:///{repo}/ppdb/apdb.db")
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text('UPDATE "DiaSource" SET "psfFlux" = "psfFlux" + 1000'))
    engine.dispose()
    stored = _stored_sources(ppdb, sim_repo["visits"][0]["mjd"])
    assert len(stored) > 0
    done = Path(repo, "alerts", "done", f"visit_{VISIT}", f"{VISIT}_{DETECTOR}.json")
    assert not done.exists()
    report = _ok(_process_ccd(repo, alerts))
    (ccd,) = report["ccds"]
    assert ccd["stored"] is False and ccd["alerts_resent"] is True
    assert json.loads(done.read_text())["n_alerts"] == len(stored)
    got = read_alerts(ccd["alert_file"])
    assert len(got) == len(stored)  # the file is rewritten, each alert once
    _check_equal(got, stored)
    assert np.all([a["diaSource"]["visit"] == VISIT for a in got])
    assert _ok(_process_ccd(repo, alerts))["skipped"] == ["T00"]
