"""Benchmark: a whole simulated LSSTCam visit through the real pipeline (issue 18).

Not a unit test.  For each alert density (``--transients-per-ccd``, with
``--variable-fraction``), simulates (in a subprocess, seed fixed) one LSSTCam visit of
``--ccds`` CCDs (the ones nearest the focal-plane centre; 189 is the whole focal
plane), then, for each worker count in ``--workers``, processes it the way
``apdask process-visit`` does: :func:`apdask.pipeline.run.run_visit` on a
:func:`~apdask.pipeline.run.local_cluster` of that many single-threaded worker
processes, the raws read from the repository (file distributor), a fresh SQLite PPDB
and a file alert sink per run.  Per run:

* ``wall_s``: the visit, graph built to the last CCD's report (``run_visit``'s own
  ``wall_s``); ``cluster_start_s`` apart;
* ``core_s``: CPU time (user + system) of this process and every process under it
  (dask workers, the nanny processes) from just before ``run_visit`` to its return,
  less the memory sampler's own; ``core_s_per_ccd`` divides by the CCDs;
* ``peak_rss_GB``: the summed RSS of the whole process tree, sampled every 50 ms
  (``peak_rss_by_process_GB``: each process's own peak, by role);
* ``n_alerts``, alerts per CCD, and the alerts a 189-CCD visit of this density would
  send (``alerts_per_visit_189``, per-CCD alerts x 189);
* ``task_seconds`` per stage (Dask task stream) and ``/proc/loadavg`` before and after.

With fewer than 189 CCDs, ``visit_189`` extrapolates linearly from the measured
throughput (wall per CCD x 189, core-seconds per CCD; the peak memory as measured,
which a longer visit exceeds: 6.5 GB for 5 CCDs, 9.9 GB for 189, on 2 workers) and
says so (``extrapolated: true``).  ``--warmup N`` (default 1) runs N CCDs first on each cluster
and reports them apart as ``cold``.  Prints one JSON object.  A whole visit needs
~65 GB of free disk: its simulated Butler (24 GB), raws (13 GB) and products (~24 GB,
140 MB per CCD); ``--repo`` keeps the repositories.

    .venv/bin/python benchmarks/bench_visit.py --ccds 189 --workers 1,2
    .venv/bin/python benchmarks/bench_visit.py --ccds 6 --transients-per-ccd 5,40,100,200
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time

import psutil

from apdask.core.camera import get_camera
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import local_cluster, run_visit
from apdask.ppdb import create_ppdb

GB = 1e9
VISIT_CCDS = 189  # LSSTCam science CCDs


def _loadavg():
    with open("/proc/loadavg") as f:
        return f.read().strip()


def _tree(root=None):
    """This process (or ``root``) and every process under it."""
    p = psutil.Process(root)
    return [p, *p.children(recursive=True)]


def _cpu_seconds(procs):
    """{pid: user + system CPU seconds} of live processes."""
    out = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


class _Sampler(threading.Thread):
    """Peak summed RSS of the process tree, sampled; its own CPU time is kept apart."""

    def __init__(self, period=0.05):
        super().__init__(daemon=True)
        self.period, self.peak, self.cpu = period, 0, 0.0
        self.by_process = {}  # {(pid, name): peak RSS}
        self._stop_event = threading.Event()

    def run(self):
        t0 = time.thread_time()
        me = os.getpid()
        while not self._stop_event.is_set():
            rss = 0
            for p in _tree():
                with contextlib.suppress(psutil.Error):
                    r = p.memory_info().rss
                    rss += r
                    key = (p.pid, "driver" if p.pid == me else _role(p))
                    self.by_process[key] = max(self.by_process.get(key, 0), r)
            self.peak = max(self.peak, rss)
            self.cpu = time.thread_time() - t0
            self._stop_event.wait(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()


def _role(proc):
    """``worker`` for the LocalCluster's worker processes (the nannies run in the driver)."""
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "?"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    return "worker" if "spawn_main" in cmd else proc.name()


def _peaks(sampler):
    """Peak RSS (GB) per process of the tree, by role: ``{"driver": x, "worker": [...]}``."""
    out = {}
    for (_, role), rss in sorted(sampler.by_process.items()):
        out.setdefault(role, []).append(round(rss / GB, 3))
    return out


def central_ccds(n):
    """The ``n`` LSSTCam CCDs nearest the focal-plane centre (a compact patch of sky)."""
    dets = list(get_camera("lsstcam"))
    if not 1 <= n <= len(dets):
        raise SystemExit(f"--ccds must be in 1..{len(dets)}, got {n}")
    if n == len(dets):
        return [d.name for d in dets]
    near = {d.name for d in sorted(dets, key=lambda d: (math.hypot(d.fp_x, d.fp_y), d.name))[:n]}
    return [d.name for d in dets if d.name in near]  # camera order


