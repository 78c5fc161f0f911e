"""Subtraction quality: figures measured on every difference image, and a verdict.

:func:`assess` measures, after :func:`apdask.subtract.subtract` and detection:

* the kernel sum against the photometric ratio the zero points predict, and its
  variation across the image;
* the stamps used and the kernel model (with the fallbacks taken);
* the normalised residual χ² and the fraction of dipoles on the kernel stars;
* the difference noise against the propagated variance, per pixel and at the PSF
  scale (the robust σ of the matched-filter S/N map);
* the fractions of detections that are dipoles or sit on static (template) sources.

Each figure is compared with ``apdask.subtract.qa.*`` (apdask.yaml) and gets
``pass``, ``warn`` or ``fail``; the record's ``status`` is the worst of them and
``reasons`` names the checks that did not pass.  :func:`enforce` raises
:class:`~apdask.exceptions.SubtractionQualityError` on ``fail``;
:func:`flag_sources` marks every DiaSource of a warned subtraction
(:data:`QA_WARN_FLAGS`).  See ``docs/real-data.md`` and ``docs/alerts.md``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping
from typing import Any

import ducc0
import numpy as np
from astropy.table import Table
from numpy.lib.stride_tricks import sliding_window_view

from apdask import config
from apdask._kernels.fused import thinned_values
from apdask.core.exposure import Exposure, mask_bits
from apdask.core.records import SubtractionInfo
from apdask.exceptions import SubtractionQualityError, SubtractionQualityWarning

__all__ = [
    "QA_WARN_FLAGS",
    "assess",
    "enforce",
    "expected_ratio",
    "flag_sources",
    "image_figures",
    "qa_thresholds",
    "snr_sigma",
]

#: The DiaSource columns set True on every DiaSource of a subtraction whose QA warned.
#: The APDB DiaSource table and the alert schema have no subtraction-quality column or
#: bit field; ``pixelFlags_suspect`` ("the footprint includes suspect pixels") is
#: true of every pixel of a difference that its QA calls suspect (docs/alerts.md).
QA_WARN_FLAGS = ("pixelFlags_suspect", "pixelFlags_suspectCenter")

_BAD = mask_bits("BAD", "SAT", "CR", "NO_DATA", "EDGE")


def qa_thresholds() -> dict[str, Any]:
    """The configured thresholds, ``apdask.subtract.qa.*``, as a plain dict."""
    return dict(config.get("subtract.qa"))


def expected_ratio(science: Exposure, template: Exposure) -> float | None:
    """Photometric ratio science/template that the calibrations predict, or None.

    Both in nJy (the pipeline, or inputs with zero points or flux units): 1.  Both in
    counts with zero points: ``10^(0.4 (zp_s − zp_t))``.  Otherwise unknown (None).
    """
    us = science.meta.get("unit", "nJy")
    ut = template.meta.get("unit", "nJy")
    if us == ut == "nJy":
        return 1.0
    zs, zt = science.meta.get("zero_point"), template.meta.get("zero_point")
    if us == ut and zs is not None and zt is not None:
        return 10.0 ** (0.4 * (zs - zt))
    return None


def _level(value, warn, fail):
    if value is None or not math.isfinite(value):
        return "pass"
    return "fail" if value > fail else ("warn" if value > warn else "pass")


def _noise_level(noise, t):
    """Level of the per-pixel noise ratio.  Above 1 the difference is noisier than its
    variance says (false detections): ``noise_ratio_warn``/``_fail``.  Below 1 it is
    quieter (a template sharing the science image's noise, an overestimated variance):
    the S/N is conservative and only depth is lost, so the low side fails only at
    ``noise_ratio_low_fail`` (a difference nearly without noise: the template is the
    science image)."""
    if noise is None or not math.isfinite(noise):
        return "pass"
    if noise >= 1.0:
        return _level(noise - 1.0, t["noise_ratio_warn"], t["noise_ratio_fail"])
    return _level(1.0 - noise, t["noise_ratio_warn"], t.get("noise_ratio_low_fail", 0.9))


def _correlate_stamps(stamps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlation of each stamp of an ``(n, S, S)`` stack with an odd square ``kernel``,
    'same' size, zero outside the stamp: one float64 FFT of the stack (no wrap-around).
    Returns float64."""
    n, s, _ = stamps.shape
    h = kernel.shape[0] // 2
    m = ducc0.fft.good_size(s + h, True)
    grid = np.zeros((m, m))
    grid[: 2 * h + 1, : 2 * h + 1] = kernel
    spec = np.conj(ducc0.fft.r2c(np.roll(grid, (-h, -h), axis=(0, 1)), axes=(0, 1)))
    buf = np.zeros((n, m, m))
    buf[:, :s, :s] = stamps
    f = ducc0.fft.r2c(buf, axes=(1, 2))
    f *= spec
    return ducc0.fft.c2r(f, axes=(1, 2), lastsize=m, forward=False, inorm=2, out=buf)[:, :s, :s]


def _star_residuals(difference, xs, ys, fwhm):
    """Normalised residual χ² (r ≤ 1.5 FWHM) and ±5σ dipole flags (r ≤ 2 FWHM) at stars.

    All stars at once: their stamps are gathered into one stack and the matched filter
    of every stamp runs as one FFT over it (it was one ``scipy.signal.correlate`` per
    star: ~0.4 s for a 4k CCD's ~300 stars).  Stars whose stamp leaves the image, or
    with fewer than 5 good pixels within 1.5 FWHM, are left out.
    """
    img, var, mask = difference.image, difference.variance, difference.mask
    psf = np.asarray(difference.psf, float)
    ph = psf.shape[0] // 2
    r_chi, r_dip = 1.5 * fwhm, 2.0 * fwhm
    half = int(math.ceil(r_dip)) + ph + 1
    ny, nx = img.shape
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    rr = np.hypot(xx, yy)
    xs, ys = np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)
    on = (xs >= half) & (ys >= half) & (xs + half < nx) & (ys + half < ny)
    # (n, S, S) windows (all on the image)
    xs, ys, size = xs[on] - half, ys[on] - half, (2 * half + 1, 2 * half + 1)
    d = sliding_window_view(img, size)[ys, xs]
    v = sliding_window_view(var, size)[ys, xs]
    ok = ((sliding_window_view(mask, size)[ys, xs] & _BAD) == 0) & (v > 0)
    inner = rr <= r_chi
    d_in, v_in, ok_in = d[:, inner].astype(float), v[:, inner].astype(float), ok[:, inner]
    n_core = ok_in.sum(axis=1)
    use = n_core >= 5
    if not use.any():
        return [], []
    d_in, v_in, ok_in, n_core = d_in[use], v_in[use], ok_in[use], n_core[use]
    chi2 = (np.where(ok_in, d_in, 0.0) ** 2 / np.where(ok_in, v_in, 1.0)).sum(axis=1) / n_core
    if not use.all():
        d, v, ok = d[use], v[use], ok[use]
    f = _correlate_stamps(np.where(ok, d, 0.0), psf)
    vf = _correlate_stamps(np.where(ok, v, 0.0), psf * psf)
    # the FFT leaves round-off where the direct sum is exactly 0 (all neighbours masked)
    near = rr <= r_dip
    f, vf, vmax = f[:, near], vf[:, near], vf.max(axis=(1, 2))[:, None]
    live = vf > 1e-9 * vmax
    snr = np.where(live, f / np.sqrt(np.where(live, vf, 1.0)), 0.0)
    dip = (snr.max(axis=1) > 5.0) & (snr.min(axis=1) < -5.0)
    return [float(c) for c in chi2], [bool(b) for b in dip]


