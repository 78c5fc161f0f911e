"""Bright-star finding and pixel stamps around stars.

Shared by PSF estimation, astrometry, the kernel fit and measurement.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view
from scipy.spatial import cKDTree

from apdask._kernels.fused import boxes_clear, boxes_clear_of, local_peaks, search_planes
from apdask.core.exposure import IGNORE_BITS
from apdask.core.stats import robust_sigma
from apdask.pipeline.background import Background, fit_background

__all__ = [
    "StarPeaks",
    "star_peaks",
    "find_stars",
    "usable_stars",
    "subpixel_peak",
    "local_maxima",
    "cutout_at",
    "stamps_at",
    "weighted_moments",
    "adaptive_sizes",
    "stellar_locus",
]


def subpixel_peak(img: np.ndarray, iy: np.ndarray, ix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


@dataclass(frozen=True)
class StarPeaks:
    """One star search of an image: the local maxima of its smoothed, background-free
    version, before any selection (:func:`star_peaks`).

    :func:`find_stars` selects its stars from these alone, so one search serves several
    selections of the same image: the calibrate stage keeps the astrometry's in
    :class:`~apdask.core.records.Calibrated`, and the PSF model selects from it too.
    A few hundred kB (a few thousand peaks, the bad pixels' coordinates).
    """

    fwhm: float  #: FWHM (px) of the Gaussian the image was smoothed with
    shape: tuple[int, int]  #: the image's
    noise: float  #: σ of the smoothed image
    y: np.ndarray  #: the local maxima above 5 ``noise``, raster order (int64)
    x: np.ndarray
    value: np.ndarray  #: the smoothed image at the maxima
    xsub: np.ndarray  #: the maxima refined to sub-pixel positions (:func:`subpixel_peak`)
    ysub: np.ndarray
    #: the masked or non-finite pixels: ``(y, x)`` when at most
    #: :data:`_MAX_BAD_LIST`, else the boolean mask
    bad: tuple[np.ndarray, np.ndarray] | np.ndarray
    bkg: Background  #: the background that was subtracted
    #: the pixels (``(y, x)``, raster order) whose value less ``bkg`` exceeds
    #: ``bright_nsigma`` times the square root of their variance: all the pixels the
    #: cosmic-ray search may flag at that threshold or above (its ``above``)
    bright: tuple[np.ndarray, np.ndarray] | None = None
    bright_nsigma: float = 5.0

    def bad_mask(self) -> np.ndarray:
        """The bad pixels as a boolean image."""
        if not isinstance(self.bad, tuple):
            return self.bad
        m = np.zeros(self.shape, bool)
        m[self.bad] = True
        return m


#: Up to this many bad pixels, the star search keeps their coordinates; beyond, the
#: mask (which is smaller then).
_MAX_BAD_LIST = 200_000

#: The threshold (σ) of :attr:`StarPeaks.bright`: the cosmic-ray search's.
_BRIGHT_NSIGMA = 5.0


def star_peaks(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, fwhm: float = 4.5
) -> StarPeaks:
    """The search of :func:`find_stars`: local maxima above 5 σ of the image less its
    background, masked pixels zeroed, smoothed by a Gaussian of ``fwhm``; and from the
    same pass the pixels above 5 σ of the background (:attr:`StarPeaks.bright`)."""
    bkg = fit_background(image, mask, lazy=True)
    sigma = fwhm / 2.3548
    planes = search_planes(image, bkg.bilinear(), mask, IGNORE_BITS, sigma, truncate=3.0,
                           variance=variance, nsigma=_BRIGHT_NSIGMA)  # fmt: skip
    sm, bad = planes.smoothed, planes.bad
    if np.asarray(variance).dtype == np.float32:  # sampled in the pass
        vs = planes.variance_sample
        ok = ~np.isnan(vs)
    else:
        vs = np.asarray(variance)[::4, ::4]
        ok = ~bad[::4, ::4] & np.isfinite(vs)
    v0 = float(np.median(vs[ok])) if ok.any() else 1.0
    noise = np.sqrt(v0 / (4 * np.pi * sigma**2))
    ay, ax = local_maxima(sm, 5 * noise)
    xsub, ysub = subpixel_peak(sm, ay, ax)
    by, bx = planes.bad_pixels
    return StarPeaks(
        fwhm=float(fwhm),
        shape=image.shape,
        noise=noise,
        y=ay,
        x=ax,
        value=sm[ay, ax],
        xsub=xsub,
        ysub=ysub,
        bad=(by, bx) if len(by) <= _MAX_BAD_LIST else bad,
        bkg=bkg,
        bright=planes.bright,
        bright_nsigma=_BRIGHT_NSIGMA,
    )


def find_stars(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    *,
    fwhm: float = 4.5,
    nsigma: float = 10.0,
    isolation: float = 10.0,
    border: int = 12,
    max_stars: int | None = None,
    avoid: np.ndarray | None = None,
    contrast: float = 0.0,
    isolation_cut: bool = True,
    peaks: StarPeaks | None = None,
) -> dict[str, Any]:
    """Bright, isolated, unmasked point-like peaks.

    Returns a dict of arrays ``x``, ``y`` (sub-pixel), ``snr`` (matched-filter),
    ``flux`` (peak of the Gaussian-filtered, background-subtracted image) and
    ``neighbour`` (the brightest other peak within ``isolation`` over this one's),
    sorted by decreasing ``snr``, with ``isolation`` and ``bkg`` (the background, a
    :class:`Background`: slice it for a box).
    ``avoid`` is a boolean image of pixels a star may not touch within ``border``
    pixels.  A star is isolated when no other peak above 5 sigma
    and brighter than ``contrast`` times its own peak lies within ``isolation`` pixels.
    ``nearest`` is the distance to the closest such peak (``inf`` if none within
    ``isolation``).  With ``isolation_cut=False`` crowded peaks are kept too, so that
    the caller can choose its isolation radius from ``nearest`` (:func:`stellar_locus`
    users: the PSF star selection).  ``peaks``, a search of this image already made
    (:func:`star_peaks`), is selected from when it was made with this ``fwhm``.
    """
    if peaks is None or peaks.fwhm != fwhm or peaks.shape != image.shape:
        peaks = star_peaks(image, variance, mask, fwhm)
    ny, nx = peaks.shape
    ay, ax, apk, noise = peaks.y, peaks.x, peaks.value, peaks.noise
    strong = apk > nsigma * noise
    idx = np.flatnonzero(strong)  # into the peaks
    iy, ix = ay[idx], ax[idx]
    keep = (ix >= border) & (ix < nx - border) & (iy >= border) & (iy < ny - border)
    idx = idx[keep]
    # isolation against all peaks above 5 sigma brighter than contrast x this one:
    # ``neighbour`` is the brightest other peak within ``isolation`` over this one
    neighbour, nearest = _neighbours(peaks, idx, isolation, contrast)
    if isolation_cut and len(idx) and len(ax) > 1:
        iso = neighbour <= contrast
        idx, neighbour, nearest = idx[iso], neighbour[iso], nearest[iso]
    if len(idx):
        ok = _clear_of_bad(peaks, ay[idx], ax[idx], border, avoid)
        idx, neighbour, nearest = idx[ok], neighbour[ok], nearest[ok]
    snr = apk[idx] / noise
    order = np.argsort(-snr)
    if max_stars is not None:
        order = order[:max_stars]
    idx, snr, neighbour, nearest = idx[order], snr[order], neighbour[order], nearest[order]
    sigma = peaks.fwhm / 2.3548
    return {
        "x": peaks.xsub[idx],
        "y": peaks.ysub[idx],
        "snr": snr,
        "flux": apk[idx] * 4 * np.pi * sigma**2,
        "neighbour": neighbour,
        "nearest": nearest,
        "isolation": float(isolation),
        "bkg": peaks.bkg,
    }


def _neighbours(
    peaks: StarPeaks, idx: np.ndarray, isolation: float, contrast: float
) -> tuple[np.ndarray, np.ndarray]:
    """For the peaks ``idx``: the brightest other peak within ``isolation`` over the
    peak's own value (0 if none), and the distance to the closest one brighter than
    ``contrast`` times the peak (``inf`` if none)."""
    neighbour = np.zeros(len(idx))
    nearest = np.full(len(idx), np.inf)
    ax, ay, apk = peaks.x, peaks.y, peaks.value
    if len(idx) == 0 or len(ax) <= 1:
        return neighbour, nearest
    tree = cKDTree(np.column_stack([ax, ay]))
    nbrs = tree.query_ball_point(np.column_stack([ax[idx], ay[idx]]), isolation)
    counts = np.fromiter(map(len, nbrs), np.int64, len(nbrs))
    other = np.fromiter(itertools.chain.from_iterable(nbrs), np.int64, int(counts.sum()))
    owner = np.repeat(np.arange(len(idx)), counts)
    notself = other != idx[owner]
    other, owner = other[notself], owner[notself]
    ratio = apk[other] / apk[idx][owner]  # all positive (peaks above 5 sigma)
    np.maximum.at(neighbour, owner, ratio)
    close = ratio > contrast
    other, owner = other[close], owner[close]
    dist = np.hypot(ax[other] - ax[idx][owner], ay[other] - ay[idx][owner])
    np.minimum.at(nearest, owner, dist)
    return neighbour, nearest


def _clear_of_bad(
    peaks: StarPeaks, iy: np.ndarray, ix: np.ndarray, border: int, avoid: np.ndarray | None
) -> np.ndarray:
    """Whether no bad pixel (nor one of ``avoid``) lies in each ``(2 border + 1)²`` box."""
    if avoid is None and isinstance(peaks.bad, tuple) and len(peaks.bad[0]) == 0:
        return np.ones(len(iy), bool)
    if avoid is None and isinstance(peaks.bad, tuple):  # a few: no full-frame mask
        return boxes_clear_of(peaks.bad, peaks.shape, iy, ix, border)
    bad = peaks.bad_mask() if avoid is None else (peaks.bad_mask() | avoid)
    return boxes_clear(bad, iy, ix, border)


def local_maxima(img: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x)`` of pixels above ``threshold`` not below any of their 8 neighbours.

    Equal to ``(img == maximum_filter(img, 3)) & (img > threshold)`` (edges padded
    with ``-inf``), in raster order, in one parallel pass that makes no full-frame mask
    (:func:`apdask._kernels.fused.local_peaks`).
    """
    return local_peaks(img, threshold)


def usable_stars(n: int, cap: int | None) -> np.ndarray:
    """Indices into ``n`` stars sorted brightest first: the brightest 2 % left out (their
    wings are non-linear or saturated), then at most ``cap``."""
    idx = np.arange(n)
    if n > 20:
        idx = idx[int(0.02 * n) :]
    return idx[:cap]


def cutout_at(arr: np.ndarray, ix: int, iy: int, half: int, fill: Any) -> np.ndarray:
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


def weighted_moments(
    image: np.ndarray, x: float, y: float, sigma_w: float, half: int, sign: int = 1
) -> tuple[float, float, float]:
    """Gaussian-weighted second moments, corrected for the weight (Gaussian assumption)."""
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    d = sign * cutout_at(image, ix, iy, half, np.float32(0.0)).astype(float)
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


def stamps_at(
    arr: np.ndarray, xs: npt.ArrayLike, ys: npt.ArrayLike, half: int, fill: Any = np.nan
) -> np.ndarray:
    """``(n, 2 half + 1, 2 half + 1)`` windows of ``arr`` centred on integer ``(xs, ys)``;
    pixels off the array are ``fill``.

    The windows inside the array are copied from a strided view (no full-size index
    arrays: ~10x faster than gathering pixel by pixel for large windows); only those
    that reach off the array are gathered pixel by pixel.
    """
    arr = np.asarray(arr)
    xs, ys = np.asarray(xs, np.int64).ravel(), np.asarray(ys, np.int64).ravel()
    ny, nx = arr.shape
    size = 2 * half + 1
    inside = (xs >= half) & (ys >= half) & (xs < nx - half) & (ys < ny - half)
    if inside.all():
        return sliding_window_view(arr, (size, size))[ys - half, xs - half]
    out = np.empty((len(xs), size, size), arr.dtype)
    for k in np.flatnonzero(inside).tolist():
        out[k] = arr[ys[k] - half : ys[k] + half + 1, xs[k] - half : xs[k] + half + 1]
    o = np.arange(-half, half + 1)
    yy = ys[~inside, None, None] + o[None, :, None]
    xx = xs[~inside, None, None] + o[None, None, :]
    on = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    edge = arr[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)]
    out[~inside] = np.where(on, edge, np.asarray(fill).astype(arr.dtype))
    return out


def adaptive_sizes(
    stamps: np.ndarray, dx: npt.ArrayLike, dy: npt.ArrayLike, fwhm0: float, iterations: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Adaptive-moment FWHM and ellipticity of many background-subtracted stamps.

    The Gaussian weight is matched to each source (its σ² set to twice the weighted
    second moment per axis, the fixed point of a Gaussian source), starting from
    ``fwhm0``; ``dx``, ``dy`` are the sources' offsets from the stamps' centre pixels.

    Parameters
    ----------
    stamps : numpy.ndarray
        ``(n, S, S)`` stamps, background removed.
    dx, dy : array_like
        Sub-pixel offsets of the sources from the central pixels (``n`` each).
    fwhm0 : float
        Starting weight FWHM in pixels.
    iterations : int, optional
        At most this many fixed-point iterations (they stop when every weight has
        converged to 0.1 %).

    Returns
    -------
    fwhm, ellipticity : numpy.ndarray
        ``2.3548 σ`` of the matched weight, and ``|(Mxx − Myy, 2 Mxy)| / (Mxx + Myy)``
        of the weighted moments; NaN where the weighted flux is not positive or the
        weight grew past the stamp (an extended source).
    """
    st = np.ascontiguousarray(stamps, float)  # (a view of wider stamps: read 20 times)
    n, size = st.shape[0], st.shape[-1]
    half = size // 2
    o = np.arange(-half, half + 1, dtype=float)
    ddx = o[None, :] - np.asarray(dx, float)[:, None]  # (n, S)
    ddy = o[None, :] - np.asarray(dy, float)[:, None]
    s2 = np.full(n, (max(float(fwhm0), 1.0) / 2.3548) ** 2)
    s2_max = (half / 2.0) ** 2
    f = mxx = myy = mxy = np.full(n, np.nan)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for _ in range(iterations):
            # the weight is separable: contract x with (1, dx, dx²) x its weight, then y
            wx = np.exp(-0.5 * ddx * ddx / s2[:, None])
            wy = np.exp(-0.5 * ddy * ddy / s2[:, None])
            cx = st @ np.stack([wx, wx * ddx, wx * ddx * ddx], axis=2)  # (n, S, 3)
            f = np.einsum("ny,ny->n", wy, cx[:, :, 0])
            mxx = np.einsum("ny,ny->n", wy, cx[:, :, 2]) / f
            myy = np.einsum("ny,ny->n", wy * ddy * ddy, cx[:, :, 0]) / f
            mxy = np.einsum("ny,ny->n", wy * ddy, cx[:, :, 1]) / f
            new = np.clip(mxx + myy, 0.05, s2_max)  # 2 x the mean per-axis moment
            done = np.nanmax(np.abs(new / s2 - 1.0), initial=0.0) < 1e-3
            s2 = np.where(np.isfinite(new), new, s2_max)
            if done:
                break
        fwhm = 2.3548 * np.sqrt(mxx + myy)
        ell = np.hypot(mxx - myy, 2 * mxy) / (mxx + myy)
    bad = ~(f > 0) | ~(mxx > 0) | ~(myy > 0) | (mxx + myy >= 0.98 * s2_max)
    fwhm[bad] = np.nan
    ell[bad] = np.nan
    return fwhm, ell


#: Half-width (in ln FWHM) of the window that counts a candidate's size neighbours.
_LOCUS_WIDTH = 0.08


def stellar_locus(
    fwhm: npt.ArrayLike,
    ell: npt.ArrayLike,
    snr: npt.ArrayLike,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    shape: tuple[int, ...],
    min_stars: int = 5,
) -> np.ndarray:
    """Point sources among star-finder candidates: the narrow, smallest-size sequence.

    Stars share one size (the PSF's), so in ln FWHM they form a narrow sequence;
    galaxies, blends and saturated stars are larger and spread out, cosmic rays and
    hot pixels smaller than any sampled PSF.  The locus is seeded at the smallest size
    with ``min_stars`` candidates within ±8 % (FWHM ≥ 1 px, ellipticity < 0.5), moved
    to the densest size within 16 % above that seed, then refined by iterative
    clipping about a plane ``ln FWHM(x, y)`` (a PSF varying over the image) with a
    tolerance of 3 σ above and 5 σ below, σ² the locus' own scatter (2–8 %) plus each
    candidate's measurement noise (``1.2 / snr``); ellipticity outliers (4 σ, ≥ 0.1
    above the locus median) are dropped too.  This works whether stars are most of the
    candidates (a 4k CCD) or a few among galaxies (a galaxy-cluster field).

    Parameters
    ----------
    fwhm, ell : array_like
        Sizes and ellipticities (:func:`adaptive_sizes`).
    snr : array_like
        The candidates' S/N (size noise ≈ 1.2 / S/N in ln FWHM).
    x, y : array_like
        Positions, for the spatial fit.
    shape : tuple
        Image shape ``(ny, nx)``.
    min_stars : int, optional
        Candidates the seed needs within its window.

    Returns
    -------
    numpy.ndarray
        Boolean mask of the locus members (all False when no locus is found).
    """
    fw = np.asarray(fwhm, float)
    el = np.asarray(ell, float)
    xs, ys = np.asarray(x, float), np.asarray(y, float)
    keep = np.zeros(len(fw), bool)
    ok = np.isfinite(fw) & np.isfinite(el) & (fw >= 1.0) & (el < 0.5)
    if np.count_nonzero(ok) < min_stars:
        return keep
    lf = np.log(np.where(ok, fw, 1.0))
    ls = np.sort(lf[ok])
    w = _LOCUS_WIDTH
    count = np.searchsorted(ls, ls + w, "right") - np.searchsorted(ls, ls - w, "left")
    seeds = np.flatnonzero(count >= min_stars)
    if len(seeds) == 0:
        return keep
    lo = ls[seeds[0]]
    near = np.flatnonzero((ls >= lo) & (ls <= lo + 2 * w))
    centre = ls[near[np.argmax(count[near])]]
    keep = ok & (np.abs(lf - centre) <= w)
    noise2 = (1.2 / np.maximum(np.asarray(snr, float), 1.0)) ** 2
    ny, nx = shape[:2]
    a = np.column_stack([np.ones_like(xs), xs / nx - 0.5, ys / ny - 0.5])
    for _ in range(10):
        if np.count_nonzero(keep) >= 12:
            coef = np.linalg.lstsq(a[keep], lf[keep], rcond=None)[0]
            model = a @ coef
        else:
            model = np.full(len(lf), np.median(lf[keep]))
        res = lf - model
        # the locus' own scatter, its members' measurement noise removed
        own = float(robust_sigma(res[keep])) ** 2 - float(np.median(noise2[keep]))
        tol = np.sqrt(np.clip(own, 0.02**2, 0.08**2) + noise2)
        e_med = float(np.median(el[keep]))
        e_cut = e_med + max(0.1, 4.0 * float(robust_sigma(el[keep])))
        new = ok & (res < 3.0 * tol) & (res > -5.0 * tol) & (el < e_cut)
        if np.count_nonzero(new) < min_stars or np.array_equal(new, keep):
            break
        keep = new
    return keep
