"""The difference image: fit the matching kernel, convolve, subtract and decorrelate."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from scipy import signal

from apdask._kernels.fourier import convolve_tiles
from apdask._kernels.fused import (
    combine_inputs,
    difference_variance,
    dilate,
    fill_nodata,
    finish_difference,
    in_thread,
    one_blas_thread,
)
from apdask.core.exposure import MASK, Exposure, mask_bits
from apdask.core.records import SubtractionInfo
from apdask.core.stats import nanmedian_last
from apdask.exceptions import PsfFitError
from apdask.pipeline.background import tile_threads
from apdask.pipeline.measure.bright import bright_sources
from apdask.pipeline.measure.photometry import aperture_correction
from apdask.pipeline.psf import conv_stamp, estimate_psf, psf_fwhm, psf_getter
from apdask.pipeline.subtract.decorrelate import _truncated_psi
from apdask.pipeline.subtract.kernel import (
    _fit_matching_kernel,
    _powers,
    _spatial_terms,
    choose_kernel_size,
)
from apdask.pipeline.subtract.qa import _noise_ratio, _qa_figures, kernel_sum_range
from apdask.pipeline.subtract.stamps import KernelModel, choose_model

__all__ = ["subtract"]

_BAD_BITS = mask_bits("BAD", "SAT", "CR", "NO_DATA", "EDGE")
_DETECTED_BITS = mask_bits("DETECTED", "DETECTED_NEGATIVE")
_NODATA = MASK["NO_DATA"]


@one_blas_thread
def subtract(
    science: Exposure,
    template: Exposure,
    *,
    kernel_size: int | None = None,
    spatial_order: int = 1,
    max_stamps: int = 300,
    decorrelate: bool = True,
    apcorr: bool = True,
    bright: bool = True,
    min_stamps: int = 5,
    stamps_per_spatial_term: int = 4,
    full_basis_stamps: int = 10,
    max_sum_variation: float = 0.2,
    science_sharper_by: float = 0.05,
) -> tuple[Exposure, SubtractionInfo]:
    """PSF-matched, decorrelated difference image ``ψ ⊗ (S − K ⊗ T − bg)``.

    Parameters
    ----------
    science, template : apdask.core.exposure.Exposure
        Calibrated science exposure and the template warped onto its pixel grid,
        both in nJy.  Their PSFs are estimated with :func:`estimate_psf` if absent.
        A :class:`PsfGrid` in ``science.psf_model`` (spatially varying PSF)
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
        (:func:`apdask.pipeline.measure.photometry.aperture_correction`) on the image whose PSF the
        difference has; recorded as the difference's ``ap_corr`` (and ``ap_corr_science``
        for science-image PSF fluxes) and applied by ``measure_sources`` and
        ``forced_photometry``.
    bright : bool, optional
        List the template's bright sources for the S/N map of detection
        (:func:`apdask.pipeline.measure.bright.bright_sources`), as the difference's
        ``bright_sources``.
    min_stamps, stamps_per_spatial_term, full_basis_stamps : int, optional
        The star counts the kernel model needs (``apdask.subtract.kernel.*``): fewer
        than ``min_stamps`` is a :class:`PsfFitError`; spatial order ``p`` needs
        ``stamps_per_spatial_term × (p+1)(p+2)/2`` stamps, else a lower order; fewer
        than ``full_basis_stamps`` uses basis degrees ``(2, 1, 0)`` for ``(4, 3, 2)``.
        With an automatic ``kernel_size``, a smaller kernel is tried first.
    max_sum_variation : float, optional
        A fitted kernel whose sum varies over the CCD by more than this fraction
        ((max − min) / mean on a 5 × 5 grid) is refitted with a lower spatial order:
        with few stamps the spatial terms extrapolate wildly into the corners
        (reported as a ``spatial_order`` fallback).
    science_sharper_by : float, optional
        The science image is convolved instead of the template only when the template's
        PSF FWHM exceeds the science one's by more than this fraction.  Two estimates of
        one PSF differ by a few per cent, and convolving the science image then left
        nearly twice the star residuals of convolving the template (GOTO pair: 92
        against 55 detections on template sources); a kernel that sharpens by a few per
        cent is well within the basis.

    Aperture correction and the bright-source list are not part of the difference
    image itself; the benchmark times the subtraction without them (both False) as
    well as the whole call.

    Returns
    -------
    difference : apdask.core.exposure.Exposure
        nJy in the science calibration.  When the template is the sharper image
        (direction ``"convolve_template"``) ``D = ψ ⊗ (S − K ⊗ T − bg)``, variance
        ``var_S + κ² var_T``, PSF ``ψ ⊗ P_S`` (and ``psf_model`` convolved by ψ).  When
        the science image is sharper (``"convolve_science"``) the roles swap:
        ``D = ψ ⊗ (K ⊗ S + bg − T) / κ``, variance ``(var_T + κ² var_S) / κ²``, PSF
        ``ψ ⊗ P_T``.  Mask: inputs OR'ed, EDGE within the kernel half-size of the
        border or of NO_DATA.  WCS and metadata of the science exposure.
    info : apdask.core.records.SubtractionInfo
        The figures: ``kernel_sum`` (photometric scale science/template),
        ``kernel_size``, ``n_stamps``, ``stamp_chi2`` (reduced χ² per used stamp),
        FWHMs (pixels), ``direction``, ``decorrelated``, ``background``
        (coefficients), ``noise_ratio`` (robust σ of ``D/sqrt(var)`` on clean pixels),
        aperture corrections, the kernel model and its fallbacks, the kernel and
        ``timing`` (seconds per step).

    Raises
    ------
    PsfFitError
        If the PSFs or the kernel cannot be determined (too few stars).
    """
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    psf_s, psf_t, fw_s, fw_t = _psfs(science, template)
    timing["psf"] = time.perf_counter() - t0
    # the sharper image is convolved: A = template, B = science normally; reversed
    # (science sharper) A = science, B = template and D = −(B − K⊗A)/κ
    rev = fw_t > fw_s * (1.0 + science_sharper_by)
    direction = "convolve_science" if rev else "convolve_template"
    auto_size = kernel_size is None
    kernel_size, sigmas = choose_kernel_size(fw_s, fw_t, kernel_size)
    mask, bad_any, n_s, n_t = combine_inputs(
        (science.image, science.variance, science.mask),
        (template.image, template.variance, template.mask),
        _NODATA, _BAD_BITS, _DETECTED_BITS,
    )  # fmt: skip
    sci0, nodata_s = _filled(science, n_s)
    tpl0, nodata_t = _filled(template, n_t)
    nodata = _either(nodata_s, nodata_t)
    var_s, var_t = (np.asarray(e.variance, np.float32) for e in (science, template))

    # --- stamps around bright isolated stars, clean in both images
    t1 = time.perf_counter()
    model = choose_model(
        science, sci0, var_s, bad_any, (fw_s, fw_t), sigmas[1],
        (kernel_size, auto_size, int(spatial_order)), max_stamps,
        (min_stamps, stamps_per_spatial_term, full_basis_stamps),
    )  # fmt: skip
    kernel_size = model.kernel_size
    kh, stars = kernel_size // 2, model.stars
    timing["stamps"] = time.perf_counter() - t1
    # the aperture corrections of the PSF fluxes (light outside the truncated PSF
    # models) need only the inputs and the stamps' stars: serial NumPy on small stamps,
    # in a thread of its own (one core) beside the fit, the convolution and the rest,
    # filling their serial gaps instead of adding ~70 ms of one core at the end
    aperture = in_thread(
        _aperture_corrections, science, template, psf_s, psf_t, fw_s, fw_t, stars, rev, apcorr
    )

    t1 = time.perf_counter()
    img_a, img_b = (sci0, tpl0) if rev else (tpl0, sci0)
    model, (kernels, bgc, chi2, used) = _fit_with_fallback(
        (img_a, img_b), (var_s, var_t), bad_any, model, sigmas, rev, max_sum_variation
    )
    order = model.spatial_order
    del bad_any
    timing["fit"] = time.perf_counter() - t1
    ksum = _kernel_sum(kernels[0])  # the constant spatial term: u = v = 0 at the centre

    # --- typical variances (the decorrelation filter and the variance floor)
    v_s, v_t = _typical(var_s, nodata_s, 1.0), _typical(var_t, nodata_t, 0.0)
    v_a, v_b = (v_s, v_t) if rev else (v_t, v_s)

    # --- the difference's variance and PSF, then its bright sources (they need only
    # those and the template): in a thread of their own (one core, mostly serial NumPy)
    # beside the convolution rather than after it
    t1 = time.perf_counter()
    var = _difference_variance((var_s, var_t), v_a, v_b, ksum, rev, nodata)
    psi = _truncated_psi(kernels[0], v_b, v_a, kh) if decorrelate else None
    psf_b = psf_t if rev else psf_s
    psf_d = conv_stamp(psf_b, psi, psf_b.shape[0]) if psi is not None else psf_b.copy()
    scale = 1.0 / ksum if rev else ksum
    residual_rings = in_thread(_bright_sources, tpl0, var, psf_t, psf_d, scale, bright)
    psf_model = in_thread(_difference_psf_model, science, rev, psi)
    diff, u, v = _convolve_difference(img_a, img_b, kernels, psi, order)
    del sci0, img_a, img_b, tpl0  # (the thread holds the template)
    timing["convolve"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    del nodata_s, nodata_t
    _mark_edges(mask, nodata, kh)
    bg_res = _finish(diff, mask, nodata, u, v, bgc, min(order, 1), ksum, rev)
    noise = _noise_ratio(diff, var, mask)
    timing["assemble"] = time.perf_counter() - t1

    # --- residual rings of bright stars (PSF wings the kernel does not match)
    t1 = time.perf_counter()
    sources = residual_rings()
    timing["bright"] = time.perf_counter() - t1  # (the wait for them)

    # --- the aperture corrections (started after the stamps)
    t1 = time.perf_counter()
    ap = aperture()
    timing["apcorr"] = time.perf_counter() - t1  # (the wait for them)
    timing["total"] = time.perf_counter() - t0

    fields = _difference_fields(science, direction, ap[0], ap[1], sources, psf_model())
    difference = science.copy_with(image=diff, variance=var, mask=mask, psf=psf_d, **fields)
    fit = (scale, kernel_size, chi2, used, bgc, bg_res)
    qa = _qa_figures(fit, (fw_s, fw_t, psf_d), direction, decorrelate, noise, ap, sources)
    return difference, _info(qa, model, kernels, used, rev, timing)


def _fit_with_fallback(
    images: tuple[np.ndarray, np.ndarray],
    variances: tuple[np.ndarray, np.ndarray],
    bad_any: np.ndarray,
    model: KernelModel,
    sigmas: list[float],
    rev: bool,
    max_sum_variation: float,
) -> tuple[KernelModel, tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]]:
    """Fit the matching kernel; while its sum varies over the CCD by more than
    ``max_sum_variation`` (spatial terms extrapolating far from few stamps), refit one
    spatial order lower.  The model used (with the fallback noted) and the fit."""
    order = model.spatial_order
    while True:
        fit = _fit_matching_kernel(
            *images, variances, bad_any, model.xs, model.ys, sigmas, model.kernel_size, order,
            model.fit_half, model.basis_degrees,
        )  # fmt: skip
        if order == 0 or _sum_variation(fit[0], order, rev) <= max_sum_variation:
            return model, fit
        order -= 1
        model = dataclasses.replace(
            model, spatial_order=order,
            fallback=tuple(dict.fromkeys((*model.fallback, "spatial_order"))),
        )  # fmt: skip


def _info(
    qa: dict[str, Any],
    model: KernelModel,
    kernels: list[np.ndarray],
    used: np.ndarray,
    rev: bool,
    timing: dict[str, float],
) -> SubtractionInfo:
    """The subtraction's figures: QA values, the model used, stamps, kernel, timings."""
    return SubtractionInfo(
        **qa,
        model=model.as_dict(),
        fallback=list(model.fallback),
        kernel_sum_range=kernel_sum_range(kernels, model.spatial_order, rev),
        stamp_x=[int(x) for x in model.xs[used]],
        stamp_y=[int(y) for y in model.ys[used]],
        kernel=kernels[0],
        timing=timing,
    )


