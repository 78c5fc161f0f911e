"""Dynamic mode (DMTN-092 §2.2): nextVisit events from Kafka start visits at once.

The end-to-end test runs ``apdask listen`` as a process against a real
Kafka-protocol broker (tansu): a test camera announces a visit, uploads the raws a
few seconds later into the file distributor, and alerts appear.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import dask
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apdask.exceptions import ApdaskError, ConfigurationError, UnknownDetectorError, UsageError
from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.nextvisit import NextVisit
from apdask.services.listen import parse_next_visit
from tests._nextvisit import PROPERTY_SETTINGS, one_change

MSG = {"instrument": "TestCam", "groupId": "g-1000", "visit": 1000,
       "position": [150.0, -30.0], "filters": "r", "duration": 30.0,
       "detectors": ["T00", "T01"]}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (b"{not json", ValueError, "not valid JSON"),
        (b"\xff\xfe", ValueError, "not valid JSON"),
        (b"[1, 2]", UsageError, r"JSON object, got \[1, 2\]"),
        (b"[" * 50_000 + b"]" * 50_000, UsageError, "not valid JSON"),  # deeper than recursion
        (None, UsageError, "empty message"),
        (json.dumps({**MSG, "detectors": ["R22_S11"]}).encode(), UnknownDetectorError, "R22_S11"),
        (json.dumps({k: v for k, v in MSG.items() if k != "visit"}).encode(), ValueError,
         "lacks visit"),
        (json.dumps({**MSG, "position": 5}).encode(), UsageError, "'position' must be a list"),
        (json.dumps({**MSG, "visit": True}).encode(), UsageError, "'visit' must be an integer"),
        (json.dumps({**MSG, "detectors": ["T00"] * 20_000}).encode(), UsageError,
         "lists 20000 CCDs"),
    ],
)  # fmt: skip
def test_bad_next_visit_messages_raise_clear_errors(value, error, match):
    with pytest.raises(error, match=match):
        parse_next_visit(value)


def test_message_size_is_bounded_before_decoding():
    good = json.dumps(MSG).encode()
    padded = good[:-1] + b', "pad": "' + b"x" * 2_000_000 + b'"}'  # valid JSON, 2 MB
    with pytest.raises(UsageError, match=r"2000\d+ bytes exceeds apdask.listen.max_message_bytes"):
        parse_next_visit(padded)  # default limit: 1 MiB
    with pytest.raises(UsageError, match="max_message_bytes = 100;"):
        parse_next_visit(good, max_bytes=100)
    assert parse_next_visit(good, max_bytes=len(good)).groupId == "g-1000"
    with dask.config.set({"apdask.listen.max_message_bytes": 10}), pytest.raises(UsageError):
        parse_next_visit(good)
    with (
        dask.config.set({"apdask.listen.max_message_bytes": 0}),
        pytest.raises(ConfigurationError, match="listen.max_message_bytes"),
    ):
        parse_next_visit(good)


@settings(max_examples=200, **PROPERTY_SETTINGS)
@given(st.one_of(st.binary(max_size=300), one_change().map(lambda c: json.dumps(c[0]).encode())))
def test_property_any_message_parses_or_is_rejected_cleanly(value):
    """Bytes off the topic: a valid NextVisit or an ApdaskError that the listener logs and
    skips; nothing else may escape (it would end the listener)."""
    try:
        nv = parse_next_visit(value)
    except ApdaskError as exc:
        assert exc.exit_code == 64 and str(exc)
        return
    assert nv.detectors and set(nv.detectors) <= {"T00", "T01"}


def test_good_message_parses():
    nv = parse_next_visit(json.dumps(MSG).encode())
    assert nv.groupId == "g-1000" and nv.detectors == ("T00", "T01")


def _hold_back_raws(repo, visit):
    """Move a visit's raws out of the distributor directory; return a function that
    copies them back (the camera delivering them) and returns the time it did."""
    raw, held = os.path.join(repo, "raw"), os.path.join(repo, f"held_{visit}")
    os.makedirs(held)
    names = [n for n in os.listdir(raw) if f"_{visit}_" in n]
    for n in names:
        shutil.move(os.path.join(raw, n), os.path.join(held, n))

    def deliver():
        for n in names:  # copy, then atomic rename, as the camera would
            shutil.copy(os.path.join(held, n), os.path.join(raw, f".{n}.part"))
            os.replace(os.path.join(raw, f".{n}.part"), os.path.join(raw, n))
        return time.time()

    return deliver


def test_prefetch_runs_before_images_arrive(repo, sim_repo):
    """As many threads as CCDs: blocked fetches must not starve the prefetch."""
    from distributed import Client, LocalCluster, get_task_stream

    from apdask.pipeline.run import ensure_ppdb

    nv = NextVisit.from_dict(sim_repo["visits"][0])
    deliver = _hold_back_raws(repo, nv.visit)
    ppdb = ensure_ppdb(repo)
    graph = build_visit_graph(nv, repo=repo, ppdb=ppdb, timeout=60)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                     dashboard_address=None) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as ts,
    ):  # fmt: skip
        future = client.compute(graph)
        time.sleep(8.0)  # the exposure; a cold prefetch takes about 3-5 s here
        delivered = deliver()
        report = future.result(timeout=120)
    prefetch_end = [s["stop"] for t in ts.data if str(t["key"]).startswith(("prefetch-", "calib-"))
                    for s in t["startstops"] if s["action"] == "compute"]  # fmt: skip
    assert len(prefetch_end) == 2 * 4  # per CCD: PPDB + refcat, bias, dark, flat
    assert max(prefetch_end) < delivered  # templates, calibs, PPDB read before the images
    assert report["n_alerts"] > 0
    for ccd in report["ccds"]:
        assert ccd["image_registered"] >= delivered - 0.5


def _create_topic(broker, topic):
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker})
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(10)


def _produce(broker, topic, values):
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": broker})
    for v in values:
        p.produce(topic, value=v, key=b"TestCam")
    assert p.flush(10) == 0


@pytest.mark.service
def test_listener_processes_an_announced_visit_end_to_end(repo, sim_repo, kafka_broker,
                                                          tmp_path):  # fmt: skip
    nv = sim_repo["visits"][0]
    deliver = _hold_back_raws(repo, nv["visit"])
    topic = f"next-visit-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka_broker, topic)
    exe = os.path.join(os.path.dirname(sys.executable), "apdask")
    log = open(tmp_path / "listen.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [exe, "-v", "listen", "--kafka", kafka_broker, "--topic", topic, "--repo", repo,
         "--timeout", "60", "--max-visits", "1", "--offset", "earliest"],
        stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # start-up: imports, LocalCluster, assign()
        while "listening on" not in (tmp_path / "listen.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "listener did not start"
            time.sleep(0.2)
        t_announce = time.time()
        good = json.dumps({**nv, "timestamp": t_announce}).encode()
        bad_ccd = json.dumps({**nv, "groupId": "x", "detectors": ["R22_S11"]}).encode()
        # A malformed message and a bad CCD first: the listener must survive them; then
        # the visit, and the same visit announced again (processed once).
        _produce(kafka_broker, topic, [b"{malformed", bad_ccd, good, good])
        time.sleep(3.0)  # the exposure: raws arrive some seconds after nextVisit
        t_images = deliver()
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    stderr = (tmp_path / "listen.log").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(out)
    assert summary["accepted"] == [nv["groupId"]]
    assert summary["duplicates"] == [nv["groupId"]]
    assert len(summary["rejected"]) == 2
    assert "not valid JSON" in summary["rejected"][0]["error"]
    assert "R22_S11" in summary["rejected"][1]["error"]
    assert "rejected nextVisit" in stderr and "keeps running" in stderr
    assert "duplicate nextVisit" in stderr
    (done,) = summary["done"]
    assert done["n_alerts"] > 0 and summary["failed"] == []
    alert_dir = os.path.join(repo, "alerts", f"visit_{nv['visit']}")
    assert sorted(os.listdir(alert_dir)) == ["1000_0.avro", "1000_1.avro"]
    from apdask.alerts.sinks import read_alerts

    assert len(read_alerts(alert_dir)) == done["n_alerts"]
    with open(done["report"]) as f:
        report = json.load(f)
    latencies = [c["latency_s"] for c in report["ccds"]]
    assert all(c["image_registered"] >= t_images - 0.5 for c in report["ccds"])
    print(
        f"\nlisten e2e: images {t_images - t_announce:.1f} s after nextVisit; "
        f"image->alerts latency per CCD {[round(x, 2) for x in latencies]} s; "
        f"nextVisit->done {done['nextvisit_to_done_s']:.1f} s; {done['n_alerts']} alerts"
    )


@pytest.mark.service
def test_listener_idle_exit_and_missing_topic(repo, kafka_broker):
    from apdask.exceptions import ConfigurationError
    from apdask.services.listen import listen

    with pytest.raises(ConfigurationError, match="does not exist"):
        listen(kafka_broker, f"absent-{uuid.uuid4().hex[:8]}", repo=repo, client=object(),
               topic_wait=0.5)  # fmt: skip
    topic = f"next-visit-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka_broker, topic)
    stop = threading.Event()
    t0 = time.monotonic()
    summary = listen(kafka_broker, topic, repo=repo, client=object(), idle_exit=1.0,
                     stop_event=stop)  # fmt: skip
    assert 1.0 <= time.monotonic() - t0 < 10
    assert summary["accepted"] == [] and summary["done"] == []
    # a stop with nothing in flight ends the listener at once, whatever the grace
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    summary = listen(kafka_broker, topic, repo=repo, client=object(), stop_event=stop,
                     stop_grace=600)  # fmt: skip
    assert time.monotonic() - t0 < 5 and summary["abandoned"] == []


def test_a_second_signal_ends_the_grace_at_once():
    """The stop's grace (private: no public path reaches the second-signal rule cheaply)."""
    from apdask.services._listen_stop import StopRequest

    stop = StopRequest(threading.Event(), grace=60)
    assert not stop.requested and not stop.expired()
    stop.request(15)
    assert stop.requested and not stop.expired()
    stop.request(15)
    assert stop.expired() and stop.now
    unsignalled = StopRequest(threading.Event(), grace=0.2)
    unsignalled.event.set()  # a stop_event set by the caller: the grace starts when noticed
    assert not unsignalled.expired()
    time.sleep(0.25)
    assert unsignalled.expired()


