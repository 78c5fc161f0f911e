"""apdask.alerts.done: the done records that say a CCD's alerts reached its sink."""

from __future__ import annotations

import json
import os

from apdask.alerts.done import DoneRecords
from apdask.alerts.sinks import FileSink, sink_from_uri


def test_write_read_remove(tmp_path):
    done = DoneRecords(tmp_path / "done")
    assert done.read(1000, 3) is None and done.remove(1000, 3) is False
    path = done.write(1000, 3, n_alerts=12, spool_path=tmp_path / "x.avro")
    assert path == tmp_path / "done" / "visit_1000" / "1000_3.json"
    record = done.read(1000, 3)
    assert record["visit"] == 1000 and record["detector"] == 3 and record["n_alerts"] == 12
    assert record["spool_path"] == str(tmp_path / "x.avro") and record["done_at"] > 0
    assert os.listdir(path.parent) == ["1000_3.json"]  # atomic: no temporary file is left
    assert done.read(1000, 4) is None  # per CCD
    assert done.remove(1000, 3) is True and done.read(1000, 3) is None


def test_unreadable_record_counts_as_none(tmp_path):
    done = DoneRecords(tmp_path)
    done.path(7, 1).parent.mkdir(parents=True)
    done.path(7, 1).write_text("{not json")
    assert done.read(7, 1) is None  # the CCD is re-sent rather than skipped
    done.path(7, 1).write_text(json.dumps([1, 2]))
    assert done.read(7, 1) is None


def test_file_sink_done_needs_the_alert_file_too(tmp_path):
    sink = FileSink(tmp_path / "alerts")
    assert sink.done.root == tmp_path / "alerts" / "done"
    sink.write(1000, 0, [])
    assert sink.is_done(1000, 0) is None  # written, but not recorded as done yet
    sink.done.write(1000, 0, n_alerts=0)
    assert sink.is_done(1000, 0)["n_alerts"] == 0
    sink.path_for(1000, 0).unlink()
    assert sink.is_done(1000, 0) is None  # the alerts are gone: not done


def test_kafka_sink_records_next_to_its_spool(tmp_path):
    sink = sink_from_uri(f"kafka://127.0.0.1:1/alerts?spool_dir={tmp_path}")
    assert sink.done.root == tmp_path / "alerts" / "done"  # <spool_dir>/<topic>/done
    assert sink.is_done(5, 2) is None
    sink.done.write(5, 2, n_alerts=3)
    assert sink_from_uri(f"kafka://127.0.0.1:1/alerts?spool_dir={tmp_path}").is_done(5, 2)
    other = sink_from_uri(f"kafka://127.0.0.1:1/other?spool_dir={tmp_path}")
    assert other.is_done(5, 2) is None  # per topic


def test_rewrites_remove_what_a_killed_write_left(tmp_path):
    sink = FileSink(tmp_path)
    left = []
    for final in (sink.path_for(1000, 0), sink.done.path(1000, 0)):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.k3x9q2zt.tmp")  # a SIGKILL mid-write
        tmp.write_bytes(b"partial")
        os.utime(tmp, (0, 0))
        left.append(tmp)
    sink.write(1000, 0, [])
    sink.done.write(1000, 0, n_alerts=0)
    assert not any(p.exists() for p in left)
    assert sink.is_done(1000, 0) is not None


def test_ack_journal_survives_its_writer_and_is_forgotten(tmp_path):
    """Acknowledged ids are on disk as soon as each is added (no close needed, as when
    the writer is killed), are read back for the re-run, and are removed when done."""
    from apdask.alerts.done import AckJournal

    journal = AckJournal(tmp_path / "acked")
    assert journal.read(1000, 3) == set()
    appender = journal.open(1000, 3)
    appender.add(11)
    appender.add(12)
    assert journal.read(1000, 3) == {11, 12}  # before the appender is closed
    appender.__exit__(None, None, None)
    with journal.open(1000, 3) as more:
        more.add(13)
    assert journal.read(1000, 3) == {11, 12, 13}
    assert journal.read(1000, 4) == set()
    journal.remove(1000, 3)
    assert journal.read(1000, 3) == set() and not journal.path(1000, 3).exists()
    journal.remove(1000, 3)  # twice is fine
