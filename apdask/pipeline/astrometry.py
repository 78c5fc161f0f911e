"""Astrometric refinement of a predicted WCS against a reference catalogue.

Bright isolated stars are centroided in the science exposure; reference
positions are projected with the current WCS; the offset is found by voting on
all pairwise offsets (a 2-D histogram over ``±max_offset_arcsec``), then refined
by iterative least squares of a similarity transform (shift, rotation, scale)
on nearest-neighbour matches with a shrinking match radius.  The result is a
new linear TAN WCS (CD matrix and CRPIX changed, CRVAL kept).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.spatial import cKDTree

from apdask.core.exposure import Exposure
from apdask.pipeline.psf import psf_fwhm
from apdask.pipeline.stars import StarPeaks, find_stars, star_peaks

__all__ = ["refine_wcs", "star_search"]

_MIN_MATCHES = 5


def _search_fwhm(exposure: Exposure) -> float:
    """The FWHM (px) the stars are searched with: the exposure's PSF's, else 4.5."""
    return float(psf_fwhm(exposure.psf)) if exposure.psf is not None else 4.5


def star_search(exposure: Exposure) -> StarPeaks:
    """The star search :func:`refine_wcs` selects its stars from (``peaks``)."""
    return star_peaks(exposure.image, exposure.variance, exposure.mask, _search_fwhm(exposure))


def _similarity_fit(
    src: np.ndarray, dst: np.ndarray, center: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares ``dst ≈ center + t + [[a, -b], [b, a]] (src - center)``; returns (A, t)."""
    p = src - center
    q = dst - center
    n = len(p)
    m = np.zeros((2 * n, 4))
    m[0::2] = np.column_stack([p[:, 0], -p[:, 1], np.ones(n), np.zeros(n)])
    m[1::2] = np.column_stack([p[:, 1], p[:, 0], np.zeros(n), np.ones(n)])
    a, b, tx, ty = np.linalg.lstsq(m, q.reshape(-1), rcond=None)[0]
    return np.array([[a, -b], [b, a]]), np.array([tx, ty])


def _apply(amat: np.ndarray, t: np.ndarray, pts: np.ndarray, center: np.ndarray) -> np.ndarray:
    """``T(p) = A (p − c) + c + t``."""
    return center + t + (pts - center) @ amat.T


def refine_wcs(
    exposure: Exposure,
    ref_ra: npt.ArrayLike,
    ref_dec: npt.ArrayLike,
    ref_flux: npt.ArrayLike | None = None,
    max_offset_arcsec: float = 5.0,
    max_stars: int = 300,
    peaks: StarPeaks | None = None,
) -> tuple[WCS, dict[str, Any]]:
    """Correct the WCS of an exposure with a reference star catalogue.

    Parameters
    ----------
    exposure : apdask.core.exposure.Exposure
        Science exposure with an approximate (predicted) celestial WCS.
    ref_ra, ref_dec : array_like
        Reference star positions in degrees.
    ref_flux : array_like, optional
        Reference fluxes; when given only the brightest references are used.
    max_offset_arcsec : float, optional
        Largest pointing error searched.
    max_stars : int, optional
        Number of brightest detected stars used.
    peaks : apdask.pipeline.stars.StarPeaks, optional
        The star search to select the stars from (:func:`star_search`; made here when
        not given): the caller can hand it on to the PSF model.

    Returns
    -------
    wcs : astropy.wcs.WCS
        The corrected WCS, or the input WCS unchanged when the fit failed.
    info : dict
        ``ok`` (bool), ``n_matched``, ``rms_arcsec`` (match residual rms),
        ``shift_arcsec`` (correction at the CCD centre), ``rotation_deg`` and
        ``scale`` (relative plate-scale change); NaN where unknown.
    """
    wcs = exposure.wcs
    info: dict[str, Any] = {
        "ok": False,
        "n_matched": 0,
        "rms_arcsec": np.nan,
        "shift_arcsec": np.nan,
        "rotation_deg": np.nan,
        "scale": np.nan,
    }
    ny, nx = exposure.shape
    pix_scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
    fwhm = _search_fwhm(exposure)
    stars = find_stars(
        exposure.image,
        exposure.variance,
        exposure.mask,
        fwhm=fwhm,
        nsigma=15.0,
        isolation=3.0 * fwhm,
        border=int(2 * fwhm) + 2,
        max_stars=max_stars,
        peaks=peaks,
    )
    src = np.column_stack([stars["x"], stars["y"]])
    max_pix = max_offset_arcsec / pix_scale
    ref = _reference_pixels(wcs, ref_ra, ref_dec, ref_flux, (ny, nx), max_pix, len(src))
    if len(src) < _MIN_MATCHES or len(ref) < _MIN_MATCHES:
        return wcs, info
    t0 = _vote_offset(src, ref, max_pix)
    if t0 is None:
        return wcs, info
    center = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    fit = _iterative_fit(src, ref, t0, center)
    if isinstance(fit, int):
        return wcs, {**info, "n_matched": fit}
    amat, t, (ridx, sidx) = fit
    res = _apply(amat, t, ref[ridx], center) - src[sidx]
    rms = float(np.sqrt(np.mean(np.sum(res**2, axis=1)))) * pix_scale
    new = _corrected_wcs(wcs, amat, t, center)
    shift = _apply(amat, t, center[None], center)[0] - center
    info.update(
        ok=True,
        n_matched=int(len(ridx)),
        rms_arcsec=rms,
        shift_arcsec=float(np.hypot(*shift)) * pix_scale,
        rotation_deg=float(np.degrees(np.arctan2(amat[1, 0], amat[0, 0]))),
        scale=float(np.sqrt(abs(np.linalg.det(amat)))),
    )
    return new, info


