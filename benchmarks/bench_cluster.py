"""Cost of a night on SLURM: one cluster per visit vs a warm jobqueue pool (issue 17).

Needs a running SLURM (``.ci/setup-slurm.sh``, as root) and simulates a repository of
``--camera`` (``testcam``: 2 small CCDs; ``comcam``: 9 CCDs of 4k x 4k, which need
``--mem`` of about 6GB per one-core job).  Worker jobs have ``--cores-per-job`` cores
(``apdask.submit.cores``; one worker thread per core).  ``--sim-dir`` keeps the
simulated repository for the next run.  Two measurements, printed as one JSON report
with ``/proc/loadavg``:

* **cost**: N consecutive visits (``--visits 1,2,4``), processed one after the other,
  (a) with ``submit_visit(via="jobqueue")``, a new cluster and new worker jobs per visit,
  and (b) on one warm pool (``jobqueue_pool``, ``--jobs`` jobs kept warm), pool start-up
  included.  Wall time and the number of SLURM jobs started (``squeue``, polled).
* **latency**: ``--latency-visits`` visits announced every ``--cadence`` s on a warm pool,
  each visit's images delivered ``--exposure`` s after its nextVisit, the graphs submitted
  without waiting as ``apdask listen`` does: per visit, nextVisit → last alert, image →
  alerts (worst CCD), and whether every prefetch ended before the images arrived.

    .venv/bin/python benchmarks/bench_cluster.py --visits 1,2,4 --latency-visits 3
    .venv/bin/python benchmarks/bench_cluster.py --camera comcam --visits 3 \
        --skip-per-visit --latency-visits 3 --cadence 90 --exposure 30
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, run_visit
from apdask.services.batch import PoolSize, jobqueue_pool, submit_visit


def _loadavg():
    with open("/proc/loadavg") as f:
        return f.read().strip()


class _Jobs:
    """SLURM job ids whose name starts with ``prefix``, newer than the start: polled."""

    def __init__(self, prefix):
        self.prefix, self.ids, self._stop = prefix, set(), threading.Event()
        self.floor = max(self._poll(all_states=True) or {0})
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _poll(self, all_states=False):
        cmd = ["squeue", "-h", "-o", "%i %j", *(["-t", "all"] if all_states else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        return {int(i) for i, name in (line.split(maxsplit=1) for line in out.splitlines())
                if name.startswith(self.prefix) and i.isdigit()}  # fmt: skip

    def _run(self):
        while not self._stop.wait(0.3):
            self.ids |= {i for i in self._poll() if i > self.floor}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.ids |= {i for i in self._poll(all_states=True) if i > self.floor}


def _repo(base, work, name):
    dst = os.path.join(work, name)
    shutil.copytree(base, dst)
    ensure_ppdb(dst)
    return dst


def _visits(repo, n):
    names = sorted(os.listdir(os.path.join(repo, "visits")))[:n]
    return [NextVisit.from_json(os.path.join(repo, "visits", f)) for f in names]


def _per_visit(base, work, n, args):
    repo = _repo(base, work, f"per_visit_{n}")
    t0 = time.monotonic()
    with _Jobs("apdask-") as jobs:
        outs = [submit_visit(nv, "slurm", "jobqueue", repo=repo, memory=args.mem, timeout=60,
                             scheduler_host="127.0.0.1", wait_timeout=args.visit_timeout)
                for nv in _visits(repo, n)]  # fmt: skip
    return {"wall_s": round(time.monotonic() - t0, 2), "jobs": len(jobs.ids),
            "jobs_asked": sum(o["n_jobs"] for o in outs),
            "n_alerts": [o["n_alerts"] for o in outs],
            "per_visit_s": [round(o["wall_s"], 2) for o in outs]}  # fmt: skip


def _pool(args, repo, name):
    size = PoolSize.resolve(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
    return jobqueue_pool("slurm", job_dir=os.path.join(repo, "jobs"), size=size, memory=args.mem,
                         scheduler_host="127.0.0.1", job_name=name)  # fmt: skip


def _peak_rss_gb(client):
    """Each worker process's peak resident memory (GB), to size ``--mem`` by."""

    def peak():
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB

    return sorted(round(v, 2) for v in client.run(peak).values())


