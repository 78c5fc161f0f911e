"""``apdask diff --ppdb URL --alerts URI`` on real DECam pixels: association and alerts.

Two epochs of the same field (../shared/realdata/decam-sfft) go into one SQLite PPDB
and one file alert sink: DEC-OBS04b (2018-08-04 05:24 UTC, its time from EXP_BN, as
every file's MJD-OBS is a copy of DEC-OBS04a's) as visit 1, then DEC-OBS04a (09:23 UTC,
MJD-OBS) as visit 2, both against DEC-OBS18a (2016).  The transient at the centre
must become one DiaObject whose second alert carries the first DiaSource as history.
The zero point 31.4 for both images makes one count one nJy: the PPDB holds nJy.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import uuid
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy
from astropy.table import Table
from astropy.time import Time

from apdask import read_alerts
from apdask.cli.main import main
from apdask.pipeline.quality import QA_WARN_FLAGS
from apdask.ppdb import Ppdb, create_ppdb

REALDATA = Path(__file__).resolve().parents[3] / "shared" / "realdata"
DECAM = REALDATA / "decam-sfft"
pytestmark = pytest.mark.skipif(
    not (DECAM / "DEC-OBS04a.mini.fits").exists(),
    reason=f"real DECam data not found at {DECAM} (see the project's shared/realdata/README.md)",
)
CENTRE = (128.0, 127.0)
ZP = ["--s-zp", "31.4", "--t-zp", "31.4"]
MJD_04B = float(Time("2018-08-04T05:24:09", scale="utc").mjd)  # EXP_BN c4d_180804_052409


def _diff(science, out, url, alerts, *extra):
    argv = ["diff", str(DECAM / f"DEC-OBS{science}.mini.fits"),
            str(DECAM / "DEC-OBS18a.mini.fits"), "--out", str(out), "--ppdb", url,
            "--alerts", str(alerts), *ZP, *extra]  # fmt: skip
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    return rc, stdout.getvalue(), stderr.getvalue()


def _centre(alerts):
    near = [
        a for a in alerts
        if np.hypot(a["diaSource"]["x"] - CENTRE[0], a["diaSource"]["y"] - CENTRE[1]) < 3.0
    ]  # fmt: skip
    assert len(near) == 1, "the central transient has no alert"
    return near[0]


def _sql(url, query):
    db = Ppdb.open(url)
    with db._engine.connect() as conn:
        return conn.execute(sqlalchemy.text(query)).fetchall()


@pytest.fixture(scope="module")
def epochs(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffppdb")
    url = f"sqlite:///{d / 'ppdb' / 'apdb.db'}"
    # as a user would; its --config used to clash with the global one (a TypeError)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["ppdb", "create", url, "--config", str(d / "ppdb" / "apdb.yaml")]) == 0
    assert (d / "ppdb" / "apdb.yaml").exists()
    alerts = d / "alerts"
    runs = []
    for visit, science, extra in ((1, "04b", ["--mjd", str(MJD_04B)]), (2, "04a", [])):
        rc, out, err = _diff(science, d / f"out{visit}", url, alerts, "--visit", str(visit),
                             *extra)  # fmt: skip
        assert rc == 0, err
        runs.append(json.loads(out))
    return {"dir": d, "url": url, "alerts": alerts, "runs": runs}


def test_first_epoch_creates_objects_and_alerts(epochs):
    first = epochs["runs"][0]
    assert first["visit"] == 1 and first["detector"] == 37  # --visit; CCDNUM of the header
    assert first["stored"] and not first["already_done"]
    n = first["n_sources"]
    assert n > 0 and first["n_new_objects"] == n and first["n_alerts"] == n
    alerts = list(read_alerts(first["alert_file"]))
    assert len(alerts) == n and first["alerts_delivered"] == n
    transient = _centre(alerts)
    assert transient["diaSource"]["psfFlux"] > 0 and transient["diaSource"]["snr"] > 10
    assert not transient["prvDiaSources"]  # nothing before it
    assert transient["cutoutDifference"][:6] == b"SIMPLE"
    assert _sql(epochs["url"], "SELECT COUNT(*) FROM DiaSource WHERE visit = 1")[0][0] == n
    # the written table carries the PPDB's ids
    tab = Table.read(epochs["dir"] / "out1" / "diaSources.ecsv")
    want = sorted(a["diaSource"]["diaSourceId"] for a in alerts)
    assert sorted(tab["diaSourceId"]) == want
    report = json.loads((epochs["dir"] / "out1" / "report.json").read_text())
    assert report["ppdb"]["n_alerts"] == n and report["ppdb"]["done_record"]


def test_second_epoch_associates_the_transient_and_carries_its_history(epochs):
    first, second = epochs["runs"]
    assert second["visit"] == 2 and second["stored"]
    assert second["n_associated"] >= 1  # the transient at least (also the stars' residuals)
    before = _centre(read_alerts(first["alert_file"]))
    after = _centre(read_alerts(second["alert_file"]))
    oid = before["diaSource"]["diaObjectId"]
    assert after["diaSource"]["diaObjectId"] == oid
    assert after["diaSource"]["visit"] == 2 and after["diaSource"]["psfFlux"] > 0
    prv = after["prvDiaSources"]
    assert [p["diaSourceId"] for p in prv] == [before["diaSourceId"]]
    assert prv[0]["visit"] == 1 and prv[0]["midpointMjdTai"] == pytest.approx(MJD_04B)
    assert after["diaObject"]["nDiaSources"] == 2
    rows = _sql(epochs["url"], f"SELECT visit FROM DiaSource WHERE diaObjectId = {oid}")
    assert sorted(r[0] for r in rows) == [1, 2]


def test_warned_subtractions_are_flagged_in_the_ppdb_and_the_alerts(epochs):
    cols = ", ".join(QA_WARN_FLAGS)
    for k, run in enumerate(epochs["runs"], start=1):
        status = run["qa_status"]  # the single DECam pair warns on star_dipoles (0.4)
        assert status in ("pass", "warn")
        flagged = status == "warn"
        rows = _sql(epochs["url"], f"SELECT {cols} FROM DiaSource WHERE visit = {k}")
        assert len(rows) == run["n_sources"]
        assert all(all(bool(v) == flagged for v in r) for r in rows)
        for a in read_alerts(run["alert_file"]):
            assert [a["diaSource"][c] for c in QA_WARN_FLAGS] == [flagged, flagged]
    assert any(run["qa_status"] == "warn" for run in epochs["runs"])


def test_a_rerun_stores_nothing_twice_and_recovers_unsent_alerts(epochs):
    d, url, alerts = epochs["dir"], epochs["url"], epochs["alerts"]
    second = epochs["runs"][1]
    count = "SELECT COUNT(*) FROM DiaSource"
    n_rows = _sql(url, count)[0][0]
    sent = sorted(a["diaSourceId"] for a in read_alerts(second["alert_file"]))
    # a run that committed and then stopped before its done record: the re-run
    # re-makes the alerts from the stored rows and stores nothing
    done = Path(json.loads((d / "out2" / "report.json").read_text())["ppdb"]["done_record"])
    done.unlink()
    rc, out, err = _diff("04a", d / "rerun", url, alerts, "--visit", "2")
    assert rc == 0, err
    again = json.loads(out)
    assert not again["stored"] and not again["already_done"]
    assert again["n_alerts"] == second["n_alerts"] and done.exists()
    assert _sql(url, count)[0][0] == n_rows
    assert again["alerts_delivered"] == len(sent)
    assert sorted(a["diaSourceId"] for a in read_alerts(second["alert_file"])) == sent
    # done: nothing stored or sent again
    rc, out, err = _diff("04a", d / "rerun", url, alerts, "--visit", "2")
    assert rc == 0 and json.loads(out)["already_done"] and "already stored" in err
    assert _sql(url, count)[0][0] == n_rows


def test_ppdb_failure_writes_no_alerts_and_no_outputs(tmp_path):
    """A read-only PPDB (SQLite's mode=ro: root ignores file modes): read, then refused."""
    cfg = create_ppdb(f"sqlite:///{tmp_path / 'ro.db'}", str(tmp_path / "apdb.yaml"))
    Path(cfg).write_text(Path(cfg).read_text().replace("mode=rw", "mode=ro"))
    rc, out, err = _diff("04a", tmp_path / "out", cfg, tmp_path / "alerts", "--visit", "5")
    assert rc == 69, err  # PpdbError
    assert "readonly database" in err and out == ""
    assert not (tmp_path / "out").exists()
    assert not [p for p in (tmp_path / "alerts").rglob("*") if p.is_file()]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".apdask-diff")]