def _finish(
    diff: np.ndarray,
    mask: np.ndarray,
    nodata: np.ndarray | None,
    u: np.ndarray,
    v: np.ndarray,
    bgc: np.ndarray,
    bg_order: int,
    ksum: float,
    rev: bool,
) -> np.ndarray:
    """Subtract the background and scale the difference (in place); the residual
    background's coefficients.

    The background is the kernel fit's term plus a residual refit on block medians,
    applied in one pass with the scale (``−1/κ`` when the science image was convolved)
    and NaN on NO_DATA (``nodata``; None: no pixel).
    """
    plane = np.zeros(3)
    plane[: len(bgc)] = bgc
    bg_res = _residual_background(diff, mask, _BAD_BITS, bg_order, plane)
    plane[: len(bg_res)] += bg_res
    scale = -1.0 / ksum if rev else 1.0
    finish_difference(diff, u, v, plane, scale, nodata)
    return bg_res


def _psfs(science: Exposure, template: Exposure) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The two PSF images (estimated if absent) as float64 and their FWHMs (pixels)."""
    psf_s = science.psf if science.psf is not None else estimate_psf(science)
    psf_t = template.psf if template.psf is not None else estimate_psf(template)
    psf_s, psf_t = np.asarray(psf_s, float), np.asarray(psf_t, float)
    return psf_s, psf_t, float(psf_fwhm(psf_s)), float(psf_fwhm(psf_t))


def _kernel_sum(k_center: np.ndarray) -> float:
    """The photometric scale κ, the sum of the kernel at the CCD centre.

    Raises
    ------
    PsfFitError
        If it is not finite and positive.
    """
    ksum = float(k_center.sum())
    if not (np.isfinite(ksum) and ksum > 0):
        msg = "kernel fit failed: photometric scale (kernel sum) is not positive"
        raise PsfFitError(msg)
    return ksum


def _convolve_difference(
    img_a: np.ndarray,
    img_b: np.ndarray,
    kernels: list[np.ndarray],
    psi: np.ndarray | None,
    spatial_order: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``ψ⊗B − Σ_s w_s(x, y) (ψ⊗K_s)⊗A`` over the full frame, tile by tile.

    ψ is truncated where its wings fall below 1e-5 (and the difference's PSF is made
    with the same ψ); ``w_s = u^i v^j`` are the spatial polynomials.  Returns the
    difference (no background yet) and the normalised coordinates ``u``, ``v``.
    """
    ny, nx = img_a.shape
    u = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) / max((nx - 1) / 2, 1)
    v = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) / max((ny - 1) / 2, 1)
    terms: list[Any] = []
    for s, (i, j) in enumerate(_powers(spatial_order)):
        h = -(signal.convolve(psi, kernels[s]) if psi is not None else kernels[s])
        if s == 0:
            terms.append((None, None, [(1, psi if psi is not None else np.ones((1, 1))), (0, h)]))
        else:
            terms.append((v**j if j else None, u**i if i else None, [(0, h)]))
    diff = np.empty((ny, nx), np.float32)
    convolve_tiles([img_a, img_b], [(diff, terms)], threads=tile_threads())
    return diff, u, v


