"""Quality figures of a subtraction: the noise ratio and the QA record."""

from __future__ import annotations

from typing import Any

import numpy as np

from apdask.core.exposure import mask_bits
from apdask.core.stats import robust_sigma
from apdask.pipeline.psf import psf_fwhm
from apdask.pipeline.subtract.kernel import _powers

__all__ = ["kernel_sum_range"]


def _qa_figures(
    fit: tuple[float, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    psfs: tuple[float, float, np.ndarray],
    direction: str,
    decorrelate: bool,
    noise: float,
    ap: tuple[float, float, int, float],
    sources: dict[str, Any] | None,
) -> dict[str, Any]:
    """The QA fields of the subtraction's :class:`SubtractionInfo`.

    ``fit`` is (kernel sum in the science calibration, kernel size, stamp χ², stamps
    used, background coefficients, residual background coefficients); ``psfs`` the
    science and template FWHMs and the difference's PSF; ``ap`` the aperture
    corrections (difference, science, stars, radius).
    """
    kernel_sum, kernel_size, chi2, used, bgc, bg_res = fit
    fw_s, fw_t, psf_d = psfs
    return {
        "kernel_sum": kernel_sum,
        "kernel_size": kernel_size,
        "n_stamps": int(used.sum()),
        "stamp_chi2": [float(c) for c in chi2[used]],
        "fwhm_science": fw_s,
        "fwhm_template": fw_t,
        "fwhm_difference": float(psf_fwhm(psf_d)),
        "direction": direction,
        "decorrelated": bool(decorrelate),
        "background": [float(c) for c in bgc],
        "background_residual": [float(c) for c in bg_res],
        "noise_ratio": noise,
        "ap_corr": ap[0],
        "ap_corr_science": ap[1],
        "ap_corr_n_stars": ap[2],
        "ap_corr_radius": ap[3],
        "n_bright_sources": len(sources["flux"]) if sources is not None else 0,
    }


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
    return float(robust_sigma(p))


def kernel_sum_range(kernels: list[np.ndarray], order: int, rev: bool, n: int = 5) -> list[float]:
    """(min, max) of the kernel sum (photometric scale science/template) over an
    ``n × n`` grid spanning the CCD: the spatial variation of the photometric scale."""
    g = np.linspace(-1.0, 1.0, n)
    u, v = np.meshgrid(g, g)
    terms = zip(kernels, _powers(order), strict=True)
    tot = sum(float(k.sum()) * u**i * v**j for k, (i, j) in terms)
    tot = np.asarray(tot, float) * np.ones_like(u)
    if rev:
        tot = 1.0 / tot
    return [float(tot.min()), float(tot.max())]
