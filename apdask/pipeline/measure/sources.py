"""Measurement of DIASources into a table with the official DiaSource column names."""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from apdask._kernels.fused import one_blas_thread
from apdask.core.exposure import MASK, Exposure, mask_bits
from apdask.core.stats import nanmedian_last
from apdask.pipeline.background import Background, fit_background
from apdask.pipeline.measure.detection import _filtered
from apdask.pipeline.measure.fields import FIELD_COLUMNS, add_fields
from apdask.pipeline.measure.photometry import (
    _aperture_fluxes,
    _apply_aperture_correction,
    _psf_fit_many,
    _sky_errors,
)
from apdask.pipeline.measure.reliability import score_reliability
from apdask.pipeline.psf import psf_fwhm, psfs_at, require_psf, stamp_moments
from apdask.pipeline.stars import stamps_at, subpixel_peak, weighted_moments

__all__ = ["measure_sources", "DIASOURCE_COLUMNS"]

#: Columns of the table that :func:`measure_sources` returns, in order.
DIASOURCE_COLUMNS = (
    "visit", "detector", "band", "midpointMjdTai",
    "x", "y", "xErr", "yErr", "ra", "dec", "raErr", "decErr",
    "psfFlux", "psfFluxErr", "psfNdata", "psfChi2", "snr",
    "apFlux", "apFluxErr",
    "scienceFlux", "scienceFluxErr", "templateFlux", "templateFluxErr",
    "isNegative", "ixx", "iyy", "ixy", "ixxPSF", "iyyPSF", "ixyPSF",
    "bboxSize", "extendedness",
    "centroid_flag", "psfFlux_flag", "psfFlux_flag_edge",
    "pixelFlags", "pixelFlags_bad", "pixelFlags_cr", "pixelFlags_crCenter",
    "pixelFlags_edge", "pixelFlags_saturated", "pixelFlags_saturatedCenter",
    "pixelFlags_nodata",
    "isDipole", "dipoleNdata", "trailNdata", "trail_flag",
    "reliability", "reliabilityVersion",
)  # fmt: skip
#: The columns measured one source at a time; ``reliability`` follows from them.
_MEASURED = DIASOURCE_COLUMNS[:-2]


def _pixel_flags(
    mask: np.ndarray, x0: int, x1: int, y0: int, y1: int, ix: int, iy: int
) -> tuple[int, int]:
    """OR of the mask in the box and in the 3x3 pixels around ``(ix, iy)``."""
    ny, nx = mask.shape
    box = mask[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)]
    cen = mask[max(iy - 1, 0) : min(iy + 2, ny), max(ix - 1, 0) : min(ix + 2, nx)]
    anyb = np.bitwise_or.reduce(box, axis=None) if box.size else 0
    anyc = np.bitwise_or.reduce(cen, axis=None) if cen.size else 0
    return int(anyb), int(anyc)


@one_blas_thread
def measure_sources(
    difference: Exposure,
    science: Exposure | None,
    template: Exposure | None,
    detections: Table,
    *,
    visit: int,
    detector: int,
    band: str,
    mjd: float,
    aperture_radius: float = 12.0,
    dipole_radius: float | None = None,
    matched: tuple[Any, ...] | None = None,
) -> Table:
    """Measure detections into a DiaSource table with official Rubin column names.

    The columns of :data:`DIASOURCE_COLUMNS` are measured per source; the flags,
    ``psfLnL``, ``ra_dec_Cov``, ``extendedness`` and the dipole fit of
    :mod:`apdask.pipeline.measure.fields` (:data:`~apdask.pipeline.measure.fields.FIELD_COLUMNS`)
    follow for the whole table.

    Parameters
    ----------
    difference, science, template : apdask.core.exposure.Exposure
        The difference image (nJy, PSF = science PSF), the calibrated science
        exposure and the warped template on the same pixel grid.
    detections : astropy.table.Table
        Output of :func:`detect_sources`.
    visit, detector : int
        Visit and detector numbers.
    band : str
        Filter band.
    mjd : float
        Exposure midpoint, MJD TAI.
    aperture_radius : float, optional
        Radius in pixels of the circular aperture flux on the difference image.
    dipole_radius : float, optional
        Opposite-sign detections closer than this (pixels) are flagged ``isDipole``;
        default 2 x PSF FWHM.
    matched : tuple, optional
        :func:`matched_filter` of ``difference``, if already computed.

    Returns
    -------
    astropy.table.Table
        Columns :data:`DIASOURCE_COLUMNS`; fluxes in nJy, positions in pixels and
        degrees, moments in px².  Unknown floats are NaN.  ``diaSourceId`` is absent.
        ``reliability`` and ``reliabilityVersion`` come from the model shipped with
        the package (:func:`apdask.pipeline.measure.reliability.score_reliability`).
    """
    psf = require_psf(difference, "difference")
    n = len(detections)
    if n == 0:
        return _empty_table()
    filt, _, _ = matched if matched is not None else _filtered(difference, psf)
    fwhm = psf_fwhm(psf)
    dipole_radius = 2.0 * fwhm if dipole_radius is None else dipole_radius
    is_dipole, dipole_ndata = _dipoles(detections, dipole_radius)
    xs, ys, cflag = _centroids(filt, detections)
    fits = _psf_fluxes(difference, science, template, psf, xs, ys)
    common = {"visit": int(visit), "detector": int(detector), "band": str(band)}
    common["midpointMjdTai"] = float(mjd)
    sig_w = max(fwhm / 2.3548, 1.0)
    psf_moments = stamp_moments(psf)[2:]
    cols: dict[str, list[Any]] = {c: [] for c in _MEASURED}
    sky = np.asarray(difference.wcs.pixel_to_world_values(xs, ys), float).reshape(2, n)
    for i in range(n):
        row = _measure_one(
            difference, detections, fits, i, xs[i], ys[i], sig_w, psf_moments, sky[:, i]
        )
        row.update(common)
        row["centroid_flag"] = bool(cflag[i])
        row["isDipole"], row["dipoleNdata"] = bool(is_dipole[i]), int(dipole_ndata[i])
        for c in _MEASURED:
            cols[c].append(row[c])
    tab = Table(cols, names=_MEASURED)
    _apply_aperture_correction(tab, difference)
    _aperture_fluxes(tab, difference, aperture_radius)
    add_fields(tab, difference, science, detections, fits, psf, aperture_radius)
    for c in ("ra", "dec", "raErr", "decErr", "midpointMjdTai"):
        tab[c] = tab[c].astype(np.float64)
    return score_reliability(tab, difference, science, template)


