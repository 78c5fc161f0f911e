"""The raw-calibration pipeline (DMTN-092 §2.3): metrics, verdicts, reports, sinks.

Calibration frames are rendered from the simulated repository's masters by
``simulate_calib_frame``; each injected defect must be caught, clean frames pass.
"""

import json
import os
import shutil
import uuid

import dask
import pytest

from apdask.cli.main import main
from apdask.pipeline.calib import MetricsDeliveryError, process_calib, publish_metrics
from apdask.tools.simulate import simulate_calib_frame


@pytest.fixture(scope="module")
def crepo(sim_repo, tmp_path_factory):
    """A writable copy of the simulated repository, shared by this module's tests."""
    root = tmp_path_factory.mktemp("calib") / "repo"
    shutil.copytree(sim_repo["root"], root)
    return str(root)


_COUNTER = iter(range(900_000, 999_999))


def _frame(repo, intent, defect=None, ccd="T00", **kw):
    path = simulate_calib_frame(repo, ccd, intent, exposure_id=next(_COUNTER), defect=defect,
                                **kw)  # fmt: skip
    return os.path.basename(path)


def _run(repo, intent, image, ccd="T00", band="r", **kw):
    return process_calib(intent, ccd, image, repo=repo, distributor=f"file://{repo}/raw",
                         band=band, timeout=2, **kw)  # fmt: skip


