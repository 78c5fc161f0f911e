"""Calibration frames and their per-amplifier metrics against the master calibrations."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
from scipy import ndimage

from apdask import config
from apdask.core.exposure import MASK
from apdask.core.stats import robust_sigma
from apdask.exceptions import HeaderMismatchError
from apdask.io.raw import overscan
from apdask.pipeline.isr import DARK_HOT, FLAT_BAD, isr_arrays

__all__ = ["INTENTS", "amp_metrics", "calib_frame"]

#: Intents the raw-calibration pipeline accepts, and the IMGTYPE each expects.
INTENTS = {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "cbp": "CBP"}
#: Master calibration each intent is compared with.
_MASTER = {"bias": "bias", "dark": "dark", "flat": "flat", "cbp": "flat"}
_THRESHOLD_KEYS = (
    "hot_nsigma",
    "outlier_nsigma",
    "dead_fraction",
    "max_hot_fraction",
    "max_dead_fraction",
    "max_outlier_fraction",
    "max_read_noise_e",
    "max_bias_offset_e",
    "max_dark_excess",
    "max_flat_ratio_dev",
)


def _thresholds(overrides=None):
    out = {k: float(config.get(f"calib.{k}")) for k in _THRESHOLD_KEYS}
    for k, v in (overrides or {}).items():
        if k not in out:
            msg = f"unknown calibration threshold {k!r}; use one of {', '.join(_THRESHOLD_KEYS)}"
            raise ValueError(msg)
        out[k] = float(v)
    return out


def _robust_sigma(x):
    if x.size == 0:
        return float("nan")
    return float(robust_sigma(x))


def _read_noise_e(segment, amp):
    """Read noise (e⁻) from the serial overscan: robust σ after removing the row level."""
    osc = np.asarray(overscan(segment, amp), np.float64)
    if osc.size == 0:
        return None
    row = ndimage.uniform_filter1d(np.median(osc, axis=1), 15, mode="nearest")
    return _robust_sigma(osc - row[:, None]) * amp.gain


def amp_metrics(
    frame: np.ndarray,
    master: np.ndarray,
    good: np.ndarray,
    intent: str,
    read_noise_e: float | None = None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Metrics and verdict of one amplifier's processed frame against its master.

    Parameters
    ----------
    frame, master : numpy.ndarray
        The amplifier's section of the processed frame and of the master calibration,
        in the units of the intent (e⁻ for bias, e⁻/s for dark, normalised for flat).
    good : numpy.ndarray of bool
        Pixels to use (not saturated, no data, or known bad).
    intent : {"bias", "dark", "flat", "cbp"}
    read_noise_e : float, optional
        Read noise measured from the overscan.
    thresholds : dict, optional
        Overrides of ``apdask.calib.*``.

    Returns
    -------
    dict
        ``mean``, ``median``, ``sigma`` (1.4826 × MAD) of the frame; ``read_noise_e``;
        ``master_ratio`` (flat: median of frame/master; dark: median frame / median
        master; bias: None) and ``master_diff`` (median of frame − master); counts
        ``n_hot``, ``n_dead`` (flat and CBP only, else None), ``n_outlier`` and
        ``n_pixels``; ``verdict`` (``"pass"``/``"fail"``) and ``failures``.
    """
    th = _thresholds(thresholds)
    x = np.asarray(frame, np.float64)[good]
    m = np.asarray(master, np.float64)[good]
    n = int(x.size)
    flat_like = intent in ("flat", "cbp")
    if flat_like:
        ok = np.isfinite(m) & (m > 0)
        resid = np.where(ok, x / np.where(ok, m, 1.0), np.nan)[ok]
    else:
        resid = x - m
    r_med = float(np.median(resid)) if resid.size else float("nan")
    r_sig = _robust_sigma(resid)
    dev = resid - r_med
    out = {
        "n_pixels": n,
        "mean": float(np.mean(x)) if n else None,
        "median": float(np.median(x)) if n else None,
        "sigma": _robust_sigma(x) if n else None,
        "read_noise_e": None if read_noise_e is None else float(read_noise_e),
        "master_diff": float(np.median(x - m)) if n else None,
        "master_ratio": None,
        "n_hot": int(np.sum(dev > th["hot_nsigma"] * r_sig)),
        "n_dead": int(np.sum(x < th["dead_fraction"])) if flat_like else None,
        "n_outlier": int(np.sum(np.abs(dev) > th["outlier_nsigma"] * r_sig)),
    }
    if flat_like:
        out["master_ratio"] = r_med
    elif intent == "dark" and n and np.mean(m) > 0:
        out["master_ratio"] = float(np.mean(x) / np.mean(m))
    out["failures"] = _failures(out, intent, th)
    out["verdict"] = "fail" if out["failures"] else "pass"
    return out


