"""Long-running services: ``apdask listen`` (dynamic mode) and ``apdask submit`` (batch)."""

from __future__ import annotations

import argparse
import sys

from apdask.cli.common import check_workers
from apdask.core import jsonsafe
from apdask.exceptions import UsageError
from apdask.pipeline.nextvisit import NextVisit
from apdask.services.batch import open_client, submit_visit
from apdask.services.listen import listen

__all__ = ["listen_command", "submit_command"]

#: ``apdask listen`` stopped by a signal with visits abandoned (docs/errors.md).
EX_TEMPFAIL = 75
#: ``apdask listen`` ended with visits (or CCDs of visits) that failed (docs/errors.md).
EX_VISITS_FAILED = 1


def listen_command(args: argparse.Namespace) -> int:
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
    partial = [d for d in summary["done"] if d.get("failed_ccds")]
    if summary["failed"] or partial:  # the listener ran on; the exit says it was not all good
        bad = [str(f["visit"]) for f in summary["failed"]]
        bad += [f"{d['visit']} (CCDs {', '.join(d['failed_ccds'])})" for d in partial]
        print(f"apdask: error: {len(bad)} visit(s) failed: {'; '.join(bad)}; see the "
              "summary and each visit's report", file=sys.stderr)  # fmt: skip
        return EX_VISITS_FAILED
    return 0


def submit_command(args: argparse.Namespace) -> int:
    nv = NextVisit.from_json(args.next_visit)
    out = submit_visit(
        nv, args.scheduler, args.via, repo=args.repo, distributor=args.distributor,
        ppdb=args.ppdb, alerts=args.alerts, timeout=args.timeout, job_dir=args.job_dir,
        partition=args.partition, memory=args.mem, walltime=args.walltime,
        scheduler_host=args.scheduler_host, wait=args.wait, dry_run=args.dry_run,
    )  # fmt: skip
    print(jsonsafe.dumps(out))
    return 1 if out.get("failed") else 0