def _reference_pixels(
    wcs: WCS,
    ref_ra: npt.ArrayLike,
    ref_dec: npt.ArrayLike,
    ref_flux: npt.ArrayLike | None,
    shape: tuple[int, int],
    max_pix: float,
    n_src: int,
) -> np.ndarray:
    """Pixel positions of the references within ``max_pix`` of the CCD, brightest
    ``3 n_src`` first when fluxes are given."""
    ny, nx = shape
    ref_ra = np.atleast_1d(np.asarray(ref_ra, float))
    ref_dec = np.atleast_1d(np.asarray(ref_dec, float))
    rx, ry = wcs.world_to_pixel_values(ref_ra, ref_dec)
    inside = np.isfinite(rx) & (rx > -max_pix) & (rx < nx + max_pix)
    inside &= (ry > -max_pix) & (ry < ny + max_pix)
    ref = np.column_stack([rx[inside], ry[inside]])
    if ref_flux is not None:
        fl = np.asarray(ref_flux, float)[inside]
        ref = ref[np.argsort(-fl)[: 3 * max(n_src, 1)]]
    return ref


def _vote_offset(src: np.ndarray, ref: np.ndarray, max_pix: float) -> np.ndarray | None:
    """The offset ``src − ref`` most pairs agree on: a 2-D histogram of all pairwise
    offsets within ``max_pix``, smoothed over 3x3 bins; None with too few pairs."""
    tree = cKDTree(ref)
    pairs = tree.query_ball_point(src, max_pix + 1.0)
    dxy = np.array([src[i] - ref[j] for i, js in enumerate(pairs) for j in js]).reshape(-1, 2)
    if len(dxy) < _MIN_MATCHES:
        return None
    nb = int(np.ceil(2 * (max_pix + 1.0) / 1.0))
    edges = np.linspace(-(max_pix + 1.0), max_pix + 1.0, nb + 1)
    h, _, _ = np.histogram2d(dxy[:, 0], dxy[:, 1], bins=[edges, edges])
    # smooth the votes over 3x3 bins to be robust to small rotations
    hs = sum(np.roll(np.roll(h, i, 0), j, 1) for i in (-1, 0, 1) for j in (-1, 0, 1))
    i, j = np.unravel_index(np.argmax(hs), np.shape(hs))
    t0 = np.array([0.5 * (edges[i] + edges[i + 1]), 0.5 * (edges[j] + edges[j + 1])])
    sel = np.all(np.abs(dxy - t0) < 2.0, axis=1)
    if sel.sum() >= 3:
        t0 = np.median(dxy[sel], axis=0)
    return t0


def _iterative_fit(
    src: np.ndarray, ref: np.ndarray, t0: np.ndarray, center: np.ndarray
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray]] | int:
    """Similarity fit on nearest-neighbour matches with a shrinking radius.

    Returns ``(A, t, (ref rows, src rows))``, or the number of matches when too few.
    """
    amat, t = np.eye(2), t0.copy()
    stree = cKDTree(src)
    matched = None
    for radius in (3.0, 2.0, 1.0, 0.6, 0.6):
        pred = _apply(amat, t, ref, center)
        d, k = stree.query(pred, distance_upper_bound=radius)
        ok = np.isfinite(d)
        if ok.sum() < _MIN_MATCHES:
            return int(ok.sum())
        # one source per reference and vice versa
        ridx = np.nonzero(ok)[0]
        _, first = np.unique(k[ridx], return_index=True)
        ridx = ridx[first]
        amat, t = _similarity_fit(ref[ridx], src[k[ridx]], center)
        res = _apply(amat, t, ref[ridx], center) - src[k[ridx]]
        rr = np.hypot(res[:, 0], res[:, 1])
        clip = rr < max(3.0 * np.sqrt(np.mean(rr**2)), 0.05)
        if clip.sum() >= _MIN_MATCHES and not clip.all():
            ridx = ridx[clip]
            amat, t = _similarity_fit(ref[ridx], src[k[ridx]], center)
        matched = (ridx, k[ridx])
    assert matched is not None
    return amat, t, matched


def _corrected_wcs(wcs: WCS, amat: np.ndarray, t: np.ndarray, center: np.ndarray) -> WCS:
    """New WCS: world = W_old(T⁻¹(p)), ``T(p) = A (p − c) + c + t``."""
    ainv = np.linalg.inv(amat)
    # T^-1(p) = ainv (p - c - t) + c = ainv p + (c - ainv (c + t))
    off = center - ainv @ (center + t)
    new = wcs.deepcopy()
    cd_old = wcs.wcs.cd if wcs.wcs.has_cd() else wcs.wcs.get_pc() * wcs.wcs.cdelt[:, None]
    cd_new = cd_old @ ainv
    crpix0 = np.asarray(wcs.wcs.crpix, float) - 1.0
    # CD (ainv p + off - crpix0) = CD ainv (p - A (crpix0 - off))
    crpix_new = amat @ (crpix0 - off) + 1.0
    if wcs.wcs.has_cd():
        new.wcs.cd = cd_new
    else:
        new.wcs.pc = cd_new / wcs.wcs.cdelt[:, None]
    new.wcs.crpix = crpix_new
    new.wcs.set()
    return new