def _failures(mt, intent, th):
    fails = []
    n = max(mt["n_pixels"], 1)

    def check(bad, text, key):
        if bad:
            fails.append(f"{text} (apdask.calib.{key}={th[key]:g})")

    if mt["n_pixels"] == 0:
        return ["no usable pixels"]
    rn = mt["read_noise_e"]
    check(
        rn is not None and rn > th["max_read_noise_e"],
        f"read noise {rn:.2f} e-",
        "max_read_noise_e",
    )
    check(mt["n_hot"] / n > th["max_hot_fraction"], f"{mt['n_hot']} hot pixels", "max_hot_fraction")
    check(
        mt["n_outlier"] / n > th["max_outlier_fraction"],
        f"{mt['n_outlier']} outliers",
        "max_outlier_fraction",
    )
    if intent in ("flat", "cbp"):
        check(
            mt["n_dead"] / n > th["max_dead_fraction"],
            f"{mt['n_dead']} dead pixels",
            "max_dead_fraction",
        )
        ratio = mt["master_ratio"]
        check(
            not abs(ratio - 1.0) <= th["max_flat_ratio_dev"],
            f"flat/master ratio {ratio:.4f}",
            "max_flat_ratio_dev",
        )
    elif intent == "dark":
        check(
            mt["master_diff"] > th["max_dark_excess"],
            f"dark current {mt['master_diff']:.4f} e-/s above the master",
            "max_dark_excess",
        )
    else:
        check(
            abs(mt["master_diff"]) > th["max_bias_offset_e"],
            f"bias offset {mt['master_diff']:.2f} e- from the master",
            "max_bias_offset_e",
        )
    return fails


def calib_frame(
    raw: Any, intent: str, masters: dict[str, Any], darktime: float
) -> tuple[np.ndarray, np.ndarray]:
    """Run ISR as far as ``intent`` allows; return (frame, mask) in the intent's units.

    Parameters
    ----------
    raw : apdask.rawio.RawExposure
    intent : {"bias", "dark", "flat", "cbp"}
    masters : dict
        ``bias``, ``dark`` (and ``flat`` for flat/CBP) assembled master arrays.
    darktime : float
        DARKTIME of the frame, s.

    Returns
    -------
    frame : numpy.ndarray
        float64 assembled frame: e⁻ (bias), e⁻/s (dark) or normalised (flat, CBP:
        scaled so that the median of frame / master flat over the CCD is 1).
    mask : numpy.ndarray
        uint32 ISR mask.
    """
    det = raw.detector
    if intent == "bias":
        img, _, mask = isr_arrays(raw.amps, det)
    elif intent == "dark":
        img, _, mask = isr_arrays(raw.amps, det, bias=masters["bias"])
    else:
        img, _, mask = isr_arrays(
            raw.amps, det, bias=masters["bias"], dark=masters["dark"], darktime=darktime
        )
    img, mask = dask.compute(img, mask, scheduler="threads")
    frame = np.asarray(img, np.float64)
    if intent == "dark":
        if not darktime > 0:
            msg = f"dark frame {raw.path} has DARKTIME={darktime}; a dark needs DARKTIME > 0"
            raise HeaderMismatchError(msg)
        frame /= darktime
    elif intent in ("flat", "cbp"):
        flat = np.asarray(masters["flat"], np.float64)
        ok = (mask & _ignore_bits()) == 0
        ok &= np.isfinite(flat) & (flat > 0)
        scale = np.median(frame[ok] / flat[ok]) if ok.any() else 0.0
        if not scale > 0:
            msg = f"{intent} frame {raw.path} has no signal (median {scale:g} e-)"
            raise HeaderMismatchError(msg)
        frame /= scale
    return frame, mask


def _known_defects(masters):
    """Pixels the masters already flag (hot in the dark, dead or bad in the flat)."""
    known = np.zeros(np.shape(masters["bias"]), bool)
    if "dark" in masters:
        dark = np.asarray(masters["dark"])
        known |= ~np.isfinite(dark) | (dark > DARK_HOT)
    if "flat" in masters:
        flat = np.asarray(masters["flat"])
        known |= ~np.isfinite(flat) | (flat <= FLAT_BAD)
    return known


def _ignore_bits():
    return MASK["SAT"] | MASK["NO_DATA"] | MASK["BAD"]
