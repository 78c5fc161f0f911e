"""``apdask bench``: runs the scripts in benchmarks/ and reports figures against targets."""

import json
import os
import shutil
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
    # the floors, measured on this machine, and the summary picture beside the JSON
    floors = report["floors"]
    assert floors["shape"] == [4000, 4072]
    assert all(floors[k] > 0 for k in ("rfft2_pair_s", "memory_pass_s", "raw_read_s"))
    png, page = tmp_path / "report.png", tmp_path / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    text = page.read_text()
    assert "data:image/png;base64," in text and "associate 1,000 vs 100,000" in text
    assert "<h2>Floors</h2>" in text and "rfft2_pair_s" in text
    assert "<h2>Peers</h2>" not in text  # the peers benchmark did not run


def _peers_result():
    """A result as run_benchmarks returns it, with a peers report of two stages."""
    rows = {
        "apdask warp": {"stage": "resampling", "tool": "apdask", "status": "ok", "seconds": 0.5},
        "SWarp": {"stage": "resampling", "tool": "SWarp", "status": "ok", "seconds": 1.5,
                  "ratio_to_apdask": 3.0, "quality": {"rms_residual_over_noise": 0.13}},
        "SFFT": {"stage": "subtraction", "tool": "SFFT", "status": "not installed (no sfft)"},
    }  # fmt: skip
    check = {"label": "SWarp / apdask warp", "value": 3.0, "unit": "x", "target": None,
             "met": None}  # fmt: skip
    timed = {"label": "subtraction", "value": 1.2, "unit": "s", "target": "<= 1.5", "met": True}
    return {
        "machine": {"cpus": 2, "load_avg_start": [3.0, 2.0, 1.0]},
        "quick": False,
        "floors": {
            "shape": [4000, 4072],
            "rfft2_pair_s": 0.4,
            "memory_pass_s": 0.02,
            "raw_read_s": 0.05,
        },  # fmt: skip
        "benchmarks": {
            "peers": {"returncode": 0, "report": {"rows": rows}, "checks": [check]},
            "subtract": {"returncode": 0, "report": {"subtract_s": 1.1}, "checks": [timed]},
        },
    }


def test_summary_picture_shows_targets_peers_and_floors(tmp_path):
    from apdask.tools.bench_summary import summary_figure, write_summary

    fig = summary_figure(_peers_result())
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["against the targets", "against peers (bench_peers.py)",
                      "against the floor"]  # fmt: skip
    targets, peers, floor = fig.axes
    assert [t.get_text() for t in targets.get_yticklabels()] == ["subtract: subtraction"]
    assert [p.get_width() for p in targets.patches] == pytest.approx([1.2 / 1.5])
    assert [t.get_text() for t in peers.get_yticklabels()] == [
        "resampling: apdask warp", "resampling: SWarp"]  # fmt: skip
    assert any("not installed (no sfft)" in t.get_text() for t in peers.texts)
    labels = [t.get_text() for t in floor.get_yticklabels()]
    assert labels[:3] == ["floor: rfft2 pair", "floor: memory pass", "floor: read the raw file"]
    assert "subtraction (subtract bench)" in labels and "resampling (peers pair)" in labels
    png, page = write_summary(_peers_result(), tmp_path / "s.png", tmp_path / "s.html")
    text = page.read_text()
    assert "<h2>Peers</h2>" in text and "SWarp" in text and "not installed (no sfft)" in text
    assert png.read_bytes()[:4] == b"\x89PNG"


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
    slow = {"ccd", "cluster", "realpairs", "peers", "visit"}  # minutes; cluster: SLURM
    assert all(not BENCHMARKS[n].default for n in slow)
    assert all(b.default for n, b in BENCHMARKS.items() if n not in slow)


PEER_TOOLS = ("SWarp", "source-extractor", "psfex")
PEERS = ("SWarp", "PSFEx", "ZOGY", "SFFT", "Source Extractor")


def _run_peers_script(tmp_path, path=None, peers_dir=None):
    """bench_peers.py on a 512 × 512 pair with 20 transients, SFFT left out (minutes)."""
    script = find_benchmark_dir() / BENCHMARKS["peers"].script
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent), "MPLBACKEND": "Agg"}
    if path is not None:
        env["PATH"] = path
    args = ["--nx", "512", "--ny", "512", "--transients", "20", "--no-sfft"]
    if peers_dir is not None:
        args += ["--peers-dir", str(peers_dir), "--no-install"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          env=env, timeout=900, check=False, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)["rows"]


