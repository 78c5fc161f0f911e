"""Metrics of DIASources against the simulator's truth (no file I/O).

Re-exported by :mod:`apdask.tools.evaluate`.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy.spatial import cKDTree

from apdask.core.exposure import mask_bits
from apdask.core.geometry import unit_vectors
from apdask.core.stats import robust_sigma

__all__ = ["SNR_BINS", "evaluate_sources", "noise_ratio"]

#: Completeness bins in expected difference-image SNR.
SNR_BINS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 20.0, 40.0, 80.0, 200.0, 1e4)


def _chord(radius_arcsec):
    return 2 * np.sin(np.deg2rad(radius_arcsec / 3600.0) / 2)


def _arcsec(chord):
    return np.rad2deg(2 * np.arcsin(np.asarray(chord) / 2)) * 3600.0


def noise_ratio(
    stamps: Iterable[bytes | None], fwhm_px: float = 5.0, exclude_fwhm: float = 3.0
) -> dict[str, Any]:
    """Robust σ of ``image / sqrt(variance)`` over difference cutouts, sources excluded.

    Parameters
    ----------
    stamps : iterable of bytes
        FITS cutouts as written by :func:`apdask.pipeline.measure.cutouts.make_cutout`.
    fwhm_px : float
        PSF FWHM; pixels within ``exclude_fwhm × fwhm_px`` of the centre are skipped.
    exclude_fwhm : float

    Returns
    -------
    dict
        ``ratio`` (1.4826 × MAD of the pulls), ``std`` (3σ-clipped standard
        deviation) and ``n_pixels``.
    """

    bad = mask_bits("BAD", "SAT", "CR", "NO_DATA", "EDGE", "DETECTED", "DETECTED_NEGATIVE")
    pulls = []
    for b in stamps:
        if not b:
            continue
        with fits.open(io.BytesIO(b)) as h:
            img = np.asarray(h[0].data, float)
            var = np.asarray(h["UNCERT"].data, float)
            msk = np.asarray(h["MASK"].data)
        n = img.shape[0]
        yy, xx = np.mgrid[:n, :n] - n // 2
        ok = (np.hypot(xx, yy) > exclude_fwhm * fwhm_px) & np.isfinite(img) & (var > 0)
        ok &= (msk & bad) == 0
        pulls.append(img[ok] / np.sqrt(var[ok]))
    if not pulls:
        return {"ratio": float("nan"), "std": float("nan"), "n_pixels": 0}
    p = np.concatenate(pulls)
    med = np.median(p)
    mad = robust_sigma(p, med)
    clip = p[np.abs(p - med) < 3 * mad]
    # a 3σ-clipped Gaussian has std 0.9866 σ
    return {"ratio": float(mad), "std": float(np.std(clip) / 0.9866), "n_pixels": int(p.size)}


def _robust_sigma(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return float("nan")
    return float(robust_sigma(x))


def _f(x):
    x = float(x)
    return x if np.isfinite(x) else None


def evaluate_sources(
    truth: Table,
    sources: list[dict[str, Any]],
    snr_true: np.ndarray,
    *,
    radius_arcsec: float = 1.0,
    n_ccd: int | None = None,
    changed_snr: float = 3.0,
) -> dict[str, Any]:
    """Metrics of DIASources against truth (no file I/O).

    Parameters
    ----------
    truth : astropy.table.Table
        ``kind``, ``ra``, ``dec``, ``flux``, ``template_flux``, ``detector``.
    sources : list of dict
        DIASources (``ra``, ``dec``, ``psfFlux``, ``psfFluxErr``, ``snr``, ``detector``).
    snr_true : numpy.ndarray
        Expected difference SNR of every truth row (signed).
    radius_arcsec : float
        Match radius.
    n_ccd : int, optional
        Number of CCDs processed (default: number of CCDs in the truth table).
    changed_snr : float
        Truth rows with ``|snr_true|`` at least this are real changes; a DIASource
        within the radius of one is not a false positive.

    Returns
    -------
    dict
        JSON-ready metrics; see :func:`evaluate_visit`.
    """
    kind = np.asarray(truth["kind"]).astype(str)
    det_names = np.asarray(truth["detector"]).astype(str)
    n_ccd = n_ccd or len(set(det_names))
    t_xyz = unit_vectors(np.asarray(truth["ra"]), np.asarray(truth["dec"]))
    delta = np.asarray(truth["flux"], float) - np.asarray(truth["template_flux"], float)
    ra = np.array([s["ra"] for s in sources], float)
    dec = np.array([s["dec"] for s in sources], float)
    flux = np.array([np.nan if s.get("psfFlux") is None else s["psfFlux"] for s in sources], float)
    err = np.array(
        [np.nan if s.get("psfFluxErr") is None else s["psfFluxErr"] for s in sources], float
    )
    chord = _chord(radius_arcsec)
    tr = np.flatnonzero(kind == "transient")
    found, m_src, m_sep = _match_transients(tr, t_xyz, delta, ra, dec, flux, chord)
    s_tr = snr_true[tr]
    fp, fp_class = _false_positives(truth, t_xyz, ra, dec, snr_true, changed_snr, chord)
    det_of = np.array([str(s.get("detector")) for s in sources])
    per_ccd = {}
    for d in sorted(set(det_of[fp])) if fp.any() else []:
        per_ccd[d] = int(np.sum(fp & (det_of == d)))
    classes: dict[str, int] = {}
    for c in np.asarray(fp_class)[fp]:
        classes[c] = classes.get(c, 0) + 1
    out: dict[str, Any] = {
        "n_ccd": int(n_ccd),
        "n_dia_sources": len(sources),
        "n_transients": len(tr),
        "n_transients_found": int(found.sum()),
        "completeness_bins": _completeness_bins(s_tr, found),
        "completeness_snr_ge_7": _fraction(found, s_tr >= 7),
        "completeness_snr_5_6": _fraction(found, (s_tr >= 5) & (s_tr < 6)),
        "completeness_snr_ge_5": _fraction(found, s_tr >= 5),
        "n_false_positives": int(fp.sum()),
        "false_positives_per_ccd": float(fp.sum()) / max(n_ccd, 1),
        "false_positives_by_ccd": per_ccd,
        "false_positives_by_class": classes,
    }
    mi = m_src[found]
    f_meas = flux[mi] if len(mi) else np.array([])
    f_err = err[mi] if len(mi) else np.array([])
    flux_metrics, plot = _flux_metrics(
        s_tr[found], delta[tr][found], f_meas, f_err, m_sep[found], len(mi)
    )
    out.update(flux_metrics)
    out["_plot"] = {"snr_true": s_tr.tolist(), "found": found.tolist(), **plot}
    return out


def _fraction(found: np.ndarray, sel: np.ndarray) -> float | None:
    """Fraction of ``found`` among the selected transients (None if none is selected)."""
    return _f(found[sel].mean()) if sel.any() else None


def _match_transients(
    tr: np.ndarray,
    t_xyz: np.ndarray,
    delta: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    flux: np.ndarray,
    chord: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest DIASource of the right sign within ``chord`` of each transient.

    Returns ``(found, source index or -1, separation in arcsec or NaN)``.
    """
    found = np.zeros(len(tr), bool)
    m_src = np.full(len(tr), -1)
    m_sep = np.full(len(tr), np.nan)
    if len(ra) and len(tr):
        tree = cKDTree(unit_vectors(ra, dec))
        for j, i in enumerate(tr):
            cand = tree.query_ball_point(t_xyz[i], chord)
            cand = [
                c for c in cand if np.sign(flux[c]) == np.sign(delta[i]) or not np.isfinite(flux[c])
            ]
            if cand:
                d = np.linalg.norm(unit_vectors(ra[cand], dec[cand]) - t_xyz[i], axis=1)
                k = int(np.argmin(d))
                found[j], m_src[j], m_sep[j] = True, cand[k], float(_arcsec(d[k]))
    return found, m_src, m_sep


