"""Benchmark: one full-size LSSTCam CCD, image registered → alerts, through the real pipeline.

Not a unit test.  Simulates (in a subprocess, seed fixed) a small LSSTCam repository
with one CCD (default R22_S11) and ``--warmup + --arrivals`` visits, starts the HTTP
distributor (``apdask distributor serve`` on a free loopback port) and, with
``kafka`` among ``--sinks``, a tansu broker.  Then, per arrival and per sink:

1. :func:`apdask.pipeline.run.run_visit` -- what ``apdask process-ccd`` calls: the
   same graph (``apdask.pipeline.graph``), tasks and outputs, on the threaded
   scheduler (``--scheduler distributed``: a 2-worker LocalCluster, as
   ``process-visit`` / ``listen``) -- starts in a thread with the image not yet
   registered, so its fetch task waits at the distributor;
2. once the prefetch task has finished (templates, calibrations, refcat, PPDB
   history), and ``--gap`` seconds later, the raw is uploaded (``PUT``) and registered;
3. latency is the CCD report's ``latency.arrival_to_alerts_s``: the distributor's
   registration time to the alerts written (file sink) or acknowledged (Kafka).

Core-seconds per CCD are the CPU time (user + system) of every process involved
from the start of ``run_visit`` to its return, prefetch included: this process
(less the memory sampler), dask worker processes, the distributor server and the
broker; not the uploading process (the camera's side).  Peak RSS is sampled every
20 ms (this process plus dask workers) and is at least this process's ``ru_maxrss``.
Stage seconds are the report's timings and the seconds of each task, by task name.
The first ``--warmup`` arrival of each series (numba's disk cache loaded, or the
kernels compiled on a fresh checkout; lazy imports; first PPDB open) is reported
as ``cold`` and not counted.  Unless ``--no-startup``: what a batch ``process-ccd``
pays before any pixel (interpreter and imports, PPDB open and region read, a
LocalCluster start) and whole batch runs, numba's disk cache warm and (unless
``--no-cold-compile``) empty.  ``--py-spy FILE`` samples the measured
arrivals of the first series with py-spy (not a dependency: ``pip install py-spy``)
and adds the top functions to the report.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _broker import tansu  # noqa: E402  (benchmarks/_broker.py)
from dask.callbacks import Callback  # noqa: E402
from dask.utils import key_split  # noqa: E402

from apdask.io.distributor import TOKEN_ENV  # noqa: E402
from apdask.pipeline.nextvisit import NextVisit  # noqa: E402
from apdask.pipeline.run import local_cluster, run_visit  # noqa: E402
from apdask.ppdb import create_ppdb  # noqa: E402

TOKEN = "bench-ccd-token"
GB = 1e9


# the tasks that run before the image exists (apdask.pipeline.graph)
PREFETCH_TASKS = ("prefetch", "prewarp", "calib-bias", "calib-dark", "calib-flat")


class _TaskClock(Callback):
    """Per task name under the threaded scheduler: seconds, CPU seconds and time span.

    The process's CPU time between two scheduler events is shared equally among the
    tasks running then (numba's and zarr's pool threads included; a fetch, which
    mostly waits, only when it runs alone); CPU time while no task runs goes to
    ``(between tasks)``.  Also sets an event when prefetch is done: the ``prefetch``
    task (refcat, PPDB history), the ``calib-*`` tasks (master calibrations) and the
    ``prewarp`` task (the template warped on the predicted WCS, its PSF).
    """

    def __init__(self):
        super().__init__()
        self.started, self.seconds = {}, defaultdict(float)
        self.cpu, self.span = defaultdict(float), {}
        self.prefetched = threading.Event()
        self._prefetch_left = set(PREFETCH_TASKS)
        self._cpu_mark = time.process_time()

    def _share_cpu(self):
        now = time.process_time()
        running = [key_split(k) for k in self.started]
        # a fetch waiting at the distributor uses no CPU: it gets a share only alone
        running = [n for n in running if n != "fetch"] or running or ["(between tasks)"]
        for name in running:
            self.cpu[name] += (now - self._cpu_mark) / len(running)
        self._cpu_mark = now

    def _pretask(self, key, dsk, state):
        self._share_cpu()
        self.started[key] = (time.perf_counter(), time.time())

    def _posttask(self, key, result, dsk, state, id):
        self._share_cpu()
        name = key_split(key)
        t0, wall0 = self.started.pop(key, (time.perf_counter(), time.time()))
        self.seconds[name] += time.perf_counter() - t0
        lo, hi = self.span.get(name, (wall0, 0.0))
        self.span[name] = (min(lo, wall0), max(hi, time.time()))
        self._prefetch_left.discard(name)
        if not self._prefetch_left:
            self.prefetched.set()

    def timeline(self, registered):
        """``[start, end]`` of each task name after ``registered`` (Unix s), in order."""
        rows = sorted((lo, hi, n) for n, (lo, hi) in self.span.items() if hi > registered)
        return {n: [round(max(lo - registered, 0.0), 3), round(hi - registered, 3)]
                for lo, hi, n in rows}  # fmt: skip


class _Sampler(threading.Thread):
    """Peak summed RSS of the pipeline processes, sampled; its own CPU time is kept apart."""

    def __init__(self, pids, period=0.02):
        super().__init__(daemon=True)
        self.pids, self.period, self.peak, self.cpu = pids, period, 0, 0.0
        self._stop_event = threading.Event()

    def run(self):
        t0 = time.thread_time()
        procs = {}
        while not self._stop_event.is_set():
            rss = 0
            for pid in self.pids:
                with contextlib.suppress(psutil.Error):
                    rss += procs.setdefault(pid, psutil.Process(pid)).memory_info().rss
            self.peak = max(self.peak, rss)
            self.cpu = time.thread_time() - t0
            self._stop_event.wait(self.period)

    def stop(self):
        self._stop_event.set()
        self.join()


def _cpu_seconds(pid):
    with contextlib.suppress(psutil.Error):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    return 0.0


def _stats(values):
    v = np.asarray([x for x in values if x is not None], float)
    if not len(v):
        return None
    return {"median": float(np.median(v)), "p95": float(np.percentile(v, 95)),
            "min": float(v.min()), "max": float(v.max()), "n": int(len(v))}  # fmt: skip


@contextlib.contextmanager
def _distributor(root):
    env = {**os.environ, TOKEN_ENV: TOKEN}
    cmd = [sys.executable, "-m", "apdask.cli", "distributor", "serve", "--root", root,
           "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().split(" at ")[-1].strip()
        if not url.startswith("http://"):
            raise RuntimeError(f"the distributor did not start (exit {proc.poll()})")
        yield proc.pid, url
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


def simulate(args, repo):
    """Simulate the repository in a subprocess (its memory stays out of the figures)."""
    n = args.warmup + args.arrivals
    if not glob.glob(os.path.join(repo, "visits", "visit_*.json")):
        cmd = [sys.executable, "-m", "apdask.cli", "simulate", "--camera", args.camera,
               "--repo", repo, "--visits", str(n), "--seed", str(args.seed),
               "--detectors", args.detector]  # fmt: skip
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    visits = sorted(glob.glob(os.path.join(repo, "visits", "visit_*.json")))
    if len(visits) < n:
        raise SystemExit(f"{repo} has {len(visits)} visits; --warmup + --arrivals needs {n}")
    return [NextVisit.from_json(v) for v in visits[:n]]


def _prefetched(clock, client, keys, timeout):
    """Block until the CCD's prefetch tasks (``keys``) have finished; False on timeout."""
    if client is None:
        return clock.prefetched.wait(timeout)

    def states(dask_scheduler, keys=tuple(keys)):
        return [getattr(dask_scheduler.tasks.get(k), "state", None) for k in keys]

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s == "memory" for s in client.run_on_scheduler(states)):
            return True
        time.sleep(0.02)
    return False


