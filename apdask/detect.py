"""Detection and measurement of DIASources on a difference image.

Detection is a PSF matched filter: the difference image and its variance are
convolved with the PSF (and PSF²) and the ratio gives a signal-to-noise map on
which photutils' ``detect_sources`` finds footprints above ``threshold_sigma``,
separately for positive and negative sources.  Masked pixels (EDGE, NO_DATA,
BAD, SAT, CR) are zeroed before filtering, so they can neither trigger nor
contribute to a detection.

Measurement uses the official Rubin DiaSource column names (APDB schema v11):
PSF-fit fluxes on the difference, science and (warped) template images at the
centroid, aperture fluxes, second moments, pixel flags and dipole / trail
flags.  ``diaSourceId`` is not assigned here.

The module also hosts small pixel helpers shared by the other pixel stages
(FFT convolution, background map, bright-star finder).
"""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits
from astropy.table import Table
from photutils.aperture import ApertureMask, CircularAperture
from scipy import ndimage
from scipy.spatial import cKDTree

from . import config
from ._fourier import convolve_tiles
from ._fused import (
    inner_threads,
    matched_inputs,
    one_blas_thread,
    segments,
    smoothed_residual,
    snr_map,
)
from ._stats import nanmedian_last
from .exceptions import PsfFitError
from .image import MASK, MASK_STAMP_DTYPE, mask_bits, mask_plane_cards

__all__ = [
    "matched_filter",
    "detect_sources",
    "measure_sources",
    "forced_photometry",
    "aperture_correction",
    "make_cutout",
    "cutout_size",
    "DIASOURCE_COLUMNS",
]

#: Mask planes that exclude a pixel from detection and fitting.
_IGNORE = mask_bits("EDGE", "NO_DATA", "BAD", "SAT", "CR")

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
)  # fmt: skip


# --------------------------------------------------------------------------------------
# shared pixel helpers
# --------------------------------------------------------------------------------------
def _workers():
    return inner_threads()


def _interp_matrix(nodes, n):
    """Dense matrix that linearly interpolates node values to pixels ``0..n-1`` (or to the
    pixel positions ``n``, an array), clamped at the outer nodes."""
    nodes = np.asarray(nodes, dtype=float)
    x = np.arange(n, dtype=float) if np.ndim(n) == 0 else np.asarray(n, float)
    m = np.zeros((len(x), len(nodes)))
    if len(nodes) == 1:
        m[:, 0] = 1.0
        return m
    j = np.clip(np.searchsorted(nodes, x, side="right") - 1, 0, len(nodes) - 2)
    t = np.clip((x - nodes[j]) / (nodes[j + 1] - nodes[j]), 0.0, 1.0)
    m[np.arange(len(x)), j] = 1.0 - t
    m[np.arange(len(x)), j + 1] += t
    return m


def _upsample(coarse, ynodes, xnodes, shape):
    """Bilinear interpolation of a coarse grid (values at ``ynodes x xnodes``) to ``shape``."""
    my = _interp_matrix(ynodes, shape[0]).astype(np.float32)
    right = (np.asarray(coarse, float) @ _interp_matrix(xnodes, shape[1]).T).astype(np.float32)
    return my @ right


class Background:
    """A smooth background: block medians, bilinearly interpolated between block centres.

    :meth:`full` is the whole map; slicing (``bkg[y0:y1, x0:x1]``) evaluates a small box
    only, and :meth:`bilinear` gives fused loops what they need, so per-source
    measurements and the star finder never build the full 4k × 4k map (0.1 s, 64 MB).
    """

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, coarse, ynodes, xnodes, shape):
        self.coarse, self.ynodes, self.xnodes, self.shape = coarse, ynodes, xnodes, shape

    def __getitem__(self, key):
        """The map on a box ``[y0:y1, x0:x1]`` (slices only), float32."""
        ry, rx = (np.arange(*k.indices(n)) for k, n in zip(key, self.shape, strict=True))
        return (_interp_matrix(self.ynodes, ry) @ self.coarse
                @ _interp_matrix(self.xnodes, rx).T).astype(np.float32)  # fmt: skip

    def bilinear(self):
        """``(coarse, jy, ty, jx, tx)``: the map at ``(y, x)`` is the bilinear blend of
        ``coarse[jy[y]:jy[y]+2, jx[x]:jx[x]+2]`` with weights ``ty[y]``, ``tx[x]``
        (what :meth:`full` computes, for fused loops)."""
        coarse = np.asarray(self.coarse, np.float32)
        out = []
        for axis, (nodes, n) in enumerate(zip((self.ynodes, self.xnodes), self.shape, strict=True)):
            nodes = np.asarray(nodes, float)
            if len(nodes) == 1:  # one node: constant along this axis
                nodes = np.array([nodes[0], nodes[0] + 1.0])
                coarse = np.repeat(coarse, 2, axis=axis)
            x = np.arange(n, dtype=float)
            j = np.clip(np.searchsorted(nodes, x, side="right") - 1, 0, len(nodes) - 2)
            t = np.clip((x - nodes[j]) / (nodes[j + 1] - nodes[j]), 0.0, 1.0)
            out += [j.astype(np.int64), t.astype(np.float32)]
        return (np.ascontiguousarray(coarse), *out)

    def full(self):
        """The map on every pixel (float32)."""
        return _upsample(self.coarse, self.ynodes, self.xnodes, self.shape)