def _mark_edges(mask: np.ndarray, nodata: np.ndarray | None, grow: int) -> None:
    """EDGE within ``grow`` pixels of the border and of NO_DATA (in place).

    ψ is compact (close to a δ function for a deeper template): its wings are not
    added to the EDGE width, which is the kernel half size.
    """
    edge_bit = np.uint32(MASK["EDGE"])
    if grow > 0:
        for band in (np.s_[:grow], np.s_[-grow:], np.s_[:, :grow], np.s_[:, -grow:]):
            mask[band] |= edge_bit
    if nodata is not None:  # (rare) masks of the NO_DATA pixels and the band around them
        mask[dilate(nodata, grow) & ~nodata] |= edge_bit
        mask[nodata] |= np.uint32(MASK["NO_DATA"])


def _difference_variance(
    variances: tuple[np.ndarray, np.ndarray],
    v_a: float,
    v_b: float,
    ksum: float,
    rev: bool,
    nodata: np.ndarray | None,
) -> np.ndarray:
    """Variance plane of the difference, in the science calibration, from the science
    and template ``variances`` (the typical variance on ``nodata``, None: no pixel)."""
    var_s, var_t = variances
    var_a, var_b = (var_s, var_t) if rev else (var_t, var_s)
    k2 = ksum**2
    var_scale = 1.0 / k2 if rev else 1.0
    fill = var_scale * (v_b + k2 * v_a)  # (the typical difference variance)
    return difference_variance(var_b, var_a, k2, var_scale, 1e-6 * max(v_b, 1e-30), fill, nodata)


