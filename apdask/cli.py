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

    p = sub.add_parser("process-ccd", help="process one CCD (DMTN-092 §2 arguments)")
    p.add_argument("--ccd", required=True, help="CCD name, e.g. R22_S11")
    p.add_argument("--ra", required=True, help="boresight RA, degrees")
    p.add_argument("--dec", required=True, help="boresight Dec, degrees")
    p.add_argument("--filter", dest="band", required=True, help="filter band u g r i z y")
    p.add_argument("--exptime", type=float, required=True, help="anticipated exposure time, s")
    p.add_argument("--distributor", required=True, help="file://DIR (http:// in issue 3)")
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

    p = sub.add_parser("alerts", help="alert tools")
    asub = p.add_subparsers(dest="alerts_command", required=True)
    q = asub.add_parser("validate", help="decode every alert with the official schema")
    q.add_argument("source", help="file://DIR, a directory or an .avro file")
    q = asub.add_parser("tail", help="one readable line per alert")
    q.add_argument("source")
    return parser


def _strip_file(uri):
    return uri[len("file://") :] if uri.startswith("file://") else uri


def _cmd_simulate(args):
    from .simulate import simulate_repo

    visits = simulate_repo(args.camera, args.repo, n_visits=args.visits, seed=args.seed,
                           band=args.band)  # fmt: skip
    print(f"simulated {len(visits)} visits of {args.camera} into {args.repo}")


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
    from .distributor import open_distributor
    from .rawio import read_raw

    dist = open_distributor(args.distributor)
    timeout = config.get("distributor.timeout", args.timeout)
    first = dist.get(args.image[0], timeout=timeout)
    meta = check_raw_header(read_raw(first).meta, detector, args.band, name=args.image[0])
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
    from .ppdb import create_ppdb

    path = create_ppdb(args.url, args.config or "apdb.yaml")
    print(f"PPDB initialised; config written to {path}")


def _cmd_alerts(args):
    from .alerts import read_alerts, validate_alerts

    src = _strip_file(args.source)
    if args.alerts_command == "validate":
        rep = validate_alerts(src)
        print(json.dumps(rep, indent=1, default=str))
        if rep["problems"]:
            return 65
        return 0
    for a in read_alerts(src):
        s = a["diaSource"]
        print(
            f"visit={s['visit']} det={s['detector']} diaSourceId={a['diaSourceId']} "
            f"diaObjectId={s.get('diaObjectId')} ra={s['ra']:.6f} dec={s['dec']:.6f} "
            f"psfFlux={s.get('psfFlux')} nJy snr={s.get('snr')} "
            f"nPrv={len(a['prvDiaSources'] or [])}"
        )
    return 0


_COMMANDS = {
    "simulate": _cmd_simulate,
    "process-ccd": _cmd_process_ccd,
    "process-visit": _cmd_process_visit,
    "demo": _cmd_demo,
    "butler": _cmd_butler,
    "ppdb": _cmd_ppdb,
    "alerts": _cmd_alerts,
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