@pytest.mark.parametrize("intent", ["bias", "dark", "flat", "cbp"])
def test_clean_frame_passes_with_sane_metrics(crepo, intent):
    rep = _run(crepo, intent, _frame(crepo, intent))
    assert rep["verdict"] == "pass", rep["failures"]
    assert [a["amp"] for a in rep["amplifiers"]] == ["C10", "C11", "C01", "C00"]
    for a in rep["amplifiers"]:
        assert 4.5 < a["read_noise_e"] < 7.5  # the simulator's 5-7 e-
        assert a["n_hot"] / a["n_pixels"] < 1e-3
        if intent in ("flat", "cbp"):
            assert abs(a["master_ratio"] - 1) < 0.005 and a["n_dead"] == 0
            assert 0.005 < a["sigma"] < 0.02  # photon noise of 20 000 e- and the flat
        elif intent == "bias":
            assert a["master_ratio"] is None and abs(a["master_diff"]) < 0.5
            assert abs(a["sigma"] - a["read_noise_e"]) < 0.5
        else:
            assert abs(a["master_diff"]) < 0.02  # e-/s
    # The report is in the repository and on the default metrics sink.
    with open(rep["report_path"]) as f:
        assert json.load(f)["verdict"] == "pass"
    assert rep["report_path"].startswith(os.path.join(crepo, "calib-reports", intent))
    with open(os.path.join(crepo, "calib-reports", "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert any(m["image"] == rep["image"] and m["verdict"] == "pass" for m in lines)


@pytest.mark.parametrize(
    ("intent", "defect", "bad_amps", "metric"),
    [
        ("bias", "hot_column", {"C10", "C01"}, "hot pixels"),
        ("dark", "hot_column", {"C10", "C01"}, "hot pixels"),
        ("flat", "dead_amp", {"C10"}, "dead pixels"),
        ("cbp", "dead_amp", {"C10"}, "dead pixels"),
        ("flat", "wrong_flat", {"C10", "C11", "C01", "C00"}, "flat/master ratio"),
    ],
)
def test_injected_defect_is_caught(crepo, intent, defect, bad_amps, metric):
    rep = _run(crepo, intent, _frame(crepo, intent, defect))
    assert rep["verdict"] == "fail"
    failed = {a["amp"] for a in rep["amplifiers"] if a["verdict"] == "fail"}
    assert failed == bad_amps
    assert all(any(metric in f for f in a["failures"]) for a in rep["amplifiers"]
               if a["amp"] in bad_amps)  # fmt: skip
    amps = {a["amp"]: a for a in rep["amplifiers"]}
    if defect == "hot_column":  # one column of 256 rows in each of the two amps it crosses
        assert all(256 <= amps[n]["n_hot"] <= 270 for n in bad_amps)
    if defect == "dead_amp":
        assert amps["C10"]["n_dead"] >= 0.99 * amps["C10"]["n_pixels"]
        assert amps["C10"]["master_ratio"] < 0.01
    if defect == "wrong_flat":  # the ±10 % gradient along x, averaged per amplifier
        assert amps["C10"]["master_ratio"] == pytest.approx(0.95, abs=0.01)
        assert amps["C11"]["master_ratio"] == pytest.approx(1.05, abs=0.01)


def test_thresholds_come_from_dask_config(crepo):
    image = _frame(crepo, "bias", "hot_column")
    with dask.config.set({"apdask.calib.max_hot_fraction": 0.01,
                          "apdask.calib.max_outlier_fraction": 0.01}):  # fmt: skip
        rep = _run(crepo, "bias", image)
    assert rep["verdict"] == "pass" and rep["thresholds"]["max_hot_fraction"] == 0.01
    rep = _run(crepo, "bias", image, thresholds={"max_read_noise_e": 3.0})
    assert rep["verdict"] == "fail"
    assert all("read noise" in a["failures"][0] for a in rep["amplifiers"])


def test_cli_exit_status_and_output(crepo, capsys):
    args = ["process-calib", "--ccd", "T01", "--filter", "r", "--exptime", "30",
            "--distributor", f"file://{crepo}/raw", "--repo", crepo, "--timeout", "2"]  # fmt: skip
    assert main([*args, "--intent", "dark", "--image", _frame(crepo, "dark", ccd="T01")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "pass" and out["detector"] == "T01"
    bad = _frame(crepo, "dark", "hot_column", ccd="T01")
    assert main([*args, "--intent", "dark", "--image", bad]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "fail" and any("hot pixels" in f for f in out["failures"])


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"--ccd": "R22_S11"}, 64, ["unknown CCD", "T00"]),
        ({"--intent": "dark"}, 65, ["IMGTYPE=FLAT", "--intent dark"]),
        ({"--filter": "g"}, 65, ["FILTBAND=r", "--filter g"]),
        ({"--filter": None}, 64, ["needs --filter"]),
        ({"--image": "TestCam_1_T00_0.fits", "--timeout": "0.3"}, 75, ["TestCam_1_T00_0.fits"]),
        ({"--metrics": "mqtt://x/y"}, 78, ["unsupported metrics sink"]),
    ],
)
def test_cli_bad_input(crepo, capsys, change, code, words):
    opts = {"--intent": "flat", "--ccd": "T00", "--filter": "r", "--exptime": "10",
            "--distributor": f"file://{crepo}/raw", "--image": _frame(crepo, "flat"),
            "--repo": crepo, "--timeout": "2"}  # fmt: skip
    opts.update(change)
    argv = ["process-calib"] + [x for k, v in opts.items() if v is not None for x in (k, v)]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("apdask: error:") and err.count("\n") == 1
    for w in words:
        assert w in err


def test_kafka_delivery_failure_is_spooled(tmp_path):
    spool = tmp_path / "spool.jsonl"
    with pytest.raises(MetricsDeliveryError, match="spooled"):
        publish_metrics({"verdict": "pass"}, "kafka://127.0.0.1:9/calib", spool=str(spool),
                        timeout=1.0)  # fmt: skip
    assert json.loads(spool.read_text()) == {"verdict": "pass"}


@pytest.mark.service
def test_metrics_published_to_kafka(crepo, kafka_broker):
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    topic = f"calib-metrics-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_broker})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(10)
    rep = _run(crepo, "flat", _frame(crepo, "flat", "wrong_flat"),
               metrics=f"kafka://{kafka_broker}/{topic}")  # fmt: skip
    assert rep["metrics_sink"] == f"kafka://{kafka_broker}/{topic}"
    consumer = Consumer({"bootstrap.servers": kafka_broker, "group.id": "t",
                         "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        msg = consumer.poll(10)
    finally:
        consumer.close()
    assert msg is not None and msg.error() is None
    got = json.loads(msg.value())
    assert msg.key() == b"TestCam/T00"
    assert got["verdict"] == "fail" and got["image"] == rep["image"]
    assert len(got["amplifiers"]) == 4
