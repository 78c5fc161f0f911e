"""PSF models: Gaussian and empirical PSFs, moments and FWHM, and the spatially varying grid."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.fft as sfft

from apdask._kernels.fused import in_thread, stamps_less_background
from apdask.core.exposure import Exposure
from apdask.core.stats import robust_sigma
from apdask.exceptions import PsfFitError
from apdask.pipeline.stars import (
    StarPeaks,
    adaptive_sizes,
    find_stars,
    star_peaks,
    stellar_locus,
    usable_stars,
)

__all__ = [
    "PsfGrid",
    "sharpest_fwhm_px",
    "estimate_psf",
    "estimate_psf_model",
    "psf_star_search",
    "psf_fwhm",
    "stamp_moments",
    "shifted_psf",
    "shifted_psfs",
    "psfs_at",
    "psf_getter",
    "require_psf",
    "conv_stamp",
    "recentre",
]


def _gaussian_psf(sigma, size=None):
    """Pixel-sampled circular Gaussian stamp of sum 1."""
    if size is None:
        size = 2 * int(np.ceil(4 * sigma)) + 1
    h = size // 2
    y, x = np.mgrid[-h : h + 1, -h : h + 1]
    g = np.exp(-0.5 * (x * x + y * y) / sigma**2)
    return g / g.sum()


def stamp_moments(
    stamp: np.ndarray, xc: float | None = None, yc: float | None = None
) -> tuple[Any, Any, Any, Any, Any]:
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


def psf_fwhm(psf: np.ndarray) -> float:
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
    _, _, ixx, iyy, _ = stamp_moments(p)
    return 2.3548 * np.sqrt(0.5 * (ixx + iyy))


def shifted_psf(psf: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """PSF stamp shifted by a sub-pixel (dx, dy) with a Fourier phase ramp."""
    ny, nx = psf.shape
    f = np.fft.rfft2(psf)
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    f = f * np.exp(-2j * np.pi * (kx * dx + ky * dy))
    return np.fft.irfft2(f, s=(ny, nx))


def psfs_at(
    exposure: Exposure | None, default: np.ndarray, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """PSF stamps ``(n, S, S)`` at many positions (:func:`psf_getter` for each)."""
    model = exposure.psf_model if exposure is not None else None
    if model is not None and hasattr(model, "at_many"):
        return model.at_many(x, y)
    if model is not None and hasattr(model, "at"):
        return np.array([model.at(xi, yi) for xi, yi in zip(x, y, strict=True)])
    default = np.asarray(default, float)
    return np.broadcast_to(default, (len(x), *default.shape))


def shifted_psfs(psfs: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """:func:`shifted_psf` of many stamps ``(n, S, S)`` by ``(dx, dy)`` each."""
    n, ny, nx = psfs.shape
    f = np.fft.rfft2(psfs, axes=(1, 2))
    ky = np.fft.fftfreq(ny)[None, :, None]
    kx = np.fft.rfftfreq(nx)[None, None, :]
    f *= np.exp(-2j * np.pi * (kx * dx[:, None, None] + ky * dy[:, None, None]))
    return np.fft.irfft2(f, s=(ny, nx), axes=(1, 2))


def psf_getter(
    exposure: Exposure | None, default: np.ndarray
) -> Callable[[float, float], np.ndarray]:
    """``(x, y) -> PSF stamp``: the exposure's spatially varying model if any, else ``default``."""
    model = exposure.psf_model if exposure is not None else None
    if model is not None and hasattr(model, "at"):
        return model.at
    default = np.asarray(default, float)
    return lambda x, y: default


def require_psf(exposure: Exposure, what: str) -> np.ndarray:
    """The exposure's PSF stamp as float64.

    Raises
    ------
    PsfFitError
        If it has none (``what`` names the exposure in the message).
    """
    if exposure.psf is None:
        msg = f"the {what} exposure has no PSF; run subtract.estimate_psf first"
        raise PsfFitError(msg)
    return np.asarray(exposure.psf, dtype=float)


_MIN_PSF_STARS = 5