def _background(image, mask=None, box=64, lazy=False):
    """Smooth background map: block medians (masked pixels ignored), bilinear upsampled
    (a :class:`Background` to evaluate on demand when ``lazy``)."""
    ny, nx = image.shape
    nby, nbx = max(1, ny // box), max(1, nx // box)
    by, bx = ny // nby, nx // nbx

    def sample(a):  # every other row and column of each block
        return a[: nby * by, : nbx * bx].reshape(nby, by, nbx, bx)[:, ::2, :, ::2]

    data = sample(np.asarray(image)).astype(np.float32)
    bad = ~np.isfinite(data)
    if mask is not None:
        bad |= (sample(np.asarray(mask)) & mask_bits("BAD", "SAT", "CR", "NO_DATA")) != 0
    data[bad] = np.nan
    blocks = data.transpose(0, 2, 1, 3).reshape(nby, nbx, -1)
    coarse = nanmedian_last(blocks)
    allnan = np.isnan(coarse)
    if np.all(allnan):
        coarse = np.zeros((nby, nbx), np.float32)
    else:
        coarse[allnan] = np.median(coarse[~allnan])
    if min(nby, nbx) >= 3:
        coarse = ndimage.median_filter(coarse, size=3, mode="nearest")
    ynodes = (np.arange(nby) + 0.5) * by - 0.5
    xnodes = (np.arange(nbx) + 0.5) * bx - 0.5
    model = Background(np.asarray(coarse, float), ynodes, xnodes, image.shape)
    return model if lazy else model.full()


def _gaussian_psf(sigma, size=None):
    """Pixel-sampled circular Gaussian stamp of sum 1."""
    if size is None:
        size = 2 * int(np.ceil(4 * sigma)) + 1
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    g = np.exp(-0.5 * (x * x + y * y) / sigma**2)
    return g / g.sum()


def _moments(stamp, xc=None, yc=None):
    """Unweighted first and second moments of a stamp: (x, y, ixx, iyy, ixy)."""
    ny, nx = stamp.shape
    y, x = np.mgrid[0:ny, 0:nx]
    s = stamp.sum()
    if xc is None:
        xc = (stamp * x).sum() / s
        yc = (stamp * y).sum() / s
    dx, dy = x - xc, y - yc
    return (
        xc,
        yc,
        (stamp * dx * dx).sum() / s,
        (stamp * dy * dy).sum() / s,
        (stamp * dx * dy).sum() / s,
    )


def _psf_fwhm(psf):
    """FWHM in pixels of a PSF stamp from its second moments (Gaussian equivalent).

    The moments are taken within 3 half-maximum radii of the centre, so that noise or
    ringing in the far wings (e.g. of a decorrelated difference-image PSF) cannot
    dominate them.
    """
    p = np.asarray(psf, dtype=float)
    n = p.shape[0]
    yy, xx = np.mgrid[:n, :n] - n // 2
    r_half = np.sqrt(np.count_nonzero(p >= 0.5 * p.max()) / np.pi)
    p = np.where(np.hypot(xx, yy) <= max(3.0 * r_half, 3.0), p, 0.0)
    _, _, ixx, iyy, _ = _moments(p)
    return 2.3548 * np.sqrt(0.5 * (ixx + iyy))


def _subpixel_peak(img, iy, ix):
    """Log-parabola sub-pixel refinement of local maxima at integer (iy, ix)."""
    ny, nx = img.shape
    iy = np.clip(iy, 1, ny - 2)
    ix = np.clip(ix, 1, nx - 2)
    c = img[iy, ix]
    tiny = np.maximum(np.abs(c) * 1e-6, 1e-30)

    def _off(m, p):
        lm = np.log(np.maximum(m, tiny))
        lc = np.log(np.maximum(c, tiny))
        lp = np.log(np.maximum(p, tiny))
        den = lm - 2 * lc + lp
        with np.errstate(divide="ignore", invalid="ignore"):
            off = 0.5 * (lm - lp) / den
        off = np.where(np.isfinite(off) & (den < 0), off, 0.0)
        return np.clip(off, -0.5, 0.5)

    dx = _off(img[iy, ix - 1], img[iy, ix + 1])
    dy = _off(img[iy - 1, ix], img[iy + 1, ix])
    return ix + dx, iy + dy


def _find_stars(
    image, variance, mask, *, fwhm=4.5, nsigma=10.0, isolation=10.0, border=12, max_stars=None,
    avoid=None, contrast=0.0,
):  # fmt: skip
    """Bright, isolated, unmasked point-like peaks.

    Returns a dict of arrays ``x``, ``y`` (sub-pixel), ``snr`` (matched-filter),
    ``flux`` (peak of the Gaussian-filtered, background-subtracted image) and
    ``neighbour`` (the brightest other peak within ``isolation`` over this one's),
    sorted by decreasing ``snr``, with ``isolation`` and ``bkg`` (the background, a
    :class:`Background`: slice it for a box).
    ``avoid`` is a boolean image of pixels a star may not touch within ``border``
    pixels.  A star is isolated when no other peak above 5 sigma
    and brighter than ``contrast`` times its own peak lies within ``isolation`` pixels.
    """
    ny, nx = image.shape
    bkg = _background(image, mask, lazy=True)
    sigma = fwhm / 2.3548
    sm, bad = smoothed_residual(image, bkg.bilinear(), mask, _IGNORE, sigma, truncate=3.0)
    vs = np.asarray(variance)[::4, ::4]
    ok = ~bad[::4, ::4] & np.isfinite(vs)
    v0 = float(np.median(vs[ok])) if ok.any() else 1.0
    noise = np.sqrt(v0 / (4 * np.pi * sigma**2))
    ay, ax = _local_maxima(sm, 5 * noise)
    strong = sm[ay, ax] > nsigma * noise
    iy, ix = ay[strong], ax[strong]
    keep = (ix >= border) & (ix < nx - border) & (iy >= border) & (iy < ny - border)
    iy, ix = iy[keep], ix[keep]
    # isolation against all peaks above 5 sigma brighter than contrast x this one:
    # ``neighbour`` is the brightest other peak within ``isolation`` over this one
    neighbour = np.zeros(len(ix))
    if len(ix) and len(ax) > 1:
        tree = cKDTree(np.column_stack([ax, ay]))
        apk = sm[ay, ax]
        own_idx = np.flatnonzero(strong)[keep]
        nbrs = tree.query_ball_point(np.column_stack([ix, iy]), isolation)
        own = sm[iy, ix]
        for k, (n, j) in enumerate(zip(nbrs, own_idx, strict=True)):
            others = [m for m in n if m != j]
            neighbour[k] = apk[others].max() / own[k] if others else 0.0
        iso = neighbour <= contrast
        iy, ix, neighbour = iy[iso], ix[iso], neighbour[iso]
    if len(ix):
        bad_any = bad if avoid is None else (bad | avoid)
        nbad_pix = int(np.count_nonzero(bad_any))
        if 0 < nbad_pix <= 200_000:
            by, bx = np.nonzero(bad_any)
            btree = cKDTree(np.column_stack([bx, by]))
            # Chebyshev distance: no bad pixel in the (2 border + 1)^2 box
            d, _ = btree.query(np.column_stack([ix, iy]), p=np.inf)
            iy, ix, neighbour = iy[d > border], ix[d > border], neighbour[d > border]
        elif nbad_pix:
            bad_int = np.pad(bad_any, ((1, 0), (1, 0))).cumsum(0, dtype=np.int32).cumsum(1)
            y0, y1 = iy - border, iy + border + 1
            x0, x1 = ix - border, ix + border + 1
            nbad = bad_int[y1, x1] - bad_int[y0, x1] - bad_int[y1, x0] + bad_int[y0, x0]
            iy, ix, neighbour = iy[nbad == 0], ix[nbad == 0], neighbour[nbad == 0]
    snr = sm[iy, ix] / noise
    order = np.argsort(-snr)
    if max_stars is not None:
        order = order[:max_stars]
    iy, ix, snr, neighbour = iy[order], ix[order], snr[order], neighbour[order]
    x, y = _subpixel_peak(sm, iy, ix)
    flux = sm[iy, ix] * 4 * np.pi * sigma**2
    return {"x": x, "y": y, "snr": snr, "flux": flux, "neighbour": neighbour,
            "isolation": float(isolation), "bkg": bkg}  # fmt: skip


def _local_maxima(img, threshold):
    """``(y, x)`` of pixels above ``threshold`` not below any of their 8 neighbours.

    Equal to ``(img == maximum_filter(img, 3)) & (img > threshold)`` (edges padded
    with ``-inf``) but only the few pixels above the threshold are compared.
    """
    ny, nx = img.shape
    ys, xs = np.nonzero(img > threshold)
    v = img[ys, xs]
    peak = np.ones(len(ys), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == dx == 0:
                continue
            yy, xx = ys + dy, xs + dx
            inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
            nb = np.full(len(ys), -np.inf, img.dtype)
            nb[inside] = img[yy[inside], xx[inside]]
            peak &= v >= nb
    return ys[peak], xs[peak]


def usable_stars(n, cap):
    """Indices into ``n`` stars sorted brightest first: the brightest 2 % left out (their
    wings are non-linear or saturated), then at most ``cap``."""
    idx = np.arange(n)
    if n > 20:
        idx = idx[int(0.02 * n) :]
    return idx[:cap]


def _shifted_psf(psf, dx, dy):
    """PSF stamp shifted by a sub-pixel (dx, dy) with a Fourier phase ramp."""
    ny, nx = psf.shape
    f = np.fft.rfft2(psf)
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    f = f * np.exp(-2j * np.pi * (kx * dx + ky * dy))
    return np.fft.irfft2(f, s=(ny, nx))


def _cutout(arr, ix, iy, half, fill):
    """Window ``[iy-half:iy+half+1, ix-half:ix+half+1]`` padded with ``fill`` off the image."""
    ny, nx = arr.shape
    size = 2 * half + 1
    out = np.full((size, size), fill, dtype=arr.dtype)
    y0, x0 = iy - half, ix - half
    sy0, sx0 = max(y0, 0), max(x0, 0)
    sy1, sx1 = min(y0 + size, ny), min(x0 + size, nx)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = arr[sy0:sy1, sx0:sx1]
    return out


def aperture_correction(exposure, psf_at, *, radii=(20.0, 15.0, 12.0), fwhm=None,
                        max_stars=300, min_stars=5, max_error=0.005, stars=None):  # fmt: skip
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
    exposure : apdask.image.Exposure
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
        fwhm = float(_psf_fwhm(psf_at(nx / 2.0, ny / 2.0)))
    r_in, r_out = radii[0] + 4.0, radii[0] + 12.0
    half = int(np.ceil(r_out)) + 1
    image = np.asarray(exposure.image)
    if stars is None:
        stars = _find_stars(
            image, exposure.variance, exposure.mask, fwhm=fwhm, nsigma=50.0, isolation=r_out,
            border=half, max_stars=None, contrast=0.002,
        )  # fmt: skip
    order = usable_stars(len(stars["x"]), max_stars)
    bkg = stars.get("bkg")
    ratios = [[] for _ in radii]
    errors = [[] for _ in radii]
    x = np.asarray(stars["x"], float)[order]
    y = np.asarray(stars["y"], float)[order]
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    psfs = np.array([np.asarray(psf_at(xi, yi), float) for xi, yi in zip(x, y, strict=True)])
    ph = psfs.shape[-1] // 2 if len(order) else 0
    if len(order) and ph <= half:
        # all stars at once: (n, S, S) stamps, NaN off the image as the loop's cutouts were
        d = _stamps(image, ix, iy, half).astype(float)
        if bkg is not None:  # (the annulus median below removes a constant anyway)
            d -= np.array(
                [_cutout(bkg, i, j, half, np.float32(0.0)) for i, j in zip(ix, iy, strict=True)]
            )
        v = _stamps(exposure.variance, ix, iy, half).astype(float)
        m = _stamps(exposure.mask, ix, iy, half, MASK["NO_DATA"])
        o = np.arange(-half, half + 1, dtype=float)
        r = np.hypot(o[None, None, :] - (x - ix)[:, None, None],
                     o[None, :, None] - (y - iy)[:, None, None])  # fmt: skip
        ok = np.isfinite(d) & np.isfinite(v) & ((m & _IGNORE) == 0)
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
        p[:, half - ph : half + ph + 1, half - ph : half + ph + 1] = _shifted_psfs(
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
    for k, rad in enumerate(radii):
        rk, ek = np.asarray(ratios[k]), np.asarray(errors[k])
        if len(rk) < min_stars:
            continue
        med = float(np.median(rk))
        # one clip of blends and neighbours' light (3 robust sigma, at least 3 errors)
        sig = 1.4826 * float(np.median(np.abs(rk - med)))
        keep = np.abs(rk - med) <= 3 * np.maximum(sig, ek)
        w = 1.0 / ek[keep] ** 2
        corr = float((w * rk[keep]).sum() / w.sum())
        if keep.sum() < min_stars or 1.0 / np.sqrt(w.sum()) > max_error:
            continue
        if np.isfinite(corr) and 0.8 < corr < 1.25:
            return corr, int(keep.sum()), rad
    return 1.0, 0, float("nan")


def _weighted_moments(image, x, y, sigma_w, half, sign=1):
    """Gaussian-weighted second moments, corrected for the weight (Gaussian assumption)."""
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    d = sign * _cutout(image, ix, iy, half, np.float32(0.0)).astype(float)
    d[~np.isfinite(d)] = 0.0
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    dx, dy = xx - (x - ix), yy - (y - iy)
    w = np.exp(-0.5 * (dx * dx + dy * dy) / sigma_w**2) * d
    s = w.sum()
    if not s > 0:
        return np.nan, np.nan, np.nan
    mxx, myy, mxy = (w * dx * dx).sum() / s, (w * dy * dy).sum() / s, (w * dx * dy).sum() / s
    # invert the Gaussian weighting: M_true = (M^-1 - W^-1)^-1
    m = np.array([[mxx, mxy], [mxy, myy]])
    try:
        inv = np.linalg.inv(m) - np.eye(2) / sigma_w**2
        t = np.linalg.inv(inv)
    except np.linalg.LinAlgError:
        return np.nan, np.nan, np.nan
    if not (t[0, 0] > 0 and t[1, 1] > 0):
        return mxx, myy, mxy
    return t[0, 0], t[1, 1], t[0, 1]


def _psfs_at(exposure, default, x, y):
    """PSF stamps ``(n, S, S)`` at many positions (:func:`_psf_getter` for each)."""
    model = exposure.meta.get("psf_model") if exposure is not None else None
    if model is not None and hasattr(model, "at_many"):
        return model.at_many(x, y)
    if model is not None and hasattr(model, "at"):
        return np.array([model.at(xi, yi) for xi, yi in zip(x, y, strict=True)])
    default = np.asarray(default, float)
    return np.broadcast_to(default, (len(x), *default.shape))


def _shifted_psfs(psfs, dx, dy):
    """:func:`_shifted_psf` of many stamps ``(n, S, S)`` by ``(dx, dy)`` each."""
    n, ny, nx = psfs.shape
    f = np.fft.rfft2(psfs, axes=(1, 2))
    ky = np.fft.fftfreq(ny)[None, :, None]
    kx = np.fft.rfftfreq(nx)[None, None, :]
    f *= np.exp(-2j * np.pi * (kx * dx[:, None, None] + ky * dy[:, None, None]))
    return np.fft.irfft2(f, s=(ny, nx), axes=(1, 2))


def _psf_fit_many(image, variance, mask, psfs, x, y, bkg=None, full=False):
    """Linear PSF-flux fits (uniform weights) at many fixed positions at once.

    For each position: the PSF shifted to the sub-pixel position (Fourier phase
    ramp), fitted to the background-subtracted box around the nearest pixel, using
    the pixels where the PSF is above 1e-4 of its peak and the data are good;
    ``flux = ΣPd / ΣP²``, ``err = sqrt(ΣP²v) / ΣP²``.  ``edge`` is set when any box
    pixel is masked, off the image or not finite; fewer than 3 usable pixels give NaN.
    Returns ``(flux, flux_err, edge)`` arrays.

    ``psfs`` is ``(n, S, S)``; ``bkg`` a :class:`Background` (or None).  With ``full``,
    also the number of pixels used, χ² and, for Cramér–Rao centroid errors, the sums
    of the squared PSF gradients and of P²: ``(flux, flux_err, ndata, chi2, edge,
    (gx2, gy2, s2))``.
    """
    half = psfs.shape[1] // 2
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    p = _shifted_psfs(np.asarray(psfs, float), x - ix, y - iy)
    d = _stamps(image, ix, iy, half, np.float32(np.nan)).astype(float)
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
    v = _stamps(variance, ix, iy, half, np.float32(np.nan)).astype(float)
    m = _stamps(mask, ix, iy, half, np.uint32(MASK["NO_DATA"]))
    ok = np.isfinite(d) & np.isfinite(v) & ((m & _IGNORE) == 0)
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
    return flux, err, n, chi2, edge, g


def _psf_getter(exposure, default):
    """``(x, y) -> PSF stamp``: the exposure's spatially varying model if any, else ``default``."""
    model = exposure.meta.get("psf_model") if exposure is not None else None
    if model is not None and hasattr(model, "at"):
        return model.at
    default = np.asarray(default, float)
    return lambda x, y: default


def _require_psf(exposure, what):
    if exposure.psf is None:
        msg = f"the {what} exposure has no PSF; run subtract.estimate_psf first"
        raise PsfFitError(msg)
    return np.asarray(exposure.psf, dtype=float)


def bright_sources(template, variance, psf_template, psf_difference, *, scale=1.0,
                   min_snr=300.0):  # fmt: skip
    """Bright sources of the template: their residual rings on the difference.

    A matching kernel of limited size with a Gaussian basis cannot follow PSF wings
    that are not Gaussian (Kolmogorov or Moffat): around a bright star the difference
    keeps a ring of ~1e-5 of the star's flux per pixel just beyond the kernel's
    reach, linear in the flux.  Above ~1e6 nJy it exceeds the detection threshold.
    :func:`matched_filter` measures that ring around these sources and treats it
    as systematic noise of its S/N map (see :func:`_bright_variance`).

    Parameters
    ----------
    template : numpy.ndarray
        Template on the difference's pixel grid (sky ~0, finite values).
    variance : numpy.ndarray
        Variance of the difference (nJy²).
    psf_template, psf_difference : numpy.ndarray
        PSF stamps (sum 1).
    scale : float, optional
        Photometric scale difference/template (science/template kernel sum).
    min_snr : float, optional
        Keep sources whose flux is at least this many times the PSF-flux noise of the
        difference: with the residual level of a Kolmogorov PSF, the rings of fainter
        ones stay below 0.2 σ of the S/N map.

    Returns
    -------
    dict
        ``x``, ``y`` (int pixel of the peak) and ``flux`` (nJy in difference units:
        the template flux within 3 FWHM, less the local annulus median, over the PSF
        fraction there), brightest first.
    """
    pd = np.asarray(psf_difference, float)
    pt = np.asarray(psf_template, float)
    v0 = float(np.median(variance[::8, ::8]))
    f_min = min_snr * np.sqrt(max(v0, 0.0) / float((pd * pd).sum()))
    none = {"x": np.zeros(0, int), "y": np.zeros(0, int), "flux": np.zeros(0)}
    # a source of flux f_min peaks at least at half the centred PSF peak
    thr = 0.5 * f_min / max(scale, 1e-12) * float(pt.max())
    rows = np.flatnonzero(np.fmax.reduce(template, axis=1) > thr)  # a few rows: cheap
    ys, xs = _local_maxima(template[rows], thr)
    ys = rows[ys]
    if len(xs) == 0:
        return none
    # one peak per source: the brightest within 2 template FWHM
    fw_t = float(_psf_fwhm(pt))
    order = np.argsort(-template[ys, xs])
    ys, xs = ys[order], xs[order]
    xy = np.column_stack([xs, ys])
    keep = np.ones(len(xs), bool)
    for i, nb in enumerate(cKDTree(xy).query_ball_point(xy, 2.0 * fw_t)):
        if keep[i]:
            keep[[j for j in nb if j > i]] = False
    ys, xs = ys[keep], xs[keep]
    r_ap = max(3.0 * fw_t, 6.0)
    h = int(np.ceil(r_ap + 6.0))
    rr = np.hypot(*np.mgrid[-h : h + 1, -h : h + 1])
    inner, ann = rr <= r_ap, (rr > r_ap + 2.0) & (rr <= r_ap + 6.0)
    ph = pt.shape[0] // 2
    frac = float(pt[np.hypot(*np.mgrid[-ph : ph + 1, -ph : ph + 1]) <= r_ap].sum() / pt.sum())
    st = _stamps(template, xs, ys, h)
    bkg = nanmedian_last(st[:, ann])
    flux = np.nansum(st[:, inner] - bkg[:, None], axis=1) / frac * scale
    sel = np.flatnonzero(flux >= f_min)
    sel = sel[np.argsort(-flux[sel])]
    return {"x": xs[sel], "y": ys[sel], "flux": flux[sel]}


def _stamps(arr, xs, ys, half, fill=np.nan):
    """``(n, 2 half + 1, 2 half + 1)`` windows of ``arr`` centred on integer ``(xs, ys)``;
    pixels off the array are ``fill``."""
    ny, nx = arr.shape
    o = np.arange(-half, half + 1)
    yy = np.asarray(ys, int)[:, None, None] + o[None, :, None]
    xx = np.asarray(xs, int)[:, None, None] + o[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    out = arr[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)]
    if not inside.all():
        out = np.where(inside, out, np.asarray(fill).astype(out.dtype))
    return out


def _bright_variance(filt, vfilt, bad, sources, psf, *, r_max=48, step=2.0, max_stars=50,
                     nsigma=2.0, floor=0.05, neighbours=10, max_local=200):  # fmt: skip
    """Residuals of bright sources as systematic noise of the S/N map (in place).

    Two terms, the score-image variance terms of Zackay, Ofek & Gal-Yam (2016):

    * **Rings.**  The matched-filter residual around the sources of
      :func:`bright_sources` is modelled as ``F · R(r)``: ``R`` in bins of ``step``
      pixels is the weighted median (weights ``F²``; variable stars and neighbours do
      not bias it) over the brightest ``max_stars`` sources of their annulus medians of
      ``filt / F``.  ``A(r)``, the part of ``|R|`` above ``nsigma`` errors, gives the
      variance ``(F · A(r))²``.
    * **Local residual power.**  The kernel's spatial model is least exact in parts of
      the CCD (a corner where the PSF is sharpest), and there the residuals of bright
      stars need not be round.  For each source (at most ``max_local``) the power of
      ``filt`` in each annulus above its noise, per ``F²``, is measured; each source
      then takes the weighted median (weights: inverse errors) of that of its
      ``neighbours`` nearest other sources, the part above ``nsigma`` errors, times
      its ``F²``.  Leaving the source itself out keeps its own signal (a variable
      star, a supernova near a galaxy's core) from hiding itself.

    Each is made non-increasing outwards and flat within one PSF FWHM.  The larger of
    the two, linear in ``r`` between the bins' centres and at least ``a(0) φ(r)^1.6``
    (``φ`` the matched filter's response to a centred point source, so that the S/N
    peak of a varying bright star stays on it), is added to ``vfilt`` around every
    source, out to where it drops below ``floor`` times the typical S/N-map noise.
    Sources with masked pixels within ``4 × step`` px are left out of both estimates.

    Returns
    -------
    numpy.ndarray
        ``A`` per bin (per nJy of source flux, in ``filt`` units).
    """
    edges = np.arange(0.0, float(r_max) + step, step)
    nbin = len(edges) - 1
    xs, ys, flux = (np.asarray(sources.get(k, ())) for k in ("x", "y", "flux"))
    if len(flux) == 0:
        return np.zeros(nbin)
    nea = 1.0 / float((np.asarray(psf, float) ** 2).sum())
    fwhm = _psf_fwhm(psf)
    H = int(np.ceil(edges[-1]))
    r = np.hypot(*np.mgrid[-H : H + 1, -H : H + 1]).ravel()
    rbin = np.digitize(r, edges) - 1
    cnt = np.bincount(rbin[rbin < nbin], minlength=nbin)
    pix = np.argsort(rbin, kind="stable")[: cnt.sum()]  # stamp pixels grouped by bin
    slot = np.arange(len(pix)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    take = np.full((nbin, cnt.max()), -1)
    take[rbin[pix], slot] = pix  # (bin, slot) -> stamp pixel; -1 = a NaN pad
    b = _stamps(bad, xs, ys, H, True).reshape(len(xs), -1)
    clean = np.flatnonzero(~b[:, r <= 4 * step].any(axis=1))[:max_local]
    if len(clean) == 0:
        return np.zeros(nbin)
    pad = np.full((len(clean), 1), np.nan)
    d = np.where(b[clean], np.nan, _stamps(filt, xs[clean], ys[clean], H).reshape(len(clean), -1))
    v = np.where(b[clean], np.nan, _stamps(vfilt, xs[clean], ys[clean], H).reshape(len(clean), -1))
    d = np.concatenate([d, pad], axis=1)[:, take]  # (source, bin, slot)
    v = np.concatenate([v, pad], axis=1)[:, take]
    n = np.count_nonzero(np.isfinite(d), axis=2)
    f = flux[clean][:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mv = np.nanmean(v, axis=2)
        # --- rings: annulus medians of the brightest (a median of n correlated pixels)
        use = slice(0, max_stars)
        val = nanmedian_last(d[use]) / f[use]
        err2 = (np.pi / 2) * mv[use] * np.minimum(1.0, nea / n[use]) / f[use] ** 2
        # --- local power: filt's correlation area is about twice the PSF's
        n_eff = np.maximum(n / (2.0 * nea), 1.0)
        pw = (np.nanmean(d * d, axis=2) - mv) / f**2
        pw_w = n_eff * f**4 / (2.0 * mv * mv)
    amp = _weighted_median_profile(val, np.where(n[use] >= 5, 1.0 / err2, 0.0), nsigma)
    amp[edges[:-1] < fwhm] = amp[0]  # flat within one FWHM
    pw_w = np.where((n >= 5) & np.isfinite(pw) & np.isfinite(pw_w), pw_w, 0.0)
    local = np.zeros((len(flux), nbin))
    m = len(clean)
    if m >= 2 and neighbours > 0:
        k = min(int(neighbours), m - 1)
        pts = np.column_stack([xs[clean], ys[clean]]).astype(float)
        tree = cKDTree(pts)
        _, nb = tree.query(np.column_stack([xs, ys]).astype(float), k=k + 1)
        nb = np.asarray(nb).reshape(len(flux), k + 1)
        own = np.full(len(flux), -1)
        own[clean] = np.arange(m)
        # leave the source itself out (the k nearest others)
        keep = nb != own[:, None]
        nb = np.array([row[kk][:k] for row, kk in zip(nb, keep, strict=True)])
        # (source, neighbour, bin): the weighted medians of all sources at once
        local = _weighted_median_profile(pw[nb], pw_w[nb], nsigma, signed=True)
        local = np.maximum.accumulate(local[:, ::-1], axis=1)[:, ::-1]
        core = edges[:-1] < fwhm
        local[:, core] = local[:, core].max(axis=1, keepdims=True)
    if not amp.any() and not local.any():
        return amp
    ny, nx = vfilt.shape
    s0 = float(np.sqrt(np.median(vfilt[::16, ::16])))
    # a floor a2(0)·φ(r)^1.6, φ the matched filter's response to a centred point
    # source: the S/N of a source at the centre (a variable star) then falls
    # outwards as φ^0.2 at least, and its peak stays there
    fine = np.arange(0.0, float(r_max) + 0.5, 0.25)
    phi = _filter_profile(psf, fine) ** 1.6
    mid = 0.5 * (edges[:-1] + edges[1:])
    for i, (x, y, fl) in enumerate(zip(xs, ys, flux, strict=True)):
        a2 = np.maximum((fl * amp) ** 2, fl * fl * local[i])
        big = np.flatnonzero(a2 > (floor * s0) ** 2)
        if len(big) == 0:
            continue
        h = int(np.ceil(edges[big[-1] + 1]))
        y0, y1, x0, x1 = max(y - h, 0), min(y + h + 1, ny), max(x - h, 0), min(x + h + 1, nx)
        if y1 <= y0 or x1 <= x0:
            continue
        rr = np.hypot(np.arange(x0, x1)[None, :] - x, np.arange(y0, y1)[:, None] - y)
        # linear in r between the bins' centres: no steps in the S/N map at bin edges
        add = np.maximum(np.interp(rr, mid, a2, right=0.0), a2[0] * np.interp(rr, fine[:-1], phi))
        vfilt[y0:y1, x0:x1] += add.astype(np.float32)
    return amp


def _filter_profile(psf, edges):
    """Matched-filter response to a centred point source (the PSF's autocorrelation,
    1 at the centre): its largest value in each radial bin ``edges[k] <= r < edges[k+1]``
    (0 beyond the stamp)."""
    p = np.asarray(psf, float)
    n = p.shape[0]
    f = np.fft.rfft2(p, s=(2 * n, 2 * n))
    ac = np.fft.fftshift(np.fft.irfft2(f * np.conj(f), s=(2 * n, 2 * n)))
    ac /= ac[n, n]
    r = np.hypot(*np.mgrid[-n:n, -n:n]).ravel()
    k = np.digitize(r, edges) - 1
    out = np.zeros(len(edges) - 1)
    sel = (k >= 0) & (k < len(out))
    np.maximum.at(out, k[sel], np.clip(ac.ravel()[sel], 0.0, None))
    return out


def _weighted_median_profile(val, w, nsigma, signed=False):
    """Per bin (last axis) weighted median over sources (the axis before), less ``nsigma``
    errors (``1.2533 / sqrt(Σ w)``): of ``|median|`` (``signed=False``, made
    non-increasing outwards) or of the median itself, 0 where not positive."""
    w = np.where(np.isfinite(val) & np.isfinite(w) & (w > 0), w, 0.0)
    val = np.where(w > 0, val, 0.0)
    ax = val.ndim - 2  # the sources' axis (leading axes: independent batches)
    o = np.argsort(val, axis=ax)
    vs, ws = np.take_along_axis(val, o, ax), np.take_along_axis(w, o, ax)
    cw = np.cumsum(ws, axis=ax)
    tot = np.take(cw, -1, axis=ax)
    k = np.argmax(cw >= 0.5 * np.expand_dims(tot, ax), axis=ax)
    prof = np.where(tot > 0, np.take_along_axis(vs, np.expand_dims(k, ax), ax).squeeze(ax), 0.0)
    err = np.where(tot > 0, 1.2533 / np.sqrt(np.where(tot > 0, tot, 1.0)), 0.0)
    if signed:
        return np.maximum(prof - nsigma * err, 0.0)
    amp = np.maximum(np.abs(prof) - nsigma * err, 0.0)
    return np.maximum.accumulate(amp[::-1])[::-1]  # non-increasing outwards


@one_blas_thread
def matched_filter(difference):
    """PSF matched filter of a difference image: ``(filtered, snr, ignored)``.

    :func:`detect_sources` and :func:`measure_sources` both need it; compute it
    once and pass it to both as ``matched=`` (two full-frame convolutions saved).

    Parameters
    ----------
    difference : apdask.image.Exposure

    Returns
    -------
    filtered, snr : numpy.ndarray
        float32 correlation of the image with the PSF, and its S/N map.
    ignored : numpy.ndarray
        bool, pixels left out (masked, non-finite, near saturation).
    """
    return _filtered(difference, _require_psf(difference, "difference"))


def _filtered(difference, psf, sat_grow=None):
    """Matched-filter image and its S/N map, masked pixels zeroed.

    Pixels within ``sat_grow`` pixels of a saturated pixel (default 2 × PSF FWHM)
    are ignored too: the wings of a saturated star leave residuals that must not
    become DIASources.
    """
    if sat_grow is None:
        sat_grow = int(np.ceil(2.0 * _psf_fwhm(psf)))
    sat = (difference.mask & MASK["SAT"]) != 0
    img, var, bad = matched_inputs(
        difference.image, difference.variance, difference.mask, _IGNORE, sat, int(sat_grow)
    )
    p = psf[::-1, ::-1]  # correlation with the PSF
    filt, vfilt = np.empty(img.shape, np.float32), np.empty(img.shape, np.float32)
    jobs = [(filt, [(None, None, [(0, p)])]), (vfilt, [(None, None, [(1, p * p)])])]
    convolve_tiles([img, var], jobs, threads=_workers())
    sources = difference.meta.get("bright_sources")
    if sources is not None:
        _bright_variance(filt, vfilt, bad, sources, psf)
    return filt, snr_map(filt, vfilt, bad), bad


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
@one_blas_thread
def detect_sources(difference, *, threshold_sigma=None, n_pixels=None, matched=None):
    """Find positive and negative sources on a difference image.

    Parameters
    ----------
    difference : apdask.image.Exposure
        Difference image (nJy) with variance, mask and PSF stamp.
    threshold_sigma : float, optional
        Detection threshold on the PSF-matched-filter S/N map; default
        ``apdask.detection.threshold_sigma`` (5).
    n_pixels : int, optional
        Minimum connected pixels above threshold; default ``apdask.detection.n_pixels``.
    matched : tuple, optional
        :func:`matched_filter` of ``difference``, if already computed.

    Returns
    -------
    astropy.table.Table
        One row per footprint: ``x``, ``y`` (int peak pixel of the S/N map), ``sign``
        (+1/-1), ``bbox_x0``, ``bbox_x1``, ``bbox_y0``, ``bbox_y1`` (half-open),
        ``n_pixels`` and ``peak_snr``.  Empty (zero rows) when nothing is found.
    """
    threshold_sigma = float(config.get("detection.threshold_sigma", threshold_sigma))
    n_pixels = int(config.get("detection.n_pixels", n_pixels))
    _, snr, _ = matched if matched is not None else matched_filter(difference)
    rows = []
    for sign in (1, -1):
        # as photutils detect_sources (> threshold, 8-connected, n_pixels), sparse
        seg, peak = segments(snr, threshold_sigma, n_pixels, sign)
        for (area, x0, x1, y0, y1, px, py), p in zip(seg.tolist(), peak, strict=True):
            rows.append((px, py, sign, x0, x1, y0, y1, area, float(p) * sign))
    names = ("x", "y", "sign", "bbox_x0", "bbox_x1", "bbox_y0", "bbox_y1", "n_pixels", "peak_snr")
    dtypes = (int, int, int, int, int, int, int, int, float)
    if not rows:
        return Table(names=names, dtype=dtypes)
    return Table(rows=rows, names=names, dtype=dtypes)


def _pixel_flags(mask, x0, x1, y0, y1, ix, iy):
    ny, nx = mask.shape
    box = mask[max(y0, 0) : min(y1, ny), max(x0, 0) : min(x1, nx)]
    cen = mask[max(iy - 1, 0) : min(iy + 2, ny), max(ix - 1, 0) : min(ix + 2, nx)]
    anyb = np.bitwise_or.reduce(box, axis=None) if box.size else 0
    anyc = np.bitwise_or.reduce(cen, axis=None) if cen.size else 0
    return int(anyb), int(anyc)


@one_blas_thread
def measure_sources(
    difference, science, template, detections, *, visit, detector, band, mjd, aperture_radius=12.0,
    dipole_radius=None, matched=None,
):  # fmt: skip
    """Measure detections into a DiaSource table with official Rubin column names.

    Parameters
    ----------
    difference, science, template : apdask.image.Exposure
        The difference image (nJy, PSF = science PSF), the calibrated science
        exposure and the warped template on the same pixel grid.
    detections : astropy.table.Table
        Output of :func:`detect_sources`.
    visit, detector : int
    band : str
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
    """
    psf = _require_psf(difference, "difference")
    n = len(detections)
    cols = {c: [] for c in DIASOURCE_COLUMNS}
    if n == 0:
        return _empty_table()
    psf_sci = science.psf if science is not None and science.psf is not None else psf
    psf_tpl = template.psf if template is not None and template.psf is not None else psf_sci
    psf_sci, psf_tpl = np.asarray(psf_sci, float), np.asarray(psf_tpl, float)
    filt, _, _ = matched if matched is not None else _filtered(difference, psf)
    sci_bkg = _background(science.image, science.mask, lazy=True) if science is not None else None
    tpl_bkg = (
        _background(template.image, template.mask, lazy=True) if template is not None else None
    )
    fwhm = _psf_fwhm(psf)
    sig_w = max(fwhm / 2.3548, 1.0)
    mom_half = int(np.ceil(4 * sig_w))
    pxx, pyy, pxy = _moments(psf)[2:]
    dipole_radius = 2.0 * fwhm if dipole_radius is None else dipole_radius

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
            nb = tree.query_ball_point([dx0[i], dy0[i]], dipole_radius)
            dipole_ndata[i] = int(npix[[j for j in nb if is_dipole[j]]].sum())

    ny, nx = difference.shape
    xs = np.empty(n)
    ys = np.empty(n)
    cflag = np.zeros(n, bool)
    for i in range(n):
        s = sign[i]
        ix, iy = int(dx0[i]), int(dy0[i])
        if 1 <= ix < nx - 1 and 1 <= iy < ny - 1:
            local = s * filt[iy - 1 : iy + 2, ix - 1 : ix + 2]
            x, y = _subpixel_peak(local, np.array([1]), np.array([1]))
            x, y = x + ix - 1, y + iy - 1
            xs[i], ys[i] = float(x[0]), float(y[0])
        else:
            xs[i], ys[i] = float(ix), float(iy)
            cflag[i] = True
    # PSF fits of all sources at once: difference (with centroid-error terms), science
    # and template
    fit_d = _psf_fit_many(difference.image, difference.variance, difference.mask,
                          _psfs_at(difference, psf, xs, ys), xs, ys, full=True)  # fmt: skip
    fit_s = fit_t = None
    if science is not None:
        fit_s = _psf_fit_many(science.image, science.variance, science.mask,
                              _psfs_at(science, psf_sci, xs, ys), xs, ys, sci_bkg)  # fmt: skip
    if template is not None:
        fit_t = _psf_fit_many(template.image, template.variance, template.mask,
                              _psfs_at(template, psf_tpl, xs, ys), xs, ys, tpl_bkg)  # fmt: skip
    for i in range(n):
        s = sign[i]
        f, fe, nd, chi2, edge = (a[i] for a in fit_d[:5])
        gx2, gy2, s2 = (a[i] for a in fit_d[5])
        # Cramér-Rao centroid errors for the fitted flux and the pixel noise
        with np.errstate(divide="ignore", invalid="ignore"):
            vloc = fe * fe * s2
            xe = np.sqrt(vloc / (f * f * gx2)) if np.isfinite(f) and f != 0 else np.nan
            ye = np.sqrt(vloc / (f * f * gy2)) if np.isfinite(f) and f != 0 else np.nan
        sf, sfe = (fit_s[0][i], fit_s[1][i]) if fit_s is not None else (np.nan, np.nan)
        tf, tfe = (fit_t[0][i], fit_t[1][i]) if fit_t is not None else (np.nan, np.nan)
        ixx, iyy, ixy = _weighted_moments(difference.image, xs[i], ys[i], sig_w, mom_half, s)
        x0, x1 = int(detections["bbox_x0"][i]), int(detections["bbox_x1"][i])
        y0, y1 = int(detections["bbox_y0"][i]), int(detections["bbox_y1"][i])
        ix, iy = int(np.floor(xs[i] + 0.5)), int(np.floor(ys[i] + 0.5))
        half = psf.shape[0] // 2
        anyb, anyc = _pixel_flags(
            difference.mask, min(x0, ix - half), max(x1, ix + half + 1),
            min(y0, iy - half), max(y1, iy + half + 1), ix, iy,
        )  # fmt: skip
        flags = {
            "pixelFlags_bad": bool(anyb & MASK["BAD"]),
            "pixelFlags_cr": bool(anyb & MASK["CR"]),
            "pixelFlags_crCenter": bool(anyc & MASK["CR"]),
            "pixelFlags_edge": bool(anyb & MASK["EDGE"]),
            "pixelFlags_saturated": bool(anyb & MASK["SAT"]),
            "pixelFlags_saturatedCenter": bool(anyc & MASK["SAT"]),
            "pixelFlags_nodata": bool(anyb & MASK["NO_DATA"]),
        }
        # trail: strongly elongated compared with the PSF
        trail = False
        if np.isfinite(ixx) and np.isfinite(iyy):
            tr = ixx + iyy
            det = np.sqrt(max((ixx - iyy) ** 2 + 4 * ixy * ixy, 0.0))
            l1, l2 = 0.5 * (tr + det), 0.5 * (tr - det)
            trail = bool(l2 > 0 and l1 / l2 > 4.0 and l1 > 4.0 * 0.5 * (pxx + pyy))
        bbox = max(x1 - x0, y1 - y0)
        ra, dec = difference.wcs.pixel_to_world_values(xs[i], ys[i])
        rae, dece = _sky_errors(difference.wcs, xs[i], ys[i], xe, ye, float(dec))
        row = {
            "visit": int(visit), "detector": int(detector), "band": str(band),
            "midpointMjdTai": float(mjd),
            "x": xs[i], "y": ys[i], "xErr": xe, "yErr": ye,
            "ra": float(np.mod(ra, 360.0)), "dec": float(dec), "raErr": rae, "decErr": dece,
            "psfFlux": f, "psfFluxErr": fe, "psfNdata": int(nd), "psfChi2": chi2,
            "snr": f / fe if fe > 0 else np.nan,
            "apFlux": np.nan, "apFluxErr": np.nan,
            "scienceFlux": sf, "scienceFluxErr": sfe, "templateFlux": tf, "templateFluxErr": tfe,
            "isNegative": bool(s < 0), "ixx": ixx, "iyy": iyy, "ixy": ixy,
            "ixxPSF": pxx, "iyyPSF": pyy, "ixyPSF": pxy,
            "bboxSize": int(bbox), "extendedness": np.nan,
            "centroid_flag": bool(cflag[i]),
            "psfFlux_flag": bool(not np.isfinite(f) or not np.isfinite(fe)),
            "psfFlux_flag_edge": bool(edge),
            "pixelFlags": any(flags.values()), **flags,
            "isDipole": bool(is_dipole[i]), "dipoleNdata": int(dipole_ndata[i]),
            "trailNdata": 0, "trail_flag": trail,
        }  # fmt: skip
        for c in DIASOURCE_COLUMNS:
            cols[c].append(row[c])
    tab = Table(cols, names=DIASOURCE_COLUMNS)
    _apply_aperture_correction(tab, difference)
    _aperture_fluxes(tab, difference, aperture_radius)
    for c in ("ra", "dec", "raErr", "decErr", "midpointMjdTai"):
        tab[c] = tab[c].astype(np.float64)
    return tab


def _ap_corr(difference):
    """Aperture corrections ``(difference, science)`` recorded by ``subtract`` (1 if absent)."""
    meta = difference.meta if difference is not None else {}
    c_d = float(meta.get("ap_corr", 1.0))
    return c_d, float(meta.get("ap_corr_science", c_d))


def _apply_aperture_correction(tab, difference):
    """Scale PSF fluxes (difference and science) by the aperture corrections."""
    c_d, c_s = _ap_corr(difference)
    for col, c in (("psfFlux", c_d), ("psfFluxErr", c_d), ("scienceFlux", c_s),
                   ("scienceFluxErr", c_s)):  # fmt: skip
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
        bad = (m.cutout(difference.mask, fill_value=MASK["NO_DATA"]) & _IGNORE) != 0
        bad |= ~np.isfinite(img) | ~np.isfinite(var)
        w = np.where(bad, 0.0, m.data)
        flux[k] = (w * np.where(bad, 0.0, img)).sum()
        err[k] = np.sqrt((w * np.where(bad, 0.0, np.maximum(var, 0.0))).sum())
    tab["apFlux"] = flux
    tab["apFluxErr"] = err


def _empty_table():
    types = {
        "visit": int, "detector": int, "band": str, "psfNdata": int, "bboxSize": int,
        "dipoleNdata": int, "trailNdata": int,
    }  # fmt: skip
    dt = []
    for c in DIASOURCE_COLUMNS:
        if c in types:
            dt.append(types[c])
        elif c.startswith(("is", "pixelFlags")) or c.endswith("_flag") or "_flag_" in c:
            dt.append(bool)
        else:
            dt.append(float)
    return Table(names=DIASOURCE_COLUMNS, dtype=dt)


@one_blas_thread
def forced_photometry(difference, science, ra, dec):
    """PSF-fit fluxes at given sky positions on the difference and science images.

    Parameters
    ----------
    difference, science : apdask.image.Exposure
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
    psf = _require_psf(difference, "difference")
    psf_sci = np.asarray(science.psf, float) if science.psf is not None else psf
    ra = np.atleast_1d(np.asarray(ra, float))
    dec = np.atleast_1d(np.asarray(dec, float))
    x, y = difference.wcs.world_to_pixel_values(ra, dec)
    x, y = np.atleast_1d(x), np.atleast_1d(y)
    ny, nx = difference.shape
    on = np.isfinite(x) & np.isfinite(y) & (x >= -0.5) & (x < nx - 0.5)
    on &= (y >= -0.5) & (y < ny - 0.5)
    out = {k: np.full(len(x), np.nan) for k in ("psfFlux", "psfFluxErr", "scienceFlux",
                                                 "scienceFluxErr")}  # fmt: skip
    out["flag_edge"] = np.ones(len(x), bool)
    if on.any():  # all positions at once, in blocks (bounded memory)
        bkg = _background(science.image, science.mask, lazy=True)
        idx = np.flatnonzero(on)
        for blk in np.array_split(idx, max(1, len(idx) // 2000)):
            xb, yb = x[blk], y[blk]
            f, fe, edge = _psf_fit_many(difference.image, difference.variance, difference.mask,
                                        _psfs_at(difference, psf, xb, yb), xb, yb)  # fmt: skip
            sf, sfe, _ = _psf_fit_many(science.image, science.variance, science.mask,
                                       _psfs_at(science, psf_sci, xb, yb), xb, yb, bkg)  # fmt: skip
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


def cutout_size(bbox_size):
    """Side of an alert cutout: ``bboxSize`` clamped to the configured 30..102, made odd.

    Parameters
    ----------
    bbox_size : int

    Returns
    -------
    int
        Odd side length within ``[cutouts.min_size, cutouts.max_size]``.
    """
    lo = int(config.get("cutouts.min_size"))
    hi = int(config.get("cutouts.max_size"))
    s = int(min(max(int(bbox_size), lo), hi))
    if s % 2 == 0:
        s = s + 1 if s + 1 <= hi else s - 1
    return s


def make_cutout(exposure, x, y, size):
    """FITS bytes of a CCDData-compatible stamp centred on pixel ``(x, y)``.

    Parameters
    ----------
    exposure : apdask.image.Exposure
    x, y : float
        Centre in pixels; the stamp is centred on the nearest pixel.
    size : int
        Side length in pixels; an even size is increased by one.

    Returns
    -------
    bytes
        A FITS file: primary HDU = image (``BUNIT = 'nJy'``, a local gnomonic WCS
        whose reference point is the source, ``CUTMINX``/``CUTMINY``; see
        :func:`apdask.stamps.local_wcs_cards`), ``MASK`` (uint8 mask planes, named
        by ``MASKBITn = 'NAME'`` cards), ``UNCERT`` (variance,
        ``UTYPE = 'VarianceUncertainty'``) and ``PSFIMAGE`` (PSF stamp, if known),
        the names and order astropy's ``CCDData.write`` uses.  Pixels off the exposure are NaN in
        image and variance and NO_DATA in the mask.  Read it back with
        ``CCDData.read(io.BytesIO(b), format="fits")``.
    """
    size = int(size)
    if size % 2 == 0:
        size += 1
    half = size // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    img = _cutout(np.asarray(exposure.image, np.float32), ix, iy, half, np.float32(np.nan))
    var = _cutout(np.asarray(exposure.variance, np.float32), ix, iy, half, np.float32(np.nan))
    msk = _cutout(np.asarray(exposure.mask), ix, iy, half, MASK["NO_DATA"]).astype(MASK_STAMP_DTYPE)
    from .stamps import local_wcs_cards

    local = local_wcs_cards(exposure.wcs, x, y, ix - half, iy - half)
    hdr = fits.Header(local[:-2])
    hdr["BUNIT"] = "nJy"
    hdr.extend(local[-2:])
    hdus = [
        fits.PrimaryHDU(img, header=hdr),
        fits.ImageHDU(msk, header=fits.Header(mask_plane_cards()), name="MASK"),
        fits.ImageHDU(var, header=fits.Header([("UTYPE", "VarianceUncertainty")]), name="UNCERT"),
    ]
    if exposure.psf is not None:
        hdus.append(fits.ImageHDU(np.asarray(exposure.psf, np.float32), name="PSFIMAGE"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()
