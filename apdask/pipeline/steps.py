"""The machinery of a CCD's chain: failures that pass down the chain instead of raising.

A CCD whose template, PSF fit or PPDB access fails must not stop the visit: the step
that fails returns a :class:`CcdFailure`, every later step of that CCD passes it on
untouched, and the report step turns it into the CCD's error entry.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from apdask.config import PipelineConfig
from apdask.core.memory import keep_freed_memory
from apdask.exceptions import (
    AlertDeliveryError,
    NoTemplateCoverageError,
    PsfFitError,
    SubtractionQualityError,
)

__all__ = ["CCD_DATA_ERRORS", "CcdFailure", "PpdbUnavailableError", "now_mjd", "per_ccd"]


class PpdbUnavailableError(Exception):
    """A PPDB read or write failed: the CCD reports it, the visit goes on."""


#: Errors of one CCD that end that CCD's chain, not the visit's.
CCD_DATA_ERRORS = (
    AlertDeliveryError,  # the sink cannot take the CCD's alerts (checked before its commit)
    NoTemplateCoverageError,
    PsfFitError,
    SubtractionQualityError,
    PpdbUnavailableError,
)


@dataclass
class CcdFailure:
    """What a step of a failed CCD hands on, in place of its result."""

    error: Exception


def per_ccd(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Step wrapper: a CCD's data or PPDB error becomes a :class:`CcdFailure` that later
    steps pass on (no PPDB write, no alerts), so the visit's other CCDs still run."""

    @functools.wraps(fn)
    def step(*args: Any) -> Any:
        failed = next((a for a in args if isinstance(a, CcdFailure)), None)
        if failed is not None:
            return failed
        cfg = next((a for a in args if isinstance(a, PipelineConfig)), None)
        # in whichever worker process runs the step
        keep_freed_memory(enabled=None if cfg is None else cfg.keep_freed_memory)
        try:
            return fn(*args)
        except CCD_DATA_ERRORS as err:
            return CcdFailure(err)

    return step


def now_mjd() -> float:
    """The current time as MJD (TAI ≈ UTC + 37 s)."""
    return 40587.0 + time.time() / 86400.0 + 37.0 / 86400.0
