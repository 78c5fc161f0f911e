"""The DiaSource fields measured after the per-source loop of ``measure_sources``.

Pixel flags of every plane the schema names, the flags of the aperture, forced and
shape measurements, ``psfLnL``, ``ra_dec_Cov``, ``extendedness``, the dipole fit
(:mod:`apdask.pipeline.measure.dipole`) and the trailed-source fit
(:mod:`apdask.pipeline.measure.trail`).  Definitions are in ``docs/alerts.md``,
"Measured fields".
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.table import Table

from apdask.core.exposure import MASK, Exposure
from apdask.pipeline.measure.dipole import DIPOLE_COLUMNS, fit_dipoles
from apdask.pipeline.measure.trail import TRAIL_COLUMNS, fit_trails
from apdask.pipeline.psf import psf_fwhm, psf_getter
from apdask.pipeline.stars import weighted_moments

__all__ = ["FIELD_COLUMNS", "add_fields", "extendedness"]

#: Boolean columns :func:`add_fields` adds.
_FLAG_COLUMNS = (
    "pixelFlags_nodataCenter", "pixelFlags_interpolated", "pixelFlags_interpolatedCenter",
    "pixelFlags_offimage", "pixelFlags_suspect", "pixelFlags_suspectCenter",
    "pixelFlags_streak", "pixelFlags_streakCenter", "pixelFlags_injected",
    "pixelFlags_injectedCenter", "pixelFlags_injected_template",
    "pixelFlags_injected_templateCenter",
    "psfFlux_flag_noGoodPixels", "apFlux_flag", "apFlux_flag_apertureTruncated",
    "forced_PsfFlux_flag", "forced_PsfFlux_flag_edge", "forced_PsfFlux_flag_noGoodPixels",
    "shape_flag", "shape_flag_no_pixels", "shape_flag_not_contained",
    "shape_flag_parent_source", "dipoleFitAttempted",
)  # fmt: skip

#: Columns :func:`add_fields` adds to the DiaSource table (``extendedness``,
#: ``isDipole``, ``dipoleNdata``, ``trailNdata`` and ``trail_flag`` are already there
#: and are rewritten).
FIELD_COLUMNS = (
    *_FLAG_COLUMNS, "psfLnL", "ra_dec_Cov", *DIPOLE_COLUMNS, *TRAIL_COLUMNS, "trail_flag_edge",
)  # fmt: skip

#: ``extendedness`` is 0 up to this ratio of source to PSF second-moment trace ...
_EXT_LO = 1.2
#: ... and 1 from this one, linear between.
_EXT_HI = 1.8


def extendedness(trace_ratio: Any) -> Any:
    """``extendedness`` from the ratio of the source's to the PSF's moment trace.

    ``(Ixx + Iyy) / (Ixx_PSF + Iyy_PSF)`` of the same Gaussian-weighted moments is 1
    for a point source; ``extendedness`` is 0 at or below 1.2, 1 at or above 1.8 and
    linear between (NaN where the moments failed).
    """
    r = np.asarray(trace_ratio, float)
    return np.clip((r - _EXT_LO) / (_EXT_HI - _EXT_LO), 0.0, 1.0)


def _mask_ors(
    mask: np.ndarray, detections: Table, xs: np.ndarray, ys: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray]:
    """OR of the mask over each footprint's box grown to the PSF stamp, and over the
    3x3 pixels at the centroid (the boxes of ``pixelFlags_*`` in ``measure_sources``)."""
    ny, nx = mask.shape
    n = len(xs)
    anyb, anyc = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for i in range(n):
        ix, iy = int(np.floor(xs[i] + 0.5)), int(np.floor(ys[i] + 0.5))
        x0 = max(min(int(detections["bbox_x0"][i]), ix - half), 0)
        x1 = min(max(int(detections["bbox_x1"][i]), ix + half + 1), nx)
        y0 = max(min(int(detections["bbox_y0"][i]), iy - half), 0)
        y1 = min(max(int(detections["bbox_y1"][i]), iy + half + 1), ny)
        box = mask[y0:y1, x0:x1]
        cen = mask[max(iy - 1, 0) : min(iy + 2, ny), max(ix - 1, 0) : min(ix + 2, nx)]
        anyb[i] = int(np.bitwise_or.reduce(box, axis=None)) if box.size else 0
        anyc[i] = int(np.bitwise_or.reduce(cen, axis=None)) if cen.size else 0
    return anyb, anyc


def _pixel_flag_columns(
    tab: Table, difference: Exposure, detections: Table, half: int
) -> dict[str, np.ndarray]:
    """The ``pixelFlags_*`` that ``measure_sources`` does not set, as booleans."""
    xs, ys = np.asarray(tab["x"], float), np.asarray(tab["y"], float)
    anyb, anyc = _mask_ors(difference.mask, detections, xs, ys, half)
    ny, nx = difference.shape
    no = np.zeros(len(tab), bool)
    return {
        "pixelFlags_nodataCenter": (anyc & MASK["NO_DATA"]) != 0,
        # ISR interpolates exactly the cosmic-ray pixels (apdask.pipeline.isr)
        "pixelFlags_interpolated": (anyb & MASK["CR"]) != 0,
        "pixelFlags_interpolatedCenter": (anyc & MASK["CR"]) != 0,
        "pixelFlags_offimage": (xs < -0.5) | (xs > nx - 0.5) | (ys < -0.5) | (ys > ny - 0.5),
        "pixelFlags_suspect": (anyb & MASK["SUSPECT"]) != 0,
        "pixelFlags_suspectCenter": (anyc & MASK["SUSPECT"]) != 0,
        # no streak masking and no source injection: those planes are never set
        "pixelFlags_streak": no,
        "pixelFlags_streakCenter": no,
        "pixelFlags_injected": no,
        "pixelFlags_injectedCenter": no,
        "pixelFlags_injected_template": no,
        "pixelFlags_injected_templateCenter": no,
    }


def _shape_columns(tab: Table, detections: Table, psf: np.ndarray) -> dict[str, np.ndarray]:
    """``shape_flag*`` and ``extendedness`` from the weighted moments of the table."""
    ixx, iyy = np.asarray(tab["ixx"], float), np.asarray(tab["iyy"], float)
    ixy = np.asarray(tab["ixy"], float)
    xs, ys = np.asarray(tab["x"], float), np.asarray(tab["y"], float)
    failed = ~(np.isfinite(ixx) & np.isfinite(iyy) & np.isfinite(ixy))
    no_pixels = np.asarray(tab["psfNdata"], int) == 0
    inside = (xs >= np.asarray(detections["bbox_x0"]) - 0.5) & (
        xs <= np.asarray(detections["bbox_x1"]) - 0.5
    )
    inside &= (ys >= np.asarray(detections["bbox_y0"]) - 0.5) & (
        ys <= np.asarray(detections["bbox_y1"]) - 0.5
    )
    # the PSF's moments with the same weight as the sources' (measure_sources)
    h = psf.shape[0] // 2
    sig_w = max(float(psf_fwhm(psf)) / 2.3548, 1.0)
    pxx, pyy, _ = weighted_moments(psf, float(h), float(h), sig_w, int(np.ceil(4 * sig_w)))
    with np.errstate(invalid="ignore", divide="ignore"):
        ext = extendedness((ixx + iyy) / (pxx + pyy))
    return {
        "shape_flag": failed | no_pixels,
        "shape_flag_no_pixels": no_pixels,
        "shape_flag_not_contained": ~inside,
        # no deblending: no DiaSource is a parent
        "shape_flag_parent_source": np.zeros(len(tab), bool),
        "extendedness": np.where(failed, np.nan, ext).astype(np.float32),
    }


def _ra_dec_cov(tab: Table, difference: Exposure) -> np.ndarray:
    """Covariance of (RA cos Dec, Dec) in deg² from ``xErr``, ``yErr`` (independent)."""
    cd = difference.wcs.pixel_scale_matrix
    xe, ye = np.asarray(tab["xErr"], float), np.asarray(tab["yErr"], float)
    return (cd[0, 0] * cd[1, 0] * xe * xe + cd[0, 1] * cd[1, 1] * ye * ye).astype(np.float32)


def add_fields(
    tab: Table,
    difference: Exposure,
    science: Exposure | None,
    detections: Table,
    fits: tuple[Any, Any, Any],
    psf: np.ndarray,
    aperture_radius: float,
) -> None:
    """Add :data:`FIELD_COLUMNS` to ``tab`` (in place) and rewrite ``extendedness``.

    Parameters
    ----------
    tab : astropy.table.Table
        The DiaSource table of ``measure_sources`` (one row per detection, same order).
    difference, science : apdask.core.exposure.Exposure
        The difference image and the science exposure (None: no forced flux).
    detections : astropy.table.Table
        The detections the table was measured from.
    fits : tuple
        ``measure_sources``' PSF fits on the difference, science and template.
    psf : numpy.ndarray
        The difference image's PSF stamp.
    aperture_radius : float
        Radius of ``apFlux`` in pixels.
    """
    n = len(tab)
    fit_d, fit_s, _ = fits
    cols: dict[str, Any] = _pixel_flag_columns(tab, difference, detections, psf.shape[0] // 2)
    nd = np.asarray(tab["psfNdata"], int)
    cols["psfFlux_flag_noGoodPixels"] = nd < 3
    ap = np.asarray(tab["apFlux"], float)
    xs, ys = np.asarray(tab["x"], float), np.asarray(tab["y"], float)
    ny, nx = difference.shape
    r = float(aperture_radius)
    cols["apFlux_flag_apertureTruncated"] = (
        (xs - r < -0.5) | (xs + r > nx - 0.5) | (ys - r < -0.5) | (ys + r > ny - 0.5)
    )
    cols["apFlux_flag"] = ~np.isfinite(ap) | cols["apFlux_flag_apertureTruncated"]
    if fit_s is None:
        s_bad, s_edge = np.ones(n, bool), np.ones(n, bool)
    else:
        s_bad = ~np.isfinite(np.asarray(fit_s[0], float))
        s_edge = np.asarray(fit_s[2], bool)
    cols["forced_PsfFlux_flag"] = s_bad | s_edge
    cols["forced_PsfFlux_flag_edge"] = s_edge
    cols["forced_PsfFlux_flag_noGoodPixels"] = s_bad
    cols.update(_shape_columns(tab, detections, psf))
    chi2, lnv = np.asarray(fit_d[3], float), np.asarray(fit_d[6], float)
    cols["psfLnL"] = (-0.5 * (chi2 + lnv)).astype(np.float32)
    cols["ra_dec_Cov"] = _ra_dec_cov(tab, difference)
    for c, v in cols.items():
        tab[c] = np.asarray(v)
    fit_dipoles(
        tab,
        difference,
        psf_getter(difference, psf),
        np.asarray(detections["sign"]),
        float(difference.ap_corr),
    )
    fit_trails(tab, difference, detections, psf_getter(difference, psf), float(difference.ap_corr))
