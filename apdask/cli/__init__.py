"""The ``apdask`` command."""

from apdask.cli.main import main

__all__ = ["main"]