@pytest.mark.service
def test_listener_bounds_message_size_and_graph_build_time(repo, sim_repo, kafka_broker, caplog):
    """An over-size message is rejected unparsed; a visit whose build passes
    ``build_timeout`` fails with that reason; the listener goes on and nothing is computed
    (``client`` is not a cluster: any submission would fail)."""
    from apdask.services.listen import listen

    topic = f"next-visit-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka_broker, topic)
    nv = sim_repo["visits"][0]
    big = json.dumps({**nv, "groupId": "big", "pad": "x" * 5000}).encode()
    _produce(kafka_broker, topic, [big, json.dumps(nv).encode()])
    caplog.set_level("ERROR", logger="apdask.services.listen")
    t0 = time.monotonic()
    summary = listen(kafka_broker, topic, repo=repo, client=object(), offset="earliest",
                     max_visits=1, idle_exit=30.0, max_message_bytes=4096,
                     build_timeout=1e-6)  # fmt: skip
    assert time.monotonic() - t0 < 30
    (rejected,) = summary["rejected"]
    assert f"{len(big)} bytes exceeds apdask.listen.max_message_bytes = 4096" in rejected["error"]
    assert summary["accepted"] == [nv["groupId"]] and summary["done"] == []
    (failed,) = summary["failed"]
    assert failed["visit"] == nv["visit"] and "build_timeout_s = 1e-06 s" in failed["error"]
    assert "rejected nextVisit" in caplog.text and "not started" in caplog.text
    assert summary["abandoned"] == []


