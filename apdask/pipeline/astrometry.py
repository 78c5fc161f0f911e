"""Astrometric refinement of a predicted WCS against a reference catalogue.

Bright isolated stars are centroided in the science exposure; reference
positions are projected with the current WCS; the offset is found by voting on
all pairwise offsets (a 2-D histogram over ``±max_offset_arcsec``), then refined
by iterative least squares of a similarity transform (shift, rotation, scale)
on nearest-neighbour matches with a shrinking match radius.  The result is a
new linear TAN WCS (CD matrix and CRPIX changed, CRVAL kept).
"""

from __future__ import annotations

import numpy as np
from astropy.wcs.utils import proj_plane_pixel_scales
from scipy.spatial import cKDTree

from apdask.pipeline.psf import psf_fwhm
from apdask.pipeline.stars import find_stars

__all__ = ["refine_wcs"]

_MIN_MATCHES = 5


def _similarity_fit(src, dst, center):
    """Least-squares ``dst ≈ center + t + [[a, -b], [b, a]] (src - center)``; returns (A, t)."""
    p = src - center
    q = dst - center
    n = len(p)
    m = np.zeros((2 * n, 4))
    m[0::2] = np.column_stack([p[:, 0], -p[:, 1], np.ones(n), np.zeros(n)])
    m[1::2] = np.column_stack([p[:, 1], p[:, 0], np.zeros(n), np.ones(n)])
    a, b, tx, ty = np.linalg.lstsq(m, q.reshape(-1), rcond=None)[0]
    return np.array([[a, -b], [b, a]]), np.array([tx, ty])


def _apply(amat, t, pts, center):
    return center + t + (pts - center) @ amat.T


def refine_wcs(exposure, ref_ra, ref_dec, ref_flux=None, max_offset_arcsec=5.0, max_stars=300):
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
    info = {"ok": False, "n_matched": 0, "rms_arcsec": np.nan, "shift_arcsec": np.nan,
            "rotation_deg": np.nan, "scale": np.nan}  # fmt: skip
    ny, nx = exposure.shape
    pix_scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0
    fwhm = float(psf_fwhm(exposure.psf)) if exposure.psf is not None else 4.5
    stars = find_stars(
        exposure.image, exposure.variance, exposure.mask, fwhm=fwhm, nsigma=15.0,
        isolation=3.0 * fwhm, border=int(2 * fwhm) + 2, max_stars=max_stars,
    )  # fmt: skip
    src = np.column_stack([stars["x"], stars["y"]])
    ref_ra = np.atleast_1d(np.asarray(ref_ra, float))
    ref_dec = np.atleast_1d(np.asarray(ref_dec, float))
    rx, ry = wcs.world_to_pixel_values(ref_ra, ref_dec)
    max_pix = max_offset_arcsec / pix_scale
    inside = np.isfinite(rx) & (rx > -max_pix) & (rx < nx + max_pix)
    inside &= (ry > -max_pix) & (ry < ny + max_pix)
    ref = np.column_stack([rx[inside], ry[inside]])
    if ref_flux is not None:
        fl = np.asarray(ref_flux, float)[inside]
        ref = ref[np.argsort(-fl)[: 3 * max(len(src), 1)]]
    if len(src) < _MIN_MATCHES or len(ref) < _MIN_MATCHES:
        return wcs, info

    # 1. vote: 2-D histogram of all pairwise offsets within max_pix
    tree = cKDTree(ref)
    pairs = tree.query_ball_point(src, max_pix + 1.0)
    dxy = np.array([src[i] - ref[j] for i, js in enumerate(pairs) for j in js]).reshape(-1, 2)
    if len(dxy) < _MIN_MATCHES:
        return wcs, info
    nb = int(np.ceil(2 * (max_pix + 1.0) / 1.0))
    edges = np.linspace(-(max_pix + 1.0), max_pix + 1.0, nb + 1)
    h, _, _ = np.histogram2d(dxy[:, 0], dxy[:, 1], bins=[edges, edges])
    # smooth the votes over 3x3 bins to be robust to small rotations
    hs = sum(np.roll(np.roll(h, i, 0), j, 1) for i in (-1, 0, 1) for j in (-1, 0, 1))
    i, j = np.unravel_index(np.argmax(hs), hs.shape)
    t0 = np.array([0.5 * (edges[i] + edges[i + 1]), 0.5 * (edges[j] + edges[j + 1])])
    sel = np.all(np.abs(dxy - t0) < 2.0, axis=1)
    if sel.sum() >= 3:
        t0 = np.median(dxy[sel], axis=0)

    # 2. iterative similarity fit on nearest-neighbour matches
    center = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0])
    amat, t = np.eye(2), t0.copy()
    stree = cKDTree(src)
    matched = None
    for radius in (3.0, 2.0, 1.0, 0.6, 0.6):
        pred = _apply(amat, t, ref, center)
        d, k = stree.query(pred, distance_upper_bound=radius)
        ok = np.isfinite(d)
        if ok.sum() < _MIN_MATCHES:
            return wcs, {**info, "n_matched": int(ok.sum())}
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
    ridx, sidx = matched
    res = _apply(amat, t, ref[ridx], center) - src[sidx]
    rms = float(np.sqrt(np.mean(np.sum(res**2, axis=1)))) * pix_scale

    # 3. new WCS: world = W_old(T^-1(p)),  T(p) = A (p - c) + c + t
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
    shift = _apply(amat, t, center[None], center)[0] - center
    info.update(
        ok=True, n_matched=int(len(ridx)), rms_arcsec=rms,
        shift_arcsec=float(np.hypot(*shift)) * pix_scale,
        rotation_deg=float(np.degrees(np.arctan2(amat[1, 0], amat[0, 0]))),
        scale=float(np.sqrt(abs(np.linalg.det(amat)))),
    )  # fmt: skip
    return new, info
