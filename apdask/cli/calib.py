"""``apdask process-calib``: verify a raw calibration frame (DMTN-092 §2.3)."""

from __future__ import annotations

import argparse
import json

from apdask import config
from apdask.pipeline.calib import process_calib

__all__ = ["process_calib_command"]


def process_calib_command(args: argparse.Namespace) -> int:
    report = process_calib(
        args.intent, args.ccd, args.image, repo=config.get("repo", args.repo),
        distributor=args.distributor, band=args.band, exptime=args.exptime,
        metrics=args.metrics, timeout=args.timeout,
    )  # fmt: skip
    print(json.dumps({k: report[k] for k in ("intent", "detector", "image", "verdict",
                      "failures", "report_path", "metrics_sink")}, indent=1))  # fmt: skip
    return 0 if report["verdict"] == "pass" else 3