def _completeness_bins(s_tr: np.ndarray, found: np.ndarray) -> list[dict[str, Any]]:
    """Completeness of the transients in the :data:`SNR_BINS` of expected SNR."""
    bins = []
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:], strict=True):
        sel = (s_tr >= lo) & (s_tr < hi)
        bins.append(
            {
                "snr_lo": lo,
                "snr_hi": hi,
                "n": int(sel.sum()),
                "n_found": int(found[sel].sum()),
                "completeness": _f(found[sel].mean()) if sel.any() else None,
            }
        )
    return bins


def _false_positives(
    truth: Table,
    t_xyz: np.ndarray,
    ra: np.ndarray,
    dec: np.ndarray,
    snr_true: np.ndarray,
    changed_snr: float,
    chord: float,
) -> tuple[np.ndarray, list[str]]:
    """DIASources near no real change, and what lies under each of them."""
    changed = np.abs(snr_true) >= changed_snr
    fp = np.zeros(len(ra), bool)
    fp_class = [""] * len(ra)
    if len(ra):
        tree_c = cKDTree(t_xyz[changed]) if changed.any() else None
        tree_all = cKDTree(t_xyz)
        stat_flux = np.asarray(truth["template_flux"], float)
        for i in range(len(ra)):
            p = unit_vectors(ra[i : i + 1], dec[i : i + 1])[0]
            if tree_c is not None and tree_c.query_ball_point(p, chord):
                continue
            fp[i] = True
            near = tree_all.query_ball_point(p, _chord(3.0))
            if near and np.nanmax(stat_flux[near]) > 1e6:
                fp_class[i] = "bright_star"
            elif near:
                fp_class[i] = "static_source"
            else:
                fp_class[i] = "empty_sky"
    return fp, fp_class


def _flux_metrics(
    st: np.ndarray,
    f_true: np.ndarray,
    f_meas: np.ndarray,
    f_err: np.ndarray,
    sep: np.ndarray,
    n_matched: int,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """Flux bias, pulls and astrometric error of the matched transients, and plot data."""
    snr_meas = f_meas / f_err if n_matched else np.array([])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = f_meas / f_true - 1
        pull = (f_meas - f_true) / f_err
    hi10 = st >= 10
    hi20 = snr_meas > 20
    metrics = {
        "n_flux_matches": int(np.isfinite(pull).sum()),
        "flux_bias_median": _f(np.nanmedian(rel[hi10])) if hi10.any() else None,
        "flux_bias_median_all": _f(np.nanmedian(rel)) if len(rel) else None,
        "flux_pull_sigma": _robust_sigma(pull) if len(pull) else None,
        "flux_pull_std": _f(np.nanstd(pull[np.abs(pull) < 5])) if len(pull) else None,
        "flux_pull_median": _f(np.nanmedian(pull)) if len(pull) else None,
        "astrometric_error_median_arcsec_snr_gt_20": (
            _f(np.median(sep[hi20])) if hi20.any() else None
        ),
        "astrometric_error_median_arcsec_all": _f(np.median(sep)) if len(sep) else None,
        "n_snr_gt_20": int(hi20.sum()),
    }
    plot = {
        "pull": pull.tolist(),
        "rel": rel.tolist(),
        "sep": sep.tolist(),
        "snr_meas": snr_meas.tolist(),
        "snr_matched": st.tolist(),
    }
    return metrics, plot
