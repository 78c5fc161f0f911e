"""The ``apdask`` command.  Thin: it parses arguments and calls the API.

Exit codes are documented in ``docs/errors.md``: every :class:`ApdaskError` carries
its own; argument errors exit 64 (EX_USAGE).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .exceptions import ApdaskError

__all__ = ["main", "build_parser"]

log = logging.getLogger("apdask")


def _add_outputs(p):
    p.add_argument("--repo", help="Butler repository directory (default: apdask.repo)")
    p.add_argument("--ppdb", help="PPDB config file (default: <repo>/ppdb/apdb.yaml, SQLite)")
    p.add_argument("--alerts", help="alert sink URI (default: file://<repo>/alerts)")
    p.add_argument("--timeout", type=float, help="seconds to wait for each image (default 120)")


def build_parser():
    """The argument parser of the ``apdask`` command."""
    parser = argparse.ArgumentParser(
        prog="apdask", description="Rubin-style Alert Production (DMTN-092) on Dask."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate a repository: templates, calibs, raws, truth")
    p.add_argument("--camera", choices=["comcam", "lsstcam", "testcam"], default="comcam")
    p.add_argument("--repo", required=True)
    p.add_argument("--visits", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--filter", dest="band", default="r")
    p.add_argument("--detectors", help="comma-separated CCD names to simulate (default: all)")
    p.add_argument(
        "--no-artifacts", action="store_true", help="no cosmic rays, hot column or saturated stars"
    )
    p.add_argument(
        "--fwhm",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="science PSF FWHM range across a CCD, arcsec (default 0.9 1.1)",
    )
    p.add_argument("--template-fwhm", type=float, help="template PSF FWHM, arcsec (default 0.7)")
    p.add_argument("--engine", choices=["apdask", "galsim"], default="apdask",
                   help="pixel renderer: our Gaussian code (default) or GalSim (Kolmogorov PSF, "
                   "Sersic galaxies; needs the 'sim' extra)")  # fmt: skip

    p = sub.add_parser("evaluate", help="compare a processed visit with the simulator's truth")
    p.add_argument("--repo", required=True, help="simulated repository (truth/, alerts/)")
    p.add_argument("--visit", type=int, required=True)
    p.add_argument("--out", help="output directory (default <repo>/evaluate/visit_<V>)")

    p = sub.add_parser("process-ccd", help="process one CCD (DMTN-092 §2 arguments)")
    p.add_argument("--ccd", required=True, help="CCD name, e.g. R22_S11")
    p.add_argument("--ra", required=True, help="boresight RA, degrees")
    p.add_argument("--dec", required=True, help="boresight Dec, degrees")
    p.add_argument("--filter", dest="band", required=True, help="filter band u g r i z y")
    p.add_argument("--exptime", type=float, required=True, help="anticipated exposure time, s")
    p.add_argument("--distributor", required=True, help="http://HOST:PORT or file://DIR")
    p.add_argument("--image", action="append", required=True, help="image name (once per snap)")
    _add_outputs(p)

    p = sub.add_parser("process-visit", help="process all CCDs of a nextVisit message")
    p.add_argument("--next-visit", required=True, help="nextVisit JSON file")
    p.add_argument("--distributor", help="file://DIR (default file://<repo>/raw)")
    p.add_argument("--workers", type=int, default=2)
    _add_outputs(p)

    p = sub.add_parser("demo", help="the main job: simulate ComCam and process 3 visits")
    p.add_argument("--dir", default="apdask-demo", help="working directory (default ./apdask-demo)")
    p.add_argument("--camera", choices=["comcam", "lsstcam", "testcam"], default="comcam")
    p.add_argument("--visits", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=2)

    p = sub.add_parser("butler", help="Butler repository tools")
    bsub = p.add_subparsers(dest="butler_command", required=True)
    q = bsub.add_parser("ingest-template", help="ingest a FITS image with a celestial WCS")
    q.add_argument("file")
    q.add_argument("--filter", dest="band", required=True)
    q.add_argument("--repo", required=True)
    q = bsub.add_parser("ingest-calib", help="ingest a master bias, dark or flat")
    q.add_argument("file")
    q.add_argument("--type", dest="kind", choices=["bias", "dark", "flat"], required=True)
    q.add_argument("--detector", type=int, required=True)
    q.add_argument("--filter", dest="band")
    q.add_argument("--repo", required=True)
    q.add_argument("--valid-from", type=float, default=0.0, help="MJD")
    q.add_argument("--valid-to", type=float, default=1e6, help="MJD")

    p = sub.add_parser("ppdb", help="PPDB tools")
    psub = p.add_subparsers(dest="ppdb_command", required=True)
    q = psub.add_parser("create", help="initialise a PPDB (SQLite or PostgreSQL URL)")
    q.add_argument("url")
    q.add_argument("--config", help="where to write the apdb config (default apdb.yaml)")
    q = psub.add_parser("load-drp", help="load the repository's DRP Object catalog into a PPDB")
    q.add_argument("--repo", required=True, help="Butler repository with a DRP catalog")
    q.add_argument("--ppdb", required=True, help="PPDB config file or SQLAlchemy URL")

    p = sub.add_parser("alerts", help="alert tools")
    asub = p.add_subparsers(dest="alerts_command", required=True)
    q = asub.add_parser("validate", help="decode every alert with the official schema")
    q.add_argument("source", help="kafka://HOST:PORT/TOPIC, file://DIR, a directory or .avro file")
    q = asub.add_parser("tail", help="one readable line per alert")
    q.add_argument("source", help="kafka://HOST:PORT/TOPIC, file://DIR, a directory or .avro file")
    q.add_argument(
        "--from-beginning",
        action="store_true",
        help="kafka: print the topic from its start, then stop (add --follow to wait)",
    )
    q.add_argument("--follow", action="store_true", help="kafka: keep waiting for new alerts")
    q = asub.add_parser("replay", help="deliver a spool of undelivered alerts")
    q.add_argument("spool", help="spool file or directory (apdask.alerts.spool_dir)")
    q.add_argument("--to", required=True, help="kafka://HOST:PORT/TOPIC")

    p = sub.add_parser("distributor", help="the HTTP image distributor (docs/distributor.md)")
    dsub = p.add_subparsers(dest="distributor_command", required=True)
    q = dsub.add_parser("serve", help="serve DIR over HTTP; uploads need $APDASK_DISTRIBUTOR_TOKEN")
    q.add_argument("--root", required=True, help="image directory (created if missing)")
    q.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    q.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 = any free)")
    q = dsub.add_parser("upload", help="upload raw files (token from $APDASK_DISTRIBUTOR_TOKEN)")
    q.add_argument("--distributor", required=True, help="http://HOST:PORT")
    q.add_argument("files", nargs="+", help="files; each is registered under its base name")
    q = dsub.add_parser("list", help="print the distributor's index as JSON")
    q.add_argument("--distributor", required=True, help="http://HOST:PORT")

    p = sub.add_parser("process-calib", help="verify a raw calibration frame (DMTN-092 §2.3)")
    p.add_argument("--intent", required=True, choices=["bias", "dark", "flat", "cbp"])
    p.add_argument("--ccd", required=True, help="CCD name, e.g. R22_S11")
    p.add_argument("--filter", dest="band", help="filter in place (required for flat, cbp)")
    p.add_argument("--exptime", type=float, help="anticipated exposure time, s")
    p.add_argument("--distributor", required=True, help="http://HOST:PORT or file://DIR")
    p.add_argument("--image", required=True, help="image name")
    p.add_argument("--repo", help="Butler repository (masters; the report is written here)")
    p.add_argument("--metrics", help="file://PATH or kafka://HOST:PORT/TOPIC (default: "
                   "file://<repo>/calib-reports/metrics.jsonl)")  # fmt: skip
    p.add_argument("--timeout", type=float, help="seconds to wait for the image (default 120)")

    p = sub.add_parser("listen", help="dynamic mode: run visits announced on a Kafka topic")
    p.add_argument("--kafka", required=True, help="bootstrap servers HOST:PORT")
    p.add_argument("--topic", default="next-visit", help="nextVisit topic (default next-visit)")
    p.add_argument("--distributor", help="http://HOST:PORT or file://DIR (default <repo>/raw)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    p.add_argument("--scheduler-address", help="use a running Dask scheduler instead")
    p.add_argument("--offset", choices=["latest", "earliest"],
                   help="where to start reading the topic (default latest)")  # fmt: skip
    p.add_argument("--max-visits", type=int, help="exit after this many visits finished")
    p.add_argument("--idle-exit", type=float, help="exit after S seconds with nothing to do")
    _add_outputs(p)

    p = sub.add_parser("submit", help="batch mode: one SLURM/HTCondor job per CCD (§2.1)")
    p.add_argument("--scheduler", required=True, choices=["slurm", "htcondor"])
    p.add_argument("--next-visit", required=True, help="nextVisit JSON file")
    p.add_argument("--via", choices=["native", "jobqueue"], default="native",
                   help="native: jobs run `apdask process-ccd` (default); jobqueue: jobs are "
                   "Dask workers driven from here")  # fmt: skip
    p.add_argument("--distributor", help="http://HOST:PORT or file://DIR (default <repo>/raw)")
    p.add_argument("--job-dir", help="scripts and logs (default <repo>/jobs/visit_<visit>)")
    p.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--mem", help="memory per CCD job (default 4GB)")
    p.add_argument("--walltime", help="time limit per job (default 00:30:00)")
    p.add_argument("--scheduler-host", help="jobqueue: address workers reach the scheduler on")
    p.add_argument("--wait", action="store_true", help="block until every CCD job finished")
    p.add_argument("--dry-run", action="store_true", help="write the job files, submit nothing")
    _add_outputs(p)

    from .diff import add_parser as _add_diff_parser

    _add_diff_parser(sub)  # apdask diff SCIENCE.fits TEMPLATE.fits --out DIR (docs/real-data.md)

    p = sub.add_parser("bench", help="run benchmarks/ and report the figures against targets")
    p.add_argument("--only", help="comma list of: association, ppdb, alerts, subtract, distributor")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke check, not targets")
    p.add_argument("--dir", help="the benchmarks/ directory (default: the source checkout's)")
    p.add_argument("--out", default="bench-report.json", help="JSON report (default %(default)s)")
    return parser


def _strip_file(uri):
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _cmd_simulate(args):
    from .simulate import simulate_repo

    dets = [d.strip() for d in args.detectors.split(",") if d.strip()] if args.detectors else None
    visits = simulate_repo(args.camera, args.repo, n_visits=args.visits, seed=args.seed,
                           band=args.band, detectors=dets, artifacts=not args.no_artifacts,
                           fwhm_range=args.fwhm, template_fwhm=args.template_fwhm,
                           engine=args.engine)  # fmt: skip
    print(f"simulated {len(visits)} visits of {args.camera} into {args.repo}")


def _cmd_evaluate(args):
    from .evaluate import evaluate_visit

    res = evaluate_visit(args.repo, args.visit, out_dir=args.out)
    summary = {k: res[k] for k in ("visit", "n_alerts", "n_transients", "n_transients_found",
                                   "json", "plot") if k in res}  # fmt: skip
    summary["targets"] = res["targets"]
    summary["false_positives_by_class"] = res["false_positives_by_class"]
    print(json.dumps(summary, indent=1, default=str))


def _repo_camera(repo):
    import os

    from .butler import Butler
    from .exceptions import ConfigurationError

    if "://" not in repo and not os.path.isdir(os.path.join(repo, "butler.zarr")):
        msg = f"no Butler repository at {repo}; create one with `apdask simulate --repo {repo}`"
        raise ConfigurationError(msg)
    camera = Butler(repo).camera
    if camera is None:
        msg = f"repository {repo} records no camera; re-create it with `apdask simulate`"
        raise ConfigurationError(msg)
    return camera


def _cmd_process_ccd(args):
    from . import config
    from .camera import check_band, check_pointing
    from .exceptions import ConfigurationError
    from .run import run_visit
    from .visit import NextVisit, check_raw_header

    repo = config.get("repo", args.repo)
    if repo is None:
        raise ConfigurationError("no Butler repository; pass --repo DIR or set apdask.repo")
    camera = _repo_camera(repo)
    detector = camera[args.ccd]  # UnknownDetectorError names valid CCDs
    ra, dec = check_pointing(args.ra, args.dec)
    check_band(args.band)
    if not 1 <= len(args.image) <= 2:
        raise ValueError(f"give one or two --image names (snaps), got {len(args.image)}")
    if len(set(args.image)) != len(args.image):
        raise ValueError(f"the two --image names (snaps) must differ, got {args.image[0]} twice")
    import time

    from .distributor import check_image_for_ccd, open_distributor
    from .rawio import read_raw

    for name in args.image:
        check_image_for_ccd(name, camera, detector)  # before waiting, not after the timeout
    timeout = float(config.get("distributor.timeout", args.timeout))
    if not timeout > 0:
        raise ValueError(f"--timeout must be > 0 seconds, got {timeout:g}")
    dist = open_distributor(args.distributor)
    # Wait for every snap under one deadline: nothing is written before all have arrived.
    deadline = time.monotonic() + timeout
    paths = [dist.get(n, timeout=max(deadline - time.monotonic(), 0.0)) for n in args.image]
    meta = check_raw_header(read_raw(paths[0]).meta, detector, args.band, name=args.image[0])
    nv = NextVisit(
        instrument=camera.name, groupId=str(meta.visit), visit=meta.visit, position=(ra, dec),
        rotationAngle=meta.rotpa, filters=args.band, duration=args.exptime,
        nimages=len(args.image), detectors=(detector.name,), mjd=meta.mjd_begin,
    )  # fmt: skip
    report = run_visit(
        nv, repo=repo, ppdb=args.ppdb, alerts=args.alerts, distributor=args.distributor,
        timeout=timeout, images={detector.name: list(args.image)},
    )  # fmt: skip
    print(json.dumps(report, default=str, indent=1))


def _cmd_process_visit(args):
    from .run import local_cluster, run_visit
    from .visit import NextVisit

    nv = NextVisit.from_json(args.next_visit)
    with local_cluster(n_workers=args.workers) as client:
        report = run_visit(
            nv,
            repo=args.repo,
            ppdb=args.ppdb,
            alerts=args.alerts,
            distributor=args.distributor,
            timeout=args.timeout,
            client=client,
        )
    print(json.dumps(report, default=str, indent=1))
    return _partial_failure_code(report)


def _partial_failure_code(report):
    """0 if every CCD succeeded, else the exit code of the first failed CCD (docs/errors.md).

    A CCD whose PPDB access failed carries ``error`` without ``exit_code``: PpdbError's.
    """
    from .exceptions import PpdbError

    failed = [c for c in report.get("ccds", []) if c.get("error") or c.get("exit_code")]
    if failed:
        names = ", ".join(str(c.get("detector")) for c in failed)
        msg = f"apdask: error: {len(failed)} CCD(s) failed: {names}; see the report"
        print(msg, file=sys.stderr)
        return int(failed[0].get("exit_code") or PpdbError.exit_code)
    return 0


def _cmd_demo(args):
    from .demo import run_demo

    run_demo(args.dir, camera=args.camera, n_visits=args.visits, seed=args.seed,
             workers=args.workers)  # fmt: skip


def _cmd_butler(args):
    from .butler import Butler

    b = Butler(args.repo)
    if args.butler_command == "ingest-template":
        tile = b.ingest_template(args.file, args.band)
        print(f"ingested template tile {tile} ({args.band}) into {args.repo}")
    else:
        b.ingest_calib(args.file, args.kind, args.detector, band=args.band,
                       valid_from=args.valid_from, valid_to=args.valid_to)  # fmt: skip
        print(f"ingested {args.kind} for detector {args.detector} into {args.repo}")


def _cmd_ppdb(args):
    from .ppdb import Ppdb, create_ppdb

    if args.ppdb_command == "load-drp":
        from .butler import Butler

        _repo_camera(args.repo)  # clear error for a missing repository
        n = Ppdb.open(args.ppdb).load_drp_objects(Butler(args.repo).get_drp_objects())
        print(f"loaded {n} DRP Objects from {args.repo} into {args.ppdb}")
        return
    path = create_ppdb(args.url, args.config or "apdb.yaml")
    print(f"PPDB initialised; config written to {path}")


def _alert_line(a):
    s = a["diaSource"]
    return (
        f"visit={s['visit']} det={s['detector']} diaSourceId={a['diaSourceId']} "
        f"diaObjectId={s.get('diaObjectId')} ra={s['ra']:.6f} dec={s['dec']:.6f} "
        f"psfFlux={s.get('psfFlux')} nJy snr={s.get('snr')} "
        f"nPrv={len(a['prvDiaSources'] or [])}"
    )


def _cmd_alerts(args):
    from .alerts import read_alerts, validate_alerts

    if args.alerts_command == "replay":
        from .spool import replay_spool

        rep = replay_spool(args.spool, args.to)
        print(json.dumps(rep, indent=1, default=str))
        return 75 if rep["remaining"] else 0  # EX_TEMPFAIL: run it again later
    kafka_src = args.source.startswith("kafka://")
    if args.alerts_command == "validate":
        if kafka_src:
            from .consume import validate_topic

            rep = validate_topic(args.source)
        else:
            rep = validate_alerts(_strip_file(args.source))
        print(json.dumps(rep, indent=1, default=str))
        if rep["problems"]:
            return 65
        return 0
    if not kafka_src:
        for a in read_alerts(_strip_file(args.source)):
            print(_alert_line(a))
        return 0
    from .alerts import _parsed, _registry
    from .consume import consume

    follow = args.follow or not args.from_beginning
    for msg, data in consume(args.source, from_beginning=args.from_beginning, follow=follow):
        if data is None or len(data) < 5 or data[0] != 0:
            print(f"partition={msg.partition()} offset={msg.offset()}: not a Confluent frame")
            continue
        parsed = _parsed(_registry().get_by_id(int.from_bytes(data[1:5], "big", signed=True)))
        import io

        import fastavro

        a = fastavro.schemaless_reader(io.BytesIO(data[5:]), parsed, parsed)
        print(f"p={msg.partition()} o={msg.offset()} " + _alert_line(a), flush=True)
    return 0


def _cmd_distributor(args):
    import os

    if args.distributor_command == "serve":
        from .distributor_server import run_server

        run_server(args.root, host=args.host, port=args.port)
        return 0
    from .distributor import HttpDistributor

    dist = HttpDistributor(args.distributor)
    if args.distributor_command == "list":
        print(json.dumps(dist.index(), indent=1))
        return 0
    for path in args.files:
        rec = dist.put(os.path.basename(path), path)
        print(f"registered {rec['name']} ({rec['size']} bytes, sha256 {rec['sha256']})")
    return 0


def _cmd_process_calib(args):
    from . import config
    from .calib import process_calib

    report = process_calib(
        args.intent, args.ccd, args.image, repo=config.get("repo", args.repo),
        distributor=args.distributor, band=args.band, exptime=args.exptime,
        metrics=args.metrics, timeout=args.timeout,
    )  # fmt: skip
    print(json.dumps({k: report[k] for k in ("intent", "detector", "image", "verdict",
                      "failures", "report_path", "metrics_sink")}, indent=1))  # fmt: skip
    return 0 if report["verdict"] == "pass" else 3


def _cmd_listen(args):
    from .cluster import open_client
    from .listen import listen

    with open_client(args.scheduler_address, n_workers=args.workers) as client:
        summary = listen(
            args.kafka, args.topic, repo=args.repo, ppdb=args.ppdb, alerts=args.alerts,
            distributor=args.distributor, timeout=args.timeout, client=client,
            max_visits=args.max_visits, idle_exit=args.idle_exit, offset=args.offset,
        )  # fmt: skip
    print(json.dumps(summary, default=str, indent=1))
    return 0


def _cmd_submit(args):
    from .cluster import submit_visit
    from .visit import NextVisit

    nv = NextVisit.from_json(args.next_visit)
    out = submit_visit(
        nv, args.scheduler, args.via, repo=args.repo, distributor=args.distributor,
        ppdb=args.ppdb, alerts=args.alerts, timeout=args.timeout, job_dir=args.job_dir,
        partition=args.partition, memory=args.mem, walltime=args.walltime,
        scheduler_host=args.scheduler_host, wait=args.wait, dry_run=args.dry_run,
    )  # fmt: skip
    print(json.dumps(out, default=str, indent=1))
    return 1 if out.get("failed") else 0


def _cmd_bench(args):
    from .bench import format_summary, run_benchmarks

    names = [n.strip() for n in args.only.split(",")] if args.only else None
    result = run_benchmarks(names, quick=args.quick, bench_dir=args.dir)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print(format_summary(result))
    print(f"full report: {args.out}")
    failed = [n for n, b in result["benchmarks"].items() if b["returncode"] != 0]
    return 70 if failed else 0


def _cmd_diff(args):
    from .diff import run_cli

    return run_cli(args)


_COMMANDS = {
    "bench": _cmd_bench,
    "simulate": _cmd_simulate,
    "evaluate": _cmd_evaluate,
    "process-ccd": _cmd_process_ccd,
    "process-visit": _cmd_process_visit,
    "demo": _cmd_demo,
    "butler": _cmd_butler,
    "ppdb": _cmd_ppdb,
    "alerts": _cmd_alerts,
    "process-calib": _cmd_process_calib,
    "listen": _cmd_listen,
    "submit": _cmd_submit,
    "distributor": _cmd_distributor,
    "diff": _cmd_diff,
}


def main(argv=None):
    """Entry point of the ``apdask`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        return _COMMANDS[args.command](args) or 0
    except ApdaskError as e:
        print(f"apdask: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError) as e:
        print(f"apdask: error: {e}", file=sys.stderr)
        return 64
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