def _ccd_alerts(report):
    """Alerts per CCD of a visit report and how its template was warped ("shift": the
    prefetch's warp moved onto the refined WCS, "warp": warped again), to compare runs."""
    return {c["detector"]: [c["n_alerts"], c.get("template_warp", {}).get("method")]
            for c in report["ccds"]}  # fmt: skip


def _wait_warm(client, n, timeout=300):
    deadline = time.monotonic() + timeout
    while len(client.scheduler_info(n_workers=-1)["workers"]) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the pool did not reach {n} workers in {timeout} s")
        time.sleep(0.2)


def _warm_pool(base, work, n, args):
    repo = _repo(base, work, f"pool_{n}")
    name = f"apdask-bench-pool-{os.getpid()}-{n}"
    t0 = time.monotonic()
    with _Jobs(name) as jobs, _pool(args, repo, name) as client:
        _wait_warm(client, args.jobs)
        t_warm = time.monotonic()
        reports = [run_visit(nv, repo=repo, timeout=60, client=client,
                             result_timeout=args.visit_timeout)
                   for nv in _visits(repo, n)]  # fmt: skip
        t_end = time.monotonic()
        peak = _peak_rss_gb(client)
    return {"wall_s": round(t_end - t0, 2), "startup_s": round(t_warm - t0, 2),
            "jobs": len(jobs.ids), "n_alerts": [r["n_alerts"] for r in reports],
            "per_visit_s": [round(r["wall_s"], 2) for r in reports],
            "ccd_alerts": [_ccd_alerts(r) for r in reports],
            "worker_peak_rss_GB": peak}  # fmt: skip


def _hold_back(repo, visit):
    raw, held = os.path.join(repo, "raw"), os.path.join(repo, f"held_{visit}")
    os.makedirs(held)
    names = [n for n in os.listdir(raw) if f"_{visit}_" in n]
    for n in names:
        shutil.move(os.path.join(raw, n), os.path.join(held, n))

    def deliver():
        for n in names:
            shutil.copy(os.path.join(held, n), os.path.join(raw, f".{n}.part"))
            os.replace(os.path.join(raw, f".{n}.part"), os.path.join(raw, n))
        return time.time()

    return deliver


def _latency(base, work, args):
    """Visits announced at a cadence on a warm pool, submitted without waiting (listen)."""
    from distributed import get_task_stream

    from apdask.pipeline.graph import build_visit_graph

    repo = _repo(base, work, "latency")
    ppdb = ensure_ppdb(repo)
    visits = _visits(repo, args.latency_visits)
    deliveries = {nv.visit: _hold_back(repo, nv.visit) for nv in visits}
    name = f"apdask-bench-latency-{os.getpid()}"
    out = []
    with _Jobs(name) as jobs, _pool(args, repo, name) as client, \
            get_task_stream(client) as ts:  # fmt: skip
        _wait_warm(client, args.jobs)
        futures, timers, delivered, t_start = {}, [], {}, time.time()
        for i, nv in enumerate(visits):
            time.sleep(max(0.0, t_start + i * args.cadence - time.time()))
            t_nv = time.time()
            graph = build_visit_graph(nv, repo=repo, ppdb=ppdb, timeout=120)
            futures[nv.visit] = (t_nv, client.compute(graph))
            timer = threading.Timer(args.exposure, lambda v=nv.visit: delivered.update(
                {v: deliveries[v]()}))  # fmt: skip
            timers.append(timer)
            timer.start()
        for visit, (t_nv, fut) in futures.items():
            report = fut.result(timeout=args.visit_timeout)
            done = max(c["alert_written"] for c in report["ccds"])
            out.append({"visit": visit, "n_alerts": report["n_alerts"],
                        "nextvisit_to_done_s": round(done - t_nv, 2),
                        "image_to_alerts_s": round(max(c["latency_s"] for c in report["ccds"]), 2),
                        "ccd_alerts": _ccd_alerts(report),
                        "prefetch_before_images": None})  # fmt: skip
        for t in timers:
            t.join()
        peak = _peak_rss_gb(client)
    for row in out:  # prefetch: calibrations and PPDB history; prewarp: the template's warp
        for step, prefixes in (("prefetch", ("prefetch", "calib-bias", "calib-dark", "calib-flat")),
                               ("prewarp", ("prewarp",))):  # fmt: skip
            starts = tuple(f"{p}-{row['visit']}-" for p in prefixes)
            ends = [s["stop"] for t in ts.data if str(t["key"]).startswith(starts)
                    for s in t["startstops"] if s["action"] == "compute"]  # fmt: skip
            images = delivered[row["visit"]]
            row[f"{step}_before_images"] = bool(ends) and max(ends) < images
            row[f"{step}_end_after_images_s"] = round(max(ends) - images, 2) if ends else None
    return {"cadence_s": args.cadence, "exposure_s": args.exposure, "jobs": len(jobs.ids),
            "worker_peak_rss_GB": peak, "visits": out}  # fmt: skip