def _aperture_corrections(
    science: Exposure,
    template: Exposure,
    psf_s: np.ndarray,
    psf_t: np.ndarray,
    fw_s: float,
    fw_t: float,
    stars: dict[str, Any],
    rev: bool,
    apcorr: bool,
) -> tuple[float, float, int, float]:
    """Aperture corrections of the difference's and the science image's PSF fluxes,
    the number of stars and the aperture radius (1, 1, 0, NaN when not measured)."""
    if not apcorr:
        return 1.0, 1.0, 0, float("nan")
    ap_s, n_ap, r_ap = aperture_correction(
        science, psf_getter(science, psf_s), fwhm=fw_s, stars=stars
    )  # the kernel stamps' stars: no second search
    ap_d = ap_s
    if rev:  # the difference has the template's PSF
        ap_d, n_ap, r_ap = aperture_correction(template, psf_getter(template, psf_t), fwhm=fw_t)
    return ap_d, ap_s, n_ap, r_ap


def _bright_sources(
    template: np.ndarray,
    variance: np.ndarray,
    psf_t: np.ndarray,
    psf_d: np.ndarray,
    scale: float,
    bright: bool,
) -> dict[str, np.ndarray] | None:
    """:func:`bright_sources` of the template (None when ``bright`` is False)."""
    return bright_sources(template, variance, psf_t, psf_d, scale=scale) if bright else None