def snr_sigma(matched: tuple[np.ndarray, np.ndarray, np.ndarray]) -> float | None:
    """Robust σ of a matched-filter S/N map (:func:`apdask.detect.matched_filter`) on the
    pixels it did not ignore; None when none is left."""
    _, snr, ignored = matched
    # every step-th such pixel, for about 200,000 of them (one pass, no full-frame copy)
    v = thinned_values(snr, ignored, 200_000)
    if v.size == 0:
        return None
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def image_figures(
    difference: Exposure,
    info: SubtractionInfo,
    matched: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The figures of :func:`assess` that need only the images, not the DiaSources.

    The residual χ² and dipole flags at the kernel stars (``star_chi2``,
    ``star_dipoles``: lists, one value per star checked) and the robust σ of the S/N
    map (``snr_sigma``, None without ``matched``).  Most of their time is spent in FFTs
    and array passes that release the GIL, so a task can measure them in a thread
    while it measures the DiaSources, and give them to :func:`assess` as ``figures``.
    """
    fwhm = float(info.fwhm_difference or 3.0)
    chi2, dip = _star_residuals(difference, info.stamp_x, info.stamp_y, fwhm)
    snr_sig = snr_sigma(matched) if matched is not None else None
    return {"star_chi2": chi2, "star_dipoles": dip, "snr_sigma": snr_sig}


def assess(
    difference: Exposure,
    info: SubtractionInfo,
    sources: Table | None,
    science: Exposure,
    template: Exposure,
    *,
    matched: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    thresholds: dict[str, float] | None = None,
    figures: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure the QA figures of one subtraction and judge them.

    Parameters
    ----------
    difference : apdask.core.exposure.Exposure
        The difference image (with its PSF).
    info : apdask.core.records.SubtractionInfo
        What :func:`apdask.pipeline.subtract.difference.subtract` returned with it.
    sources : astropy.table.Table or None
        The DiaSources measured on it
        (:func:`apdask.pipeline.measure.sources.measure_sources`).
    science, template : apdask.core.exposure.Exposure
        The inputs (their ``meta`` give units and zero points).
    matched : tuple, optional
        The difference's :func:`apdask.pipeline.measure.detection.matched_filter`: its
        S/N map's robust σ is judged too (``snr_map_sigma``).
    thresholds : dict, optional
        Default :func:`qa_thresholds`.
    figures : dict, optional
        :func:`image_figures` of ``difference``, ``info`` and ``matched``, if already
        measured.

    Returns
    -------
    dict
        Strict-JSON-able figures (None for unknown), ``checks`` (``{name: level}``),
        ``status`` (``"pass"``, ``"warn"`` or ``"fail"``) and ``reasons``.
    """
    t = qa_thresholds() if thresholds is None else thresholds
    ks = float(info.kernel_sum)
    exp = expected_ratio(science, template)
    dev = abs(ks / exp - 1.0) if exp else None
    lo, hi = info.kernel_sum_range or [ks, ks]
    variation = abs(hi - lo) / abs(0.5 * (hi + lo)) if (hi + lo) else None
    if figures is None:
        figures = image_figures(difference, info, matched)
    chi2, dip = figures["star_chi2"], figures["star_dipoles"]
    chi2_med = float(np.median(chi2)) if chi2 else None
    star_dip = float(np.mean(dip)) if dip else None
    noise = float(info.noise_ratio)
    n_det, n_dip, n_static = _detection_counts(sources, float(t["static_snr"]))
    det_dip = n_dip / n_det if n_det else None
    det_static = n_static / n_det if n_det else None
    enough = n_det >= int(t["min_detections"])
    snr_sig = figures["snr_sigma"]
    vc = info.variance_correction
    checks = {
        "kernel_sum": _level(dev, t["kernel_sum_warn"], t["kernel_sum_fail"]),
        "kernel_sum_variation": _level(
            variation, t["kernel_sum_variation_warn"], t["kernel_sum_variation_fail"]
        ),
        "star_chi2": _level(chi2_med, t["chi2_warn"], t["chi2_fail"]),
        "star_dipoles": _level(star_dip, t["star_dipole_warn"], t["star_dipole_fail"]),
        "noise_ratio": _noise_level(noise, t),
        "variance_correction": _level(  # a factor below 1 is judged by its inverse
            max(vc, 1.0 / vc) if vc else None,
            t["variance_correction_warn"],
            t["variance_correction_fail"],
        ),  # fmt: skip
        "snr_map_sigma": _level(
            None if snr_sig is None else abs(snr_sig - 1.0),
            t["snr_sigma_warn"],
            t["snr_sigma_fail"],
        ),  # fmt: skip
        "detection_dipoles": _level(
            det_dip if enough else None, t["dipole_fraction_warn"], t["dipole_fraction_fail"]
        ),
        "detections_on_static": _level(
            det_static if enough else None, t["static_fraction_warn"], t["static_fraction_fail"]
        ),
    }
    status = "fail" if "fail" in checks.values() else (
        "warn" if "warn" in checks.values() else "pass")  # fmt: skip
    reasons = [k for k, v in checks.items() if v != "pass"]

    def num(v):
        return None if v is None or not math.isfinite(float(v)) else float(v)

    return {
        "status": status,
        "reasons": reasons,
        "checks": checks,
        "kernel_sum": num(ks),
        "expected_ratio": num(exp),
        "kernel_sum_deviation": num(dev),
        "kernel_sum_range": [num(lo), num(hi)],
        "kernel_sum_variation": num(variation),
        "n_stamps": int(info.n_stamps),
        "kernel_model": info.model,
        "fallback": list(info.fallback),
        "direction": info.direction,
        "star_chi2_median": num(chi2_med),
        "n_stars_checked": len(chi2),
        "star_dipole_fraction": num(star_dip),
        "noise_ratio": num(noise),
        "snr_map_sigma": num(snr_sig),
        "variance_correction": num(info.variance_correction),
        "n_detections": n_det,
        "n_dipoles": n_dip,
        "n_on_static": n_static,
        "dipole_fraction": num(det_dip),
        "static_fraction": num(det_static),
        "thresholds": {k: num(v) for k, v in t.items()},
    }


def _detection_counts(sources: Table | None, static_snr: float) -> tuple[int, int, int]:
    """Detections, dipoles among them, and those on a template source (S/N ≥ static_snr)."""
    if sources is None or not len(sources):
        return 0, 0, 0
    n_dip = int(np.count_nonzero(np.asarray(sources["isDipole"], dtype=np.bool_)))
    tf = np.asarray(sources["templateFlux"], dtype=np.float64)
    tfe = np.asarray(sources["templateFluxErr"], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        n_static = int(np.count_nonzero(np.abs(tf / tfe) >= static_snr))
    return len(sources), n_dip, n_static


def enforce(qa: Mapping[str, Any], where: str = "", log: logging.Logger | None = None) -> None:
    """Raise :class:`SubtractionQualityError` for a failed QA record; warn for a warned one
    (a :class:`SubtractionQualityWarning`, or a log warning on ``log`` when given)."""
    prefix = f"{where}: " if where else ""
    if qa["status"] == "fail":
        failed = [k for k, v in qa["checks"].items() if v == "fail"]
        detail = ", ".join(f"{k} ({_figure(qa, k)})" for k in failed)
        msg = (
            f"{prefix}subtraction failed its quality checks: {detail}; the difference is not "
            "trustworthy (see docs/real-data.md: a better template, more stars, or "
            "apdask.subtract.qa.* thresholds)"
        )
        raise SubtractionQualityError(msg, failed, qa)
    if qa["status"] == "warn" and log is not None:
        log.warning("%ssubtraction QA warning: %s", prefix, ", ".join(qa["reasons"]))
    elif qa["status"] == "warn":
        warnings.warn(f"{prefix}subtraction QA warning: {', '.join(qa['reasons'])}",
                      SubtractionQualityWarning, stacklevel=2)  # fmt: skip


def flag_sources(sources: Table, qa: Mapping[str, Any] | None) -> Table:
    """Mark every DiaSource of a subtraction whose QA did not pass, in place.

    The columns of :data:`QA_WARN_FLAGS` become True on every row when ``qa``'s status
    is ``warn`` (or ``fail``, when a caller does not enforce it); a passing
    subtraction's rows are left as measured (those flags then follow the difference's
    ``SUSPECT`` mask plane only).

    Parameters
    ----------
    sources : astropy.table.Table
        The subtraction's DiaSources (:func:`apdask.pipeline.measure.sources.measure_sources`).
    qa : dict or None
        The record of :func:`assess`; None leaves the table as it is.

    Returns
    -------
    astropy.table.Table
        ``sources``, modified in place.
    """
    if qa is None or qa.get("status") not in ("warn", "fail"):
        return sources
    for col in QA_WARN_FLAGS:
        sources[col] = np.ones(len(sources), dtype=bool)
    return sources


def _figure(qa, check):
    key = {
        "kernel_sum": ("kernel_sum", "expected_ratio"),
        "kernel_sum_variation": ("kernel_sum_variation",),
        "star_chi2": ("star_chi2_median",),
        "star_dipoles": ("star_dipole_fraction",),
        "noise_ratio": ("noise_ratio",),
        "snr_map_sigma": ("snr_map_sigma",),
        "variance_correction": ("variance_correction",),
        "detection_dipoles": ("dipole_fraction",),
        "detections_on_static": ("static_fraction", "n_detections"),
    }[check]
    return ", ".join(f"{k}={_fmt(qa.get(k))}" for k in key)


def _fmt(v):
    return "null" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
