"""Dipole fit of DIASources with a positive and a negative lobe.

A dipole (a source that moved, or a PSF or astrometric mismatch between science and
template) shows as a positive and a negative detection close together.  For each such
pair the difference image is fitted with two PSFs of opposite sign: four positions
by bounded non-linear least squares, the two fluxes solved linearly at each step.
The ``dipole*`` columns of both lobes' DiaSources take the same fit (see
``docs/alerts.md``, "Measured fields").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.table import Table
from scipy.optimize import least_squares
from scipy.spatial import cKDTree

from apdask.core.exposure import IGNORE_BITS, MASK, Exposure
from apdask.pipeline.psf import shifted_psf
from apdask.pipeline.stars import stamps_at

__all__ = ["DIPOLE_COLUMNS", "fit_dipole", "fit_dipoles"]

#: Float columns :func:`fit_dipoles` fills (NaN where no fit was attempted).
DIPOLE_COLUMNS = (
    "dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr",
    "dipoleLength", "dipoleAngle", "dipoleChi2",
)  # fmt: skip

#: Largest move of a lobe from its detection's centroid during the fit (pixels).
_MAX_SHIFT = 2.0
#: Both lobes' fitted fluxes must be this significant for ``isDipole``.
_MIN_LOBE_SNR = 3.0


def _render(psf: np.ndarray, dx: float, dy: float, half: int) -> np.ndarray:
    """``(2 half + 1)²`` stamp with ``psf`` centred ``(dx, dy)`` from its central pixel."""
    h = psf.shape[0] // 2
    ix, iy = int(np.floor(dx + 0.5)), int(np.floor(dy + 0.5))
    out = np.zeros((2 * half + 1, 2 * half + 1))
    y0, x0 = half + iy - h, half + ix - h
    out[y0 : y0 + 2 * h + 1, x0 : x0 + 2 * h + 1] = shifted_psf(psf, dx - ix, dy - iy)
    return out


def _fluxes(
    d: np.ndarray, w: np.ndarray, pp: np.ndarray, pn: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted linear fit ``d = a pp - b pn``: ``((a, b), covariance)``."""
    a = np.array(
        [[(w * pp * pp).sum(), -(w * pp * pn).sum()], [-(w * pp * pn).sum(), (w * pn * pn).sum()]]
    )
    rhs = np.array([(w * pp * d).sum(), -(w * pn * d).sum()])
    cov = np.linalg.pinv(a)
    return cov @ rhs, cov