@pytest.fixture(scope="module")
def empty_ppdb(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('empty') / 'p.db'}"
    create_ppdb(url)
    return url


@pytest.mark.parametrize(
    ("drop", "extra", "code", "words"),
    [
        ("alerts", ["--visit", "1"], 64, "--ppdb and --alerts go together"),
        ("", [], 64, "has no EXPNUM: pass --visit"),  # CCDNUM is there, EXPNUM is not
        ("zp", ["--visit", "1"], 64, "give --s-zp"),  # counts without a zero point
        ("", ["--visit", "1", "--detector", "300"], 64, "--detector must be in [0, 256)"),
        ("", ["--visit", "1", "--band", "N6"], 64, "not one of u, g, r, i, z, y"),
        ("ppdb", ["--visit", "1"], 69, "apdask ppdb create"),  # no such PPDB
    ],
)
def test_bad_ppdb_arguments_fail_before_any_pixel_work(tmp_path, capsys, empty_ppdb, drop, extra,
                                                       code, words):  # fmt: skip
    url = empty_ppdb if drop != "ppdb" else f"sqlite:///{tmp_path / 'none.db'}"
    argv = ["diff", str(DECAM / "DEC-OBS04a.mini.fits"), str(DECAM / "DEC-OBS18a.mini.fits"),
            "--out", str(tmp_path / "out"), "--ppdb", url, *extra]  # fmt: skip
    argv += [] if drop == "alerts" else ["--alerts", str(tmp_path / "alerts")]
    argv += [] if drop == "zp" else ZP
    assert main(argv) == code
    assert words in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "alerts").exists()


