"""Helpers shared by the command modules."""

from __future__ import annotations

import os
import sys

from apdask.exceptions import ConfigurationError, PpdbError, UsageError
from apdask.io.butler import Butler


def strip_file(uri):
    return uri[len("file://") :] if uri.startswith("file://") else uri


def repo_camera(repo):

    if "://" not in repo and not os.path.isdir(os.path.join(repo, "butler.zarr")):
        msg = f"no Butler repository at {repo}; create one with `apdask simulate --repo {repo}`"
        raise ConfigurationError(msg)
    camera = Butler(repo).camera
    if camera is None:
        msg = f"repository {repo} records no camera; re-create it with `apdask simulate`"
        raise ConfigurationError(msg)
    return camera


def partial_failure_code(report):
    """0 if every CCD succeeded, else the exit code of the first failed CCD (docs/errors.md).

    A CCD whose PPDB access failed carries ``error`` without ``exit_code``: PpdbError's.
    """
    failed = [c for c in report.get("ccds", []) if c.get("error") or c.get("exit_code")]
    if failed:
        names = ", ".join(str(c.get("detector")) for c in failed)
        msg = f"apdask: error: {len(failed)} CCD(s) failed: {names}; see the report"
        print(msg, file=sys.stderr)
        return int(failed[0].get("exit_code") or PpdbError.exit_code)
    return 0


def check_workers(workers):
    """``--workers`` as given, after checking it is at least 1 (before a cluster starts)."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}; e.g. --workers 2")
    return workers