def simulate(repo, ccds, args, transients):
    """Simulate one visit in a subprocess (its memory stays out of the figures); seconds."""
    t0 = time.monotonic()
    if not os.path.exists(os.path.join(repo, "visits")):
        cmd = [sys.executable, "-m", "apdask.cli", "simulate", "--camera", "lsstcam",
               "--repo", repo, "--visits", "1", "--seed", str(args.seed),
               "--transients-per-ccd", str(transients)]  # fmt: skip
        if len(ccds) < VISIT_CCDS:
            cmd += ["--detectors", ",".join(ccds)]
        if args.variable_fraction is not None:
            cmd += ["--variable-fraction", str(args.variable_fraction)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


class _Progress:
    """Each CCD as it ends, one JSON line on stderr: so a run stopped early leaves figures."""

    def __init__(self, sampler, procs, cpu0, t0):
        self.sampler, self.procs, self.cpu0, self.t0, self.n = sampler, procs, cpu0, t0, 0

    def __call__(self, ccd):
        self.n += 1
        cpu = _cpu_seconds(self.procs)
        core_s = sum(cpu.get(p, c) - c for p, c in self.cpu0.items()) - self.sampler.cpu
        line = {"ccd_done": ccd.get("detector"), "n": self.n,
                "elapsed_s": round(time.monotonic() - self.t0, 1), "core_s": round(core_s, 1),
                "peak_rss_GB": round(self.sampler.peak / GB, 3), "loadavg": _loadavg()}  # fmt: skip
        print(json.dumps(line), file=sys.stderr, flush=True)


def _measured(fn):
    """Call ``fn(progress)``; its result, wall seconds, core-seconds and peak RSS of the tree."""
    sampler = _Sampler()
    procs = _tree()
    cpu0 = _cpu_seconds(procs)
    sampler.start()
    t0 = time.monotonic()
    try:
        result = fn(_Progress(sampler, procs, cpu0, t0))
    finally:
        wall = time.monotonic() - t0
        cpu1 = _cpu_seconds(procs)
        sampler.stop()
    core_s = sum(cpu1.get(p, c) - c for p, c in cpu0.items()) - sampler.cpu
    return result, wall, core_s, sampler.peak / GB, _peaks(sampler)


def process(repo, nv, workers, run_dir, warmup):
    """One ``process-visit`` run on ``workers`` worker processes: its figures.

    With ``warmup`` > 0, the first ``warmup`` CCDs run alone first on the same cluster
    (the workers' first-use costs: imports, numba kernels, PPDB open) and are reported
    apart as ``cold``; the figures are the remaining CCDs'.
    """
    os.makedirs(run_dir)
    ppdb = create_ppdb(f"sqlite:///{run_dir}/apdb.db", os.path.join(run_dir, "apdb.yaml"))
    sink = f"file://{run_dir}/alerts"
    load0 = _loadavg()
    t0 = time.monotonic()
    dets = list(nv.detectors)
    cold = None
    with local_cluster(n_workers=workers, threads_per_worker=1) as client:
        client.wait_for_workers(workers, timeout=300)
        start_s = time.monotonic() - t0

        def run(which, progress):
            return run_visit(nv, repo=repo, ppdb=ppdb, alerts=sink, client=client,
                             detectors=which, result_timeout=7200, on_ccd=progress)  # fmt: skip

        if 0 < warmup < len(dets):
            rep, wall, core_s, peak, _ = _measured(lambda pr: run(dets[:warmup], pr))
            cold = {"ccds": warmup, "n_alerts": rep["n_alerts"], "wall_s": round(wall, 2),
                    "core_s": round(core_s, 2), "peak_rss_GB": round(peak, 3)}  # fmt: skip
            dets = dets[warmup:]
        report, _, core_s, peak, peaks = _measured(lambda pr: run(dets, pr))
    n = len(report["ccds"])
    failed = [c["detector"] for c in report["ccds"] if c.get("error")]
    stages = report.get("task_seconds") or {}
    return {
        "workers": workers,
        "ccds": n,
        "cold": cold,
        "failed": failed,
        "n_alerts": report["n_alerts"],
        "alerts_per_ccd": report["n_alerts"] / n,
        "alerts_per_visit_189": round(report["n_alerts"] / n * VISIT_CCDS),
        "wall_s": round(report["wall_s"], 2),
        "wall_s_per_ccd": round(report["wall_s"] / n, 3),
        "cluster_start_s": round(start_s, 2),
        "core_s": round(core_s, 2),
        "core_s_per_ccd": round(core_s / n, 3),
        "peak_rss_GB": round(max(peak, cold["peak_rss_GB"] if cold else 0.0), 3),
        "peak_rss_by_process_GB": peaks,
        "task_seconds_per_ccd": {k: round(v / n, 3) for k, v in stages.items()},
        "loadavg_before": load0,
        "loadavg_after": _loadavg(),
    }


def visit_189(run):
    """A whole visit's figures from one run: measured at 189 CCDs, else extrapolated.

    Extrapolated: the cold CCDs' wall plus the measured CCDs' wall per CCD for the rest
    (cluster start not included, as in ``wall_s``); core-seconds per CCD the measured
    (warm) CCDs'; peak memory as measured.  ``wall_s_cores_free``: 189 CCDs' measured
    core-seconds spread over the workers, the wall on a machine with a core per worker.
    """
    cold = run["cold"] or {"ccds": 0, "wall_s": 0.0}
    n = run["ccds"] + cold["ccds"]
    wall = cold["wall_s"] + run["wall_s_per_ccd"] * (VISIT_CCDS - cold["ccds"])
    return {
        "workers": run["workers"],
        "extrapolated": n < VISIT_CCDS,
        "from_ccds": n,
        "wall_s": round(run["wall_s"] + cold["wall_s"] if n >= VISIT_CCDS else wall, 1),
        "core_s_per_ccd": run["core_s_per_ccd"],
        # on a loaded machine the wall is the load's: this is the wall the measured
        # core-seconds would take with every worker on a core of its own
        "wall_s_cores_free": round(run["core_s_per_ccd"] * VISIT_CCDS / run["workers"], 1),
        "peak_rss_GB": run["peak_rss_GB"],
        "alerts": run["alerts_per_visit_189"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ccds",
        type=int,
        default=VISIT_CCDS,
        help="CCDs per visit, nearest the centre first (default 189: all)",
    )
    p.add_argument(
        "--transients-per-ccd",
        default="40",
        help="comma-separated densities, one simulated visit each (default 40, "
        "the simulator's: about 13,800 alerts per 189-CCD visit)",
    )
    p.add_argument(
        "--variable-fraction",
        type=float,
        help="fraction of stars that vary (simulator default 0.03)",
    )
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="CCDs run first on each cluster and reported apart as cold (default 1; "
        "0 measures the visit as one batch)",
    )
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--repo", help="keep the simulated repositories here (reused if present)")
    args = p.parse_args(argv)  # fmt: skip
    densities = [int(x) for x in args.transients_per_ccd.split(",") if x]
    workers = [int(x) for x in args.workers.split(",") if x]
    ccds = central_ccds(args.ccds)
    report = {"camera": "lsstcam", "ccds": len(ccds), "warmup": args.warmup, "seed": args.seed,
              "variable_fraction": args.variable_fraction, "cpus": os.cpu_count(),
              "loadavg_start": _loadavg(), "densities": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="apdask-bench-visit-") as tmp:
        base = args.repo or tmp
        for k, density in enumerate(densities):
            vf = "" if args.variable_fraction is None else f"_v{args.variable_fraction:g}"
            repo = os.path.join(base, f"lsstcam_{len(ccds)}ccd_t{density}{vf}_s{args.seed}")
            sim_s = simulate(repo, ccds, args, density)
            (visit_file,) = sorted(os.listdir(os.path.join(repo, "visits")))
            nv = NextVisit.from_json(os.path.join(repo, "visits", visit_file))
            row = {"transients_per_ccd": density, "simulate_s": round(sim_s, 1), "runs": []}
            for w in workers:
                run = process(repo, nv, w, os.path.join(tmp, f"run_{k}_{w}"), args.warmup)
                row["runs"].append(run)
                print(json.dumps({"transients_per_ccd": density, **run}), file=sys.stderr,
                      flush=True)  # fmt: skip
            report["densities"].append(row)
    # the headline: the simulator's default density if measured, else the first; most workers
    rows = report["densities"]
    head = next((r for r in rows if r["transients_per_ccd"] == 40), rows[0])
    report["visit_189"] = [visit_189(r) for r in head["runs"]]
    report["visit_189_2_workers"] = next(
        (v for v in report["visit_189"] if v["workers"] == 2), report["visit_189"][-1]
    )
    report["per_ccd_cost_by_density"] = [
        {"transients_per_ccd": r["transients_per_ccd"], "workers": run["workers"],
         "alerts_per_visit_189": run["alerts_per_visit_189"],
         "core_s_per_ccd": run["core_s_per_ccd"], "wall_s_per_ccd": run["wall_s_per_ccd"]}
        for r in rows for run in r["runs"]
    ]  # fmt: skip
    report["peak_rss_GB"] = max(run["peak_rss_GB"] for r in rows for run in r["runs"])
    report["loadavg_end"] = _loadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
