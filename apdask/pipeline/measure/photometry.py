"""PSF-fit and aperture photometry, aperture corrections and forced photometry."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.table import Table
from photutils.aperture import ApertureMask, CircularAperture

from apdask._kernels.fused import one_blas_thread
from apdask.core.exposure import IGNORE_BITS, MASK, Exposure
from apdask.core.stats import nanmedian_last, robust_sigma
from apdask.pipeline.background import fit_background
from apdask.pipeline.psf import psf_fwhm, psfs_at, require_psf, shifted_psfs
from apdask.pipeline.stars import cutout_at, find_stars, stamps_at, usable_stars

__all__ = ["forced_photometry", "aperture_correction"]


def aperture_correction(
    exposure: Exposure,
    psf_at: Callable[[float, float], np.ndarray],
    *,
    radii: Sequence[float] = (20.0, 15.0, 12.0),
    fwhm: float | None = None,
    max_stars: int = 300,
    min_stars: int = 5,
    max_error: float = 0.005,
    stars: dict[str, Any] | None = None,
) -> tuple[float, int, float]:
    """Aperture correction of PSF fluxes: median ``apFlux(radius) / psfFlux`` of bright stars.

    An empirical PSF model is a truncated, pedestal-subtracted stamp (see
    ``subtract._combine``): light in the wings beyond it (a few per cent for a
    Kolmogorov PSF) is missed by a PSF fit.  As in the Rubin pipelines the PSF
    fluxes are therefore scaled by the ratio of a large-aperture flux to the PSF flux,
    both measured on the same bright isolated stars of ``exposure`` with the same local
    background (the median of an annulus just outside the aperture) and uniform
    weights (the background-limited regime of faint transients).

    Parameters
    ----------
    exposure : apdask.core.exposure.Exposure
        The image whose PSF model ``psf_at`` describes (nJy), with variance and mask.
    psf_at : callable
        ``(x, y) -> PSF stamp`` (sum 1), the model used for the PSF fluxes.
    radii : sequence of float, optional
        Aperture radii in pixels: the largest that gives the correction to
        ``max_error`` (from the background noise of the apertures; stars with a ratio
        error above 0.1 are left out) with at least ``min_stars`` stars is used.
        20 px = 4 arcsec holds 99 % of a 1 arcsec Kolmogorov PSF, 12 px about 97.5 %.
    fwhm : float, optional
        PSF FWHM in pixels for the star finder (default from ``psf_at`` at the centre).
    max_stars, min_stars : int, optional
        Use at most ``max_stars`` of the brightest suitable stars; with fewer than
        ``min_stars`` the correction is 1.
    max_error : float, optional
        Largest error of the correction (inverse-variance weighted mean of the
        3-sigma-clipped ratios).
    stars : dict, optional
        Bright isolated stars already found on ``exposure`` by the star finder
        (``x``, ``y``, optionally ``bkg``, brightest first), e.g. those of the kernel fit;
        default: search (about 0.5 s on a full CCD).

    Returns
    -------
    correction : float
        Multiply PSF fluxes and their errors by this (1.0 when undetermined).
    n_stars : int
        Stars used.
    radius : float
        Aperture radius used (NaN when undetermined).
    """
    ny, nx = exposure.shape
    radii = sorted((float(r) for r in radii), reverse=True)
    if fwhm is None:
        fwhm = float(psf_fwhm(psf_at(nx / 2.0, ny / 2.0)))
    r_out = radii[0] + 12.0
    half = int(np.ceil(r_out)) + 1
    image = np.asarray(exposure.image)
    if stars is None:
        stars = find_stars(
            image,
            exposure.variance,
            exposure.mask,
            fwhm=fwhm,
            nsigma=50.0,
            isolation=r_out,
            border=half,
            max_stars=None,
            contrast=0.002,
        )
    order = usable_stars(len(stars["x"]), max_stars)
    ratios, errors = _star_ratios(exposure, psf_at, stars, order, radii, half)
    return _choose_correction(ratios, errors, radii, min_stars, max_error)


def _star_ratios(
    exposure: Exposure,
    psf_at: Callable[[float, float], np.ndarray],
    stars: dict[str, Any],
    order: np.ndarray,
    radii: Sequence[float],
    half: int,
) -> tuple[list[list[float]], list[list[float]]]:
    """``apFlux(radius) / psfFlux`` and its error of each usable star, per radius.

    All stars at once: ``(n, S, S)`` stamps of side ``2 half + 1``, NaN off the image,
    the local background the median of the annulus ``radii[0] + 4 .. radii[0] + 12``.
    """
    image = np.asarray(exposure.image)
    r_in, r_out = radii[0] + 4.0, radii[0] + 12.0
    bkg = stars.get("bkg")
    ratios: list[list[float]] = [[] for _ in radii]
    errors: list[list[float]] = [[] for _ in radii]
    x = np.asarray(stars["x"], float)[order]
    y = np.asarray(stars["y"], float)[order]
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    psfs = np.array([np.asarray(psf_at(xi, yi), float) for xi, yi in zip(x, y, strict=True)])
    ph = psfs.shape[-1] // 2 if len(order) else 0
    if len(order) and ph <= half:
        # all stars at once: (n, S, S) stamps, NaN off the image as the loop's cutouts were
        d = stamps_at(image, ix, iy, half).astype(float)
        if bkg is not None:  # (the annulus median below removes a constant anyway)
            d -= np.array(
                [cutout_at(bkg, i, j, half, np.float32(0.0)) for i, j in zip(ix, iy, strict=True)]
            )
        v = stamps_at(exposure.variance, ix, iy, half).astype(float)
        m = stamps_at(exposure.mask, ix, iy, half, MASK["NO_DATA"])
        o = np.arange(-half, half + 1, dtype=float)
        r = np.hypot(
            o[None, None, :] - (x - ix)[:, None, None], o[None, :, None] - (y - iy)[:, None, None]
        )
        ok = np.isfinite(d) & np.isfinite(v) & ((m & IGNORE_BITS) == 0)
        ann = ok & (r >= r_in) & (r <= r_out)
        n = len(order)
        use = (ok | (r > radii[0])).reshape(n, -1).all(axis=1)
        use &= ann.reshape(n, -1).sum(axis=1) >= 50
        # the annulus pixels of every star lie within 1 px of those of a centred one
        r0 = np.hypot(o[None, :], o[:, None]).ravel()
        ring = np.flatnonzero((r0 >= r_in - 1.0) & (r0 <= r_out + 1.0))
        ann_r = ann.reshape(n, -1)[:, ring]
        sky = nanmedian_last(np.where(ann_r, d.reshape(n, -1)[:, ring], np.nan))
        v_sky = nanmedian_last(np.where(ann_r, v.reshape(n, -1)[:, ring], np.nan))
        d -= sky[:, None, None]
        p = np.zeros_like(d)
        p[:, half - ph : half + ph + 1, half - ph : half + ph + 1] = shifted_psfs(
            psfs, x - ix, y - iy
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            pf = (p * d).sum(axis=(1, 2)) / (p * p).sum(axis=(1, 2))
        use &= pf > 0
        for k, rad in enumerate(radii):
            inside = r <= rad
            with np.errstate(invalid="ignore", divide="ignore"):
                err = np.sqrt(inside.sum(axis=(1, 2)) * np.maximum(v_sky, 0.0)) / pf
                ratio = np.where(inside, d, 0.0).sum(axis=(1, 2)) / pf
            sel = use & (err <= 0.1)
            ratios[k] = list(ratio[sel])
            errors[k] = list(err[sel])
    return ratios, errors


def _choose_correction(
    ratios: list[list[float]],
    errors: list[list[float]],
    radii: Sequence[float],
    min_stars: int,
    max_error: float,
) -> tuple[float, int, float]:
    """The largest radius whose clipped, weighted mean ratio is determined to
    ``max_error`` with ``min_stars`` stars: ``(correction, n_stars, radius)``."""
    for k, rad in enumerate(radii):
        rk, ek = np.asarray(ratios[k]), np.asarray(errors[k])
        if len(rk) < min_stars:
            continue
        med = float(np.median(rk))
        # one clip of blends and neighbours' light (3 robust sigma, at least 3 errors)
        sig = float(robust_sigma(rk, med))
        keep = np.abs(rk - med) <= 3 * np.maximum(sig, ek)
        w = 1.0 / ek[keep] ** 2
        corr = float((w * rk[keep]).sum() / w.sum())
        if keep.sum() < min_stars or 1.0 / np.sqrt(w.sum()) > max_error:
            continue
        if np.isfinite(corr) and 0.8 < corr < 1.25:
            return corr, int(keep.sum()), rad
    return 1.0, 0, float("nan")


def _psf_fit_many(image, variance, mask, psfs, x, y, bkg=None, full=False):
    """Linear PSF-flux fits (uniform weights) at many fixed positions at once.

    For each position: the PSF shifted to the sub-pixel position (Fourier phase
    ramp), fitted to the background-subtracted box around the nearest pixel, using
    the pixels where the PSF is above 1e-4 of its peak and the data are good;
    ``flux = ΣPd / ΣP²``, ``err = sqrt(ΣP²v) / ΣP²``.  ``edge`` is set when any box
    pixel is masked, off the image or not finite; fewer than 3 usable pixels give NaN.
    Returns ``(flux, flux_err, edge)`` arrays.

    ``psfs`` is ``(n, S, S)``; ``bkg`` a :class:`Background` (or None).  With ``full``,
    also the number of pixels used, χ², for Cramér–Rao centroid errors the sums
    of the squared PSF gradients and of P², and ``Σ ln(2π v)`` over the pixels used
    (for the Gaussian log-likelihood ``-(χ² + Σ ln 2πv) / 2``): ``(flux, flux_err,
    ndata, chi2, edge, (gx2, gy2, s2), lnv)``.
    """
    half = psfs.shape[1] // 2
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    p = shifted_psfs(np.asarray(psfs, float), x - ix, y - iy)
    d = stamps_at(image, ix, iy, half, np.float32(np.nan)).astype(float)
    if bkg is not None:
        coarse, jy, ty, jx, tx = bkg.bilinear()
        coarse, ty, tx = coarse.astype(float), ty.astype(float), tx.astype(float)
        o = np.arange(-half, half + 1)
        r = np.clip(iy[:, None] + o, 0, len(jy) - 1)[:, :, None]
        c = np.clip(ix[:, None] + o, 0, len(jx) - 1)[:, None, :]
        j, t, i, u = jy[r], ty[r], jx[c], tx[c]
        d -= (1 - t) * ((1 - u) * coarse[j, i] + u * coarse[j, i + 1]) + t * (
            (1 - u) * coarse[j + 1, i] + u * coarse[j + 1, i + 1]
        )
    v = stamps_at(variance, ix, iy, half, np.float32(np.nan)).astype(float)
    m = stamps_at(mask, ix, iy, half, np.uint32(MASK["NO_DATA"]))
    ok = np.isfinite(d) & np.isfinite(v) & ((m & IGNORE_BITS) == 0)
    edge = ~ok.all(axis=(1, 2))
    ok &= p > 1e-4 * p.max(axis=(1, 2), keepdims=True)
    n = ok.sum(axis=(1, 2))
    pp = np.where(ok, p, 0.0)
    s2 = (pp * pp).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        flux = (pp * np.where(ok, d, 0.0)).sum(axis=(1, 2)) / s2
        err = np.sqrt((pp * pp * np.where(ok, v, 0.0)).sum(axis=(1, 2))) / s2
    few = n < 3
    flux[few], err[few], edge[few] = np.nan, np.nan, True
    if not full:
        return flux, err, edge
    with np.errstate(invalid="ignore"):
        res = np.where(ok, d - flux[:, None, None] * p, 0.0)
        chi2 = (res * res / np.maximum(np.where(ok, v, 1.0), 1e-30)).sum(axis=(1, 2))
    gy, gx = np.gradient(p, axis=(1, 2))
    g = tuple((np.where(ok, a, 0.0) ** 2).sum(axis=(1, 2)) for a in (gx, gy)) + (s2.copy(),)
    chi2[few] = np.nan
    for a in g:
        a[few] = np.nan
    with np.errstate(invalid="ignore", divide="ignore"):
        lnv = np.where(ok, np.log(2 * np.pi * np.where(ok, v, 1.0)), 0.0).sum(axis=(1, 2))
    lnv[few] = np.nan
    return flux, err, n, chi2, edge, g, lnv


def _ap_corr(difference):
    """Aperture corrections ``(difference, science)`` recorded by ``subtract`` (1 if absent)."""
    if difference is None:
        return 1.0, 1.0
    c_d = float(difference.ap_corr)
    c_s = difference.ap_corr_science
    return c_d, c_d if c_s is None else float(c_s)


def _apply_aperture_correction(tab, difference):
    """Scale PSF fluxes (difference and science) by the aperture corrections."""
    c_d, c_s = _ap_corr(difference)
    for col, c in (
        ("psfFlux", c_d),
        ("psfFluxErr", c_d),
        ("scienceFlux", c_s),
        ("scienceFluxErr", c_s),
    ):
        if c != 1.0:
            tab[col] = np.asarray(tab[col], float) * c


def _sky_errors(wcs, x, y, xe, ye, dec):
    """Propagate pixel errors to RA/Dec errors in degrees (RA error in RA degrees)."""
    if not (np.isfinite(xe) and np.isfinite(ye)):
        return np.nan, np.nan
    cd = wcs.pixel_scale_matrix
    e_ra = np.sqrt((cd[0, 0] * xe) ** 2 + (cd[0, 1] * ye) ** 2)
    e_dec = np.sqrt((cd[1, 0] * xe) ** 2 + (cd[1, 1] * ye) ** 2)
    return float(e_ra / max(np.cos(np.deg2rad(dec)), 1e-6)), float(e_dec)


def _aperture_fluxes(tab, difference, radius):
    """Exact-overlap circular aperture sums and errors (as photutils ``aperture_photometry``
    with masked, non-finite and negative-variance pixels left out), read from small
    cutouts only."""
    ap = CircularAperture(np.column_stack([tab["x"], tab["y"]]), r=radius)
    masks = ap.to_mask(method="exact")
    if isinstance(masks, ApertureMask):
        masks = [masks]
    flux, err = np.full(len(tab), np.nan), np.full(len(tab), np.nan)
    for k, m in enumerate(masks):
        img = m.cutout(difference.image, fill_value=np.nan)
        if img is None:  # entirely off the image
            continue
        var = m.cutout(difference.variance, fill_value=np.nan).astype(float)
        bad = (m.cutout(difference.mask, fill_value=MASK["NO_DATA"]) & IGNORE_BITS) != 0
        bad |= ~np.isfinite(img) | ~np.isfinite(var)
        w = np.where(bad, 0.0, m.data)
        flux[k] = (w * np.where(bad, 0.0, img)).sum()
        err[k] = np.sqrt((w * np.where(bad, 0.0, np.maximum(var, 0.0))).sum())
    tab["apFlux"] = flux
    tab["apFluxErr"] = err


@one_blas_thread
def forced_photometry(
    difference: Exposure, science: Exposure, ra: npt.ArrayLike, dec: npt.ArrayLike
) -> Table:
    """PSF-fit fluxes at given sky positions on the difference and science images.

    Parameters
    ----------
    difference, science : apdask.core.exposure.Exposure
        Same pixel grid; the difference PSF is used for both unless the science
        exposure has its own.
    ra, dec : array_like
        Positions in degrees.

    Returns
    -------
    astropy.table.Table
        ``psfFlux``, ``psfFluxErr``, ``scienceFlux``, ``scienceFluxErr`` (nJy), ``x``,
        ``y`` (pixels) and ``flag_edge`` (fit window off the image or on masked pixels).
    """
    psf = require_psf(difference, "difference")
    psf_sci = np.asarray(science.psf, float) if science.psf is not None else psf
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    x, y = difference.wcs.world_to_pixel_values(ra, dec)
    x, y = np.atleast_1d(x), np.atleast_1d(y)
    ny, nx = difference.shape
    on = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5)
    on &= (y >= -0.5) & (y < ny - 0.5)
    out = {
        k: np.full(len(x), np.nan)
        for k in ("psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr")
    }
    out["flag_edge"] = np.ones(len(x), bool)
    if on.any():  # all positions at once, in blocks (bounded memory)
        bkg = fit_background(science.image, science.mask, lazy=True)
        idx = np.flatnonzero(on)
        for blk in np.array_split(idx, max(1, len(idx) // 2000)):
            xb, yb = x[blk], y[blk]
            f, fe, edge = _psf_fit_many(
                difference.image,
                difference.variance,
                difference.mask,
                psfs_at(difference, psf, xb, yb),
                xb,
                yb,
            )
            sf, sfe, _ = _psf_fit_many(
                science.image,
                science.variance,
                science.mask,
                psfs_at(science, psf_sci, xb, yb),
                xb,
                yb,
                bkg,
            )
            out["psfFlux"][blk], out["psfFluxErr"][blk] = f, fe
            out["scienceFlux"][blk], out["scienceFluxErr"][blk] = sf, sfe
            out["flag_edge"][blk] = edge
    c_d, c_s = _ap_corr(difference)
    tab = Table(
        {
            "psfFlux": np.asarray(out["psfFlux"], float) * c_d,
            "psfFluxErr": np.asarray(out["psfFluxErr"], float) * c_d,
            "scienceFlux": np.asarray(out["scienceFlux"], float) * c_s,
            "scienceFluxErr": np.asarray(out["scienceFluxErr"], float) * c_s,
            "x": np.asarray(x, float),
            "y": np.asarray(y, float),
            "flag_edge": np.asarray(out["flag_edge"], bool),
        }
    )
    return tab