def arrival(nv, env, series, client):
    """One CCD: prefetch, then register its raw, and wait for its alerts."""
    det = nv.detectors[0]
    name = nv.image_names(det)[0]
    services = list(env["services"].values())
    pids = [os.getpid()] + [p.pid for p in psutil.Process().children(recursive=True)
                            if p.pid not in services]  # dask workers  # fmt: skip
    sampler = _Sampler(pids)
    uploader = _uploader(env["url"], name, os.path.join(env["repo"], "raw", name))
    cpu0 = {p: _cpu_seconds(p) for p in [*pids, *services]}
    clock, out = _TaskClock(), {}
    sampler.start()

    def run():
        try:
            with clock:
                out["report"] = run_visit(
                    nv, repo=env["repo"], ppdb=series["ppdb"], alerts=series["sink"],
                    distributor=env["url"], timeout=120.0, client=client,
                    images={det: [name]},
                )  # fmt: skip
        except BaseException as e:  # reported by the main thread
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    keys = [f"{n}-{nv.visit}-{det}" for n in PREFETCH_TASKS]
    if not _prefetched(clock, client, keys, 300.0):
        raise RuntimeError(f"prefetch of visit {nv.visit} did not finish in 300 s")
    time.sleep(env["gap"])
    uploader.communicate("go\n", timeout=300)
    if uploader.returncode != 0:
        raise RuntimeError(f"the upload of {name} failed (exit {uploader.returncode})")
    th.join()
    sampler.stop()
    if "error" in out:
        raise out["error"]
    cpu = {p: _cpu_seconds(p) - cpu0[p] for p in cpu0}
    return _arrival_figures(nv, out["report"], cpu, env, sampler, clock)


