"""Typed records that the tasks of a CCD's chain hand to each other.

They replace the dicts of the first versions: a reader sees in one place what each
step receives and returns.  In-graph records are frozen dataclasses (they pickle
between workers); the reports, which end as JSON, are ``TypedDict`` so that they
stay plain dicts for ``json.dump`` and for existing readers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, TypedDict

import numpy as np

from apdask.core.exposure import Exposure

__all__ = [
    "Association",
    "Calibrated",
    "CcdReport",
    "CcdRows",
    "Fetched",
    "Measurement",
    "PpdbHistory",
    "Prefetch",
    "Prewarped",
    "RawHeader",
    "Stored",
    "Subtraction",
    "SubtractionInfo",
    "VisitReport",
    "Warped",
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
    #: per snap, where each amplifier's pixels lie (apdask.io.raw.Segment, or None)
    segments: tuple[tuple[Any, ...], ...] = ()

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
    """What a CCD needs before its pixels exist (read at nextVisit time), besides the
    master calibrations and the template, which are tasks of their own."""

    refcat: Any  #: reference catalogue (DRP objects) for astrometry
    history: PpdbHistory
    ppdb_error: str | None = None  #: a failed PPDB read: this CCD reports it, without alerts
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibrated:
    """The science image calibrated to nJy, with the WCS refined on the reference
    catalogue."""

    exposure: Exposure
    astrometry: Mapping[str, Any] = field(default_factory=dict)  #: the WCS fit's figures
    timings: Mapping[str, float] = field(default_factory=dict)
    #: the star search of the image (an ``apdask.pipeline.stars.StarPeaks``; the core
    #: does not import the pipeline) that the WCS fit and the PSF model select their
    #: stars from; None once the image has changed
    peaks: Any = None


@dataclass(frozen=True)
class Prewarped:
    """The template as prefetch leaves it, before the image exists.

    Either warped onto the CCD's predicted grid with a margin (``exposure``), or, when
    that is off or failed, the tiles to warp once the WCS is refined.
    """

    exposure: Exposure | None  #: the template on the predicted grid grown by a margin
    tiles: Sequence[Any] | None = None  #: the template tiles, when not prewarped
    error: str | None = None  #: why prewarping failed (the warp then says it again)
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Warped:
    """The template warped onto the science image's pixel grid."""

    exposure: Exposure
    coverage: float  #: fraction of the CCD with template data (the rest is NO_DATA)
    timings: Mapping[str, float] = field(default_factory=dict)
    #: "shift" (the prefetch's warp moved onto the refined grid) or "warp" (tiles warped)
    method: str = "warp"
    shift: Mapping[str, float] = field(default_factory=dict)  #: shift_x/y, residual_px


@dataclass(frozen=True)
class SubtractionInfo:
    """The figures of one subtraction (:func:`apdask.pipeline.subtract.difference.subtract`).

    Fluxes are in the science image's calibration; FWHMs and positions in pixels.
    :meth:`as_dict` gives the strict-JSON part (without the kernel and timings) that
    the CCD report carries as ``"subtraction"``.
    """

    kernel_sum: float  #: photometric scale science/template at the CCD centre
    kernel_size: int  #: side of the matching kernel (odd)
    n_stamps: int  #: stars used for the kernel fit
    stamp_chi2: list[float]  #: reduced χ² per used stamp
    fwhm_science: float
    fwhm_template: float
    fwhm_difference: float
    direction: str  #: "convolve_template" or "convolve_science"
    decorrelated: bool
    background: list[float]  #: background-difference coefficients of the fit
    background_residual: list[float]  #: residual background removed afterwards
    noise_ratio: float  #: robust σ of difference / √variance (1 for a correct variance)
    ap_corr: float  #: aperture correction of the difference's PSF fluxes
    ap_corr_science: float  #: the same for the science image's PSF fluxes
    ap_corr_n_stars: int
    ap_corr_radius: float
    n_bright_sources: int
    model: dict[str, Any]  #: the kernel model used (order, basis degrees, ...)
    fallback: list[str]  #: what the model lowered for want of stars
    kernel_sum_range: list[float]  #: (min, max) of the kernel sum over the CCD
    stamp_x: list[int]
    stamp_y: list[int]
    kernel: np.ndarray | None = None  #: the constant term of the kernel
    timing: Mapping[str, float] = field(default_factory=dict)  #: seconds per step
    preconvolved: bool = False
    variance_correction: float = 1.0  #: factor applied to the variance (``apdask diff``)
    snr_map_sigma_before: float | None = None  #: the S/N map's σ before that correction

    def as_dict(self) -> dict[str, Any]:
        """The figures as a plain dict, without ``kernel`` and ``timing``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for k in ("kernel", "timing"):
            out.pop(k)
        if out["snr_map_sigma_before"] is None:
            out.pop("snr_map_sigma_before")
        return out


@dataclass(frozen=True)
class Subtraction:
    """A difference image with the images it came from and the subtraction's figures."""

    science: Exposure  #: calibrated, cosmic rays masked, with its PSF model
    template: Exposure  #: warped template with its PSF
    difference: Exposure
    info: SubtractionInfo
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
    template_warp: dict[str, Any]
    template_partial: bool
    subtraction: dict[str, Any]
    config: dict[str, Any]
    qa: dict[str, Any] | None
    products: dict[str, str]  #: image product kind -> file (apdask.io.products)


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
