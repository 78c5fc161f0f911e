"""PSF estimation and PSF-matched image subtraction (Alard & Lupton 1998).

See ``docs/subtraction.md`` for the choices made here.  In short: a Gaussian ×
polynomial (Alard–Lupton) kernel basis is fitted by linear least squares on
stamps around bright isolated stars, with a polynomial spatial variation of the
kernel and of a background difference term.  The sharper image is convolved to
match the broader one; the convolution of the full CCD uses FFTs (one forward
transform, one inverse per spatial term).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft as sfft
from scipy import ndimage, signal

from ._fourier import convolve_tiles
from ._fused import (
    combine_masks,
    difference_variance,
    dilate,
    fill_nodata,
    finish_difference,
    one_blas_thread,
)
from ._stats import nanmedian_last
from .detect import (
    _find_stars,
    _psf_fwhm,
    _psf_getter,
    _shifted_psf,
    _workers,
    aperture_correction,
    bright_sources,
    usable_stars,
)
from .exceptions import PsfFitError
from .image import MASK, mask_bits

__all__ = [
    "estimate_psf",
    "estimate_psf_model",
    "PsfGrid",
    "subtract",
    "alard_lupton_basis",
    "decorrelation_kernel",
]

_MIN_PSF_STARS = 5
_MIN_STAMPS = 5


def _model_rules():
    """Star counts the kernel model needs (``apdask.subtract.kernel.*`` in apdask.yaml)."""
    from . import config

    return {
        "min_stamps": int(config.get("subtract.kernel.min_stamps")),
        "stamps_per_term": int(config.get("subtract.kernel.stamps_per_spatial_term")),
        "full_basis_stamps": int(config.get("subtract.kernel.full_basis_stamps")),
    }


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

    def __init__(self, psfs, xc, yc, mean=None, stars=None):
        self.stars = stars
        self.psfs = np.asarray(psfs, float)
        self.xc = np.asarray(xc, float)
        self.yc = np.asarray(yc, float)
        if mean is None:
            mean = self.at(float(np.mean(self.xc)), float(np.mean(self.yc)))
        self.mean = np.asarray(mean, float)

    @property
    def shape(self):
        """Stamp shape ``(S, S)``."""
        return self.psfs.shape[2:]

    def at(self, x, y):
        """PSF stamp (sum 1) at pixel ``(x, y)``."""
        iy, ty = _bracket(self.yc, y)
        ix, tx = _bracket(self.xc, x)
        p = self.psfs
        st = ((1 - ty) * ((1 - tx) * p[iy[0], ix[0]] + tx * p[iy[0], ix[1]])
              + ty * ((1 - tx) * p[iy[1], ix[0]] + tx * p[iy[1], ix[1]]))  # fmt: skip
        return st / st.sum()

    def at_many(self, x, y):
        """PSF stamps (sum 1) at many positions: ``(n, S, S)``, as :meth:`at` for each."""
        x, y = np.atleast_1d(np.asarray(x, float)), np.atleast_1d(np.asarray(y, float))
        (iy0, iy1), ty = _bracket_many(self.yc, y)
        (ix0, ix1), tx = _bracket_many(self.xc, x)
        ty, tx = ty[:, None, None], tx[:, None, None]
        p = self.psfs
        st = ((1 - ty) * ((1 - tx) * p[iy0, ix0] + tx * p[iy0, ix1])
              + ty * ((1 - tx) * p[iy1, ix0] + tx * p[iy1, ix1]))  # fmt: skip
        return st / st.sum(axis=(1, 2), keepdims=True)

    def convolved(self, kernel, size=None):
        """A new grid with every stamp convolved by ``kernel`` (and cut/padded to ``size``)."""
        size = int(size or self.psfs.shape[-1]) | 1
        out = np.array([[_conv_stamp(p, kernel, size) for p in row] for row in self.psfs])
        return PsfGrid(out, self.xc, self.yc, _conv_stamp(self.mean, kernel, size))


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


def _conv_stamp(a, b, size):
    """Full convolution of two small centred stamps, cut (or zero padded) to ``size``, sum 1."""
    n = a.shape[0] + b.shape[0] - 1
    L = sfft.next_fast_len(n)
    c = sfft.irfft2(sfft.rfft2(a, s=(L, L)) * sfft.rfft2(b, s=(L, L)), s=(L, L))[:n, :n]
    return _recentre(c, size)


def _recentre(c, size):
    """Cut or zero-pad a centred odd stamp to ``size`` and normalise it to sum 1."""
    n = c.shape[0]
    h, H = size // 2, n // 2
    out = np.zeros((size, size))
    m = min(h, H)
    out[h - m : h + m + 1, h - m : h + m + 1] = c[H - m : H + m + 1, H - m : H + m + 1]
    return out / out.sum()


def _psf_stamps(exposure, stamp_size, max_stars):
    """Background-subtracted, re-centred, unit-sum stamps of bright isolated stars.

    Returns ``stamps, xs, ys, stars`` (``stars``: all the star finder's candidates,
    without the background map).
    """
    stamp_size = int(stamp_size) | 1
    half = stamp_size // 2
    fwhm0 = _guess_fwhm(exposure)
    # isolation radius: the stamp side, or (too few stars: small or sparse images) 4 FWHM
    for isolation in (stamp_size, min(stamp_size, max(4.0 * fwhm0, 0.5 * stamp_size))):
        stars = _find_stars(
            exposure.image, exposure.variance, exposure.mask, fwhm=fwhm0, nsigma=20.0,
            isolation=isolation, border=half + 2, max_stars=None, contrast=0.02,
        )  # fmt: skip
        n_found = len(stars["x"])
        order = np.arange(n_found)
        if n_found > 20:
            order = order[int(0.02 * n_found) :]
        order = order[:max_stars]
        if len(order) >= _MIN_PSF_STARS:
            break
    if len(order) < _MIN_PSF_STARS:
        msg = (
            f"PSF estimation failed: only {len(order)} bright isolated unmasked stars "
            f"(need {_MIN_PSF_STARS}); the field is too sparse, too crowded or badly masked"
        )
        raise PsfFitError(msg)
    bkg = stars["bkg"]
    stamps, xs, ys = [], [], []
    big = half + 2
    for i in order:
        x, y = stars["x"][i], stars["y"][i]
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        sl = (slice(iy - big, iy + big + 1), slice(ix - big, ix + big + 1))
        st = np.asarray(exposure.image[sl], float) - bkg[sl]
        if st.shape != (2 * big + 1, 2 * big + 1):
            continue
        ring = np.concatenate([st[:2].ravel(), st[-2:].ravel(), st[2:-2, :2].ravel(),
                               st[2:-2, -2:].ravel()])  # fmt: skip
        st -= np.median(ring)
        st = _shifted_psf(st, -(x - ix), -(y - iy))[2:-2, 2:-2]
        tot = st.sum()
        if tot > 0:
            stamps.append(st / tot)
            xs.append(x)
            ys.append(y)
    stamps, xs, ys = np.array(stamps), np.array(xs), np.array(ys)
    if len(stamps) >= 3 * _MIN_PSF_STARS:
        keep = _stellar_locus(stamps, xs, ys, exposure.shape)
        stamps, xs, ys = stamps[keep], xs[keep], ys[keep]
    if len(stamps) < _MIN_PSF_STARS:
        msg = (
            f"PSF estimation failed: only {len(stamps)} usable star stamps (need {_MIN_PSF_STARS})"
        )
        raise PsfFitError(msg)
    stars = {k: v for k, v in stars.items() if k != "bkg"}
    return stamps, xs, ys, stars


def _stellar_locus(stamps, xs, ys, shape):
    """Reject extended sources and blends: size outliers from a planar size(x, y) fit.

    The size is the Gaussian-weighted second moment of each stamp; galaxies and blends
    are larger, so the clip is asymmetric (3 robust σ above, 5 below).
    """
    half = stamps.shape[-1] // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    r2 = (xx * xx + yy * yy).astype(float)
    w = np.exp(-0.5 * r2 / 3.0**2)
    size = (stamps * w * r2).sum(axis=(1, 2)) / np.maximum((stamps * w).sum(axis=(1, 2)), 1e-12)
    ny, nx = shape
    a = np.column_stack([np.ones_like(xs), xs / nx - 0.5, ys / ny - 0.5])
    keep = np.isfinite(size)
    for _ in range(3):
        coef = np.linalg.lstsq(a[keep], size[keep], rcond=None)[0]
        res = size - a @ coef
        sig = 1.4826 * np.median(np.abs(res[keep] - np.median(res[keep])))
        new = np.isfinite(size) & (res < 3 * sig) & (res > -5 * sig)
        if np.array_equal(new, keep):
            break
        keep = new
    return keep


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


def estimate_psf_model(exposure, stamp_size=25, max_stars=1000, cells=3, min_per_cell=8):
    """Spatially varying empirical PSF on a ``cells × cells`` grid of the CCD.

    Parameters
    ----------
    exposure : apdask.image.Exposure
        Calibrated exposure; masked pixels are avoided.
    stamp_size : int, optional
        Odd stamp side.
    max_stars : int, optional
        Use at most this many of the brightest suitable stars.
    cells : int, optional
        Grid cells per axis (3 gives 9 cells, about 1360 px on an LSST CCD).
    min_per_cell : int, optional
        A cell with fewer stars borrows the nearest stars of the CCD until it has this many.

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
    stamps, xs, ys, stars = _psf_stamps(exposure, stamp_size, max_stars)
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
            inside = np.flatnonzero((np.abs(xs - xc[i]) <= nx / cells / 2)
                                    & (np.abs(ys - yc[j]) <= ny / cells / 2))  # fmt: skip
            if len(inside) < min_per_cell:
                inside = np.argsort(d)[: max(min_per_cell, len(inside))]
            psfs[j, i] = _combine(stamps[inside])
    return PsfGrid(psfs, xc, yc, _combine(stamps), stars=stars)