def _uploader(url, name, path):
    """The camera's side, a process of its own (not counted): uploads on a line on stdin."""
    code = (
        "import sys; from apdask.io.distributor import HttpDistributor; "
        f"c = HttpDistributor({url!r}); sys.stdin.readline(); "
        f"c.put({name!r}, {path!r}, token={TOKEN!r})"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, text=True)


def _arrival_figures(nv, report, cpu, env, sampler, clock):
    ccd = report["ccds"][0]
    if ccd.get("error"):
        raise RuntimeError(f"visit {nv.visit}: {ccd['error']}")
    lat = ccd["latency"]
    services = env["services"]
    pipeline = sum(v for p, v in cpu.items() if p not in services.values())
    pipeline -= sampler.cpu
    parts = {"pipeline": pipeline, **{k: cpu.get(p, 0.0) for k, p in services.items()}}
    return {
        "visit": nv.visit,
        "n_alerts": ccd["n_alerts"],
        "alerts_delivered": ccd.get("alerts_delivered"),
        "latency_s": lat["arrival_to_alerts_s"],
        "registered_to_fetched_s": lat["image_fetched"] - lat["image_registered"],
        "fetched_to_written_s": lat["alerts_written"] - lat["image_fetched"],
        "core_s": sum(parts.values()),
        "core_s_parts": parts,
        "peak_rss_GB": sampler.peak / GB,
        "timings": ccd["timings"],
        "task_seconds": report.get("task_seconds") or dict(clock.seconds),
        "task_cpu_s": dict(clock.cpu),
        "timeline_s": clock.timeline(lat["image_registered"]),
        "wall_s": report["wall_s"],
        "load_avg": os.getloadavg(),
    }


def run_series(sink, visits, args, env, tmp, client):
    """Warm-up plus measured arrivals into a fresh SQLite PPDB and one sink."""
    d = os.path.join(tmp, sink)
    os.makedirs(d)
    series = {"ppdb": create_ppdb(f"sqlite:///{d}/apdb.db", os.path.join(d, "apdb.yaml"))}
    if sink == "kafka":
        from apdask.services import kafka

        topic = f"bench-ccd-{os.getpid()}"
        kafka.ensure_topic(env["bootstrap"], topic, partitions=1)
        series["sink"] = f"kafka://{env['bootstrap']}/{topic}?spool_dir={d}/spool"
    else:
        series["sink"] = f"file://{d}/alerts"
    # A distributor of its own: the image names of the series before are registered there.
    with _distributor(os.path.join(d, "dist")) as (env["services"]["distributor"], env["url"]):
        cold = [arrival(nv, env, series, client) for nv in visits[: args.warmup]]
        spy = None
        if args.py_spy and not env.get("profiled"):
            spy = _start_py_spy(args.py_spy, subprocesses=client is not None)
        measured = [arrival(nv, env, series, client) for nv in visits[args.warmup :]]
    out = {"cold": cold, "arrivals": measured}
    if spy is not None:
        env["profiled"] = True
        out["profile"] = _stop_py_spy(spy, args.py_spy)
    return _summarise(out)


def _summarise(out):
    a = out["arrivals"]
    out["latency_s"] = _stats(r["latency_s"] for r in a)
    out["fetched_to_written_s"] = _stats(r["fetched_to_written_s"] for r in a)
    out["registered_to_fetched_s"] = _stats(r["registered_to_fetched_s"] for r in a)
    out["core_s"] = _stats(r["core_s"] for r in a)
    out["peak_rss_GB"] = max(r["peak_rss_GB"] for r in [*a, *out["cold"]])
    for key in ("timings", "task_seconds", "task_cpu_s", "core_s_parts"):
        names = sorted({k for r in a for k in r[key]})
        med = {k: float(np.median([r[key].get(k, 0.0) for r in a])) for k in names}
        out[key] = dict(sorted(med.items(), key=lambda kv: -kv[1]))
    return out


