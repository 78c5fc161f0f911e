"""Commands that run the pipeline on one CCD or one visit: process-ccd, process-visit.

The other long-running commands have modules of their own (``cli/services.py``:
listen and submit; ``cli/calib.py``: process-calib; ``cli/data.py``: demo), so that a
batch ``process-ccd`` imports only what it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator

from apdask.cli.common import check_workers, partial_failure_code, repo_camera
from apdask.config import Locations
from apdask.core import jsonsafe
from apdask.core.camera import check_band, check_pointing
from apdask.exceptions import UsageError
from apdask.io.distributor import check_image_for_ccd, open_distributor
from apdask.io.raw import read_raw
from apdask.io.raw_header import check_raw_header
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import local_cluster, run_visit
from apdask.pipeline.warm import warm_kernels
from apdask.tools.progress import VisitProgress, compile_note, visit_table, write_report


def process_ccd_command(args: argparse.Namespace) -> int:
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


def process_visit_command(args: argparse.Namespace) -> int:
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
def performance(path: str | os.PathLike[str] | None) -> Iterator[None]:
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
