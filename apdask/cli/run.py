"""Commands that run the pipeline: process-ccd, -visit, -calib, listen, submit, demo."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import threading
import time

from apdask import config
from apdask.cli.common import check_workers, partial_failure_code, repo_camera
from apdask.config import Locations
from apdask.core import jsonsafe
from apdask.core.camera import check_band, check_pointing
from apdask.exceptions import UsageError
from apdask.io.distributor import check_image_for_ccd, open_distributor
from apdask.io.raw import read_raw
from apdask.io.raw_header import check_raw_header
from apdask.pipeline.calib import process_calib
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import local_cluster, run_visit
from apdask.pipeline.warm import warm_kernels
from apdask.services.batch import open_client, submit_visit
from apdask.services.listen import listen
from apdask.tools.demo import run_demo
from apdask.tools.progress import VisitProgress, compile_note, visit_table, write_report

#: ``apdask listen`` stopped by a signal with visits abandoned (docs/errors.md).
EX_TEMPFAIL = 75


def process_ccd_command(args):
    """``apdask process-ccd``: the DMTN-092 per-CCD invocation."""
    where = Locations.resolve(
        args.repo, ppdb=args.ppdb, alerts=args.alerts, distributor=args.distributor,
        timeout=args.timeout,
    )  # fmt: skip
    camera = repo_camera(where.repo)
    detector = camera[args.ccd]  # UnknownDetectorError names valid CCDs
    ra, dec = check_pointing(args.ra, args.dec)
    check_band(args.band)
    if not (math.isfinite(args.exptime) and args.exptime > 0):  # before waiting for images
        msg = f"--exptime must be a finite number of seconds > 0, got {args.exptime}"
        raise UsageError(f"{msg}; e.g. --exptime 30")
    if not 1 <= len(args.image) <= 2:
        raise UsageError(f"give one or two --image names (snaps), got {len(args.image)}")
    if len(set(args.image)) != len(args.image):
        raise UsageError(f"the two --image names (snaps) must differ, got {args.image[0]} twice")
    for name in args.image:
        check_image_for_ccd(name, camera, detector)  # before waiting, not after the timeout
    dist = open_distributor(where.distributor)
    # the numba kernels load (or compile) while the image is still on its way
    threading.Thread(target=warm_kernels, name="apdask-warm", daemon=True).start()
    # Wait for every snap under one deadline: nothing is written before all have arrived.
    deadline = time.monotonic() + where.timeout
    paths = [dist.get(n, timeout=max(deadline - time.monotonic(), 0.0)) for n in args.image]
    meta = check_raw_header(read_raw(paths[0]).meta, detector, args.band, name=args.image[0])
    nv = NextVisit(
        instrument=camera.name, groupId=str(meta.visit), visit=meta.visit, position=(ra, dec),
        rotationAngle=meta.rotpa, filters=args.band, duration=args.exptime,
        nimages=len(args.image), detectors=(detector.name,), mjd=meta.mjd_begin,
    )  # fmt: skip
    report = run_visit(
        nv, repo=where.repo, ppdb=args.ppdb, alerts=where.alerts, distributor=where.distributor,
        timeout=where.timeout, images={detector.name: list(args.image)},
    )  # fmt: skip
    print(jsonsafe.dumps(report))
    return partial_failure_code(report)  # a CCD whose PPDB store failed is not a success


def process_visit_command(args):
    """``apdask process-visit``: every CCD of a nextVisit message on a LocalCluster.

    Shows the dashboard link and per-CCD progress on stderr, writes the full report as
    strict JSON (``--json``, default ``<repo>/reports/visit_<visit>.json``) and prints
    a short table.
    """
    check_workers(args.workers)
    nv = NextVisit.from_json(args.next_visit)
    # bad --repo or --timeout: before the cluster starts
    where = Locations.resolve(args.repo, ppdb=args.ppdb, alerts=args.alerts,
                              distributor=args.distributor, timeout=args.timeout)  # fmt: skip
    note = compile_note()
    if note:
        print(note, file=sys.stderr)
    with local_cluster(n_workers=args.workers) as client:
        link = client.dashboard_link
        print(f"apdask: Dask dashboard: {link}", file=sys.stderr)
        with performance(args.report):
            report = run_visit(
                nv, repo=where.repo, ppdb=args.ppdb, alerts=where.alerts,
                distributor=where.distributor, timeout=where.timeout, client=client,
                on_ccd=VisitProgress(nv.visit, len(nv.detectors)),
            )  # fmt: skip
    report["dashboard"] = link
    if args.json == "-":
        print(jsonsafe.dumps(report))
    else:
        path = args.json or os.path.join(where.repo, "reports", f"visit_{nv.visit}.json")
        print(visit_table(report, report_path=write_report(report, path)))
        if args.report:
            print(f"performance report (HTML): {os.path.abspath(args.report)}")
    return partial_failure_code(report)


@contextlib.contextmanager
def performance(path):
    """Dask's ``performance_report`` to ``path`` (HTML) around the run; nothing if None."""
    if not path:
        yield
        return
    from distributed import performance_report  # lazy: distributed costs ~0.6 s of import

    # Dask sizes its own profile tree for the report and logs a harmless RecursionError
    # warning on deep trees (distributed.sizeof); the report itself is complete.
    sizeof_log = logging.getLogger("distributed.sizeof")
    level = sizeof_log.level
    sizeof_log.setLevel(logging.ERROR)
    try:
        with performance_report(filename=os.fspath(path)):
            yield
    finally:
        sizeof_log.setLevel(level)


