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

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from .detect import _fft_convolve, _find_stars, _psf_fwhm, _shifted_psf, _workers
from .exceptions import PsfFitError
from .image import MASK, mask_bits

__all__ = ["estimate_psf", "subtract", "alard_lupton_basis"]

_MIN_PSF_STARS = 5
_MIN_STAMPS = 5


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
    stamp_size = int(stamp_size) | 1
    half = stamp_size // 2
    fwhm0 = _guess_fwhm(exposure)
    stars = _find_stars(
        exposure.image, exposure.variance, exposure.mask, fwhm=fwhm0, nsigma=20.0,
        isolation=stamp_size, border=half + 2, max_stars=None, contrast=0.02,
    )  # fmt: skip
    n_found = len(stars["x"])
    # skip the very brightest few percent (possible non-linearity), keep max_stars
    order = np.arange(n_found)
    if n_found > 20:
        order = order[int(0.02 * n_found) :]
    order = order[:max_stars]
    if len(order) < _MIN_PSF_STARS:
        msg = (
            f"PSF estimation failed: only {len(order)} bright isolated unmasked stars "
            f"(need {_MIN_PSF_STARS}); the field is too sparse, too crowded or badly masked"
        )
        raise PsfFitError(msg)
    bkg = stars["bkg"]
    stamps = []
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
        s = st.sum()
        if s > 0:
            stamps.append(st / s)
    if len(stamps) < _MIN_PSF_STARS:
        msg = (
            f"PSF estimation failed: only {len(stamps)} usable star stamps (need {_MIN_PSF_STARS})"
        )
        raise PsfFitError(msg)
    psf = np.median(np.array(stamps), axis=0)
    # remove any residual pedestal (outer ring) and cut to a circle: no clipping of
    # negative noise, which would bias the wings (and PSF fluxes) high
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = np.hypot(xx, yy)
    psf = psf - np.median(psf[rr >= half - 1])
    psf[rr > half] = 0.0
    return psf / psf.sum()


def _guess_fwhm(exposure):
    if exposure.psf is not None:
        return float(_psf_fwhm(exposure.psf))
    return 4.5  # ~0.9" at 0.2"/px


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
    half = size // 2
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(float)
    out = []
    for s, deg in zip(sigmas, degrees, strict=True):
        g = np.exp(-0.5 * (x * x + y * y) / s**2)
        for i in range(deg + 1):
            for j in range(deg + 1 - i):
                k = g * (x / half) ** i * (y / half) ** j
                out.append(k)
    out = np.array(out)
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


def _stamp_convolutions(image, basis, xs, ys, fit_half):
    """Valid-mode convolution of stamps of ``image`` with every basis kernel.

    Returns ``(n_stamps, n_basis, 2*fit_half+1, 2*fit_half+1)``.
    """
    kh = basis.shape[1] // 2
    th = fit_half + kh
    tsize = 2 * th + 1
    L = sfft.next_fast_len(tsize + 2 * kh, real=True)
    fb = sfft.rfft2(basis, s=(L, L), axes=(1, 2))
    out = []
    for x, y in zip(xs, ys, strict=True):
        st = image[y - th : y + th + 1, x - th : x + th + 1]
        fs = sfft.rfft2(st, s=(L, L))
        conv = sfft.irfft2(fb * fs[None], s=(L, L), axes=(1, 2), workers=_workers())
        out.append(conv[:, 2 * kh : 2 * kh + 2 * fit_half + 1, 2 * kh : 2 * kh + 2 * fit_half + 1])
    return np.array(out)


def _fit_kernel(ref, tgt, var, mask_ok, basis, xs, ys, shape, spatial_order, bg_order, fit_half):
    """Least-squares fit of ``tgt ≈ K(x, y) ⊗ ref + bg(x, y)`` on stamps; sigma-clipped."""
    conv = _stamp_convolutions(ref, basis, xs, ys, fit_half)  # (ns, nb, S, S)
    ns, nb = conv.shape[:2]
    sw = np.array(_spatial_terms(xs, ys, shape, spatial_order)).T  # (ns, nsp)
    bw = np.array(_spatial_terms(xs, ys, shape, bg_order)).T  # (ns, nbg)
    nsp, nbg = sw.shape[1], bw.shape[1]
    npar = nb * nsp + nbg
    S = 2 * fit_half + 1
    tg, vr, ok = [], [], []
    for x, y in zip(xs, ys, strict=True):
        sl = (slice(y - fit_half, y + fit_half + 1), slice(x - fit_half, x + fit_half + 1))
        tg.append(tgt[sl])
        vr.append(var[sl])
        ok.append(mask_ok[sl])
    tg, vr, ok = np.array(tg, float), np.array(vr, float), np.array(ok)
    # weights from a locally smoothed variance: a variance plane estimated from the
    # noisy pixels themselves would bias the fit (low pixels get high weight)
    vr = ndimage.uniform_filter(vr, size=(1, 5, 5), mode="nearest")
    w = np.where(ok & (vr > 0), 1.0 / np.where(vr > 0, vr, 1.0), 0.0)
    c = conv.reshape(ns, nb, S * S)
    tgf = tg.reshape(ns, S * S)
    wf = w.reshape(ns, S * S)
    cw = c * wf[:, None, :]
    # per-stamp normal-equation blocks
    m_n = np.matmul(cw, c.transpose(0, 2, 1))  # (ns, nb, nb)
    c_n = cw.sum(axis=2)  # (ns, nb)
    w_n = wf.sum(axis=1)  # (ns,)
    b_n = np.einsum("nbk,nk->nb", cw, tgf)  # (ns, nb)
    t_n = (wf * tgf).sum(axis=1)  # (ns,)
    use = np.ones(ns, bool)
    chi2 = np.full(ns, np.nan)
    coef = None
    nk = nb * nsp
    for _ in range(3):
        u = use
        ata = np.zeros((npar, npar))
        ata[:nk, :nk] = np.einsum("nab,ns,nt->asbt", m_n[u], sw[u], sw[u]).reshape(nk, nk)
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
        model = np.einsum("nb,nbk->nk", a_n, c) + (bw @ coef[nk:])[:, None]
        npix = np.maximum((wf > 0).sum(axis=1), 1)
        chi2 = ((tgf - model) ** 2 * wf).sum(axis=1) / npix
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