class PsfGrid:
    """A spatially varying PSF: stamps on a grid of CCD cells, bilinearly interpolated.

    Parameters
    ----------
    psfs : numpy.ndarray
        ``(ncy, ncx, S, S)`` stamps of sum 1, one per cell.
    xc, yc : array_like
        Cell centres in pixels (``ncx`` and ``ncy`` values, increasing).
    mean : numpy.ndarray, optional
        CCD-wide PSF stamp (default: the stamp at the CCD centre).
    stars : dict, optional
        The bright star candidates the model was built from (the star finder's
        ``x``, ``y``, ``snr``, ``neighbour`` and ``isolation``): :func:`subtract`
        picks its kernel stamps from them instead of searching the image again.

    Notes
    -----
    :meth:`at` interpolates between the four nearest cell centres (clamped at the
    outer centres), which follows a PSF that varies linearly across the CCD.
    """

    def __init__(
        self,
        psfs: npt.ArrayLike,
        xc: npt.ArrayLike,
        yc: npt.ArrayLike,
        mean: npt.ArrayLike | None = None,
        stars: dict[str, Any] | None = None,
    ) -> None:
        self.stars = stars
        self.psfs = np.asarray(psfs, float)
        self.xc = np.asarray(xc, float)
        self.yc = np.asarray(yc, float)
        if mean is None:
            mean = self.at(float(np.mean(self.xc)), float(np.mean(self.yc)))
        self.mean = np.asarray(mean, float)

    @property
    def shape(self) -> tuple[int, ...]:
        """Stamp shape ``(S, S)``."""
        return self.psfs.shape[2:]

    def at(self, x: float, y: float) -> np.ndarray:
        """PSF stamp (sum 1) at pixel ``(x, y)``."""
        iy, ty = _bracket(self.yc, y)
        ix, tx = _bracket(self.xc, x)
        p = self.psfs
        st = (1 - ty) * ((1 - tx) * p[iy[0], ix[0]] + tx * p[iy[0], ix[1]]) + ty * (
            (1 - tx) * p[iy[1], ix[0]] + tx * p[iy[1], ix[1]]
        )
        return st / st.sum()

    def at_many(self, x: npt.ArrayLike, y: npt.ArrayLike) -> np.ndarray:
        """PSF stamps (sum 1) at many positions: ``(n, S, S)``, as :meth:`at` for each."""
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        (iy0, iy1), ty = _bracket_many(self.yc, y)
        (ix0, ix1), tx = _bracket_many(self.xc, x)
        ty, tx = ty[:, None, None], tx[:, None, None]
        p = self.psfs
        st = (1 - ty) * ((1 - tx) * p[iy0, ix0] + tx * p[iy0, ix1]) + ty * (
            (1 - tx) * p[iy1, ix0] + tx * p[iy1, ix1]
        )
        return st / st.sum(axis=(1, 2), keepdims=True)

    def convolved(self, kernel: np.ndarray, size: int | None = None) -> PsfGrid:
        """A new grid with every stamp convolved by ``kernel`` (and cut/padded to ``size``)."""
        size = int(size or self.psfs.shape[-1]) | 1
        out = np.array([[conv_stamp(p, kernel, size) for p in row] for row in self.psfs])
        return PsfGrid(out, self.xc, self.yc, conv_stamp(self.mean, kernel, size))


def _bracket(nodes, v):
    if len(nodes) == 1:
        return (0, 0), 0.0
    j = int(np.clip(np.searchsorted(nodes, v, side="right") - 1, 0, len(nodes) - 2))
    t = float(np.clip((v - nodes[j]) / (nodes[j + 1] - nodes[j]), 0.0, 1.0))
    return (j, j + 1), t


def _bracket_many(nodes, v):
    """:func:`_bracket` for an array of values."""
    if len(nodes) == 1:
        z = np.zeros(len(v), int)
        return (z, z), np.zeros(len(v))
    j = np.clip(np.searchsorted(nodes, v, side="right") - 1, 0, len(nodes) - 2)
    t = np.clip((v - nodes[j]) / (nodes[j + 1] - nodes[j]), 0.0, 1.0)
    return (j, j + 1), t


def conv_stamp(a: np.ndarray, b: np.ndarray, size: int) -> np.ndarray:
    """Full convolution of two small centred stamps, cut (or zero padded) to ``size``, sum 1."""
    n = a.shape[0] + b.shape[0] - 1
    L = sfft.next_fast_len(n)
    c = sfft.irfft2(sfft.rfft2(a, s=(L, L)) * sfft.rfft2(b, s=(L, L)), s=(L, L))[:n, :n]
    return recentre(c, size)


