"""Detection of DIASources: the PSF matched filter and thresholded footprints."""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from apdask import config
from apdask._kernels.fourier import convolve_tiles
from apdask._kernels.fused import (
    above_both,
    matched_inputs,
    one_blas_thread,
    segments,
    snr_map,
)
from apdask.core.exposure import IGNORE_BITS, MASK, Exposure
from apdask.pipeline.background import tile_threads
from apdask.pipeline.measure.bright import _bright_variance
from apdask.pipeline.psf import psf_fwhm, require_psf

__all__ = ["matched_filter", "detect_sources"]


@one_blas_thread
def matched_filter(difference: Exposure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PSF matched filter of a difference image: ``(filtered, snr, ignored)``.

    :func:`detect_sources` and :func:`measure_sources` both need it; compute it
    once and pass it to both as ``matched=`` (two full-frame convolutions saved).

    Parameters
    ----------
    difference : apdask.core.exposure.Exposure

    Returns
    -------
    filtered, snr : numpy.ndarray
        float32 correlation of the image with the PSF, and its S/N map.
    ignored : numpy.ndarray
        bool, pixels left out (masked, non-finite, near saturation).
    """
    return _filtered(difference, require_psf(difference, "difference"))


def _filtered(difference, psf, sat_grow=None):
    """Matched-filter image and its S/N map, masked pixels zeroed.

    Pixels within ``sat_grow`` pixels of a saturated pixel (default 2 × PSF FWHM)
    are ignored too: the wings of a saturated star leave residuals that must not
    become DIASources.
    """
    if sat_grow is None:
        sat_grow = int(np.ceil(2.0 * psf_fwhm(psf)))
    img, var, bad = matched_inputs(
        difference.image, difference.variance, difference.mask, IGNORE_BITS, MASK["SAT"],
        int(sat_grow),
    )  # fmt: skip
    p = psf[::-1, ::-1]  # correlation with the PSF
    filt, vfilt = np.empty(img.shape, np.float32), np.empty(img.shape, np.float32)
    jobs = [(filt, [(None, None, [(0, p)])]), (vfilt, [(None, None, [(1, p * p)])])]
    convolve_tiles([img, var], jobs, threads=tile_threads())
    sources = difference.bright_sources
    if sources is not None:
        _bright_variance(filt, vfilt, bad, sources, psf)
    return filt, snr_map(filt, vfilt, bad, out=vfilt), bad  # vfilt is not needed after


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
@one_blas_thread
def detect_sources(
    difference: Exposure,
    *,
    threshold_sigma: float | None = None,
    n_pixels: int | None = None,
    matched: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> Table:
    """Find positive and negative sources on a difference image.

    Parameters
    ----------
    difference : apdask.core.exposure.Exposure
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
    both = above_both(snr, threshold_sigma)  # one pass lists the pixels of both signs
    for sign, pixels in zip((1, -1), both, strict=True):
        # as photutils detect_sources (> threshold, 8-connected, n_pixels), sparse
        seg, peak = segments(snr, threshold_sigma, n_pixels, sign, pixels)
        for (area, x0, x1, y0, y1, px, py), p in zip(seg.tolist(), peak, strict=True):
            rows.append((px, py, sign, x0, x1, y0, y1, area, float(p) * sign))
    names = ("x", "y", "sign", "bbox_x0", "bbox_x1", "bbox_y0", "bbox_y1", "n_pixels", "peak_snr")
    dtypes = (int, int, int, int, int, int, int, int, float)
    if not rows:
        return Table(names=names, dtype=dtypes)
    return Table(rows=rows, names=names, dtype=dtypes)
