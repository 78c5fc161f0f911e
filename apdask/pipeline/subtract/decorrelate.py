"""Decorrelation of the difference image's noise (the afterburner kernel)."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from apdask.pipeline.psf import recentre

__all__ = ["decorrelation_kernel"]


def decorrelation_kernel(
    kernel: np.ndarray,
    var_sci: float,
    var_tpl: float,
    *,
    psf_pre: np.ndarray | None = None,
    size: int | None = None,
    floor: float = 1e-4,
) -> np.ndarray:
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
    return recentre(psi, size)


def _truncated_psi(kernel, var_b, var_a, kh, tail=1e-5):
    """:func:`decorrelation_kernel` cut to the smallest box whose outside holds at most
    ``tail`` of ``Σ|ψ|`` (radius 1 to ``3 kh``), renormalised to sum 1.

    The difference image is convolved with exactly this ψ, tile by tile
    (:func:`apdask._kernels.fourier.convolve_tiles`), and its PSF is made with it too.
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
