"""The argument parser of the ``apdask`` command (argparse only: cheap to import)."""

from __future__ import annotations

import argparse
import importlib.metadata


def _add_outputs(p):
    p.add_argument("--repo", help="Butler repository directory (default: apdask.repo)")
    p.add_argument("--ppdb", help="PPDB config file (default: <repo>/ppdb/apdb.yaml, SQLite)")
    p.add_argument("--alerts", help="alert sink URI (default: file://<repo>/alerts)")
    p.add_argument("--timeout", type=float, help="seconds to wait for each image (default 120)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``apdask`` command."""
    parser = argparse.ArgumentParser(
        prog="apdask", description="Rubin-style Alert Production (DMTN-092) on Dask."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"apdask {_version()}")
    parser.add_argument(
        "--config", metavar="FILE", action="append", default=[],
        help="YAML file of settings (keys as in `apdask config show`); may repeat",
    )  # fmt: skip
    parser.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], dest="settings",
        help="one setting, e.g. --set detection.threshold_sigma=6 (YAML value); may repeat",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_data_commands(sub)
    _add_service_commands(sub)
    _add_diff_command(sub)
    _finish(parser)
    return parser


def _version():
    try:
        return importlib.metadata.version("apdask")
    except importlib.metadata.PackageNotFoundError:  # a source tree never installed
        return "unknown"


#: Help for options defined without it, by (command, option dest).
_HELP = {
    ("process-visit", "workers"): "LocalCluster worker processes",
    ("process-calib", "intent"): "what the frame is: bias, dark, flat, ...",
    ("demo", "camera"): "camera to simulate when the directory holds no repository",
    ("demo", "visits"): "visits to simulate",
    ("demo", "seed"): "simulation seed",
    ("demo", "workers"): "LocalCluster worker processes",
    ("submit", "scheduler"): "batch system",
    ("simulate", "camera"): "camera to simulate",
    ("simulate", "repo"): "repository directory to create",
    ("simulate", "visits"): "visits to simulate",
    ("simulate", "seed"): "simulation seed (the demo's too)",
    ("simulate", "band"): "filter band of the simulated visits",
    ("evaluate", "visit"): "visit number to evaluate",
    ("ingest-template", "file"): "FITS image with a celestial WCS",
    ("ingest-template", "band"): "filter band of the template",
    ("ingest-template", "repo"): "Butler repository directory",
    ("ingest-calib", "file"): "FITS master calibration frame",
    ("ingest-calib", "kind"): "bias, dark or flat",
    ("ingest-calib", "detector"): "detector id the frame belongs to",
    ("ingest-calib", "band"): "filter band (flats)",
    ("ingest-calib", "repo"): "Butler repository directory",
    ("create", "url"): "SQLAlchemy URL of the new PPDB (sqlite:///... or postgresql://...)",
}