@pytest.mark.service
def test_sigterm_stops_the_listener_within_its_grace(repo, sim_repo, kafka_broker, tmp_path):
    """A visit in flight whose images never come: SIGTERM, then the grace (2 s), then it is
    cancelled, listed under ``abandoned`` with its nextVisit, and ``apdask listen`` exits 75
    with nothing of that visit written."""
    nv = sim_repo["visits"][0]
    _hold_back_raws(repo, nv["visit"])  # never delivered
    topic = f"next-visit-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka_broker, topic)
    exe = os.path.join(os.path.dirname(sys.executable), "apdask")
    log_path = tmp_path / "listen.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [exe, "-v", "--set", "listen.stop_grace_s=2", "listen", "--kafka", kafka_broker,
             "--topic", topic, "--repo", repo, "--timeout", "300", "--workers", "1",
             "--offset", "earliest"],
            stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    try:
        _produce(kafka_broker, topic, [json.dumps(nv).encode()])
        deadline = time.monotonic() + 90  # start-up: imports, LocalCluster, assign()
        while "CCD graphs submitted" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - t_term
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = log_path.read_text()
    assert proc.returncode == 75, stderr[-3000:]
    assert 2.0 <= stopped_after < 20, stopped_after  # the grace, then the cluster's shutdown
    summary = json.loads(out)
    (gone,) = summary["abandoned"]
    assert gone["visit"] == nv["visit"] and "stop_grace_s" in gone["reason"]
    assert NextVisit.from_dict(gone["nextVisit"]) == NextVisit.from_dict(nv)
    assert summary["done"] == [] and summary["failed"] == []
    assert "finishing the visits in flight (at most 2 s)" in stderr
    assert "stopped with 1 visit(s) abandoned" in stderr and "Traceback" not in stderr
    assert not any(files for _, _, files in os.walk(os.path.join(repo, "alerts")))
    from apdask.ppdb import Ppdb

    counts = Ppdb.open(os.path.join(repo, "ppdb", "apdb.yaml")).apdb.tableRowCount()
    assert counts.get("DiaSource", 0) == 0
    print(f"\nlisten SIGTERM, a visit in flight, grace 2 s: exit 75 after {stopped_after:.1f} s")


