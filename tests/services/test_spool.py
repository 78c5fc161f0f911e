"""The spool after a crash: replay picks up or cleans the temporary files of interrupted writes.

A kill during a spool write leaves ``.<name>.<random>.tmp`` beside where the spool
file was to be (``apdask.core.files``).  These tests make such files by hand (the
real kill is in ``tests/faults/test_alert_faults.py``) and check what ``replay_spool``
and ``apdask alerts replay`` do with each kind, against a real broker (tansu).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from apdask.alerts.done import DoneRecords
from apdask.alerts.schema import load_schema
from apdask.alerts.wire import confluent_unframe
from apdask.cli.main import main
from apdask.services import spool
from tests.services.test_kafka import _read_all, _topic, _visit_packets

pytestmark = pytest.mark.service

VISIT = 31


@pytest.fixture(scope="module")
def schema():
    return load_schema()


def _as_leftover(path, age_s=3600.0):
    """Rename a spool file to the temporary name an interrupted write leaves, aged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.k3x9q2zt.tmp")
    os.replace(path, tmp)
    t = tmp.stat().st_mtime - age_s
    os.utime(tmp, (t, t))
    return tmp


def _spooled(schema, spool_dir, topic, detector, n=4):
    alerts = _visit_packets(schema, [None] * 3, VISIT, detector, n=n, n_objects=2, seed=detector)
    path = spool.write_spool(spool_dir, topic, VISIT, detector, schema, alerts, ["down"] * n)
    return path, sorted(a.diaSourceId for a in alerts)


def _ids(uri, schema):
    return sorted(confluent_unframe(v, schema)["diaSourceId"] for *_, v in _read_all(uri))


def test_complete_leftover_is_delivered_and_recorded_done(kafka_broker, schema, tmp_path):
    topic = _topic(kafka_broker)
    uri = f"kafka://{kafka_broker}/{topic}"
    path, ids = _spooled(schema, tmp_path, topic, detector=1)
    tmp = _as_leftover(path)
    rep = spool.replay_spool(tmp_path, uri)
    assert (rep["files"], rep["delivered"], rep["remaining"]) == (0, 4, 0)
    assert [e["action"] for e in rep["leftovers"]] == ["delivered"]
    assert not tmp.exists() and not path.exists()
    again = spool.replay_spool(tmp_path, uri)
    assert (again["delivered"], again["leftovers"]) == (0, [])
    assert _ids(uri, schema) == ids  # each once


def test_leftovers_each_kind(kafka_broker, schema, tmp_path):
    topic = _topic(kafka_broker)
    uri = f"kafka://{kafka_broker}/{topic}"
    done = DoneRecords(tmp_path / topic / "done")
    complete, ids = _spooled(schema, tmp_path, topic, detector=1)
    complete = _as_leftover(complete)
    partial, _ = _spooled(schema, tmp_path, topic, detector=2)
    partial.write_bytes(partial.read_bytes()[:-40])  # killed in mid-write
    partial = _as_leftover(partial)
    resent, _ = _spooled(schema, tmp_path, topic, detector=3)
    resent = _as_leftover(resent)
    done.write(VISIT, 3, n_alerts=4)  # a re-run sent the CCD since
    rewrite, kept_ids = _spooled(schema, tmp_path, topic, detector=4)
    rewrite_tmp = _as_leftover(rewrite)
    _spooled(schema, tmp_path, topic, detector=4)  # the file it rewrote is still there
    os.replace(next(tmp_path.glob(f"{topic}/{VISIT}_4_*.avro")), rewrite)
    young, _ = _spooled(schema, tmp_path, topic, detector=5)
    young = _as_leftover(young, age_s=0.0)
    record_tmp = tmp_path / topic / "done" / f"visit_{VISIT}" / ".31_6.json.a8d7e6f5.tmp"
    record_tmp.parent.mkdir(parents=True, exist_ok=True)
    record_tmp.write_text('{"vis')
    os.utime(record_tmp, (0, 0))

    rep = spool.replay_spool(tmp_path, uri)
    entries = {Path(e["path"]).name: e for e in rep["leftovers"]}
    assert entries[complete.name]["action"] == "delivered"
    assert entries[partial.name]["action"] == "removed"
    assert "incomplete" in entries[partial.name]["why"]
    assert "re-run it" in entries[partial.name]["why"]  # says how its alerts come back
    assert entries[resent.name]["action"] == "removed"
    assert "re-sent since" in entries[resent.name]["why"]
    assert entries[rewrite_tmp.name]["action"] == "removed"
    assert "intact" in entries[rewrite_tmp.name]["why"]
    assert entries[young.name]["action"] == "kept" and young.exists()
    assert entries[record_tmp.name]["action"] == "removed"
    assert {p.name for p in tmp_path.rglob(".*.tmp")} == {young.name}
    # the intact spool file and the complete leftover were delivered, nothing else
    assert (rep["files"], rep["delivered"], rep["remaining"]) == (1, 8, 0)
    assert _ids(uri, schema) == sorted(ids + kept_ids)
    assert done.read(VISIT, 1)["picked_up"] == str(complete)  # its CCD is done now
    assert done.read(VISIT, 2) is None  # a re-run re-sends this one


def test_leftover_with_broker_down_becomes_a_spool_file(schema, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"kafka://127.0.0.1:{s.getsockname()[1]}/t?delivery_timeout=1"
    path, ids = _spooled(schema, tmp_path, "t", detector=1)
    tmp = _as_leftover(path)
    assert main(["alerts", "replay", str(tmp_path), "--to", dead]) == 75  # run it again later
    rep = json.loads(capsys.readouterr().out)
    assert rep["remaining"] == 4
    assert [e["action"] for e in rep["leftovers"]] == ["spooled"]
    assert not tmp.exists() and path.exists()  # now an ordinary spool file
    _, left = spool.read_spool(path)
    assert sorted(a.diaSourceId for a in left) == ids
    assert DoneRecords(tmp_path / "t" / "done").read(VISIT, 1)["spooled"] == 4


def test_truncated_spool_is_a_clear_error(schema, tmp_path):
    path, _ = _spooled(schema, tmp_path, "t", detector=1)
    data = path.read_bytes()
    for cut in (len(data) - 10, len(data) // 2, 60):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"truncated|corrupt"):
            spool.read_spool(path)
