"""Comparison of pipeline output with the simulator's truth.

Issue 6 grows this into ``apdask evaluate`` (completeness against SNR, purity, flux
pulls, astrometry); the walking skeleton needs the recovered fraction of injected
transients and their position and flux errors.
"""

from __future__ import annotations

import os

import numpy as np
from astropy.table import Table

__all__ = ["match_truth", "load_truth"]


def load_truth(repo, visit):
    """The truth table of one visit (``<repo>/truth/visit_<visit>.ecsv``)."""
    path = os.path.join(repo, "truth", f"visit_{visit}.ecsv")
    return Table.read(path)


def _unit(ra, dec):
    ra, dec = np.deg2rad(ra), np.deg2rad(dec)
    return np.column_stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)])


def match_truth(truth, dia_sources, radius_arcsec=1.0, kinds=("transient",)):
    """Match truth sources of the given kinds to DIASources by position.

    Parameters
    ----------
    truth : astropy.table.Table
        Truth with ``ra``, ``dec``, ``kind``, ``flux``, ``template_flux``.
    dia_sources : list of dict or Table
        DIASources with ``ra``, ``dec``, ``psfFlux``, ``psfFluxErr``.
    radius_arcsec : float
        Match radius.
    kinds : tuple of str
        Truth kinds to evaluate.

    Returns
    -------
    dict
        ``n_truth``, ``n_recovered``, ``fraction``, and per-match arrays
        ``sep_arcsec``, ``flux_true``, ``flux_meas``, ``flux_err``.
    """
    from scipy.spatial import cKDTree

    sel = np.isin(np.asarray(truth["kind"]).astype(str), kinds)
    t = truth[sel]
    ra = np.array([s["ra"] for s in dia_sources], dtype=float)
    dec = np.array([s["dec"] for s in dia_sources], dtype=float)
    out = {"n_truth": len(t), "n_recovered": 0, "fraction": float("nan")}
    if len(t) == 0 or len(ra) == 0:
        out.update(fraction=0.0 if len(t) else float("nan"), sep_arcsec=np.array([]))
        return out
    tree = cKDTree(_unit(ra, dec))
    chord = 2 * np.sin(np.deg2rad(radius_arcsec / 3600.0) / 2)
    dist, idx = tree.query(
        _unit(np.asarray(t["ra"]), np.asarray(t["dec"])), distance_upper_bound=chord
    )
    ok = np.isfinite(dist)
    sep = np.rad2deg(2 * np.arcsin(dist[ok] / 2)) * 3600.0
    flux = np.array([dia_sources[i].get("psfFlux") or np.nan for i in idx[ok]], dtype=float)
    err = np.array([dia_sources[i].get("psfFluxErr") or np.nan for i in idx[ok]], dtype=float)
    true_diff = np.asarray(t["flux"])[ok] - np.asarray(t["template_flux"])[ok]
    out.update(
        n_recovered=int(ok.sum()),
        fraction=float(ok.mean()),
        sep_arcsec=sep,
        flux_true=true_diff,
        flux_meas=flux,
        flux_err=err,
    )
    return out