@pytest.mark.service
def test_listen_on_a_warm_slurm_pool_serves_consecutive_visits(slurm, kafka_broker, tmp_path):
    """``apdask listen --cluster slurm``: the pool's two worker jobs start before the first
    nextVisit and serve three visits announced at a cadence (images 3 s after each
    nextVisit); no further job is submitted, and none is left when the listener exits."""
    from apdask.tools.simulate import simulate_repo

    repo = str(tmp_path / "repo")
    visits = simulate_repo("testcam", repo, n_visits=3, seed=11)
    deliveries = [_hold_back_raws(repo, nv["visit"]) for nv in visits]
    topic = f"next-visit-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka_broker, topic)
    exe = os.path.join(os.path.dirname(sys.executable), "apdask")
    log_path = tmp_path / "listen.log"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [exe, "-v", "--set", "submit.minimum_jobs=2", "--set", "submit.maximum_jobs=2",
             "listen", "--cluster", "slurm", "--scheduler-host", "127.0.0.1", "--mem", "2GB",
             "--kafka", kafka_broker, "--topic", topic, "--repo", repo, "--timeout", "120",
             "--max-visits", "3", "--offset", "earliest"],
            stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )  # fmt: skip
    name = f"apdask-pool-{proc.pid}"
    try:
        deadline = time.monotonic() + 180  # imports, the pool's first worker job, assign()
        while "listening on" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        warm = _slurm_jobs(name)
        t0 = time.time()
        for i, (nv, deliver) in enumerate(zip(visits, deliveries, strict=True)):
            time.sleep(max(0.0, t0 + 12.0 * i - time.time()))  # the cadence, scaled down
            _produce(kafka_broker, topic, [json.dumps({**nv, "timestamp": time.time()}).encode()])
            time.sleep(3.0)  # the exposure
            deliver()
        out, _ = proc.communicate(timeout=360)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = log_path.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    # Under -v distributed's own INFO lines show; one of them, "Batched Comm Closed",
    # carries the traceback of a worker connection closed while the pool shuts down
    # (seen once in CI).  It is Dask's log of a benign race, not an error of ours.
    ours = re.sub(r"[^\n]*distributed\.batched INFO: Batched Comm Closed[^\n]*\n"
                  r"Traceback \(most recent call last\):\n(?:[ \t][^\n]*\n)*"
                  r"distributed\.comm\.core\.CommClosedError[^\n]*\n?", "", stderr)  # fmt: skip
    assert "Traceback" not in ours, ours[-3000:]
    assert "warm pool apdask-pool-" in stderr
    summary = json.loads(out)
    assert summary["failed"] == [] and len(summary["done"]) == 3, summary
    assert sorted(d["visit"] for d in summary["done"]) == [nv["visit"] for nv in visits]
    assert all(d["n_alerts"] > 0 for d in summary["done"])
    jobs = _slurm_jobs(name, all_states=True)
    assert warm and set(warm) <= set(jobs) and len(jobs) == 2, (warm, jobs)  # one pool, 2 jobs
    assert not any(state in ("RUNNING", "PENDING") for state in jobs.values()), jobs
    latencies = {d["visit"]: round(d["nextvisit_to_done_s"], 1) for d in summary["done"]}
    print(f"\nlisten --cluster slurm, 2 warm jobs, 3 visits 12 s apart: nextVisit -> done "
          f"{latencies} s; jobs {sorted(jobs)}")  # fmt: skip


def _slurm_jobs(name, all_states=False):
    """``{job id: state}`` of the SLURM jobs called ``name`` (``-t all``: ended ones too)."""
    cmd = ["squeue", "-h", "-n", name, "-o", "%i %T", *(["-t", "all"] if all_states else [])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


@pytest.mark.service
def test_listen_that_ends_with_a_failed_visit_exits_non_zero(repo, sim_repo, kafka_broker,
                                                            tmp_path):  # fmt: skip
    """A visit that fails (here: its graph build passes listen.build_timeout_s) does not
    stop the listener, but its exit is not 0: one line names the visit."""
    topic = f"next-visit-{uuid.uuid4().hex[:8]}"
    _create_topic(kafka_broker, topic)
    nv = sim_repo["visits"][0]
    _produce(kafka_broker, topic, [json.dumps(nv).encode()])
    exe = os.path.join(os.path.dirname(sys.executable), "apdask")
    done = subprocess.run(
        [exe, "--set", "listen.build_timeout_s=0.000001", "listen", "--kafka", kafka_broker,
         "--topic", topic, "--repo", repo, "--max-visits", "1", "--idle-exit", "60",
         "--offset", "earliest", "--workers", "1"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert [f["visit"] for f in summary["failed"]] == [nv["visit"]]
    lines = [x for x in done.stderr.splitlines() if x.startswith("apdask: error:")]
    assert lines == [f"apdask: error: 1 visit(s) failed: {nv['visit']}; see the summary and "
                     "each visit's report"]  # fmt: skip
    assert "Traceback" not in done.stderr
