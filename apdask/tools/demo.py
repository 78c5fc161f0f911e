"""``apdask demo``: the main job on embedded defaults.

Simulates a seeded ComCam repository under ``./apdask-demo`` if none is there,
processes every simulated visit through the visit graph on a LocalCluster with an
SQLite PPDB and Avro-file alerts, and prints a short report.  Running it again is
safe: CCDs already in the PPDB (with their alert file) are skipped.
"""

from __future__ import annotations

import glob
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from apdask.alerts.sinks import read_alerts
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, local_cluster, run_visit
from apdask.tools.evaluate import load_truth, match_truth
from apdask.tools.progress import VisitProgress, compile_note, write_report
from apdask.tools.simulate import simulate_repo

__all__ = ["run_demo"]


def _alerts_of_visit(alert_root, visit):
    path = os.path.join(alert_root, f"visit_{visit}")
    return read_alerts(path) if os.path.isdir(path) else []


def run_demo(
    directory: str | os.PathLike[str] = "apdask-demo",
    *,
    camera: str = "comcam",
    n_visits: int = 3,
    seed: int = 42,
    workers: int = 2,
    out: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Run the demo and return its report.

    Parameters
    ----------
    directory : str
        Working directory; it becomes the Butler repository.
    camera : str
        Camera to simulate when the directory holds no repository.
    n_visits : int
        Visits to simulate.
    seed : int
        Simulation seed.
    workers : int
        LocalCluster worker processes.
    out : callable
        Where report lines go.

    Returns
    -------
    dict
        Per-visit alerts, timings and recovered fractions.
    """
    repo = os.path.abspath(directory)
    t0 = time.time()
    if not os.path.exists(os.path.join(repo, "butler.zarr")):
        out(f"simulating a {camera} repository with {n_visits} visits in {repo} ...")
        simulate_repo(camera, repo, n_visits=n_visits, seed=seed, progress=_stderr)
    t_sim = time.time() - t0
    ppdb = ensure_ppdb(repo)
    alert_root = os.path.join(repo, "alerts")
    files = sorted(glob.glob(os.path.join(repo, "visits", "visit_*.json")))
    report: dict[str, Any] = {"repo": repo, "simulate_s": t_sim, "visits": []}
    note = compile_note()
    if note:
        _stderr(note)
    with local_cluster(n_workers=workers) as client:
        report["dashboard"] = client.dashboard_link
        out(f"Dask dashboard: {client.dashboard_link}")
        for f in files:
            nv = NextVisit.from_json(f)
            progress = VisitProgress(nv.visit, len(nv.detectors))
            rep = run_visit(nv, repo=repo, ppdb=ppdb, alerts=f"file://{alert_root}",
                            client=client, on_ccd=progress)  # fmt: skip
            alerts = _alerts_of_visit(alert_root, nv.visit)
            m = match_truth(load_truth(repo, nv.visit), [a["diaSource"] for a in alerts])
            report["visits"].append(
                {
                    "visit": nv.visit,
                    "ccds_processed": len(rep["ccds"]),
                    "ccds_skipped": len(rep["skipped"]),
                    "alerts": len(alerts),
                    "wall_s": rep["wall_s"],
                    "task_seconds": rep["task_seconds"],
                    "transients": m["n_truth"],
                    "recovered": m["n_recovered"],
                    "recovered_fraction": m["fraction"],
                }
            )
    report["wall_s"] = time.time() - t0
    report["report_path"] = write_report(report, os.path.join(repo, "demo-report.json"))
    _print(report, out)
    return report


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _print(report, out):
    out(f"apdask demo: {report['repo']}  (total {report['wall_s']:.1f} s)")
    for v in report["visits"]:
        status = f"{v['ccds_processed']} CCDs processed, {v['ccds_skipped']} already done"
        out(
            f"  visit {v['visit']}: {v['alerts']} alerts; {status}; "
            f"transients recovered {v['recovered']}/{v['transients']} "
            f"({100 * v['recovered_fraction']:.0f}%); wall {v['wall_s']:.1f} s"
        )
        if v["task_seconds"]:
            top = ", ".join(f"{k} {s:.1f}s" for k, s in list(v["task_seconds"].items())[:8])
            out(f"    task seconds by stage: {top}")
    out("alerts: " + os.path.join(report["repo"], "alerts"))
    out(
        "difference images: "
        + os.path.join(report["repo"], "products")
        + "  (apdask.io.butler.Butler(repo).get('difference', visit=..., detector=...))"
    )
    out("full report (JSON): " + report["report_path"])