def recentre(c: np.ndarray, size: int) -> np.ndarray:
    """Cut or zero-pad a centred odd stamp to ``size`` and normalise it to sum 1."""
    n = c.shape[0]
    h, H = size // 2, n // 2
    out = np.zeros((size, size))
    m = min(h, H)
    out[h - m : h + m + 1, h - m : h + m + 1] = c[H - m : H + m + 1, H - m : H + m + 1]
    return out / out.sum()


#: At least this many of the brightest star-finder candidates (and 4 per star wanted)
#: are sized for the stellar locus.
_MIN_CANDIDATES = 1000


def psf_star_search(exposure: Exposure, peaks: StarPeaks | None = None) -> StarPeaks:
    """The star search :func:`estimate_psf_model` selects its stars from: ``peaks`` (a
    search of this exposure's image, e.g. the astrometry's) when it was made with the
    FWHM guess the PSF model starts from, else a new one."""
    fwhm = _guess_fwhm(exposure)
    if peaks is not None and peaks.fwhm == fwhm and peaks.shape == exposure.shape:
        return peaks
    return star_peaks(exposure.image, exposure.variance, exposure.mask, fwhm)


def _psf_stamps(exposure, stamp_size, max_stars, peaks=None):
    """Background-subtracted, re-centred, unit-sum stamps of bright isolated stars.

    The star finder's candidates (crowded ones included) are sized by adaptive moments
    and the point sources among them picked as the stellar locus
    (:func:`~apdask.pipeline.stars.stellar_locus`: galaxies, blends, saturated stars
    and cosmic rays are off it).  Of these, the stars isolated within the stamp side
    are used; when that leaves fewer than 10, within 4 FWHM of the locus (at least
    half the stamp), then 2.5 FWHM (rich or small fields).  The median PSF is then
    refitted without the stamps that do not match it (:func:`_clip_mismatched`).

    Returns ``stamps, xs, ys, stars`` (``stars``: all the star finder's candidates,
    without the background map, with their ``fwhm``, ``ellipticity`` and ``locus``).
    ``peaks``: a search of the image to select from (:func:`psf_star_search`).
    """
    stamp_size = int(stamp_size) | 1
    half = stamp_size // 2
    big = half + 2
    fwhm0 = _guess_fwhm(exposure)
    stars = find_stars(
        exposure.image,
        exposure.variance,
        exposure.mask,
        fwhm=fwhm0,
        nsigma=20.0,
        isolation=stamp_size,
        border=big,
        max_stars=None,
        contrast=0.02,
        isolation_cut=False,
        peaks=peaks,
    )
    bkg = stars.pop("bkg")
    n = len(stars["x"])
    m = max(_MIN_CANDIDATES, 4 * int(max_stars or 0))
    x, y = stars["x"][:m], stars["y"][:m]
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    raw = _raw_stamps(exposure.image, bkg, ix, iy, big)
    fw, ell = adaptive_sizes(raw[:, 2:-2, 2:-2], x - ix, y - iy, fwhm0)
    locus = stellar_locus(fw, ell, stars["snr"][: len(x)], x, y, exposure.shape, _MIN_PSF_STARS)
    if np.count_nonzero(locus) < _MIN_PSF_STARS and len(x) < 3 * _MIN_PSF_STARS:
        locus = np.isfinite(fw)  # a handful of candidates and no sequence: all of them
    pad = np.full(n - len(x), np.nan)
    stars["fwhm"] = np.concatenate([fw, pad])
    stars["ellipticity"] = np.concatenate([ell, pad])
    stars["locus"] = np.concatenate([locus, np.zeros(n - len(x), bool)])
    f_star = float(np.exp(np.median(np.log(fw[locus])))) if locus.any() else fwhm0
    order = np.zeros(0, int)
    for radius in (stamp_size, max(4.0 * f_star, 0.5 * stamp_size), 2.5 * f_star):
        sel = np.flatnonzero(locus & (stars["nearest"][: len(x)] > radius))
        order = sel[usable_stars(len(sel), max_stars)]
        if len(order) >= 2 * _MIN_PSF_STARS:
            break
    if len(order) < _MIN_PSF_STARS:
        msg = (
            f"PSF estimation failed: only {len(order)} bright isolated unmasked stars "
            f"(need {_MIN_PSF_STARS}; {n} candidates, {int(locus.sum())} on the stellar "
            "locus); the field is too sparse, too crowded or badly masked"
        )
        raise PsfFitError(msg)
    stamps = _shifted_in_halves(raw[order], -(x - ix)[order], -(y - iy)[order])[:, 2:-2, 2:-2]
    tot = stamps.sum(axis=(1, 2))
    good = tot > 0
    stamps = stamps[good] / tot[good, None, None]
    xs, ys = x[order][good], y[order][good]
    keep, median = _clip_mismatched(stamps, f_star)
    if not keep.all():
        stamps, xs, ys, median = stamps[keep], xs[keep], ys[keep], None
    if len(stamps) < _MIN_PSF_STARS:
        msg = (
            f"PSF estimation failed: only {len(stamps)} usable star stamps (need {_MIN_PSF_STARS})"
        )
        raise PsfFitError(msg)
    return stamps, xs, ys, stars, median


