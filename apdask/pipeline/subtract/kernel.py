"""The PSF-matching kernel.

The Alard-Lupton basis, the stamp convolutions and the spatially varying least-squares fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from apdask._kernels.fused import weighted_stamp_rows
from apdask.core.stats import robust_sigma
from apdask.pipeline.background import tile_threads
from apdask.pipeline.stars import stamps_at

__all__ = ["alard_lupton_basis", "choose_kernel_size"]

_MIN_STAMPS = 5


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


def alard_lupton_basis(sigmas: Sequence[float], degrees: Sequence[int], size: int) -> np.ndarray:
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


def _stamps(image, xs, ys, side):
    """float32 ``(n, side, side)`` stamps of ``image`` centred on ``(xs, ys)``."""
    off = np.arange(side) - side // 2
    at = (
        np.asarray(ys)[:, None, None] + off[None, :, None],
        np.asarray(xs)[:, None, None] + off[None, None, :],
    )
    return np.asarray(image[at], np.float32)


def _group_convolutions(stamps, plan):
    """Per group of raw kernels sharing an x profile (:func:`_convolution_plan`), the
    index of its first kernel (a group's kernels are consecutive, :func:`_al_factors`)
    and the stamps' valid convolutions with its kernels: float32
    ``(n_kernels, S, n_stamps, S)``, the rows of all stamps side by side."""
    groups, _, _, S, T = plan
    ns = len(stamps)
    flat = stamps.reshape(ns * T, T)
    for tx, idx, ty in groups:
        # stamps convolved along x with prof[k][i], then along y with every prof[k][j]
        h = (flat @ tx).reshape(ns, T, S)
        rows = np.ascontiguousarray(h.transpose(1, 0, 2)).reshape(T, ns * S)
        yield idx[0], (ty @ rows).reshape(len(idx), S, ns, S)


def _stamp_convolutions(image, basis, xs, ys, fit_half, factors, plan=None):
    """Valid-mode convolution of stamps of ``image`` with the basis's separable factors.

    The Alard–Lupton kernels are linear combinations of separable raw kernels
    (``factors``, :func:`_al_factors`): ``basis = M @ raw``.  Each stamp is convolved
    with the raw kernels as two matrix products with banded (Toeplitz) matrices, all
    stamps at once, in single precision (relative error ~1e-7).  The convolutions
    with the basis are ``M @ raw`` per stamp; the fit forms its normal equations on
    the raw ones and transforms those (:func:`_fit_kernel`, which takes them group by
    group from :func:`_group_convolutions`).  ``plan`` is :func:`_convolution_plan` of
    the same arguments, if already made.

    Returns
    -------
    raw : numpy.ndarray
        float32 ``(n_stamps, n_raw, (2*fit_half+1)**2)``.
    M : numpy.ndarray
        ``(n_basis, n_raw)``.
    """
    plan = plan or _convolution_plan(basis, factors, fit_half)
    _, m, nraw, S, T = plan
    ns = len(xs)
    raw = np.empty((ns, nraw, S, S), np.float32)
    for first, res in _group_convolutions(_stamps(image, xs, ys, T), plan):
        raw[:, first : first + len(res)] = res.transpose(2, 0, 1, 3)
    return raw.reshape(ns, nraw, S * S), m


def _stamp_blocks(ref, basis, xs, ys, fit_half, factors, wf, tgf, threads, chunk=48):
    """Per-stamp normal-equation blocks ``Σ w c cᵀ``, ``Σ w c`` and ``Σ w c t`` on the raw
    separable kernels' convolutions ``c`` (:func:`_stamp_convolutions`), and ``M``.

    The convolutions (single precision) are promoted to double, times ``sqrt(w)``, as
    they are put in place (:func:`apdask._kernels.fused.weighted_stamp_rows`), before
    the products: in single precision the kernel sum moves by 2e-4.  The stamps go in
    chunks of at most ``chunk`` (whose temporaries stay in cache), as many per thread,
    to ``threads`` threads, each running single-threaded BLAS (see
    :func:`apdask._kernels.fused.one_blas_thread`).
    """

    plan = _convolution_plan(basis, factors, fit_half)
    _, m_raw, nraw, S, T = plan

    def blocks(lo, hi):
        sw = np.sqrt(wf[lo:hi])
        cs = np.empty((hi - lo, nraw, S * S))
        for first, res in _group_convolutions(_stamps(ref, xs[lo:hi], ys[lo:hi], T), plan):
            weighted_stamp_rows(res, first, sw, cs)
        m = np.matmul(cs, cs.transpose(0, 2, 1))
        c = np.matmul(cs, sw[:, :, None])[:, :, 0]
        b = np.matmul(cs, (tgf[lo:hi] * sw)[:, :, None])[:, :, 0]
        return m, c, b

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
    return m, c, b, m_raw


def _fit_kernel(
    ref, tgt, variances, bad, basis, xs, ys, shape, spatial_order, bg_order, fit_half, factors
):
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
    # the stamps lie inside the image (stars at least a kernel and a stamp from its
    # edges): copied from a strided view; a pixel off it would be NaN and bad
    tg = stamps_at(tgt, xs, ys, fit_half).astype(float)
    vr = stamps_at(variances[0], xs, ys, fit_half).astype(float)
    vr += stamps_at(variances[1], xs, ys, fit_half)
    ok = ~stamps_at(bad, xs, ys, fit_half, True)
    ok &= np.isfinite(vr)
    # weights from a locally smoothed variance: a variance plane estimated from the
    # noisy pixels themselves would bias the fit (low pixels get high weight)
    vr = ndimage.uniform_filter(vr, size=(1, 5, 5), mode="nearest")
    w = np.where(ok & (vr > 0), 1.0 / np.where(vr > 0, vr, 1.0), 0.0)
    tgf = tg.reshape(ns, S * S)
    wf = w.reshape(ns, S * S)
    # per-stamp normal-equation blocks (with them, each stamp's χ² needs no model
    # image), on the raw separable kernels in double precision, then ``M · M_raw · Mᵀ``
    m_n, c_n, b_n, m_raw = _stamp_blocks(
        ref, basis, xs, ys, fit_half, factors, wf, tgf, tile_threads()
    )
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
        chi2 = (
            tt_n
            - 2 * (a_n * b_n).sum(axis=1)
            - 2 * g_n * t_n
            + quad
            + 2 * g_n * (a_n * c_n).sum(axis=1)
            + g_n * g_n * w_n
        ) / npix
        med = np.median(chi2[use])
        mad = robust_sigma(chi2[use], med)
        new = chi2 < med + 4 * max(mad, 0.05 * med)
        if new.sum() < _MIN_STAMPS or np.array_equal(new, use):
            break
        use = new
    return coef, nb, nsp, nbg, chi2, use


def _kernel_images(coef, basis, nb, nsp):
    """Per spatial term kernel images ``K_s = sum_b a_{b,s} B_b``."""
    a = coef[: nb * nsp].reshape(nb, nsp)
    return [np.tensordot(a[:, s], basis, axes=1) for s in range(nsp)]


def choose_kernel_size(
    fw_s: float, fw_t: float, kernel_size: int | None = None
) -> tuple[int, list[float]]:
    """Side of the matching kernel and the widths of its Alard–Lupton Gaussians.

    Parameters
    ----------
    fw_s, fw_t : float
        FWHM of the science and template PSFs (pixels).
    kernel_size : int, optional
        Requested side (made odd); by default 3σ of the widest Gaussian, 11..41.

    Returns
    -------
    kernel_size : int
        Odd kernel side.
    sigmas : list of float
        ``σ_m / 2, σ_m, 2 σ_m`` with ``σ_m = max(sqrt|σ_s² − σ_t²|, 0.7)``.
    """
    sig_s, sig_t = fw_s / 2.3548, fw_t / 2.3548
    sig_m = max(np.sqrt(abs(sig_s**2 - sig_t**2)), 0.7)
    sigmas = [0.5 * sig_m, sig_m, 2.0 * sig_m]
    if kernel_size is None:
        kernel_size = 2 * int(np.ceil(3.0 * sigmas[-1])) + 1
        kernel_size = int(np.clip(kernel_size, 11, 41))
    return int(kernel_size) | 1, sigmas


def _fit_matching_kernel(
    img_a: np.ndarray,
    img_b: np.ndarray,
    variances: tuple[np.ndarray, np.ndarray],
    bad_any: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    sigmas: list[float],
    kernel_size: int,
    spatial_order: int,
    fit_half: int,
    degrees: Sequence[int] = (4, 3, 2),
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Fit ``B ≈ K(x, y) ⊗ A + bg`` on the stamps in the Alard–Lupton basis.

    Returns the kernel image of each spatial term (the constant term first), the
    background coefficients, each stamp's reduced χ² and the stamps used.
    """
    basis = alard_lupton_basis(sigmas, list(degrees), kernel_size)
    factors = _al_factors(sigmas, list(degrees), kernel_size)
    shape, bg_order = img_a.shape, min(spatial_order, 1)
    coef, nb, nsp, _, chi2, used = _fit_kernel(
        img_a,
        img_b,
        variances,
        bad_any,
        basis,
        xs,
        ys,
        shape,
        spatial_order,
        bg_order,
        fit_half,
        factors,
    )
    return _kernel_images(coef, basis, nb, nsp), coef[nb * nsp :], chi2, used
