"""Dynamic mode (DMTN-092 §2.2): nextVisit events from Kafka start visits at once.

The end-to-end test runs ``apdask listen`` as a process against a real
Kafka-protocol broker (tansu): a test camera announces a visit, uploads the raws a
few seconds later into the file distributor, and alerts appear.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid

import pytest

from apdask.exceptions import UnknownDetectorError
from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.nextvisit import NextVisit
from apdask.services.listen import parse_next_visit

MSG = {"instrument": "TestCam", "groupId": "g-1000", "visit": 1000,
       "position": [150.0, -30.0], "filters": "r", "duration": 30.0,
       "detectors": ["T00", "T01"]}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (b"{not json", ValueError, "not valid JSON"),
        (b"\xff\xfe", ValueError, "not valid JSON"),
        (b"[1, 2]", ValueError, "JSON object, got list"),
        (json.dumps({**MSG, "detectors": ["R22_S11"]}).encode(), UnknownDetectorError, "R22_S11"),
        (json.dumps({k: v for k, v in MSG.items() if k != "visit"}).encode(), ValueError,
         "lacks visit"),
        (json.dumps({**MSG, "position": 5}).encode(), ValueError, "malformed field"),
    ],
)  # fmt: skip
def test_bad_next_visit_messages_raise_clear_errors(value, error, match):
    with pytest.raises(error, match=match):
        parse_next_visit(value)


def test_good_message_parses():
    nv = parse_next_visit(json.dumps(MSG).encode())
    assert nv.groupId == "g-1000" and nv.detectors == ("T00", "T01")


def _hold_back_raws(repo, visit):
    """Move a visit's raws out of the distributor directory; return a function that
    copies them back (the camera delivering them) and returns the time it did."""
    raw, held = os.path.join(repo, "raw"), os.path.join(repo, "held")
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
    prefetch_end = [s["stop"] for t in ts.data if str(t["key"]).startswith("prefetch-")
                    for s in t["startstops"] if s["action"] == "compute"]  # fmt: skip
    assert len(prefetch_end) == 2
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