#: Fewer stamps than this are shifted in one call (a thread costs more than it saves).
_SPLIT_STAMPS = 64


def _shifted_in_halves(psfs, dx, dy):
    """:func:`shifted_psfs`, its second half in a thread beside the first when the task
    has two threads (:func:`~apdask._kernels.fused._threads.in_thread`).  Each stamp's
    FFTs and phase ramp are its own, so the stamps are those of one call, bit for bit."""
    n = len(psfs)
    if n < _SPLIT_STAMPS:
        return shifted_psfs(psfs, dx, dy)
    h = n // 2
    rest = in_thread(shifted_psfs, psfs[h:], dx[h:], dy[h:])
    first = shifted_psfs(psfs[:h], dx[:h], dy[:h])
    return np.concatenate([first, rest()])


def _raw_stamps(image, bkg, ix, iy, half):
    """``(n, 2 half + 1, 2 half + 1)`` float64 stamps at integer centres, the background
    map and then each stamp's outer-ring (2 px) median removed."""
    st = stamps_less_background(image, bkg.bilinear(), iy, ix, half)
    ring = np.ones(st.shape[1:], bool)
    ring[2:-2, 2:-2] = False
    st -= np.median(st[:, ring], axis=1)[:, None, None]
    return st


def _clip_mismatched(stamps, fwhm):
    """Stamps that match their median: the relative residual within 1.5 FWHM of the
    centre, beyond what the others show, at most 5 robust σ above their median
    (blends and galaxies that the size cut let through).

    Returns ``keep`` and the median PSF of all the stamps (:func:`_combine`; None when
    there are too few to clip)."""
    if len(stamps) <= _MIN_PSF_STARS:
        return np.ones(len(stamps), bool), None
    psf = _combine(stamps)
    half = stamps.shape[-1] // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    core = np.hypot(xx, yy) <= max(1.5 * fwhm, 2.0)
    res = ((stamps[:, core] - psf[core]) ** 2).sum(axis=1) / (psf[core] ** 2).sum()
    keep = res <= np.median(res) + 5.0 * max(float(robust_sigma(res)), 1e-4)
    if np.count_nonzero(keep) < _MIN_PSF_STARS:
        keep = np.ones(len(stamps), bool)
    return keep, psf


def _combine(stamps):
    """Median PSF with the residual pedestal removed, cut to a circle, sum 1."""
    size = stamps.shape[-1]
    half = size // 2
    psf = np.median(stamps, axis=0)
    # remove any residual pedestal (outer ring) and cut to a circle: no clipping of
    # negative noise, which would bias the wings (and PSF fluxes) high
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = np.hypot(xx, yy)
    psf = psf - np.median(psf[rr >= half - 1])
    psf[rr > half] = 0.0
    return psf / psf.sum()