def test_kafka_sink_bytes_decode_with_the_official_schema(kafka_broker, tmp_path):
    from lsst.alert.packet import Schema

    from apdask.services import consume, kafka

    topic = f"diff-{uuid.uuid4().hex[:8]}"
    assert kafka.ensure_topic(kafka_broker, topic)
    uri = f"kafka://{kafka_broker}/{topic}?spool_dir={tmp_path / 'spool'}"
    url = f"sqlite:///{tmp_path / 'p.db'}"
    create_ppdb(url)
    rc, out, err = _diff("04a", tmp_path / "out", url, uri, "--visit", "7")
    assert rc == 0, err
    run = json.loads(out)
    n = run["n_alerts"]
    assert n > 0 and (run["alerts_delivered"], run["alerts_spooled"]) == (n, 0)
    official = Schema.from_file()  # lsst.alert.packet's own
    got = [v for _, v in consume.consume(uri, from_beginning=True, follow=False, timeout=10)]
    assert len(got) == n
    decoded = []
    for value in got:
        assert value[:5] == struct.pack(">bi", 0, official.get_schema_id())  # Confluent
        decoded.append(official.deserialize(value[5:]))
    assert {a["diaSource"]["visit"] for a in decoded} == {7}
    assert {a["diaSource"]["detector"] for a in decoded} == {37}
    transient = _centre(decoded)
    assert transient["diaSource"]["psfFlux"] > 0
    stored = _sql(url, "SELECT diaSourceId FROM DiaSource")
    assert sorted(r[0] for r in stored) == sorted(a["diaSourceId"] for a in decoded)
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)
