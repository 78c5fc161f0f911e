"""Commands on data and tools: simulate, evaluate, butler, ppdb, bench."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from typing import Any

from apdask.cli.common import check_workers, repo_camera
from apdask.core import jsonsafe
from apdask.exceptions import UsageError
from apdask.io.butler import Butler
from apdask.ppdb import Ppdb, create_ppdb
from apdask.tools.bench import format_summary, run_benchmarks
from apdask.tools.demo import run_demo
from apdask.tools.evaluate import evaluate_visit
from apdask.tools.simulate import simulate_repo

#: Seeing (FWHM, arcsec) the simulator accepts: wider PSFs only cost memory and time.
_MAX_FWHM = 10.0


def _check_fwhm(option, value):
    if not (math.isfinite(value) and 0 < value <= _MAX_FWHM):
        msg = f"{option} must be in (0, {_MAX_FWHM:g}] arcsec, got {value}; e.g. {option} 0.9"
        raise UsageError(msg)


def _simulate_detectors(text):
    """``--detectors`` as a list of distinct names (None: all), checked before any work."""
    if text is None:
        return None
    dets = [d.strip() for d in text.split(",") if d.strip()]
    if not dets:
        raise UsageError(f"--detectors lists no CCD name, got {text!r}; e.g. --detectors T00,T01")
    if len(set(dets)) != len(dets):
        raise UsageError(f"--detectors lists a CCD twice, got {text!r}; list each CCD once")
    return dets


def simulate_command(args: argparse.Namespace) -> None:
    """``apdask simulate``: a new repository; an existing one only with ``--overwrite``."""
    if args.visits < 1:
        raise UsageError(f"--visits must be >= 1, got {args.visits}; e.g. --visits 3")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}; e.g. --seed 42")
    for lo_hi in [args.fwhm] if args.fwhm else []:
        for value in lo_hi:
            _check_fwhm("--fwhm", value)
        if lo_hi[0] > lo_hi[1]:
            raise UsageError(f"--fwhm LO HI needs LO <= HI, got {lo_hi[0]} {lo_hi[1]}")
    if args.template_fwhm is not None:
        _check_fwhm("--template-fwhm", args.template_fwhm)
    if args.asteroids < 0 or (args.asteroids and args.engine != "apdask"):
        raise UsageError(f"--asteroids needs N >= 0 and --engine apdask, got {args.asteroids}")
    if args.transients_per_ccd is not None and args.transients_per_ccd < 0:
        raise UsageError(f"--transients-per-ccd must be >= 0, got {args.transients_per_ccd}; "
                         "e.g. --transients-per-ccd 100")  # fmt: skip
    if args.variable_fraction is not None and not 0.0 <= args.variable_fraction <= 1.0:
        raise UsageError(f"--variable-fraction must be in [0, 1], got {args.variable_fraction}; "
                         "e.g. --variable-fraction 0.01")  # fmt: skip
    dets = _simulate_detectors(args.detectors)
    clear_for_simulation(args.repo, overwrite=args.overwrite)
    visits = simulate_repo(args.camera, args.repo, n_visits=args.visits, seed=args.seed,
                           band=args.band, detectors=dets, artifacts=not args.no_artifacts,
                           fwhm_range=args.fwhm, template_fwhm=args.template_fwhm,
                           engine=args.engine, transients_per_ccd=args.transients_per_ccd,
                           variable_fraction=args.variable_fraction,
                           progress=_stderr, asteroids=args.asteroids)  # fmt: skip
    print(f"simulated {len(visits)} visits of {args.camera} into {args.repo}")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def clear_for_simulation(repo: str, *, overwrite: bool) -> None:
    """Refuse to simulate into a non-empty directory; with ``overwrite``, remove it first.

    Only an apdask repository (one with ``butler.zarr``) is removed: ``--overwrite`` on
    any other non-empty directory is refused too, so a mistyped path never deletes a
    user's files.
    """
    if not os.path.isdir(repo) or not os.listdir(repo):
        if os.path.exists(repo) and not os.path.isdir(repo):
            raise UsageError(f"--repo {repo} is a file, not a directory; choose another path")
        return
    if not os.path.isdir(os.path.join(repo, "butler.zarr")):
        msg = (
            f"--repo {repo} is a non-empty directory that is not an apdask repository (no "
            "butler.zarr); choose a new or empty directory"
        )
        raise UsageError(msg)
    if not overwrite:
        msg = (
            f"{repo} already holds a repository; pass --overwrite to replace it whole "
            "(its raws, PPDB, alerts and products go too), or choose another --repo"
        )
        raise UsageError(msg)
    shutil.rmtree(repo)


def evaluate_command(args: argparse.Namespace) -> None:
    res = evaluate_visit(args.repo, args.visit, out_dir=args.out)
    keys = ("visit", "n_alerts", "n_transients", "n_transients_found", "json", "plot")
    summary: dict[str, Any] = {k: res[k] for k in keys if k in res}
    summary["targets"] = res["targets"]
    summary["false_positives_by_class"] = res["false_positives_by_class"]
    print(jsonsafe.dumps(summary))


def butler_command(args: argparse.Namespace) -> None:
    b = Butler(args.repo)
    if args.butler_command == "ingest-template":
        tile = b.ingest_template(args.file, args.band)
        print(f"ingested template tile {tile} ({args.band}) into {args.repo}")
    else:
        b.ingest_calib(args.file, args.kind, args.detector, band=args.band,
                       valid_from=args.valid_from, valid_to=args.valid_to)  # fmt: skip
        print(f"ingested {args.kind} for detector {args.detector} into {args.repo}")


def ppdb_command(args: argparse.Namespace) -> None:
    if args.ppdb_command == "load-drp":
        repo_camera(args.repo)  # clear error for a missing repository
        n = Ppdb.open(args.ppdb).load_drp_objects(Butler(args.repo).get_drp_objects())
        print(f"loaded {n} DRP Objects from {args.repo} into {args.ppdb}")
        return
    path = create_ppdb(args.url, args.apdb_config or "apdb.yaml")
    print(f"PPDB initialised; config written to {path}")


def bench_command(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.only.split(",")] if args.only else None
    result = run_benchmarks(names, quick=args.quick, bench_dir=args.dir)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1, default=str)
    print(format_summary(result))
    from pathlib import Path

    from apdask.tools.bench_summary import write_summary  # matplotlib: only when needed

    out = Path(args.out)
    png, page = write_summary(result, out.with_suffix(".png"), out.with_suffix(".html"))
    print(f"full report: {args.out}; summary picture: {png}, {page}")
    failed = [n for n, b in result["benchmarks"].items() if b["returncode"] != 0]
    return 70 if failed else 0


def demo_command(args: argparse.Namespace) -> None:
    check_workers(args.workers)
    if args.visits < 1:
        raise UsageError(f"--visits must be >= 1, got {args.visits}; e.g. --visits 3")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}; e.g. --seed 42")
    run_demo(args.dir, camera=args.camera, n_visits=args.visits, seed=args.seed,
             workers=args.workers)  # fmt: skip