def estimate_psf(exposure, stamp_size=25, max_stars=200):
    """Empirical PSF stamp from bright, isolated, unsaturated stars.

    Parameters
    ----------
    exposure : apdask.image.Exposure
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
    stamps, _, _, _ = _psf_stamps(exposure, stamp_size, max_stars)
    return _combine(stamps)


def _guess_fwhm(exposure):
    if exposure.psf is not None:
        return float(_psf_fwhm(exposure.psf))
    if exposure.meta.get("fwhm_guess"):  # e.g. a FITS header's FWHM (apdask.foreign)
        return float(exposure.meta["fwhm_guess"])
    return 4.5  # ~0.9" at 0.2"/px


def _al_factors(sigmas, degrees, size):
    """Separable factors of the Alard–Lupton basis before orthogonalisation.

    Returns a list of ``(sigma_index, i, j)`` and the 1-D profiles ``prof[k][i]`` =
    ``exp(-t²/2σ_k²) (t/half)**i`` on ``t = -half..half``: raw kernel ``(k, i, j)`` is
    ``outer(prof[k][j], prof[k][i])`` (y, x).
    """
    half = size // 2
    t = np.arange(-half, half + 1, dtype=float)
    prof, terms = [], []
    for k, (s, deg) in enumerate(zip(sigmas, degrees, strict=True)):
        g = np.exp(-0.5 * t * t / s**2)
        prof.append([g * (t / half) ** i for i in range(deg + 1)])
        terms += [(k, i, j) for i in range(deg + 1) for j in range(deg + 1 - i)]
    return terms, prof


def alard_lupton_basis(sigmas, degrees, size):
    """Alard–Lupton kernel basis: Gaussians times 2-D polynomials.

    Parameters
    ----------
    sigmas : sequence of float
        Gaussian widths in pixels.
    degrees : sequence of int
        Polynomial degree for each Gaussian.
    size : int
        Odd kernel side.

    Returns
    -------
    numpy.ndarray
        ``(n_basis, size, size)``.  The first kernel has sum 1, all others sum 0
        (so the photometric scale is carried by the first coefficient only).
    """
    terms, prof = _al_factors(sigmas, degrees, size)
    out = np.array([np.outer(prof[k][j], prof[k][i]) for k, i, j in terms])
    out[0] /= out[0].sum()
    for k in out[1:]:
        t = k.sum()
        if abs(t) > 1e-12 * np.abs(k).sum():
            k -= t * out[0]
    # normalise the amplitudes for conditioning
    for k in out[1:]:
        k /= np.sqrt((k * k).sum()) / np.sqrt((out[0] * out[0]).sum())
    return out


def _powers(order):
    """Exponents ``(i, j)`` of ``u**i * v**j`` in the order of :func:`_spatial_terms`."""
    return [(i, total - i) for total in range(order + 1) for i in range(total, -1, -1)]


def _spatial_terms(x, y, shape, order):
    """Polynomial spatial weights (1, u, v, u², uv, v², ...) with u, v in [-1, 1]."""
    ny, nx = shape
    u = (np.asarray(x, float) - (nx - 1) / 2) / max((nx - 1) / 2, 1)
    v = (np.asarray(y, float) - (ny - 1) / 2) / max((ny - 1) / 2, 1)
    terms = []
    for total in range(order + 1):
        for i in range(total, -1, -1):
            terms.append(u**i * v ** (total - i))
    return terms


def _convolution_plan(basis, factors, fit_half):
    """Toeplitz matrices of the raw separable kernels and ``M`` (``basis = M @ raw``),
    made once per fit for :func:`_stamp_convolutions`."""
    terms, prof = factors
    ks = basis.shape[1]
    S = 2 * fit_half + 1
    T = S + ks - 1

    def toeplitz(p):  # (S, T): row q holds the flipped profile at columns q..q+ks-1
        m = np.zeros((S, T), np.float32)
        for q in range(S):
            m[q, q : q + ks] = p[::-1]
        return m

    groups = []
    for k, i in dict.fromkeys((k, i) for k, i, _ in terms):
        idx = [r for r, t in enumerate(terms) if t[:2] == (k, i)]
        ty = np.concatenate([toeplitz(prof[k][terms[r][2]]) for r in idx])
        groups.append((np.ascontiguousarray(toeplitz(prof[k][i]).T), idx, ty))
    raw_k = np.array([np.outer(prof[k][j], prof[k][i]).ravel() for k, i, j in terms])
    m = np.linalg.lstsq(raw_k.T, basis.reshape(len(basis), -1).T, rcond=None)[0].T
    return groups, m, len(terms), S, T


def _stamp_convolutions(image, basis, xs, ys, fit_half, factors, plan=None):
    """Valid-mode convolution of stamps of ``image`` with the basis's separable factors.

    The Alard–Lupton kernels are linear combinations of separable raw kernels
    (``factors``, :func:`_al_factors`): ``basis = M @ raw``.  Each stamp is convolved
    with the raw kernels as two matrix products with banded (Toeplitz) matrices, all
    stamps at once, in single precision (relative error ~1e-7).  The convolutions
    with the basis are ``M @ raw`` per stamp; the fit forms its normal equations on
    the raw ones and transforms those (:func:`_fit_kernel`).  ``plan`` is
    :func:`_convolution_plan` of the same arguments, if already made.

    Returns
    -------
    raw : numpy.ndarray
        float32 ``(n_stamps, n_raw, (2*fit_half+1)**2)``.
    M : numpy.ndarray
        ``(n_basis, n_raw)``.
    """
    groups, m, nraw, S, T = plan or _convolution_plan(basis, factors, fit_half)
    ns = len(xs)
    off = np.arange(T) - T // 2
    at = (np.asarray(ys)[:, None, None] + off[None, :, None],
          np.asarray(xs)[:, None, None] + off[None, None, :])  # fmt: skip
    stamps = np.asarray(image[at], np.float32)
    raw = np.empty((ns, nraw, S, S), np.float32)
    flat = stamps.reshape(ns * T, T)
    for tx, idx, ty in groups:
        # stamps convolved along x with prof[k][i], then along y with every prof[k][j]
        h = (flat @ tx).reshape(ns, T, S)
        rows = np.ascontiguousarray(h.transpose(1, 0, 2)).reshape(T, ns * S)
        res = (ty @ rows).reshape(len(idx), S, ns, S)
        raw[:, idx] = res.transpose(2, 0, 1, 3)
    return raw.reshape(ns, nraw, S * S), m


def _stamp_blocks(ref, basis, xs, ys, fit_half, factors, wf, tgf, threads, chunk=48):
    """Per-stamp normal-equation blocks ``Σ w c cᵀ``, ``Σ w c`` and ``Σ w c t`` on the raw
    separable kernels' convolutions ``c`` (:func:`_stamp_convolutions`), and ``M``.

    The convolutions (single precision) are promoted to double before the products: in
    single precision the kernel sum moves by 2e-4.  The stamps go in chunks of at most
    ``chunk`` (whose temporaries stay in cache), as many per thread, to ``threads``
    threads, each running single-threaded BLAS (see :func:`apdask._fused.one_blas_thread`).
    """

    plan = _convolution_plan(basis, factors, fit_half)

    def blocks(lo, hi):
        raw, m_raw = _stamp_convolutions(ref, basis, xs[lo:hi], ys[lo:hi], fit_half, factors,
                                         plan)  # fmt: skip
        sw = np.sqrt(wf[lo:hi])
        cs = raw * sw[:, None, :]  # float64
        del raw
        m = np.matmul(cs, cs.transpose(0, 2, 1))
        c = np.matmul(cs, sw[:, :, None])[:, :, 0]
        b = np.matmul(cs, (tgf[lo:hi] * sw)[:, :, None])[:, :, 0]
        return m, c, b, m_raw

    ns = len(xs)
    threads = max(1, int(threads))
    count = threads * max(1, -(-ns // (threads * chunk)))  # a multiple of the threads
    cuts = np.linspace(0, ns, min(count, ns) + 1).astype(int)
    parts = list(zip(cuts[:-1], cuts[1:], strict=True))
    if threads == 1 or len(parts) == 1:  # (single-threaded BLAS: see one_blas_thread)
        res = [blocks(*p) for p in parts]
    else:
        with ThreadPoolExecutor(min(int(threads), len(parts))) as pool:
            res = list(pool.map(lambda p: blocks(*p), parts))
    m, c, b = (np.concatenate([r[i] for r in res]) for i in range(3))
    return m, c, b, res[0][3]


def _fit_kernel(ref, tgt, variances, bad, basis, xs, ys, shape, spatial_order, bg_order, fit_half,
                factors):  # fmt: skip
    """Least-squares fit of ``tgt ≈ K(x, y) ⊗ ref + bg(x, y)`` on stamps; sigma-clipped.

    ``variances`` are the two images' variance planes (summed per stamp), ``bad`` the
    pixels to leave out.
    """
    ns = len(xs)
    nb = len(basis)
    sw = np.array(_spatial_terms(xs, ys, shape, spatial_order)).T  # (ns, nsp)
    bw = np.array(_spatial_terms(xs, ys, shape, bg_order)).T  # (ns, nbg)
    nsp, nbg = sw.shape[1], bw.shape[1]
    npar = nb * nsp + nbg
    S = 2 * fit_half + 1
    off = np.arange(-fit_half, fit_half + 1)
    at = (np.asarray(ys)[:, None, None] + off[None, :, None],
          np.asarray(xs)[:, None, None] + off[None, None, :])  # fmt: skip
    tg = tgt[at].astype(float)
    vr = variances[0][at].astype(float) + variances[1][at]
    ok = ~bad[at]
    ok &= np.isfinite(vr)
    # weights from a locally smoothed variance: a variance plane estimated from the
    # noisy pixels themselves would bias the fit (low pixels get high weight)
    vr = ndimage.uniform_filter(vr, size=(1, 5, 5), mode="nearest")
    w = np.where(ok & (vr > 0), 1.0 / np.where(vr > 0, vr, 1.0), 0.0)
    tgf = tg.reshape(ns, S * S)
    wf = w.reshape(ns, S * S)
    # per-stamp normal-equation blocks (with them, each stamp's χ² needs no model
    # image), on the raw separable kernels in double precision, then ``M · M_raw · Mᵀ``
    m_n, c_n, b_n, m_raw = _stamp_blocks(ref, basis, xs, ys, fit_half, factors, wf, tgf,
                                         _workers())  # fmt: skip
    m_n = m_raw @ m_n @ m_raw.T  # (ns, nb, nb)
    c_n = c_n @ m_raw.T
    b_n = b_n @ m_raw.T
    w_n = wf.sum(axis=1)  # (ns,)
    t_n = (wf * tgf).sum(axis=1)  # (ns,)
    tt_n = (wf * tgf * tgf).sum(axis=1)  # (ns,)
    npix = np.maximum((wf > 0).sum(axis=1), 1)
    use = np.ones(ns, bool)
    chi2 = np.full(ns, np.nan)
    coef = None
    nk = nb * nsp
    for _ in range(3):
        u = use
        ata = np.zeros((npar, npar))
        q = (sw[u][:, :, None] * sw[u][:, None, :]).reshape(-1, nsp * nsp)  # (n, s·t)
        blk = (m_n[u].reshape(-1, nb * nb).T @ q).reshape(nb, nb, nsp, nsp)
        ata[:nk, :nk] = blk.transpose(0, 2, 1, 3).reshape(nk, nk)
        cross = np.einsum("na,ns,nt->ast", c_n[u], sw[u], bw[u]).reshape(nk, nbg)
        ata[:nk, nk:] = cross
        ata[nk:, :nk] = cross.T
        ata[nk:, nk:] = np.einsum("n,ns,nt->st", w_n[u], bw[u], bw[u])
        atb = np.concatenate(
            [np.einsum("na,ns->as", b_n[u], sw[u]).reshape(nk), np.einsum("n,ns->s", t_n[u], bw[u])]
        )
        try:
            coef = np.linalg.solve(ata, atb)
        except np.linalg.LinAlgError:
            coef = np.linalg.lstsq(ata, atb, rcond=None)[0]
        a_n = sw @ coef[:nk].reshape(nb, nsp).T  # (ns, nb) effective kernel coefficients
        g_n = bw @ coef[nk:]  # (ns,) background
        # Σ w (t − a·c − g)², expanded in the blocks
        quad = np.einsum("na,nab,nb->n", a_n, m_n, a_n)
        chi2 = (tt_n - 2 * (a_n * b_n).sum(axis=1) - 2 * g_n * t_n + quad
                + 2 * g_n * (a_n * c_n).sum(axis=1) + g_n * g_n * w_n) / npix  # fmt: skip
        med = np.median(chi2[use])
        mad = 1.4826 * np.median(np.abs(chi2[use] - med))
        new = chi2 < med + 4 * max(mad, 0.05 * med)
        if new.sum() < _MIN_STAMPS or np.array_equal(new, use):
            break
        use = new
    return coef, nb, nsp, nbg, chi2, use


def _kernel_images(coef, basis, nb, nsp):
    """Per spatial term kernel images ``K_s = sum_b a_{b,s} B_b``."""
    a = coef[: nb * nsp].reshape(nb, nsp)
    return [np.tensordot(a[:, s], basis, axes=1) for s in range(nsp)]


def decorrelation_kernel(kernel, var_sci, var_tpl, *, psf_pre=None, size=None, floor=1e-4):
    """Alard–Lupton decorrelation afterburner (Reiss & Lupton 2016).

    Parameters
    ----------
    kernel : numpy.ndarray
        Matching kernel ``K`` (template → science units, sum κ) at the CCD centre.
    var_sci, var_tpl : float
        Typical per-pixel variance of the science and template images.
    psf_pre : numpy.ndarray, optional
        Pre-convolution kernel applied to the science image (the science PSF for the
        "science sharper" direction), or None.
    size : int, optional
        Odd side of the returned real-space kernel; default covers both inputs.
    floor : float, optional
        Relative floor of the denominator (bounds the high-frequency gain).

    Returns
    -------
    numpy.ndarray
        ``ψ`` with ``ψ̂ = sqrt((σ_s² + κ²σ_t²) / (σ_s²|P̂_pre|² + σ_t²|K̂|²))``, centred,
        sum 1.  Convolving the difference ``P_pre⊗S − K⊗T`` with ``ψ`` makes its noise
        white with per-pixel variance ``σ_s² + κ²σ_t²``.
    """
    kernel = np.asarray(kernel, float)
    kappa = float(kernel.sum())
    pre = np.ones((1, 1)) if psf_pre is None else np.asarray(psf_pre, float)
    n = max(kernel.shape[0], pre.shape[0])
    size = int(size or (2 * n + 1)) | 1
    L = sfft.next_fast_len(4 * max(n, size))
    fk = np.abs(sfft.fft2(np.fft.ifftshift(_pad_to(kernel, L)), s=(L, L))) ** 2
    fp = np.abs(sfft.fft2(np.fft.ifftshift(_pad_to(pre, L)), s=(L, L))) ** 2
    num = var_sci + kappa**2 * var_tpl
    den = var_sci * fp + var_tpl * fk
    psi_f = np.sqrt(num / np.maximum(den, floor * num))
    psi = np.fft.fftshift(np.real(sfft.ifft2(psi_f)))
    return _recentre(psi, size)


def _truncated_psi(kernel, var_b, var_a, kh, tail=1e-5):
    """:func:`decorrelation_kernel` cut to the smallest box whose outside holds at most
    ``tail`` of ``Σ|ψ|`` (radius 1 to ``3 kh``), renormalised to sum 1.

    The difference image is convolved with exactly this ψ, tile by tile
    (:func:`apdask._fourier.convolve_tiles`), and its PSF is made with it too.
    """
    big = decorrelation_kernel(kernel, var_b, var_a, size=6 * kh + 1)
    c = big.shape[0] // 2
    yy, xx = np.indices(big.shape) - c
    ring = np.maximum(np.abs(yy), np.abs(xx))
    # Σ|ψ| outside radius r, for r = 0, 1, ...
    per_ring = np.bincount(ring.ravel(), weights=np.abs(big).ravel())
    outside = per_ring.sum() - np.cumsum(per_ring)
    r = int(np.argmax(outside <= tail * per_ring.sum()))
    r = int(np.clip(r, 1, 3 * kh))
    psi = big[c - r : c + r + 1, c - r : c + r + 1]
    return psi / psi.sum()


def _pad_to(k, L):
    """Centre an odd stamp in an ``L × L`` array (centre at ``L // 2``)."""
    out = np.zeros((L, L))
    h = k.shape[0] // 2
    c = L // 2
    out[c - h : c + h + 1, c - h : c + h + 1] = k
    return out


@one_blas_thread
def subtract(science, template, *, kernel_size=None, spatial_order=1, max_stamps=300,
             decorrelate=True, apcorr=True, bright=True):  # fmt: skip
    """PSF-matched, decorrelated difference image ``ψ ⊗ (S − K ⊗ T − bg)``.

    Parameters
    ----------
    science, template : apdask.image.Exposure
        Calibrated science exposure and the template warped onto its pixel grid,
        both in nJy.  Their PSFs are estimated with :func:`estimate_psf` if absent.
        A :class:`PsfGrid` in ``science.meta["psf_model"]`` (spatially varying PSF)
        is carried to the difference image, convolved like the image.
    kernel_size : int, optional
        Odd side of the matching kernel; default from the PSF widths (11..41).
    spatial_order : int, optional
        Polynomial order of the kernel's spatial variation (0 = constant,
        1 = linear).  The background difference uses ``min(spatial_order, 1)``.
    max_stamps : int, optional
        Number of brightest isolated stars used to fit the kernel.
    decorrelate : bool, optional
        Apply the Alard–Lupton decorrelation afterburner (:func:`decorrelation_kernel`).
    apcorr : bool, optional
        Measure the aperture correction of PSF fluxes
        (:func:`apdask.detect.aperture_correction`) on the image whose PSF the
        difference has; recorded as ``meta["ap_corr"]`` (and ``meta["ap_corr_science"]``
        for science-image PSF fluxes) and applied by ``measure_sources`` and
        ``forced_photometry``.
    bright : bool, optional
        List the template's bright sources for the S/N map of detection
        (:func:`apdask.detect.bright_sources`), as ``meta["bright_sources"]``.

    Aperture correction and the bright-source list are not part of the difference
    image itself; the benchmark times the subtraction without them (both False) as
    well as the whole call.

    Returns
    -------
    difference : apdask.image.Exposure
        nJy in the science calibration.  When the template is the sharper image
        (direction ``"convolve_template"``) ``D = ψ ⊗ (S − K ⊗ T − bg)``, variance
        ``var_S + κ² var_T``, PSF ``ψ ⊗ P_S`` (and ``psf_model`` convolved by ψ).  When
        the science image is sharper (``"convolve_science"``) the roles swap:
        ``D = ψ ⊗ (K ⊗ S + bg − T) / κ``, variance ``(var_T + κ² var_S) / κ²``, PSF
        ``ψ ⊗ P_T``.  Mask: inputs OR'ed, EDGE within the kernel half-size of the
        border or of NO_DATA.  WCS and metadata of the science exposure.
    info : dict
        ``kernel_sum`` (photometric scale science/template), ``kernel_size``,
        ``n_stamps``, ``stamp_chi2`` (list, reduced chi² per used stamp),
        ``fwhm_science``, ``fwhm_template``, ``fwhm_difference`` (pixels),
        ``direction``, ``preconvolved`` (always False, see docs), ``decorrelated``,
        ``background``
        (coefficients), ``noise_ratio`` (robust σ of ``D/sqrt(var)`` on clean pixels)
        and ``timing`` (seconds per step).

    Raises
    ------
    PsfFitError
        If the PSFs or the kernel cannot be determined (too few stars).
    """
    t0 = time.perf_counter()
    timing = {}
    psf_s = science.psf if science.psf is not None else estimate_psf(science)
    psf_t = template.psf if template.psf is not None else estimate_psf(template)
    psf_s, psf_t = np.asarray(psf_s, float), np.asarray(psf_t, float)
    fw_s, fw_t = float(_psf_fwhm(psf_s)), float(_psf_fwhm(psf_t))
    timing["psf"] = time.perf_counter() - t0
    # the sharper image is convolved: A = template, B = science normally; reversed
    # (science sharper) A = science, B = template and D = −(B − K⊗A)/κ
    rev = fw_t > fw_s
    preconv = False
    direction = "convolve_science" if rev else "convolve_template"
    sig_s, sig_t = fw_s / 2.3548, fw_t / 2.3548
    sig_m = max(np.sqrt(abs(sig_s**2 - sig_t**2)), 0.7)
    sigmas = [0.5 * sig_m, sig_m, 2.0 * sig_m]
    auto_size = kernel_size is None
    if kernel_size is None:
        kernel_size = 2 * int(np.ceil(3.0 * sigmas[-1])) + 1
        kernel_size = int(np.clip(kernel_size, 11, 41))
    kernel_size = int(kernel_size) | 1
    requested = {"kernel_size": kernel_size, "spatial_order": int(spatial_order),
                 "basis_degrees": [4, 3, 2]}  # fmt: skip

    shape = science.shape
    ny, nx = shape
    nodata_bit = MASK["NO_DATA"]
    sci0, nodata_s = fill_nodata(science.image, science.variance, science.mask, nodata_bit)
    tpl0, nodata_t = fill_nodata(template.image, template.variance, template.mask, nodata_bit)
    var_s = np.asarray(science.variance, np.float32)
    var_t = np.asarray(template.variance, np.float32)
    pre_half = 0
    img_a, img_b = (sci0, tpl0) if rev else (tpl0, sci0)
    var_a, var_b = (var_s, var_t) if rev else (var_t, var_s)
    psf_b = psf_t if rev else psf_s

    # --- stamps around bright isolated stars, clean in both images
    bad_bits = mask_bits("BAD", "SAT", "CR", "NO_DATA", "EDGE")
    t1 = time.perf_counter()
    mask, bad_any, nodata = combine_masks(
        science.mask, template.mask, nodata_s, nodata_t, bad_bits,
        mask_bits("DETECTED", "DETECTED_NEGATIVE"),
    )  # fmt: skip
    # kernel model with fallbacks (docs/real-data.md): a smaller kernel (smaller stamps,
    # border and isolation radius: more stars), then a lower spatial order and fewer
    # basis functions when the stars do not constrain the configured model
    rules = _model_rules()
    k_min = max(7, 2 * int(np.ceil(2.5 * sig_m)) + 1) if auto_size else kernel_size
    sizes = list(range(kernel_size, min(k_min, kernel_size) - 1, -4)) or [kernel_size]
    best = None
    for size in sizes:
        kh = size // 2
        fit_half = kh + int(np.ceil(1.5 * max(fw_s, fw_t)))
        border = fit_half + kh + pre_half + 1
        stars = _model_stars(science, 1.2 * fit_half, 0.01, border, bad_any)
        if stars is None or len(usable_stars(len(stars["x"]), max_stamps)) < max_stamps:
            # no model, or its candidates do not fill the stamp budget: search for every star
            stars = _find_stars(
                sci0, var_s, science.mask, fwhm=fw_s, nsigma=20.0, isolation=1.2 * fit_half,
                border=border, max_stars=None, avoid=bad_any, contrast=0.01,
            )  # fmt: skip
        idx = usable_stars(len(stars["x"]), max_stamps)
        if best is None or len(idx) > len(best[1]):
            best = (size, idx, stars, kh, fit_half)
        if len(idx) >= rules["stamps_per_term"] * len(_powers(int(spatial_order))):
            break
    kernel_size, idx, stars, kh, fit_half = best
    if len(idx) < rules["min_stamps"]:
        msg = (
            f"kernel fit failed: only {len(idx)} clean bright stars for stamps (need "
            f"{rules['min_stamps']}, kernel {kernel_size} px); too few stars: give a PSF-matched "
            "template or a larger image"
        )
        raise PsfFitError(msg)
    order = int(spatial_order)
    while order > 0 and len(idx) < rules["stamps_per_term"] * len(_powers(order)):
        order -= 1
    degrees = [4, 3, 2] if len(idx) >= rules["full_basis_stamps"] else [2, 1, 0]
    kmodel = {"kernel_size": kernel_size, "spatial_order": order, "basis_degrees": degrees}
    fallback = [k for k in kmodel if kmodel[k] != requested[k]]
    spatial_order = order
    basis = alard_lupton_basis(sigmas, degrees, kernel_size)
    factors = _al_factors(sigmas, degrees, kernel_size)
    xs = np.floor(stars["x"][idx] + 0.5).astype(int)
    ys = np.floor(stars["y"][idx] + 0.5).astype(int)
    timing["stamps"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    bg_order = min(int(spatial_order), 1)
    coef, nb, nsp, nbg, chi2, used = _fit_kernel(
        img_a, img_b, (var_s, var_t), bad_any, basis, xs, ys, shape, int(spatial_order),
        bg_order, fit_half, factors,
    )  # fmt: skip
    del bad_any
    kernels = _kernel_images(coef, basis, nb, nsp)
    bgc = coef[nb * nsp :]
    timing["fit"] = time.perf_counter() - t1
    k_center = kernels[0]  # the constant spatial term: u = v = 0 at the centre
    ksum = float(k_center.sum())
    if not (np.isfinite(ksum) and ksum > 0):
        msg = "kernel fit failed: photometric scale (kernel sum) is not positive"
        raise PsfFitError(msg)

    # --- typical variances (the decorrelation filter and the variance floor)
    v_s = _typical(var_s, nodata_s, 1.0)
    v_t = _typical(var_t, nodata_t, 0.0)
    v_a, v_b = (v_s, v_t) if rev else (v_t, v_s)

    # --- full frame, tile by tile: D = ψ⊗B − Σ_s w_s(x, y) (ψ⊗K_s)⊗A − bg, with
    # ψ truncated where its wings fall below 1e-5 (and the difference's PSF made with
    # the same ψ); w_s = u^i v^j the spatial polynomials
    t1 = time.perf_counter()
    psi = _truncated_psi(k_center, v_b, v_a, kh) if decorrelate else None
    u = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) / max((nx - 1) / 2, 1)
    v = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) / max((ny - 1) / 2, 1)
    terms = []
    for s, (i, j) in enumerate(_powers(int(spatial_order))):
        h = -(signal.convolve(psi, kernels[s]) if psi is not None else kernels[s])
        if s == 0:
            terms.append((None, None, [(1, psi if psi is not None else np.ones((1, 1))), (0, h)]))
        else:
            terms.append((v**j if j else None, u**i if i else None, [(0, h)]))
    diff = np.empty(shape, np.float32)
    convolve_tiles([img_a, img_b], [(diff, terms)], threads=_workers())
    del sci0, img_a, img_b  # (the template stays for its bright sources)
    timing["convolve"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    del nodata_s, nodata_t
    any_nodata = bool(nodata.any())
    scale = -1.0 / ksum if rev else 1.0
    psf_d = _conv_stamp(psf_b, psi, psf_b.shape[0]) if psi is not None else psf_b.copy()
    # ψ is compact (close to a δ function for a deeper template): its wings are not
    # added to the EDGE width, which is the kernel (plus pre-convolution) half size
    grow = kh + pre_half
    edge_bit = np.uint32(MASK["EDGE"])
    if grow > 0:
        for band in (np.s_[:grow], np.s_[-grow:], np.s_[:, :grow], np.s_[:, -grow:]):
            mask[band] |= edge_bit
    if any_nodata:  # (rare) masks of the NO_DATA pixels and the band around them
        mask[dilate(nodata, grow) & ~nodata] |= edge_bit
        mask[nodata] |= np.uint32(nodata_bit)
    # background: the kernel fit's term plus a residual refit on block medians, one pass
    plane = np.zeros(3)
    plane[: len(bgc)] = bgc
    bg_res = _residual_background(diff, mask, bad_bits, bg_order, plane)
    plane[: len(bg_res)] += bg_res
    finish_difference(diff, u, v, plane, scale, nodata if any_nodata else None)
    k2 = ksum**2
    var_scale = 1.0 / k2 if rev else 1.0
    fill = var_scale * (v_b + k2 * v_a)  # (the typical difference variance)
    var = difference_variance(var_b, var_a, k2, var_scale, 1e-6 * max(v_b, 1e-30), fill, nodata)
    noise = _noise_ratio(diff, var, mask)
    timing["assemble"] = time.perf_counter() - t1

    # --- residual rings of bright stars (PSF wings the kernel does not match)
    t1 = time.perf_counter()
    sources = None
    if bright:
        sources = bright_sources(tpl0, var, psf_t, psf_d, scale=1.0 / ksum if rev else ksum)
    timing["bright"] = time.perf_counter() - t1
    del tpl0

    # --- aperture corrections of the PSF fluxes (light outside the truncated PSF models)
    t1 = time.perf_counter()
    if apcorr:
        ap_s, n_ap, r_ap = aperture_correction(
            science, _psf_getter(science, psf_s), fwhm=fw_s, stars=stars
        )  # the kernel stamps' stars: no second search
        ap_d = ap_s
        if rev:  # the difference has the template's PSF
            ap_d, n_ap, r_ap = aperture_correction(
                template, _psf_getter(template, psf_t), fwhm=fw_t
            )
    else:
        ap_s = ap_d = 1.0
        n_ap, r_ap = 0, float("nan")
    timing["apcorr"] = time.perf_counter() - t1
    timing["total"] = time.perf_counter() - t0

    meta = dict(science.meta)
    meta["subtraction"] = direction
    meta["ap_corr"] = ap_d
    meta["ap_corr_science"] = ap_s
    if sources is not None:
        meta["bright_sources"] = sources
    else:
        meta.pop("bright_sources", None)
    model = science.meta.get("psf_model")
    if rev:
        meta.pop("psf_model", None)  # the difference has the (constant) template PSF
    elif model is not None:
        meta["psf_model"] = model.convolved(psi) if psi is not None else model
    difference = science.copy_with(image=diff, variance=var, mask=mask, psf=psf_d, meta=meta)
    info = {
        "kernel_sum": 1.0 / ksum if rev else ksum,
        "kernel_size": kernel_size,
        "n_stamps": int(used.sum()),
        "stamp_chi2": [float(c) for c in chi2[used]],
        "fwhm_science": fw_s,
        "fwhm_template": fw_t,
        "fwhm_difference": float(_psf_fwhm(psf_d)),
        "direction": direction,
        "preconvolved": bool(preconv),
        "decorrelated": bool(decorrelate),
        "background": [float(c) for c in bgc],
        "background_residual": [float(c) for c in bg_res],
        "noise_ratio": noise,
        "ap_corr": ap_d,
        "ap_corr_science": ap_s,
        "ap_corr_n_stars": n_ap,
        "ap_corr_radius": r_ap,
        "n_bright_sources": len(sources["flux"]) if sources is not None else 0,
        "model": kmodel,
        "fallback": fallback,
        "kernel_sum_range": _kernel_sum_range(kernels, int(spatial_order), rev),
        "stamp_x": [int(x) for x in xs[used]],
        "stamp_y": [int(y) for y in ys[used]],
        "kernel": k_center,
        "timing": timing,
    }
    return difference, info


def _kernel_sum_range(kernels, order, rev, n=5):
    """(min, max) of the kernel sum (photometric scale science/template) over an
    ``n × n`` grid spanning the CCD: the spatial variation of the photometric scale."""
    g = np.linspace(-1.0, 1.0, n)
    u, v = np.meshgrid(g, g)
    tot = sum(float(k.sum()) * u**i * v**j for k, (i, j) in zip(kernels, _powers(order),
                                                                 strict=True))  # fmt: skip
    tot = np.asarray(tot, float) * np.ones_like(u)
    if rev:
        tot = 1.0 / tot
    return [float(tot.min()), float(tot.max())]


def _model_stars(science, isolation, contrast, border, bad):
    """Kernel-stamp stars from the science PSF model's candidates, or None.

    The PSF model (:func:`estimate_psf_model`) keeps the bright stars its search
    found; those at least ``isolation`` from any peak brighter than ``contrast`` times
    their own, ``border`` from the edges and with no ``bad`` pixel within ``border``
    are the stars the kernel fit's own search would pick, without a second
    full-frame search.  None when there is no such model or it was searched with a
    smaller isolation radius.  (:func:`subtract` searches anyway when these do not
    fill its stamp budget: on a small or sparse CCD a kernel fitted on few stamps
    needs every star, and the PSF search, made with a fixed FWHM guess, can miss
    one or two.)
    """
    stars = getattr(science.meta.get("psf_model"), "stars", None)
    if stars is None or stars.get("isolation", 0.0) < isolation or "neighbour" not in stars:
        return None
    ny, nx = science.shape
    x, y = np.asarray(stars["x"]), np.asarray(stars["y"])
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    b = int(border)
    keep = (np.asarray(stars["neighbour"]) <= contrast) & (ix >= b) & (ix < nx - b)
    keep &= (iy >= b) & (iy < ny - b)
    for k in np.flatnonzero(keep):
        if bad[iy[k] - b : iy[k] + b + 1, ix[k] - b : ix[k] + b + 1].any():
            keep[k] = False
    return {k: v[keep] if isinstance(v, np.ndarray) else v for k, v in stars.items()}


def _typical(var, nodata, default, samples=64000):
    """Median of ``var`` on about ``samples`` pixels with data (every ``step``-th row and
    column)."""
    step = max(1, int(np.sqrt(var.size / samples)))
    good = ~nodata[::step, ::step]
    return float(np.median(var[::step, ::step][good])) if good.any() else default


def _residual_background(diff, mask, bad_bits, order, plane, box=64, step=8, min_fraction=0.25):
    """Residual background of the difference: a polynomial fitted to block medians.

    The background term of the kernel fit is constrained only by the stamps around a
    few bright stars.  With few stamps, or stamps in one part of the CCD (a template
    that covers it partly), its slope is poorly determined, and an offset of a few
    tenths of σ per pixel becomes several σ in the matched filter: false detections.
    The medians of ``box``-pixel blocks of all clean pixels pin it down.

    ``diff`` is taken minus the plane ``(c0, cu, cv)`` already fitted, and pixels with
    any of ``bad_bits`` in ``mask`` are left out; only every ``step``-th row and column
    of each block is read.  Returns the coefficients of ``_spatial_terms(order)``
    (zeros when no block has at least ``min_fraction`` clean pixels).
    """
    ny, nx = diff.shape
    nby, nbx = max(1, ny // box), max(1, nx // box)
    by, bx = ny // nby, nx // nbx
    rows = (np.arange(nby)[:, None] * by + np.arange(0, by, step)[None, :]).ravel()
    cols = (np.arange(nbx)[:, None] * bx + np.arange(0, bx, step)[None, :]).ravel()
    if by % step == 0 and bx % step == 0:  # the same pixels as a strided view
        sub = np.s_[: nby * by : step, : nbx * bx : step]
    else:
        sub = np.ix_(rows, cols)
    u = (cols - (nx - 1) / 2) / max((nx - 1) / 2, 1)
    v = (rows - (ny - 1) / 2) / max((ny - 1) / 2, 1)
    d = diff[sub] - (plane[0] + plane[1] * u[None, :] + plane[2] * v[:, None])
    d[(mask[sub] & bad_bits) != 0] = np.nan

    def blocks(a):
        a = a.reshape(nby, len(rows) // nby, nbx, len(cols) // nbx)
        return a.transpose(0, 2, 1, 3).reshape(nby * nbx, -1)

    vals = blocks(d)
    count = np.count_nonzero(np.isfinite(vals), axis=1)
    use = count >= min_fraction * vals.shape[1]
    out = np.zeros(len(_powers(order)))
    if not use.any():
        return out
    fit_order = order if use.sum() >= 3 * len(out) else 0  # too few blocks for a slope
    med = nanmedian_last(vals[use])
    yc, xc = np.mgrid[0:nby, 0:nbx]
    yc = ((yc.ravel() + 0.5) * by - 0.5)[use]
    xc = ((xc.ravel() + 0.5) * bx - 0.5)[use]
    a = np.column_stack(_spatial_terms(xc, yc, (ny, nx), fit_order))
    w = np.sqrt(count[use].astype(float))
    coef = np.linalg.lstsq(a * w[:, None], med * w, rcond=None)[0]
    out[: len(coef)] = coef  # the constant term comes first in every order
    return out


def _noise_ratio(diff, var, mask, samples=64000):
    """Robust σ of ``diff / sqrt(var)`` on clean pixels of every ``step``-th row and column,
    ``step`` chosen for about ``samples`` pixels (a relative error of 0.5 %)."""
    step = max(1, int(np.sqrt(diff.size / samples)))
    bad = mask_bits("BAD", "SAT", "CR", "NO_DATA", "EDGE")
    d, v, m = diff[::step, ::step], var[::step, ::step], mask[::step, ::step]
    ok = ((m & bad) == 0) & (v > 0)
    if not ok.any():
        return float("nan")
    p = d[ok] / np.sqrt(v[ok])
    return float(1.4826 * np.median(np.abs(p - np.median(p))))