def _dipoles(detections: Table, dipole_radius: float) -> tuple[np.ndarray, np.ndarray]:
    """``isDipole`` (an opposite-sign detection within ``dipole_radius``) and
    ``dipoleNdata`` (the pixels of the dipole's detections) per detection."""
    n = len(detections)
    sign = np.asarray(detections["sign"])
    dx0 = np.asarray(detections["x"])
    dy0 = np.asarray(detections["y"])
    is_dipole = np.zeros(n, bool)
    pos, neg = np.nonzero(sign > 0)[0], np.nonzero(sign < 0)[0]
    if len(pos) and len(neg):
        tp = cKDTree(np.column_stack([dx0[pos], dy0[pos]]))
        tn = cKDTree(np.column_stack([dx0[neg], dy0[neg]]))
        for i, nb in zip(pos, tp.query_ball_tree(tn, dipole_radius), strict=True):
            if nb:
                is_dipole[i] = True
                is_dipole[neg[nb]] = True
    dipole_ndata = np.zeros(n, int)
    if is_dipole.any():
        tree = cKDTree(np.column_stack([dx0, dy0]))
        npix = np.asarray(detections["n_pixels"])
        for i in np.nonzero(is_dipole)[0]:
            near = tree.query_ball_point([dx0[i], dy0[i]], dipole_radius)
            dipole_ndata[i] = int(npix[[j for j in near if is_dipole[j]]].sum())
    return is_dipole, dipole_ndata