def _check_apdask_rows(rows):
    warp, psf = rows["apdask warp"]["quality"], rows["apdask PSF"]["quality"]
    assert warp["rms_residual_over_noise"] < 0.5 and abs(warp["flux_ratio"] - 1) < 0.01
    assert abs(psf["fwhm_error"]) < 0.05  # the true FWHM at the centre is 5.0 px
    sub, det = rows["apdask subtract"]["quality"], rows["apdask detect+measure"]["quality"]
    assert 0.9 < sub["noise_over_propagated"] < 1.1
    assert sub["transients_matched"] >= 18 and det["transients_matched"] >= 18
    assert det["unmatched_detections"] <= 2 and 0.9 < det["median_flux_over_true"] < 1.1


def test_bench_peers_without_the_tools_gives_rows_with_reasons(tmp_path):
    """No SWarp / Source Extractor / PSFEx on PATH, no wheels: a row with the reason each."""
    rows = _run_peers_script(tmp_path, path=os.path.dirname(sys.executable),
                             peers_dir=tmp_path / "none")  # fmt: skip
    _check_apdask_rows(rows)
    assert set(PEERS) <= set(rows)
    assert all(rows[p]["status"] != "ok" and "seconds" not in rows[p] for p in PEERS)
    assert rows["SWarp"]["status"] == "not installed (apt install swarp)"
    assert rows["Source Extractor"]["status"].startswith("not installed")
    assert rows["PSFEx"]["status"].startswith("not installed")
    assert rows["ZOGY"]["status"] == "needs the PSFEx PSFs (PSFEx row)"
    assert rows["SFFT"]["status"] == "not run (--no-sfft)"
    assert not (tmp_path / "none").exists()  # --no-install: nothing was fetched


@pytest.mark.skipif(not all(shutil.which(t) for t in PEER_TOOLS),
                    reason="SWarp, source-extractor and psfex (Debian) not installed")  # fmt: skip
def test_bench_peers_small_pair_with_the_debian_tools(tmp_path):
    """SWarp, Source Extractor, PSFEx (and ZOGY when the wheels are in .cache/peers)."""
    rows = _run_peers_script(tmp_path)
    _check_apdask_rows(rows)
    sw = rows["SWarp"]
    assert sw["status"] == "ok" and sw["ratio_to_apdask"] > 0
    # two Lanczos-3 resamplings of the same pixels onto the same grid agree closely
    assert sw["quality"]["rms_difference_to_apdask_over_noise"] < 0.05
    assert sw["quality"]["rms_residual_over_noise"] < 0.5
    assert abs(rows["PSFEx"]["quality"]["fwhm_error"]) < 0.1
    sex = rows["Source Extractor"]
    assert sex["status"] == "ok" and 10 <= sex["quality"]["transients_matched"] <= 20
    z = rows["ZOGY"]
    if z["status"] == "ok":
        assert 0.8 < z["quality"]["noise_over_propagated"] < 1.25
        assert z["quality"]["transients_matched"] >= 15
    else:
        assert z["status"].startswith("not installed"), z["status"]


@pytest.mark.slow
@pytest.mark.skipif(not all(shutil.which(t) for t in PEER_TOOLS),
                    reason="SWarp, source-extractor and psfex (Debian) not installed")  # fmt: skip
def test_bench_peers_quick_draws_the_peers_panel(tmp_path):
    """``apdask bench --only peers --quick``: the checks and the peers in the picture."""
    out = tmp_path / "report.json"
    assert main(["bench", "--only", "peers", "--quick", "--out", str(out)]) == 0
    b = json.loads(out.read_text())["benchmarks"]["peers"]
    checks = {c["label"]: c["value"] for c in b["checks"]}
    assert checks["SWarp / apdask warp"] > 0 and checks["apdask: transients found"] >= 27
    assert checks["SFFT (numpy) / apdask subtract"] is None  # --quick leaves SFFT out
    text = (tmp_path / "report.html").read_text()
    assert "<h2>Peers</h2>" in text and "not run (--no-sfft)" in text


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