_MEMORY = {"testcam": "2GB", "comcam": "6GB"}  # per one-core job; a 4k CCD peaks at ~3 GB


def _simulated(args, work, n_visits):
    """The simulated repository: in ``--sim-dir`` when given (reused), else in ``work``."""
    from apdask.tools.simulate import simulate_repo

    parent = args.sim_dir or work
    base = os.path.join(parent, f"base-{args.camera}-{args.seed}-{n_visits}")
    done = os.path.join(parent, f".base-{args.camera}-{args.seed}-{n_visits}.done")
    if not os.path.exists(done):  # absent or cut short: simulate it afresh
        shutil.rmtree(base, ignore_errors=True)
        simulate_repo(args.camera, base, n_visits=n_visits, seed=args.seed)
        open(done, "w").close()
    return base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--camera", choices=sorted(_MEMORY), default="testcam")
    p.add_argument("--visits", default="1,2,4", help="consecutive visits per cost run")
    p.add_argument("--latency-visits", type=int, default=3)
    p.add_argument("--cadence", type=float, default=15.0, help="seconds between nextVisits")
    p.add_argument("--exposure", type=float, default=5.0, help="nextVisit to images, s")
    p.add_argument("--jobs", type=int, default=2, help="worker jobs of the warm pool")
    p.add_argument("--cores-per-job", type=int, default=1,
                   help="cores (worker threads) per job: apdask.submit.cores")  # fmt: skip
    p.add_argument(
        "--mem",
        default=None,
        help="memory per worker job; default 2GB (testcam), 6GB (comcam) per core",
    )
    p.add_argument(
        "--visit-timeout",
        type=float,
        default=None,
        help="seconds for one visit's result; default 600 (testcam), 1800 (comcam)",
    )
    p.add_argument(
        "--sim-dir", default=None, help="keep the simulated repository here and reuse it next time"
    )
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument(
        "--skip-per-visit",
        action="store_true",
        help="cost: the warm pool only, not one cluster per visit",
    )
    args = p.parse_args(argv)
    if args.mem is None:
        gb = int(_MEMORY[args.camera].removesuffix("GB")) * args.cores_per_job
        args.mem = f"{gb}GB"
    if args.visit_timeout is None:
        args.visit_timeout = 600.0 if args.camera == "testcam" else 1800.0
    counts = [int(x) for x in args.visits.split(",") if x]
    if shutil.which("sbatch") is None:
        sys.exit("bench_cluster: needs SLURM (sbatch on PATH): run .ci/setup-slurm.sh as root")
    import dask.config

    report = {"camera": args.camera, "jobs": args.jobs, "cores_per_job": args.cores_per_job,
              "memory_per_job": args.mem, "loadavg_start": _loadavg(), "cost": [],
              "latency": None}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="apdask-bench-cluster-") as work, \
            dask.config.set({"apdask.submit.cores": args.cores_per_job}):  # fmt: skip
        # the visits this run needs: a seed's visit 1000 differs with the number simulated
        base = _simulated(args, work, max([*([] if args.skip_cost else counts),
                                           args.latency_visits, 1]))  # fmt: skip
        if not args.skip_cost:
            for n in counts:
                per_visit = None if args.skip_per_visit else _per_visit(base, work, n, args)
                report["cost"].append({"visits": n, "per_visit_cluster": per_visit,
                                       "warm_pool": _warm_pool(base, work, n, args),
                                       "loadavg": _loadavg()})  # fmt: skip
                print(json.dumps(report["cost"][-1]), file=sys.stderr, flush=True)
        if args.latency_visits:
            report["latency"] = _latency(base, work, args)
    report["loadavg_end"] = _loadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