def estimate_psf_model(
    exposure: Exposure,
    stamp_size: int = 25,
    max_stars: int = 1000,
    cells: int = 3,
    min_per_cell: int = 8,
    peaks: StarPeaks | None = None,
) -> PsfGrid:
    """Spatially varying empirical PSF on a ``cells × cells`` grid of the CCD.

    Parameters
    ----------
    exposure : apdask.core.exposure.Exposure
        Calibrated exposure; masked pixels are avoided.
    stamp_size : int, optional
        Odd stamp side.
    max_stars : int, optional
        Use at most this many of the brightest suitable stars.
    cells : int, optional
        Grid cells per axis (3 gives 9 cells, about 1360 px on an LSST CCD).
    min_per_cell : int, optional
        A cell with fewer stars borrows the nearest stars of the CCD until it has this many.
    peaks : apdask.pipeline.stars.StarPeaks, optional
        A star search of this exposure's image already made (e.g. by the astrometry):
        its stars are selected from it when it was made with the FWHM guess the model
        starts from (:func:`psf_star_search`), else the image is searched again.

    Returns
    -------
    PsfGrid
        One median stamp per cell, interpolated between cell centres; ``mean`` is the
        median of all stamps (what :func:`estimate_psf` returns).

    Raises
    ------
    PsfFitError
        If fewer than 5 suitable stars are found on the CCD.
    """
    stamps, xs, ys, stars, median = _psf_stamps(exposure, stamp_size, max_stars, peaks)
    # the CCD-wide stamp beside the cells' (when no stamp was clipped, the clipping's)
    mean = (lambda: median) if median is not None else in_thread(_combine, stamps)
    ny, nx = exposure.shape
    cells = max(1, int(cells))
    # enough stars per cell that a cell's median stamp is not noisier than the
    # spatial variation it follows (about 25 stars each)
    cells = int(np.clip(np.floor(np.sqrt(len(stamps) / 25.0)), 1, cells))
    psfs = np.empty((cells, cells) + stamps.shape[1:])
    xc = (np.arange(cells) + 0.5) * nx / cells - 0.5
    yc = (np.arange(cells) + 0.5) * ny / cells - 0.5
    for j in range(cells):
        for i in range(cells):
            d = np.hypot((xs - xc[i]) / nx, (ys - yc[j]) / ny)
            inside = np.flatnonzero(
                (np.abs(xs - xc[i]) <= nx / cells / 2) & (np.abs(ys - yc[j]) <= ny / cells / 2)
            )
            if len(inside) < min_per_cell:
                inside = np.argsort(d)[: max(min_per_cell, len(inside))]
            psfs[j, i] = _combine(stamps[inside])
    return PsfGrid(psfs, xc, yc, mean(), stars=stars)


def estimate_psf(exposure: Exposure, stamp_size: int = 25, max_stars: int = 200) -> np.ndarray:
    """Empirical PSF stamp from bright, isolated, unsaturated stars.

    Parameters
    ----------
    exposure : apdask.core.exposure.Exposure
        Calibrated exposure (any flux unit); masked pixels (BAD, SAT, CR, NO_DATA,
        EDGE) are avoided.
    stamp_size : int, optional
        Side of the returned stamp (made odd).
    max_stars : int, optional
        Use at most this many of the brightest suitable stars.

    Returns
    -------
    numpy.ndarray
        float64 ``(stamp_size, stamp_size)`` stamp of sum 1, centred on the middle pixel.

    Raises
    ------
    PsfFitError
        If fewer than 5 suitable stars are found.
    """
    stamps, _, _, _, median = _psf_stamps(exposure, stamp_size, max_stars)
    return median if median is not None else _combine(stamps)


def _guess_fwhm(exposure):
    if exposure.psf is not None:
        return float(psf_fwhm(exposure.psf))
    if exposure.meta.get("fwhm_guess"):  # e.g. a FITS header's FWHM (apdask.io.foreign)
        return float(exposure.meta["fwhm_guess"])
    return 4.5  # ~0.9" at 0.2"/px


def sharpest_fwhm_px(psfs: np.ndarray) -> float:
    """FWHM (px) of the Gaussian as sharp as the sharpest of the PSF stamps ``(..., S, S)``.

    :func:`apdask.pipeline.isr.mask_cosmic_rays` flags pixels sharper than a Gaussian
    of the FWHM it is given allows, from the ratio of a pixel to its neighbours.  Here
    that ratio is the stamps' own: ``σ² = 1 / (2 ln R)`` with ``R`` the centre pixel over
    the mean of its four side neighbours.  Second moments would overstate the FWHM of a
    PSF with broad wings (Kolmogorov: ~20 %), and the cores of bright stars would be
    flagged as cosmic rays and interpolated away.
    """
    p = np.asarray(psfs, float).reshape((-1,) + np.shape(psfs)[-2:])
    c = p.shape[-1] // 2
    side = 0.25 * (p[:, c, c - 1] + p[:, c, c + 1] + p[:, c - 1, c] + p[:, c + 1, c])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(side > 0, p[:, c, c] / side, np.nan)
    ratio = ratio[np.isfinite(ratio) & (ratio > 1.0)]
    if len(ratio) == 0:
        return 4.5
    return 2.3548 * math.sqrt(1.0 / (2.0 * math.log(float(ratio.max()))))