def _start_py_spy(path, subprocesses):
    exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(exe):
        raise SystemExit("--py-spy needs py-spy: pip install py-spy (not an apdask dependency)")
    more = ["--subprocesses"] if subprocesses else []
    cmd = [exe, "record", "--pid", str(os.getpid()), "--format", "raw", "--output", path,
           "--rate", "100", "--nonblocking", *more]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # attached
    return proc


def _stop_py_spy(proc, path, top=30):
    proc.send_signal(signal.SIGINT)
    proc.wait(60)
    proc.stderr.close()
    incl, own, total = defaultdict(int), defaultdict(int), 0
    with open(path) as fh:
        for line in fh:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += int(n)
            for f in set(frames):
                incl[f] += int(n)
            own[frames[-1]] += int(n)
    rate = 100.0

    def best(d):
        return [[f, round(n / rate, 2)] for f, n in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {"file": path, "sampled_s": total / rate, "inclusive_s": best(incl), "self_s": best(own)}


def startup(args, visits, tmp, repo):
    """What a batch ``process-ccd`` pays besides the pixels, and one whole batch run."""
    py = sys.executable

    def timed(code):
        t0 = time.perf_counter()
        out = subprocess.run([py, "-c", code], check=True, capture_output=True, text=True)
        return time.perf_counter() - t0, out

    interp = min(timed("pass")[0] for _ in range(3))
    imp = min(timed("import apdask.cli.run")[0] for _ in range(3)) - interp
    itime = subprocess.run([py, "-X", "importtime", "-c", "import apdask.cli.run"],
                           check=True, capture_output=True, text=True)  # fmt: skip
    nv = visits[0]
    d = os.path.join(tmp, "startup")
    os.makedirs(d)
    cfg = create_ppdb(f"sqlite:///{d}/apdb.db", os.path.join(d, "apdb.yaml"))
    ppdb_code = (
        "import json,time; t0=time.perf_counter(); from apdask.ppdb import Ppdb; "
        "t1=time.perf_counter(); from apdask.core.camera import get_camera; "
        f"det=get_camera({nv.instrument!r})[{nv.detectors[0]!r}]; "
        f"db=Ppdb.for_ccd({cfg!r}, det, {nv.ra!r}, {nv.dec!r}, {nv.rotationAngle!r}); "
        f"t2=time.perf_counter(); db.read({nv.mjd!r}); t3=time.perf_counter(); "
        "print(json.dumps({'import_s': t1-t0, 'open_s': t2-t1, 'region_read_s': t3-t2}))"
    )
    ppdb = json.loads(timed(ppdb_code)[1].stdout)
    t0 = time.perf_counter()
    with local_cluster(n_workers=2):
        t1 = time.perf_counter()
    out = {
        "interpreter_s": interp,
        "import_apdask_cli_run_s": imp,
        "largest_imports_s": _importtime(itime.stderr),
        "ppdb": ppdb,
        "local_cluster_2_workers": {"start_s": t1 - t0, "stop_s": time.perf_counter() - t1},
        "batch_process_ccd": _batch_process_ccd(nv, os.path.join(tmp, "batch"), repo, {}),
    }
    if not args.no_cold_compile:  # numba's disk cache empty: every kernel compiled
        numba_dir = {"NUMBA_CACHE_DIR": os.path.join(tmp, "numba-empty")}
        cold = _batch_process_ccd(nv, os.path.join(tmp, "batch-cold"), repo, numba_dir)
        out["batch_process_ccd_numba_cold"] = cold
    out["load_avg"] = os.getloadavg()
    return out


def _importtime(stderr, top=15):
    """Import seconds of ``python -X importtime`` by top-level package (own times summed)."""
    own = defaultdict(float)
    for line in stderr.splitlines():
        if not line.startswith("import time:") or line.count("|") != 2:
            continue
        head, _, name = line.split("|")
        us = head.rsplit(":", 1)[1].strip()
        if us.isdigit():
            own[name.strip().split(".")[0]] += int(us) / 1e6
    return {k: round(v, 3) for k, v in sorted(own.items(), key=lambda kv: -kv[1])[:top]}


def _batch_process_ccd(nv, d, repo, env):
    """``apdask process-ccd`` as a fresh process (a fresh PPDB), image already in place."""
    os.makedirs(d)
    cfg = create_ppdb(f"sqlite:///{d}/apdb.db", os.path.join(d, "apdb.yaml"))
    det = nv.detectors[0]
    cmd = [sys.executable, "-m", "apdask.cli", "process-ccd", "--repo", repo, "--ccd", det,
           "--ra", repr(nv.ra), "--dec", repr(nv.dec), "--filter", nv.filters, "--exptime",
           repr(nv.duration), "--distributor", f"file://{repo}/raw", "--image",
           nv.image_names(det)[0], "--ppdb", cfg, "--alerts", f"file://{d}/alerts"]  # fmt: skip
    t0 = time.time()
    with open(os.path.join(d, "report.json"), "w") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.DEVNULL, env={**os.environ, **env}
        )
        sampler = _Sampler([proc.pid])  # wait4's ru_maxrss would include this process's
        sampler.start()
        _, status, ru = os.wait4(proc.pid, 0)
        sampler.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    with open(os.path.join(d, "report.json")) as fh:
        ccd = json.load(fh)["ccds"][0]
    lat = ccd["latency"]
    return {
        "exit_code": proc.returncode,
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_GB": sampler.peak / GB,
        "start_to_fetched_s": lat["image_fetched"] - t0,
        "fetched_to_written_s": lat["alerts_written"] - lat["image_fetched"],
        "written_to_exit_s": t0 + wall - lat["alerts_written"],
        "timings": ccd["timings"],
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--camera", default="lsstcam", help="simulated camera (default %(default)s)")
    p.add_argument("--detector", default="R22_S11", help="CCD (default %(default)s)")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--arrivals", type=int, default=5, help="measured CCDs per sink (>= 1)")
    p.add_argument("--warmup", type=int, default=1, help="cold arrivals first, not counted")
    p.add_argument("--sinks", default="file,kafka", help="file and/or kafka (tansu)")
    p.add_argument(
        "--scheduler",
        choices=("threads", "distributed"),
        default="threads",
        help="threads: as process-ccd; distributed: 2-worker LocalCluster",
    )
    p.add_argument("--gap", type=float, default=1.0, help="s from prefetch done to the upload")
    p.add_argument("--repo", help="simulated repository to use (created if empty)")
    p.add_argument("--no-startup", action="store_true", help="skip the batch start-up figures")
    p.add_argument(
        "--no-cold-compile",
        action="store_true",
        help="skip the batch run with an empty numba cache (~15 s of compiling)",
    )
    p.add_argument("--py-spy", metavar="FILE", help="py-spy raw profile of the first series")
    args = p.parse_args(argv)
    sinks = [s.strip() for s in args.sinks.split(",") if s.strip()]
    if args.arrivals < 1 or not sinks or set(sinks) - {"file", "kafka"}:
        p.error("--arrivals must be >= 1 and --sinks a list of file, kafka")
    report = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                          "load_avg_start": os.getloadavg()},
              "config": {k: v for k, v in vars(args).items() if k != "py_spy"}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench-ccd-") as tmp:
        os.environ["XDG_CACHE_HOME"] = os.path.join(tmp, "cache")  # the HTTP client's cache
        os.makedirs(os.environ["XDG_CACHE_HOME"])
        repo = os.path.abspath(args.repo or os.path.join(tmp, "repo"))
        t0 = time.perf_counter()
        visits = simulate(args, repo)
        report["simulate_s"] = time.perf_counter() - t0
        with contextlib.ExitStack() as stack:
            env = {"repo": repo, "gap": args.gap, "services": {}}
            if "kafka" in sinks:
                env["services"]["broker"], env["bootstrap"] = stack.enter_context(tansu())
            client = None
            if args.scheduler == "distributed":
                client = stack.enter_context(local_cluster(n_workers=2))
            report["series"] = {}
            for sink in sinks:
                report["series"][sink] = run_series(sink, visits, args, env, tmp, client)
        if not args.no_startup:
            report["startup"] = startup(args, visits, tmp, repo)
    _headline(report)
    print(json.dumps(report, indent=1))


def _headline(report):
    """The figures with targets, at the top level (file sink first)."""
    series = report["series"]
    first = series.get("file") or next(iter(series.values()))
    report["latency_s"] = first["latency_s"]
    report["latency_kafka_s"] = series["kafka"]["latency_s"] if "kafka" in series else None
    report["core_s_per_ccd"] = first["core_s"]
    report["stage_seconds"] = first["timings"]
    report["task_seconds"] = first["task_seconds"]
    self_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    report["peak_rss_GB"] = max(self_max, *(s["peak_rss_GB"] for s in series.values()))
    report["machine"]["load_avg_end"] = os.getloadavg()


if __name__ == "__main__":
    main()