def _difference_psf_model(science: Exposure, rev: bool, psi: np.ndarray | None) -> Any:
    """The difference's PSF model: the science's convolved by ψ (none when reversed, as
    the difference has the template's constant PSF)."""
    model = science.psf_model
    if rev:
        return None
    if model is not None and psi is not None:
        return model.convolved(psi)
    return model


def _difference_fields(
    science: Exposure,
    direction: str,
    ap_d: float,
    ap_s: float,
    sources: dict[str, Any] | None,
    psf_model: Any,
) -> dict[str, Any]:
    """The difference's metadata and typed fields: the science's meta with the
    direction, the aperture corrections, the bright sources and the PSF model
    (:func:`_difference_psf_model`)."""
    return {
        "meta": {**science.meta, "subtraction": direction},
        "ap_corr": ap_d,
        "ap_corr_science": ap_s,
        "bright_sources": sources,
        "psf_model": psf_model,
    }


def _sum_variation(kernels: list[np.ndarray], order: int, rev: bool) -> float:
    """(max − min) / mean of the kernel sum over the CCD (:func:`kernel_sum_range`)."""
    lo, hi = kernel_sum_range(kernels, order, rev)
    mean = 0.5 * (lo + hi)
    return abs(hi - lo) / abs(mean) if mean else float("inf")


def _typical(var, nodata, default, samples=64000):
    """Median of ``var`` on about ``samples`` pixels with data (every ``step``-th row and
    column; ``nodata`` None when every pixel has data)."""
    step = max(1, int(np.sqrt(var.size / samples)))
    if nodata is None:
        return float(np.median(var[::step, ::step]))
    good = ~nodata[::step, ::step]
    return float(np.median(var[::step, ::step][good])) if good.any() else default


def _either(nodata_s, nodata_t):
    """The pixels either image lacks (None when neither lacks any)."""
    if nodata_s is None or nodata_t is None:
        return nodata_t if nodata_s is None else nodata_s
    return nodata_s | nodata_t


def _filled(exposure, count):
    """The image with its ``count`` no-data pixels set to 0 and where they are
    (:func:`fill_nodata`), or the float32 image itself and None when ``count`` is 0."""
    if count == 0:
        return np.asarray(exposure.image, np.float32), None
    return fill_nodata(exposure.image, exposure.variance, exposure.mask, _NODATA)


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
