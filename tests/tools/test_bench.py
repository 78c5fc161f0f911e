"""``apdask bench``: runs the scripts in benchmarks/ and reports figures against targets."""

import json
import os
import subprocess
import sys

import pytest

from apdask.cli.main import main
from apdask.tools.bench import BENCHMARKS, find_benchmark_dir


def test_every_benchmark_script_exists():
    d = find_benchmark_dir()
    assert sorted(p.name for p in d.glob("bench_*.py")) == sorted(
        b.script for b in BENCHMARKS.values()
    )


def test_bench_association_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["bench", "--only", "association", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    b = report["benchmarks"]["association"]
    assert b["returncode"] == 0 and b["report"]["objects"] == 100_000
    speed, correct = b["checks"]
    assert speed["target"] == "<= 50" and 0 < speed["value"] < 5_000
    assert speed["met"] is None  # --quick figures are not judged
    assert correct["value"] == 1.0  # the optimal assignment recovers every planted match
    assert "associate 1,000 vs 100,000" in capsys.readouterr().out


def test_unknown_benchmark_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "--only", "nosuch", "--out", str(tmp_path / "r.json")]) == 78
    assert "unknown benchmark" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def _run_ccd_script(tmp_path, *args):
    script = find_benchmark_dir() / BENCHMARKS["ccd"].script
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    proc = subprocess.run(
        [sys.executable, str(script), "--camera", "testcam", "--detector", "T00",
         "--repo", str(tmp_path / "repo"), *args],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_bench_ccd_one_arrival_through_the_http_distributor(tmp_path):
    """Tiny mode: one test-camera CCD registered after its prefetch, alerts to a file sink."""
    r = _run_ccd_script(tmp_path, "--arrivals", "1", "--warmup", "0", "--sinks", "file",
                        "--no-startup")  # fmt: skip
    (a,) = r["series"]["file"]["arrivals"]
    assert a["n_alerts"] > 0 and a["alerts_delivered"] == a["n_alerts"]
    # the image was registered after the prefetch: the fetch waited, and no stage ran early
    assert 0 <= a["registered_to_fetched_s"] < a["latency_s"] == r["latency_s"]["median"]
    assert a["latency_s"] >= a["fetched_to_written_s"] > 0
    tl = a["timeline_s"]
    assert "prefetch" not in tl  # finished before registration
    assert tl["calibrate"][0] < tl["warp"][0] < tl["subtract"][0] < tl["detect"][0]
    assert tl["publish"][1] >= a["latency_s"] - 0.01  # the alerts are written in publish
    assert r["core_s_per_ccd"]["median"] == a["core_s"] > 0
    assert a["core_s_parts"]["distributor"] >= 0 and set(a["core_s_parts"]) == {
        "pipeline", "distributor"}  # fmt: skip
    assert {"psf", "subtract", "detect+measure", "prefetch_butler"} <= set(r["stage_seconds"])
    assert {"warp", "subtract", "isr_amp", "prefetch"} <= set(a["task_cpu_s"])
    assert 0.05 < r["peak_rss_GB"] < 8
    assert r["latency_kafka_s"] is None and "startup" not in r


@pytest.mark.slow
def test_bench_ccd_quick_with_kafka_and_startup(tmp_path):
    """``apdask bench --only ccd --quick``: tansu acknowledgements and the batch start-up."""
    out = tmp_path / "report.json"
    assert main(["bench", "--only", "ccd", "--quick", "--out", str(out)]) == 0
    b = json.loads(out.read_text())["benchmarks"]["ccd"]
    assert b["returncode"] == 0, b["stderr_tail"]
    (a,) = b["report"]["series"]["kafka"]["arrivals"]
    assert a["n_alerts"] > 0 and a["alerts_delivered"] == a["n_alerts"]  # acknowledged
    checks = {c["label"]: c for c in b["checks"]}
    assert checks["registration -> alerts acknowledged (tansu)"]["value"] == a["latency_s"]
    assert checks["core-seconds per CCD, prefetch included"]["target"] == "<= 3"
    s = b["report"]["startup"]
    assert s["batch_process_ccd"]["exit_code"] == 0
    batch = s["batch_process_ccd"]
    assert batch["wall_s"] >= batch["start_to_fetched_s"] + batch["fetched_to_written_s"] > 0
    assert s["import_apdask_cli_run_s"] > 0
    assert "scipy" in s["largest_imports_s"] and s["ppdb"]["open_s"] > 0
    assert "batch_process_ccd_numba_cold" not in s  # --quick skips the compile run


def test_slow_benchmarks_run_only_when_named():
    slow = {"ccd", "cluster", "realpairs", "visit"}  # minutes; cluster: SLURM, realpairs: sfft
    assert all(not BENCHMARKS[n].default for n in slow)
    assert all(b.default for n, b in BENCHMARKS.items() if n not in slow)


@pytest.mark.slow
def test_bench_visit_one_lsstcam_ccd(tmp_path):
    """``bench_visit.py`` on one LSSTCam CCD, 1 worker: its alerts and the extrapolation."""
    script = find_benchmark_dir() / BENCHMARKS["visit"].script
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    proc = subprocess.run(
        [sys.executable, str(script), "--ccds", "1", "--workers", "1", "--warmup", "0",
         "--transients-per-ccd", "60", "--repo", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    (row,) = r["densities"]
    (run,) = row["runs"]
    assert run["ccds"] == 1 and run["failed"] == [] and run["cold"] is None
    assert run["n_alerts"] >= 0.9 * 60  # nearly every injected transient, and variables
    assert run["core_s"] > 0 and 0.3 < run["peak_rss_GB"] < 16
    assert {"subtract", "detect", "prefetch"} <= set(run["task_seconds_per_ccd"])
    v = r["visit_189_2_workers"]  # only 1 worker measured: its figures
    assert v["extrapolated"] and v["from_ccds"] == 1 and v["workers"] == 1
    assert v["wall_s"] == pytest.approx(run["wall_s"] * 189, rel=0.01)
    assert v["alerts"] == round(run["n_alerts"] * 189)


def test_visit_checks_and_its_own_timeout(monkeypatch):
    """The visit figures are read from the script's report; a full run gets hours."""
    from apdask.tools import bench

    visit = {"workers": 2, "extrapolated": True, "from_ccds": 5, "wall_s": 4000.0,
             "core_s_per_ccd": 8.5, "wall_s_cores_free": 803.2, "peak_rss_GB": 6.5}  # fmt: skip
    report = {"visit_189": [{**visit, "workers": 1, "wall_s": 5000.0}, visit],
              "visit_189_2_workers": visit, "peak_rss_GB": 6.5}  # fmt: skip
    seen = []

    def fake_run(cmd, **kw):
        seen.append(kw["timeout"])
        return subprocess.CompletedProcess(cmd, 0, "log line\n" + json.dumps(report), "")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    full = bench.run_benchmarks(["visit"], timeout=600.0)["benchmarks"]["visit"]
    quick = bench.run_benchmarks(["visit"], quick=True, timeout=600.0)["benchmarks"]["visit"]
    assert seen == [3 * 3600.0, 600.0]
    assert "--warmup 0" in full["command"] and "--ccds 2" in quick["command"]
    checks = {c["label"].strip(): c for c in full["checks"]}
    wall = checks["189-CCD visit wall, 2 workers (extrapolated if fewer CCDs)"]
    assert wall["value"] == 4000.0 and wall["met"] is False and wall["target"] == "<= 300"
    assert checks["peak memory, whole process tree"]["met"] is True
    assert checks["189-CCD visit wall, 1 worker"]["value"] == 5000.0
    assert checks["with a core per worker"]["value"] == 803.2
    assert checks["extrapolated from fewer CCDs"]["value"] is True