def fit_dipole(
    exposure: Exposure,
    psf: np.ndarray,
    pos: tuple[float, float],
    neg: tuple[float, float],
    max_nfev: int = 60,
) -> dict[str, Any] | None:
    """Fit a positive and a negative PSF to the difference image around two lobes.

    Parameters
    ----------
    exposure : apdask.core.exposure.Exposure
        The difference image (variance and mask used).
    psf : numpy.ndarray
        PSF stamp (odd side, sum 1) at the dipole.
    pos, neg : tuple of float
        Starting ``(x, y)`` of the positive and the negative lobe (pixels).
    max_nfev : int, optional
        Most model evaluations of the position fit.

    Returns
    -------
    dict or None
        ``x_pos``, ``y_pos``, ``x_neg``, ``y_neg`` (pixels), ``flux_pos``, ``flux_neg``
        (both positive for a dipole, image units), their errors ``err_pos``,
        ``err_neg`` and covariance ``cov``, ``chi2`` and ``ndata`` (pixels used);
        None when the stamp has fewer usable pixels than parameters.
    """
    psf = np.asarray(psf, float)
    sep = float(np.hypot(pos[0] - neg[0], pos[1] - neg[1]))
    cx = int(np.floor(0.5 * (pos[0] + neg[0]) + 0.5))
    cy = int(np.floor(0.5 * (pos[1] + neg[1]) + 0.5))
    half = psf.shape[0] // 2 + int(np.ceil(0.5 * sep + _MAX_SHIFT)) + 2
    cxy = np.array([cx], int), np.array([cy], int)
    d = stamps_at(exposure.image, *cxy, half, np.float32(np.nan))[0].astype(float)
    v = stamps_at(exposure.variance, *cxy, half, np.float32(np.nan))[0].astype(float)
    m = stamps_at(exposure.mask, *cxy, half, np.uint32(MASK["NO_DATA"]))[0]
    ok = np.isfinite(d) & np.isfinite(v) & (v > 0) & ((m & IGNORE_BITS) == 0)
    # the pixels where either lobe (at its start) has light
    near = np.maximum(_render(psf, pos[0] - cx, pos[1] - cy, half), 0.0)
    near += np.maximum(_render(psf, neg[0] - cx, neg[1] - cy, half), 0.0)
    ok &= near > 1e-3 * near.max()
    ndata = int(ok.sum())
    if ndata < 7:
        return None
    w = np.where(ok, 1.0 / np.where(ok, v, 1.0), 0.0)
    d = np.where(ok, d, 0.0)
    sw = np.sqrt(w)[ok]

    def model(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pp = _render(psf, theta[0] - cx, theta[1] - cy, half)
        pn = _render(psf, theta[2] - cx, theta[3] - cy, half)
        return pp, pn

    def resid(theta: np.ndarray) -> np.ndarray:
        pp, pn = model(theta)
        (a, b), _ = _fluxes(d, w, pp, pn)
        return ((d - a * pp + b * pn)[ok]) * sw

    t0 = np.array([pos[0], pos[1], neg[0], neg[1]], float)
    sol = least_squares(
        resid,
        t0,
        bounds=(t0 - _MAX_SHIFT, t0 + _MAX_SHIFT),
        method="trf",
        x_scale=1.0,
        diff_step=1e-3,
        max_nfev=max_nfev,
    )
    pp, pn = model(sol.x)
    (a, b), _ = _fluxes(d, w, pp, pn)
    cov = _flux_covariance(model, sol.x, a, b, ok, sw)
    return {
        "x_pos": float(sol.x[0]), "y_pos": float(sol.x[1]),
        "x_neg": float(sol.x[2]), "y_neg": float(sol.x[3]),
        "flux_pos": float(a), "flux_neg": float(b),
        "err_pos": float(np.sqrt(max(cov[0, 0], 0.0))),
        "err_neg": float(np.sqrt(max(cov[1, 1], 0.0))),
        "cov": float(cov[0, 1]), "chi2": float(2.0 * sol.cost), "ndata": ndata,
    }  # fmt: skip


def _flux_covariance(
    model: Any, theta: np.ndarray, a: float, b: float, ok: np.ndarray, sw: np.ndarray
) -> np.ndarray:
    """Covariance of the two fluxes with the four positions free too (the fluxes and
    the separation of a close dipole are correlated): the flux block of ``(JᵀJ)⁻¹`` for
    the weighted model ``a P(x₊) - b P(x₋)``, the position derivatives by differences."""
    pp, pn = model(theta)
    cols = [pp[ok] * sw, -pn[ok] * sw]
    step = 1e-3
    for k in range(4):
        t = theta.copy()
        t[k] += step
        qp, qn = model(t)
        cols.append(((a * (qp - pp) - b * (qn - pn)) / step)[ok] * sw)
    jac = np.column_stack(cols)
    return np.linalg.pinv(jac.T @ jac)[:2, :2]


def _pairs(sign: np.ndarray, xs: np.ndarray, ys: np.ndarray, flagged: np.ndarray) -> np.ndarray:
    """``(positive, negative)`` row of the dipole of each flagged source (-1 if none): the
    source itself and the nearest flagged source of the other sign."""
    out = np.full((len(sign), 2), -1, int)
    pos = np.flatnonzero(flagged & (sign > 0))
    neg = np.flatnonzero(flagged & (sign < 0))
    if not (len(pos) and len(neg)):
        return out
    for mine, other in ((pos, neg), (neg, pos)):
        _, k = cKDTree(np.column_stack([xs[other], ys[other]])).query(
            np.column_stack([xs[mine], ys[mine]])
        )
        partner = other[np.asarray(k, int)]
        col = 0 if mine is pos else 1
        out[mine, col] = mine
        out[mine, 1 - col] = partner
    return out


def _bearing(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> Any:
    """Position angle (deg, east of north, 0..360) of point 2 seen from point 1."""
    r1, d1, r2, d2 = (np.deg2rad(np.asarray(a, float)) for a in (ra1, dec1, ra2, dec2))
    y = np.sin(r2 - r1) * np.cos(d2)
    x = np.cos(d1) * np.sin(d2) - np.sin(d1) * np.cos(d2) * np.cos(r2 - r1)
    return np.mod(np.rad2deg(np.arctan2(y, x)), 360.0)


def _separation(ra1: Any, dec1: Any, ra2: Any, dec2: Any) -> Any:
    """Angular separation in degrees (haversine)."""
    r1, d1, r2, d2 = (np.deg2rad(np.asarray(a, float)) for a in (ra1, dec1, ra2, dec2))
    h = np.sin(0.5 * (d2 - d1)) ** 2 + np.cos(d1) * np.cos(d2) * np.sin(0.5 * (r2 - r1)) ** 2
    return np.rad2deg(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def fit_dipoles(
    tab: Table,
    difference: Exposure,
    psf_at: Any,
    sign: np.ndarray,
    flux_scale: float = 1.0,
) -> None:
    """Fill the ``dipole*`` columns, ``dipoleFitAttempted`` and ``isDipole`` of ``tab``.

    A fit is attempted for the sources whose ``isDipole`` is set on input (an
    opposite-sign detection nearby); each pair is fitted once and both lobes take its
    result.  ``isDipole`` stays set where both fitted lobes are significant
    (``flux / err >= 3``).  ``dipoleNdata`` becomes the pixels of the fit.

    Parameters
    ----------
    tab : astropy.table.Table
        DiaSources (``x``, ``y``, ``isDipole``), changed in place.
    difference : apdask.core.exposure.Exposure
    psf_at : callable
        ``(x, y) -> PSF stamp``.
    sign : numpy.ndarray
        +1/-1 per row (the detection's sign).
    flux_scale : float, optional
        Aperture correction applied to the fitted fluxes, as to ``psfFlux``.
    """
    n = len(tab)
    out = {c: np.full(n, np.nan, np.float32) for c in DIPOLE_COLUMNS}
    flagged = np.asarray(tab["isDipole"], bool) if n else np.zeros(0, bool)
    xs, ys = np.asarray(tab["x"], float), np.asarray(tab["y"], float)
    pairs = _pairs(np.asarray(sign), xs, ys, flagged)
    is_dip, ndata = np.zeros(n, bool), np.zeros(n, np.int64)
    done: dict[tuple[int, int], dict[str, Any] | None] = {}
    for i in np.flatnonzero(flagged).tolist():
        key = (int(pairs[i, 0]), int(pairs[i, 1]))
        if key not in done:
            p, q = key
            mx, my = 0.5 * (xs[p] + xs[q]), 0.5 * (ys[p] + ys[q])
            psf = np.asarray(psf_at(mx, my), float)
            done[key] = fit_dipole(difference, psf, (xs[p], ys[p]), (xs[q], ys[q]))
        fit = done[key]
        if fit is None:
            continue
        _fill_row(out, i, fit, difference, flux_scale)
        ndata[i] = fit["ndata"]
        is_dip[i] = min(fit["flux_pos"] / fit["err_pos"], fit["flux_neg"] / fit["err_neg"]) >= (
            _MIN_LOBE_SNR
        )
    for c in DIPOLE_COLUMNS:
        tab[c] = out[c]
    tab["dipoleFitAttempted"] = flagged
    tab["isDipole"] = is_dip
    tab["dipoleNdata"] = ndata


def _fill_row(
    out: dict[str, np.ndarray], i: int, fit: dict[str, Any], exp: Exposure, scale: float
) -> None:
    """The schema's dipole values of one source from a :func:`fit_dipole` result."""
    fp, fn = fit["flux_pos"] * scale, fit["flux_neg"] * scale
    ep, en, c = fit["err_pos"] * scale, fit["err_neg"] * scale, fit["cov"] * scale * scale
    (rp, rn), (dp, dn) = exp.wcs.pixel_to_world_values(
        [fit["x_pos"], fit["x_neg"]], [fit["y_pos"], fit["y_neg"]]
    )
    out["dipoleMeanFlux"][i] = 0.5 * (fp + fn)
    out["dipoleMeanFluxErr"][i] = 0.5 * np.sqrt(max(ep * ep + en * en + 2 * c, 0.0))
    out["dipoleFluxDiff"][i] = fp - fn
    out["dipoleFluxDiffErr"][i] = np.sqrt(max(ep * ep + en * en - 2 * c, 0.0))
    out["dipoleLength"][i] = 3600.0 * _separation(rn, dn, rp, dp)
    out["dipoleAngle"][i] = _bearing(rn, dn, rp, dp)
    out["dipoleChi2"][i] = fit["chi2"]