def process_calib_command(args):
    report = process_calib(
        args.intent, args.ccd, args.image, repo=config.get("repo", args.repo),
        distributor=args.distributor, band=args.band, exptime=args.exptime,
        metrics=args.metrics, timeout=args.timeout,
    )  # fmt: skip
    print(json.dumps({k: report[k] for k in ("intent", "detector", "image", "verdict",
                      "failures", "report_path", "metrics_sink")}, indent=1))  # fmt: skip
    return 0 if report["verdict"] == "pass" else 3


def listen_command(args):
    kw = dict(repo=args.repo, ppdb=args.ppdb, alerts=args.alerts, distributor=args.distributor,
              timeout=args.timeout, max_visits=args.max_visits, idle_exit=args.idle_exit,
              offset=args.offset)  # fmt: skip
    if args.scheduler_address:
        if args.cluster != "local":
            raise UsageError(
                f"--cluster {args.cluster} starts its own warm pool of worker jobs; "
                "drop --scheduler-address, or drop --cluster to use that scheduler"
            )
        with open_client(args.scheduler_address) as client:
            summary = listen(args.kafka, args.topic, client=client, **kw)
    else:  # listen() starts its cluster itself, after checking its arguments and settings
        options = {"partition": args.partition, "memory": args.mem, "walltime": args.walltime,
                   "scheduler_host": args.scheduler_host}  # fmt: skip
        summary = listen(args.kafka, args.topic, workers=check_workers(args.workers),
                         cluster=args.cluster, cluster_options=options, **kw)  # fmt: skip
    print(jsonsafe.dumps(summary))
    if summary["abandoned"]:  # stopped by a signal before they finished: say so, exit 75
        names = ", ".join(str(a["visit"]) for a in summary["abandoned"])
        print(
            f"apdask: error: stopped with {len(summary['abandoned'])} visit(s) abandoned "
            f"({names}); re-run each with `apdask process-visit` (nextVisit in the summary)",
            file=sys.stderr,
        )
        return EX_TEMPFAIL
    return 0


def submit_command(args):
    nv = NextVisit.from_json(args.next_visit)
    out = submit_visit(
        nv, args.scheduler, args.via, repo=args.repo, distributor=args.distributor,
        ppdb=args.ppdb, alerts=args.alerts, timeout=args.timeout, job_dir=args.job_dir,
        partition=args.partition, memory=args.mem, walltime=args.walltime,
        scheduler_host=args.scheduler_host, wait=args.wait, dry_run=args.dry_run,
    )  # fmt: skip
    print(jsonsafe.dumps(out))
    return 1 if out.get("failed") else 0


def demo_command(args):
    check_workers(args.workers)
    if args.visits < 1:
        raise UsageError(f"--visits must be >= 1, got {args.visits}; e.g. --visits 3")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}; e.g. --seed 42")
    run_demo(args.dir, camera=args.camera, n_visits=args.visits, seed=args.seed,
             workers=args.workers)  # fmt: skip
