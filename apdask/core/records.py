"""Typed records that the tasks of a CCD's chain hand to each other.

They replace the dicts of the first versions: a reader sees in one place what each
step receives and returns.  In-graph records are frozen dataclasses (they pickle
between workers); the reports, which end as JSON, are ``TypedDict`` so that they
stay plain dicts for ``json.dump`` and for existing readers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from apdask.core.exposure import Exposure

__all__ = [
    "Association",
    "CcdReport",
    "CcdRows",
    "Fetched",
    "Measurement",
    "PpdbHistory",
    "Prefetch",
    "RawHeader",
    "Stored",
    "Subtraction",
    "VisitReport",
]


@dataclass(frozen=True)
class Fetched:
    """One raw image delivered by the distributor."""

    path: str  #: local file
    name: str  #: image name at the distributor
    registered: float  #: Unix time the distributor registered it (else when the fetch returned)
    fetched: float  #: Unix time the fetch returned
    waited: float  #: seconds the fetch blocked


@dataclass(frozen=True)
class RawHeader:
    """The headers of a visit's snaps, checked against the invocation."""

    metas: tuple[Any, ...]  #: apdask.io.raw.RawMetadata per snap
    exptime: float  #: effective exposure time (s), summed over snaps, from shutter motion
    darktimes: tuple[float, ...]
    mjd: float  #: mid-exposure MJD (TAI), mean over snaps
    visit: int
    ra: float
    dec: float
    rotpa: float
    fetched: tuple[Fetched, ...]
    processing_started: float  #: Unix time the header task started

    @property
    def processed_mjd(self) -> float:
        """Nominal ``timeProcessedMjdTai``: the end of the exposure.

        Deterministic per visit, so that re-running a CCD reproduces its rows exactly
        (docs/ppdb.md, Idempotence).
        """
        return float(self.mjd) + 0.5 * float(self.exptime) / 86400.0


@dataclass(frozen=True)
class PpdbHistory:
    """The PPDB as it was before this visit, in the CCD's region."""

    objects: Any = None  #: astropy Table of DIAObjects
    sources: Any = None  #: 12-month DIASource history
    forced: Any = None  #: 12-month DIAForcedSource history
    drp: Any = None  #: DRP Object ids and positions

    def as_mapping(self) -> dict[str, Any]:
        """The ``{"objects", "sources", "forced", "drp"}`` mapping the association reads."""
        return {"objects": self.objects, "sources": self.sources, "forced": self.forced,
                "drp": self.drp}  # fmt: skip


@dataclass(frozen=True)
class Prefetch:
    """What a CCD needs before its pixels exist (read at nextVisit time)."""

    tiles: Sequence[Any]  #: template tiles overlapping the footprint
    calibs: Mapping[str, np.ndarray]  #: master bias, dark and flat
    refcat: Any  #: reference catalogue (DRP objects) for astrometry
    history: PpdbHistory
    ppdb_error: str | None = None  #: a failed PPDB read: this CCD reports it, without alerts
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Subtraction:
    """A difference image with the images it came from and the subtraction's figures."""

    science: Exposure  #: calibrated, cosmic rays masked, with its PSF model
    template: Exposure  #: warped template with its PSF
    difference: Exposure
    info: Mapping[str, Any]  #: kernel, stamps, noise ratio, aperture correction, ...
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    """The DIASources measured on a difference image (official column names)."""

    sources: Any  #: astropy Table
    timings: Mapping[str, float] = field(default_factory=dict)
    qa: Mapping[str, Any] | None = None  #: the subtraction's QA record (apdask.pipeline.quality)


@dataclass(frozen=True)
class Association:
    """DIASources and forced sources tied to DIAObjects, ready for the PPDB and alerts."""

    sources: Any  #: DIASources with diaSourceId and diaObjectId
    objects: Any  #: new DIAObject versions
    forced: Any  #: forced sources at known DIAObjects, or None
    matched: np.ndarray  #: per source: index of the matched object, -1 for new
    drp_matches: Any
    history: Any  #: DIASource history including this visit's sources (for alerts)
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Stored:
    """The outcome of the CCD's PPDB write."""

    stored: bool
    error: str | None = None
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class CcdRows:
    """What one CCD of one visit stored in the PPDB (``Ppdb.get_ccd_rows``).

    A re-run of a CCD that an earlier run stored but did not finish sending re-makes
    its alerts from these.
    """

    sources: Any  #: astropy Table: the CCD's DiaSources, ordered by diaSourceId
    #: astropy Table: for each of their DiaObjects, its version valid at the visit (the
    #: one this visit wrote; the last of them when two CCDs of the visit touched it)
    objects: Any


class CcdReport(TypedDict, total=False):
    """One CCD's entry of the visit report (JSON)."""

    detector: str
    detector_id: int
    visit: int
    n_sources: int
    n_new_objects: int
    n_forced: int
    n_alerts: int
    stored: bool
    error: str
    error_type: str
    exit_code: int
    alert_file: str | None
    alerts_delivered: int
    alerts_spooled: int
    alerts_trimmed: int
    alert_spool: str | None
    alerts_resent: bool  #: re-made from rows an earlier run stored (it crashed before sending)
    done_record: str  #: the CCD's done record in the sink (apdask.alerts.done)
    alert_written: float
    timings: dict[str, float]
    image_registered: float
    latency_s: float
    latency: dict[str, float | None]
    exptime: float
    astrometry: dict[str, Any]
    template_coverage: float
    template_partial: bool
    subtraction: dict[str, Any]
    config: dict[str, Any]
    qa: dict[str, Any] | None


class VisitReport(TypedDict, total=False):
    """The report of one visit (JSON): totals and one :class:`CcdReport` per CCD."""

    visit: int
    groupId: str
    instrument: str
    band: str
    n_alerts: int
    n_alerts_delivered: int
    n_alerts_spooled: int
    failed: list[str]
    ccds: list[CcdReport]
    config: dict[str, Any]
    skipped: list[str]
    task_seconds: dict[str, float]
