"""The ``apdask`` command.  Thin: it parses arguments and calls the API.

Exit codes are documented in ``docs/errors.md``: every :class:`ApdaskError` carries
its own; argument errors exit 64 (EX_USAGE).

The command implementations live in one module per group (``run``, ``data``,
``alerts``, ``distributor``, ``settings``) and are found through :data:`COMMANDS`,
a registry of ``"module:function"`` names.  Only the chosen command's module is
imported, so ``apdask --help`` and a short command do not pay for importing the whole
pipeline (start-up time counts for batch jobs, issue 18).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from apdask.cli.parser import build_parser
from apdask.cli.settings import apply_settings
from apdask.exceptions import (
    ApdaskError,
    InternalError,
    PpdbError,
    StorageError,
    StoragePermissionError,
    UsageError,
)

__all__ = ["COMMANDS", "as_apdask_error", "build_parser", "main"]

log = logging.getLogger("apdask")

#: Command name -> "module:function" of its implementation.
COMMANDS = {
    "config": "apdask.cli.settings:config_command",
    "simulate": "apdask.cli.data:simulate_command",
    "evaluate": "apdask.cli.data:evaluate_command",
    "butler": "apdask.cli.data:butler_command",
    "ppdb": "apdask.cli.data:ppdb_command",
    "bench": "apdask.cli.data:bench_command",
    "process-ccd": "apdask.cli.run:process_ccd_command",
    "process-visit": "apdask.cli.run:process_visit_command",
    "process-calib": "apdask.cli.run:process_calib_command",
    "listen": "apdask.cli.run:listen_command",
    "submit": "apdask.cli.run:submit_command",
    "demo": "apdask.cli.run:demo_command",
    "alerts": "apdask.cli.alerts:alerts_command",
    "distributor": "apdask.cli.distributor:distributor_command",
    "diff": "apdask.tools.diff:run_cli",
}


def _command(name):
    module, func = COMMANDS[name].split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``apdask`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    try:
        apply_settings(args.config, args.settings)
        return _command(args.command)(args) or 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `apdask alerts tail | head`: the reader left; exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 0
    except Exception as e:  # every error ends as one line and a documented code
        err = as_apdask_error(e)
        if args.verbose and not isinstance(e, ApdaskError | ValueError | FileNotFoundError):
            traceback.print_exc(file=sys.stderr)
        print(f"apdask: error: {err}", file=sys.stderr)
        return err.exit_code


def as_apdask_error(e: BaseException) -> ApdaskError:
    """The documented :class:`ApdaskError` for any error a command raised.

    Bad arguments (``ValueError``, a missing input file) are usage errors (64); OS
    errors become :class:`StorageError` (74; full disk, I/O error, read-only file
    system) or :class:`StoragePermissionError` (77), with the file and the fix; an
    escaped database error is a :class:`PpdbError` (69); anything else is an
    :class:`InternalError` (70), a bug, whose traceback ``-v`` shows.
    """
    if isinstance(e, ApdaskError):
        return e
    if isinstance(e, ValueError | FileNotFoundError):
        return UsageError(str(e))
    if isinstance(e, OSError):
        return _os_error(e)
    if type(e).__module__.split(".")[0] in ("sqlalchemy", "psycopg2", "sqlite3"):
        return PpdbError(f"PPDB error: {e}; check that the database is up and writable")
    return InternalError(
        f"unexpected {type(e).__name__}: {e} (a bug in apdask: run again with -v for the "
        "traceback and report it)"
    )


def _os_error(e: OSError) -> ApdaskError:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = (
            f"no space left on the device{where}: free disk space or point the output "
            "elsewhere (--repo, --alerts, apdask.products.dir)"
        )
        return StorageError(msg)
    if e.errno in (errno.EACCES, errno.EPERM):
        msg = (
            f"permission denied{where}: run as the owner or make it writable, or point "
            "the output elsewhere"
        )
        return StoragePermissionError(msg)
    if e.errno == errno.EROFS:
        msg = f"read-only file system{where}: point the output at a writable directory"
        return StoragePermissionError(msg)
    return StorageError(f"{e.strerror or e}{where}: check the disk and the path")


if __name__ == "__main__":
    sys.exit(main())