def _dilate(bad, half):
    """Grow a boolean mask by ``half`` pixels (square), using cumulative sums."""
    if half <= 0 or not bad.any():
        return bad
    ny, nx = bad.shape
    c = np.pad(bad.astype(np.int32), ((half + 1, half), (half + 1, half))).cumsum(0).cumsum(1)
    k = 2 * half + 1
    tot = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return tot[:ny, :nx] > 0


def subtract(science, template, *, kernel_size=None, spatial_order=1, max_stamps=300):
    """PSF-matched difference image ``science - K ⊗ template - background``.

    Parameters
    ----------
    science, template : apdask.image.Exposure
        Calibrated science exposure and the template warped onto its pixel grid,
        both in nJy.  Their PSFs are estimated with :func:`estimate_psf` if absent.
    kernel_size : int, optional
        Odd side of the matching kernel; default from the PSF widths (11..41).
    spatial_order : int, optional
        Polynomial order of the kernel's spatial variation (0 = constant,
        1 = linear).  The background difference uses ``min(spatial_order, 1)``.
    max_stamps : int, optional
        Number of brightest isolated stars used to fit the kernel.

    Returns
    -------
    difference : apdask.image.Exposure
        nJy in the science calibration; variance, mask (inputs OR'ed, EDGE within
        the kernel half-size of the border or of template NO_DATA), the science WCS,
        PSF = science PSF (or the template PSF in the reversed direction) and the
        science metadata.
    info : dict
        ``kernel_sum`` (photometric scale science/template at the CCD centre),
        ``kernel_size``, ``n_stamps``, ``stamp_chi2`` (list, reduced chi² per used
        stamp), ``fwhm_science``, ``fwhm_template`` (pixels), ``direction``
        (``"convolve_template"`` or ``"convolve_science"``), ``background`` (coefficients)
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
    fw_s, fw_t = float(_psf_fwhm(psf_s)), float(_psf_fwhm(psf_t))
    timing["psf"] = time.perf_counter() - t0
    convolve_template = fw_t <= fw_s
    direction = "convolve_template" if convolve_template else "convolve_science"
    sig_s, sig_t = fw_s / 2.3548, fw_t / 2.3548
    sig_m = np.sqrt(abs(sig_s**2 - sig_t**2))
    sig_m = max(sig_m, 0.7)
    sigmas = [0.5 * sig_m, sig_m, 2.0 * sig_m]
    if kernel_size is None:
        kernel_size = 2 * int(np.ceil(3.0 * sigmas[-1])) + 1
        kernel_size = int(np.clip(kernel_size, 11, 41))
    kernel_size = int(kernel_size) | 1
    kh = kernel_size // 2
    basis = alard_lupton_basis(sigmas, [4, 3, 2], kernel_size)

    shape = science.shape
    sci_img = np.asarray(science.image, np.float32)
    tpl_img = np.asarray(template.image, np.float32)
    nodata_t = ((template.mask & MASK["NO_DATA"]) != 0) | ~np.isfinite(tpl_img)
    nodata_s = ((science.mask & MASK["NO_DATA"]) != 0) | ~np.isfinite(sci_img)
    sci0 = np.where(nodata_s, 0.0, sci_img).astype(np.float32)
    tpl0 = np.where(nodata_t, 0.0, tpl_img).astype(np.float32)
    if convolve_template:
        ref, tgt = tpl0, sci0
        var_tgt = np.asarray(science.variance, float)
    else:
        ref, tgt = sci0, tpl0
        var_tgt = np.asarray(template.variance, float)

    # --- stamps around bright isolated stars, clean in both images
    fit_half = kh + int(np.ceil(1.5 * max(fw_s, fw_t)))
    border = fit_half + kh + 1
    bad_any = (science.mask | template.mask) & mask_bits("BAD", "SAT", "CR", "NO_DATA", "EDGE")
    bad_any = (bad_any != 0) | nodata_t | nodata_s
    stars = _find_stars(
        sci_img, science.variance, science.mask, fwhm=fw_s, nsigma=20.0, isolation=1.2 * fit_half,
        border=border, max_stars=None, avoid=bad_any, contrast=0.01,
    )  # fmt: skip
    n_all = len(stars["x"])
    idx = np.arange(n_all)
    if n_all > 20:
        idx = idx[int(0.02 * n_all) :]  # skip the brightest (non-linear / saturated wings)
    idx = idx[:max_stamps]
    if len(idx) < _MIN_STAMPS:
        msg = (
            f"kernel fit failed: only {len(idx)} clean bright stars for stamps (need {_MIN_STAMPS})"
        )
        raise PsfFitError(msg)
    xs = np.floor(stars["x"][idx] + 0.5).astype(int)
    ys = np.floor(stars["y"][idx] + 0.5).astype(int)
    var_fit = var_tgt + np.asarray(template.variance if convolve_template else science.variance)
    ok = ~bad_any & np.isfinite(var_fit)
    timing["stamps"] = time.perf_counter() - t0 - timing["psf"]

    t1 = time.perf_counter()
    bg_order = min(int(spatial_order), 1)
    coef, nb, nsp, nbg, chi2, used = _fit_kernel(
        ref, tgt, var_fit, ok, basis, xs, ys, shape, int(spatial_order), bg_order, fit_half
    )
    kernels = _kernel_images(coef, basis, nb, nsp)
    bgc = coef[nb * nsp :]
    timing["fit"] = time.perf_counter() - t1

    # --- full-frame convolution: one forward FFT, one inverse per spatial term
    t1 = time.perf_counter()
    ny, nx = shape
    u = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2) / max((nx - 1) / 2, 1))[None, :]
    v = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2) / max((ny - 1) / 2, 1))[:, None]
    k_center = kernels[0]  # the constant spatial term: u = v = 0 at the centre
    ksum = float(k_center.sum())
    if not (np.isfinite(ksum) and ksum > 0):
        msg = "kernel fit failed: photometric scale (kernel sum) is not positive"
        raise PsfFitError(msg)
    var_ref = np.asarray(template.variance if convolve_template else science.variance, np.float32)
    var_ref = np.where(np.isfinite(var_ref), var_ref, 0.0).astype(np.float32)
    var_ref = np.where(nodata_t if convolve_template else nodata_s, 0.0, var_ref)
    convs = _fft_convolve(ref, list(kernels))
    var_conv = _fft_convolve(var_ref, k_center * k_center)
    model = np.zeros(shape, np.float32)
    for c, (i, j) in zip(convs, _powers(int(spatial_order)), strict=True):
        model += c if i == j == 0 else c * (u**i * v**j)
    bg = np.zeros(shape, np.float32)
    for c, (i, j) in zip(bgc, _powers(bg_order), strict=True):
        bg += np.float32(c) * (u**i * v**j)
    timing["convolve"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    if convolve_template:
        diff = sci0 - model - bg
        var = np.asarray(science.variance, np.float32) + np.maximum(var_conv, 0.0)
        psf_d = np.asarray(psf_s, float)
    else:
        # model ≈ K ⊗ science ≈ template (in template units); bring back to science units
        diff = (model + bg - tpl0) / ksum
        var = (np.maximum(var_conv, 0.0) + np.asarray(template.variance, np.float32)) / ksum**2
        psf_d = np.asarray(psf_t, float)
    mask = (science.mask | template.mask) & ~np.uint32(mask_bits("DETECTED", "DETECTED_NEGATIVE"))
    mask = mask.astype(np.uint32)
    nodata = nodata_t | nodata_s
    edge = _dilate(nodata, kh) & ~nodata
    border_m = np.zeros(shape, bool)
    border_m[:kh], border_m[-kh:], border_m[:, :kh], border_m[:, -kh:] = True, True, True, True
    mask |= np.where(edge | border_m, np.uint32(MASK["EDGE"]), np.uint32(0))
    mask |= np.where(nodata, np.uint32(MASK["NO_DATA"]), np.uint32(0))
    diff = np.where(nodata, 0.0, diff).astype(np.float32)
    var = np.where(nodata | ~np.isfinite(var), np.nanmedian(var[::8, ::8]), var).astype(np.float32)
    timing["assemble"] = time.perf_counter() - t1
    timing["total"] = time.perf_counter() - t0

    meta = dict(science.meta)
    meta["subtraction"] = direction
    difference = science.copy_with(image=diff, variance=var, mask=mask, psf=psf_d, meta=meta)
    info = {
        "kernel_sum": ksum if convolve_template else 1.0 / ksum,
        "kernel_size": kernel_size,
        "n_stamps": int(used.sum()),
        "stamp_chi2": [float(c) for c in chi2[used]],
        "fwhm_science": fw_s,
        "fwhm_template": fw_t,
        "direction": direction,
        "background": [float(c) for c in bgc],
        "timing": timing,
    }
    return difference, info
