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

import importlib
import logging
import os
import sys
from collections.abc import Sequence

from apdask.cli.parser import build_parser
from apdask.cli.settings import apply_settings
from apdask.exceptions import ApdaskError

__all__ = ["COMMANDS", "build_parser", "main"]

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
    except ApdaskError as e:
        print(f"apdask: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ValueError, FileNotFoundError) as e:
        print(f"apdask: error: {e}", file=sys.stderr)
        return 64
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `apdask alerts tail | head`: the reader left; exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail
        return 0


if __name__ == "__main__":
    sys.exit(main())