def _centroids(filt: np.ndarray, detections: Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-pixel peaks of the matched-filter image (signed) and ``centroid_flag``
    (peak on the border: the detection's pixel is kept)."""
    sign = np.asarray(detections["sign"])
    ix = np.asarray(detections["x"], np.int64)
    iy = np.asarray(detections["y"], np.int64)
    ny, nx = filt.shape
    xs, ys = ix.astype(float), iy.astype(float)
    cflag = ~((ix >= 1) & (ix < nx - 1) & (iy >= 1) & (iy < ny - 1))
    k = np.flatnonzero(~cflag)
    if len(k):
        # the signed 3x3 windows side by side: one call for all (centres at 3j + 1)
        local = stamps_at(filt, ix[k], iy[k], 1) * sign[k, None, None].astype(float)
        row = local.transpose(1, 0, 2).reshape(3, 3 * len(k))
        mid = 3 * np.arange(len(k)) + 1
        x, y = subpixel_peak(row, np.ones(len(k), np.int64), mid)
        xs[k], ys[k] = ix[k] + (x - mid), iy[k] + (y - 1)
    return xs, ys, cflag


def _psf_fluxes(
    difference: Exposure,
    science: Exposure | None,
    template: Exposure | None,
    psf: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
) -> tuple[Any, Any, Any]:
    """PSF fits of all sources at once: difference (with centroid-error terms), science
    and template (None where the image is absent)."""
    psf_sci = science.psf if science is not None and science.psf is not None else psf
    psf_tpl = template.psf if template is not None and template.psf is not None else psf_sci
    psf_sci, psf_tpl = np.asarray(psf_sci, float), np.asarray(psf_tpl, float)
    fit_d = _psf_fit_many(
        difference.image,
        difference.variance,
        difference.mask,
        psfs_at(difference, psf, xs, ys),
        xs,
        ys,
        full=True,
    )
    fit_s = None if science is None else _fit_with_background(science, psf_sci, xs, ys)
    fit_t = None if template is None else _fit_with_background(template, psf_tpl, xs, ys)
    return fit_d, fit_s, fit_t


def _measure_one(
    difference: Exposure,
    detections: Table,
    fits: tuple[Any, Any, Any],
    i: int,
    x: float,
    y: float,
    sig_w: float,
    psf_moments: tuple[float, float, float],
    radec: np.ndarray,
) -> dict[str, Any]:
    """Fluxes, errors, moments, flags and sky coordinates of detection ``i`` at ``(x, y)``
    (``radec``: its RA and Dec, the WCS of ``(x, y)``)."""
    fit_d, fit_s, fit_t = fits
    s = np.asarray(detections["sign"])[i]
    f, fe, nd, chi2, edge = (a[i] for a in fit_d[:5])
    gx2, gy2, s2 = (a[i] for a in fit_d[5])
    # Cramér-Rao centroid errors for the fitted flux and the pixel noise
    with np.errstate(divide="ignore", invalid="ignore"):
        vloc = fe * fe * s2
        xe = np.sqrt(vloc / (f * f * gx2)) if np.isfinite(f) and f != 0 else np.nan
        ye = np.sqrt(vloc / (f * f * gy2)) if np.isfinite(f) and f != 0 else np.nan
    sf, sfe = (fit_s[0][i], fit_s[1][i]) if fit_s is not None else (np.nan, np.nan)
    tf, tfe = (fit_t[0][i], fit_t[1][i]) if fit_t is not None else (np.nan, np.nan)
    mom_half = int(np.ceil(4 * sig_w))
    ixx, iyy, ixy = weighted_moments(difference.image, x, y, sig_w, mom_half, s)
    pxx, pyy, pxy = psf_moments
    flags, bbox = _source_flags(difference, detections, i, x, y)
    ra, dec = radec
    rae, dece = _sky_errors(difference.wcs, x, y, xe, ye, float(dec))
    return {
        "x": x, "y": y, "xErr": xe, "yErr": ye,
        "ra": float(np.mod(ra, 360.0)), "dec": float(dec), "raErr": rae, "decErr": dece,
        "psfFlux": f, "psfFluxErr": fe, "psfNdata": int(nd), "psfChi2": chi2,
        "snr": f / fe if fe > 0 else np.nan,
        "apFlux": np.nan, "apFluxErr": np.nan,
        "scienceFlux": sf, "scienceFluxErr": sfe, "templateFlux": tf, "templateFluxErr": tfe,
        "isNegative": bool(s < 0), "ixx": ixx, "iyy": iyy, "ixy": ixy,
        "ixxPSF": pxx, "iyyPSF": pyy, "ixyPSF": pxy,
        "bboxSize": int(bbox), "extendedness": np.nan,
        "psfFlux_flag": bool(not np.isfinite(f) or not np.isfinite(fe)),
        "psfFlux_flag_edge": bool(edge),
        "pixelFlags": any(flags.values()), **flags,
        "trailNdata": 0, "trail_flag": False,  # the trail fit (fields.add_fields) sets them
    }  # fmt: skip


def _source_flags(
    difference: Exposure, detections: Table, i: int, x: float, y: float
) -> tuple[dict[str, bool], int]:
    """``pixelFlags_*`` over the footprint's box grown to the PSF stamp, and ``bboxSize``."""
    x0, x1 = int(detections["bbox_x0"][i]), int(detections["bbox_x1"][i])
    y0, y1 = int(detections["bbox_y0"][i]), int(detections["bbox_y1"][i])
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    half = np.asarray(difference.psf).shape[0] // 2
    anyb, anyc = _pixel_flags(
        difference.mask,
        min(x0, ix - half),
        max(x1, ix + half + 1),
        min(y0, iy - half),
        max(y1, iy + half + 1),
        ix,
        iy,
    )
    flags = {
        "pixelFlags_bad": bool(anyb & MASK["BAD"]),
        "pixelFlags_cr": bool(anyb & MASK["CR"]),
        "pixelFlags_crCenter": bool(anyc & MASK["CR"]),
        "pixelFlags_edge": bool(anyb & MASK["EDGE"]),
        "pixelFlags_saturated": bool(anyb & MASK["SAT"]),
        "pixelFlags_saturatedCenter": bool(anyc & MASK["SAT"]),
        "pixelFlags_nodata": bool(anyb & MASK["NO_DATA"]),
    }
    return flags, max(x1 - x0, y1 - y0)


def _empty_table() -> Table:
    """An empty DiaSource table with the column types of :data:`DIASOURCE_COLUMNS`."""
    types = {
        "visit": int, "detector": int, "band": str, "psfNdata": int, "bboxSize": int,
        "dipoleNdata": int, "trailNdata": int, "reliability": np.float32,
        "reliabilityVersion": str,
    }  # fmt: skip
    dt = []
    for c in _MEASURED:
        if c in types:
            dt.append(types[c])
        elif c.startswith(("is", "pixelFlags")) or c.endswith("_flag") or "_flag_" in c:
            dt.append(bool)
        else:
            dt.append(float)
    tab = Table(names=_MEASURED, dtype=dt)
    for c in FIELD_COLUMNS:  # apdask.pipeline.measure.fields, in the order add_fields adds
        tab[c] = np.zeros(
            0, bool if c.startswith(("pixelFlags", "dipoleFit")) or "_flag" in c else np.float32
        )
    for c in DIASOURCE_COLUMNS[len(_MEASURED) :]:  # the reliability, last as it is scored
        tab[c] = np.zeros(0, types[c])
    return tab


def _fit_with_background(exposure, psf, xs, ys):
    """PSF fits at ``(xs, ys)`` on an exposure whose local background is fitted first."""
    half = np.asarray(psf).shape[0] // 2
    bkg = _background_near(exposure.image, exposure.mask, xs, ys, half)
    return _psf_fit_many(
        exposure.image, exposure.variance, exposure.mask, psfs_at(exposure, psf, xs, ys),
        xs, ys, bkg,
    )  # fmt: skip


def _background_near(image, mask, xs, ys, half, box=64):
    """:func:`~apdask.pipeline.background.fit_background` (lazy) where PSF fits of
    half-size ``half`` at ``(xs, ys)`` read it, NaN elsewhere.

    The map at a pixel blends 2 × 2 coarse cells, and each cell is the 3 × 3 median of
    block medians: only the blocks around the sources' cells are measured (about half
    of a 4k CCD's for ~150 sources).  The values are those of ``fit_background``; a
    grid too small for its median filter, or a measured block without any good pixel
    (whose fill needs every block), falls back to it.
    """
    ny, nx = image.shape
    nby, nbx = max(1, ny // box), max(1, nx // box)
    if min(nby, nbx) < 3 or len(xs) == 0:
        return fit_background(image, mask, box=box, lazy=True)
    by, bx = ny // nby, nx // nbx
    ynodes = (np.arange(nby) + 0.5) * by - 0.5
    xnodes = (np.arange(nbx) + 0.5) * bx - 0.5
    _, jy, _, jx, _ = Background(np.zeros((nby, nbx)), ynodes, xnodes, image.shape).bilinear()
    ix, iy = np.floor(np.asarray(xs) + 0.5).astype(int), np.floor(np.asarray(ys) + 0.5).astype(int)
    need = np.zeros((nby, nbx), bool)  # the cells the fits blend
    for y0, y1, x0, x1 in zip(
        jy[np.clip(iy - half, 0, ny - 1)], jy[np.clip(iy + half, 0, ny - 1)] + 2,
        jx[np.clip(ix - half, 0, nx - 1)], jx[np.clip(ix + half, 0, nx - 1)] + 2, strict=True,
    ):  # fmt: skip
        need[y0:y1, x0:x1] = True
    blocks = ndimage.binary_dilation(need, np.ones((3, 3), bool))  # the median filter's
    j, i = np.nonzero(blocks)
    # every other row and column of each block, as fit_background samples them
    data = image[: nby * by, : nbx * bx].reshape(nby, by, nbx, bx)[:, ::2, :, ::2][j, :, i]
    data = data.astype(np.float32, copy=False)  # a copy already (the gather)
    bad = ~np.isfinite(data)
    if mask is not None:
        m = mask[: nby * by, : nbx * bx].reshape(nby, by, nbx, bx)[:, ::2, :, ::2][j, :, i]
        bad |= (m & mask_bits("BAD", "SAT", "CR", "NO_DATA")) != 0
    data[bad] = np.nan
    med = nanmedian_last(data.reshape(len(j), -1))
    if np.isnan(med).any():
        return fit_background(image, mask, box=box, lazy=True)
    coarse = np.zeros((nby, nbx), np.float32)
    coarse[j, i] = med
    coarse = ndimage.median_filter(coarse, size=3, mode="nearest")
    coarse[~need] = np.nan
    return Background(np.asarray(coarse, float), ynodes, xnodes, image.shape)