class _DefaultsShown(argparse.HelpFormatter):
    """Show an option's default where its help does not already say it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.default in (None, False, argparse.SUPPRESS)
            or action.required
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _finish(parser, name="apdask"):
    """Help text for every option, defaults shown, on every (sub)command."""
    parser.formatter_class = _DefaultsShown
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                _finish(sub_parser, sub_name)
        elif action.help is None:
            action.help = _HELP.get((name, action.dest), "")


def _add_run_commands(sub):
    """Add the commands that run the pipeline."""
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
    p.add_argument("--json", metavar="FILE", help="write the full report (strict JSON) here "
                   "(default <repo>/reports/visit_<visit>.json); '-' prints it instead of "
                   "the table")  # fmt: skip
    p.add_argument("--report", metavar="FILE.html", help="write a Dask performance report "
                   "(task stream, worker profiles) here")  # fmt: skip
    _add_outputs(p)
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
    p = sub.add_parser("demo", help="the main job: simulate ComCam and process 3 visits")
    p.add_argument("--dir", default="apdask-demo", help="working directory (default ./apdask-demo)")
    p.add_argument("--camera", choices=["comcam", "lsstcam", "testcam"], default="comcam")
    p.add_argument("--visits", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--workers", type=int, default=2)
    p = sub.add_parser("listen", help="dynamic mode: run visits announced on a Kafka topic")
    p.add_argument("--kafka", required=True, help="bootstrap servers HOST:PORT")
    p.add_argument("--topic", default="next-visit", help="nextVisit topic (default next-visit)")
    p.add_argument("--distributor", help="http://HOST:PORT or file://DIR (default <repo>/raw)")
    p.add_argument("--workers", type=int, default=2, help="LocalCluster workers (default 2)")
    p.add_argument("--scheduler-address", help="use a running Dask scheduler instead")
    p.add_argument("--cluster", choices=["local", "slurm", "htcondor"], default="local",
                   help="local: a LocalCluster of --workers (default); slurm, htcondor: a warm, "
                   "adaptive pool of worker jobs (apdask.submit.minimum_jobs..maximum_jobs) on "
                   "your jobqueue.yaml, kept between visits")  # fmt: skip
    p.add_argument("--scheduler-host", help="--cluster: address workers reach the scheduler on")
    p.add_argument("--mem", help="--cluster: memory per worker job (default jobqueue.yaml)")
    p.add_argument("--walltime", help="--cluster: time limit per worker job")
    p.add_argument("--partition", help="--cluster slurm: partition of the worker jobs")
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


def _add_data_commands(sub):
    """Add configuration, data and tool commands."""
    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True)
    q = csub.add_parser(
        "show", help="print the resolved configuration and where each value came from"
    )
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("simulate", help="simulate a repository: templates, calibs, raws, truth")
    p.add_argument("--camera", choices=["comcam", "lsstcam", "testcam"], default="comcam")
    p.add_argument("--repo", required=True)
    p.add_argument("--visits", type=int, default=3)
    p.add_argument("--seed", type=int, default=42)
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
    p.add_argument(
        "--asteroids",
        type=int,
        default=0,
        metavar="N",
        help="fast asteroids (trailed sources, 5-30 px) per CCD and visit (default 0)",
    )
    p.add_argument("--transients-per-ccd", type=int, metavar="N",
                   help="transients per CCD in the first visit (later visits add N/3 new; "
                   "default 12 on testcam, 40 on comcam and lsstcam)")  # fmt: skip
    p.add_argument("--variable-fraction", type=float, metavar="F",
                   help="fraction of static stars that vary (default 0.03)")  # fmt: skip
    p.add_argument("--engine", choices=["apdask", "galsim"], default="apdask",
                   help="pixel renderer: our Gaussian code (default) or GalSim (Kolmogorov PSF, "
                   "Sersic galaxies; needs the 'sim' extra)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing repository whole (default: refuse to write into "
                   "a non-empty directory)")  # fmt: skip
    p = sub.add_parser("evaluate", help="compare a processed visit with the simulator's truth")
    p.add_argument("--repo", required=True, help="simulated repository (truth/, alerts/)")
    p.add_argument("--visit", type=int, required=True)
    p.add_argument("--out", help="output directory (default <repo>/evaluate/visit_<V>)")
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
    # dest apdb_config: the global --config (settings files) must keep its list
    q.add_argument(
        "--config", dest="apdb_config", help="where to write the apdb config (default apdb.yaml)"
    )
    q = psub.add_parser("load-drp", help="load the repository's DRP Object catalog into a PPDB")
    q.add_argument("--repo", required=True, help="Butler repository with a DRP catalog")
    q.add_argument("--ppdb", required=True, help="PPDB config file or SQLAlchemy URL")
    p = sub.add_parser("bench", help="run benchmarks/ and report the figures against targets")
    p.add_argument(
        "--only",
        help="comma list of: association, ppdb, alerts, subtract, distributor, "
        "reliability, ccd, cluster, realpairs, peers (default: all but ccd, realpairs and "
        "peers, which take minutes, and cluster, which needs SLURM)",
    )
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke check, not targets")
    p.add_argument("--dir", help="the benchmarks/ directory (default: the source checkout's)")
    p.add_argument(
        "--out",
        default="bench-report.json",
        help="JSON report (default %(default)s); the summary picture goes beside it "
        "(.png, and .html with the tables)",
    )


def _add_service_commands(sub):
    """Add alert and distributor commands."""
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


def _add_diff_command(sub):
    """Add ``apdask diff SCIENCE.fits TEMPLATE.fits --out DIR`` (docs/real-data.md)."""
    p = sub.add_parser("diff", help="difference imaging of a calibrated FITS pair (any instrument)")
    p.add_argument("science", help="calibrated science FITS image")
    p.add_argument("template", help="calibrated template FITS image")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    for who in ("science", "template"):
        s = who[0]
        p.add_argument(f"--{who}-psf", help=f"PSF model FITS image of the {who} image")
        p.add_argument(f"--{s}-gain", type=float, help=f"{who} gain, e-/count (default GAIN)")
        p.add_argument(f"--{s}-zp", type=float, help=f"{who} AB zero point of one count")
        p.add_argument(f"--{s}-unit", help=f"{who} unit: counts, electrons, nJy, MJy/sr ...")
        p.add_argument(f"--{s}-noise", help=f"{who} 1-sigma noise map (FITS)")
        p.add_argument(f"--{s}-saturation", type=float, help=f"{who} saturation level")
    p.add_argument("--band", help="band name (default from FILTER)")
    p.add_argument("--mjd", type=float, help="science exposure time, MJD TAI (default MJD-OBS)")
    p.add_argument(
        "--ppdb",
        help="associate with this existing PPDB and store (sqlite:///PATH, postgresql://..., "
        "apdb.yaml); needs --alerts",
    )
    p.add_argument(
        "--alerts", help="send alerts to file://DIR (or a directory) or kafka://HOST:PORT/TOPIC"
    )
    p.add_argument("--visit", type=int, help="visit id of the science image (default EXPNUM)")
    p.add_argument("--detector", type=int, help="detector id, 0-255 (default CCDNUM)")
