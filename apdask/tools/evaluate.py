"""Comparison of pipeline output with the simulator's truth (``apdask evaluate``).

:func:`evaluate_visit` reads the DIASources of one visit from the alert files
under ``<repo>/alerts`` and compares them with ``<repo>/truth/visit_<V>.ecsv``:

* **completeness** of the injected transients against their *expected*
  difference-image PSF SNR.  The expected SNR comes from the truth flux and the
  simulator's noise model (sky, read noise, dark, the PSF of the FWHM at the
  source position, the template's own noise after convolution by the matching
  kernel and the source's Poisson noise), see :func:`expected_snr`.  The PSF is
  the one that was simulated (``"engine"`` and ``"psf"`` of
  ``truth/simulation.json``): our engine's Gaussian analytically, a GalSim
  profile (Kolmogorov, Moffat or Gaussian) from its pixel image, see
  :func:`psf_noise_factors`;
* **false positives per CCD**: DIASources with no truth source that changed
  between template and science (a transient or variable with expected
  ``|SNR| ≥ 3``) within the match radius, classified by what lies under them;
* **flux bias and pulls** of matched transients: median of ``meas/true − 1`` and
  the robust σ of ``(meas − true)/err``;
* **astrometric error**: median separation at SNR > 20;
* **difference-image noise / propagated σ**: robust σ of ``image/sqrt(variance)``
  over the unmasked pixels of the difference cutouts, away from the central source.

It writes ``evaluate.json`` and ``evaluate.png`` (matplotlib's object API, no backend set).
:func:`match_truth` is the small matcher the end-to-end test uses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

from apdask.alerts.sinks import read_alerts
from apdask.core.camera import get_camera
from apdask.core.geometry import unit_vectors
from apdask.tools._eval_metrics import (
    _arcsec,
    _chord,
    evaluate_sources,
    noise_ratio,
)
from apdask.tools._eval_plot import plot_evaluation
from apdask.tools._eval_snr import (
    _noise_model,
    _sim_meta,
    _truth_snr,
    expected_snr,
    psf_image,
    psf_noise_factors,
)

__all__ = [
    "match_truth",
    "load_truth",
    "expected_snr",
    "psf_image",
    "psf_noise_factors",
    "evaluate_visit",
    "evaluate_sources",
    "noise_ratio",
    "plot_evaluation",
    "TARGETS",
]

#: Targets of issue 6, checked in the ``targets`` section of the result.
TARGETS: dict[str, tuple[str, Any]] = {
    "completeness_snr_ge_7": (">=", 0.95),
    "completeness_snr_5_6": (">=", 0.50),
    "false_positives_per_ccd": ("<=", 1.0),
    "flux_bias_median": ("abs<=", 0.02),
    "flux_pull_sigma": ("in", (0.9, 1.1)),
    "astrometric_error_median_arcsec_snr_gt_20": ("<=", 0.05),
    "noise_ratio": ("in", (0.95, 1.05)),
}


def load_truth(repo: str | os.PathLike[str], visit: int) -> Table:
    """The truth table of one visit (``<repo>/truth/visit_<visit>.ecsv``)."""
    path = os.path.join(repo, "truth", f"visit_{visit}.ecsv")
    if not os.path.exists(path):
        msg = f"no truth table for visit {visit} at {path}; was the repository simulated?"
        raise FileNotFoundError(msg)
    return Table.read(path)


def match_truth(
    truth: Table,
    dia_sources: Sequence[Mapping[str, Any]] | Table,
    radius_arcsec: float = 1.0,
    kinds: tuple[str, ...] = ("transient",),
) -> dict[str, Any]:
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
    sel = np.isin(np.asarray(truth["kind"]).astype(str), kinds)
    t = truth[sel]
    ra = np.array([s["ra"] for s in dia_sources], dtype=float)
    dec = np.array([s["dec"] for s in dia_sources], dtype=float)
    out: dict[str, Any] = {"n_truth": len(t), "n_recovered": 0, "fraction": float("nan")}
    if len(t) == 0 or len(ra) == 0:
        out.update(fraction=0.0 if len(t) else float("nan"), sep_arcsec=np.array([]))
        return out
    tree = cKDTree(unit_vectors(ra, dec))
    dist, idx = tree.query(
        unit_vectors(np.asarray(t["ra"]), np.asarray(t["dec"])),
        distance_upper_bound=_chord(radius_arcsec),
    )
    ok = np.isfinite(dist)
    sep = _arcsec(dist[ok])
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
        truth=t[ok],
    )
    return out


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def _alerts_of(repo, visit):
    """Alerts of one visit and the detector ids that have an alert file (processed CCDs)."""
    path = os.path.join(repo, "alerts", f"visit_{visit}")
    if not os.path.isdir(path):
        msg = f"no alerts for visit {visit} under {path}; run `apdask process-visit` first"
        raise FileNotFoundError(msg)
    processed = set()
    for name in os.listdir(path):
        stem = name.split(".")[0]
        if name.endswith(".avro") and stem.startswith(f"{visit}_"):
            try:
                processed.add(int(stem.split("_")[1]))
            except ValueError:
                continue
    return read_alerts(path), processed


def _check_targets(res):
    checks: dict[str, dict[str, Any]] = {}
    for key, (op, val) in TARGETS.items():
        v = res.get(key)
        if v is None or not np.isfinite(v):
            checks[key] = {"value": None, "target": f"{op} {val}", "met": False}
            continue
        if op == ">=":
            met = v >= val
        elif op == "<=":
            met = v <= val
        elif op == "abs<=":
            met = abs(v) <= val
        else:
            met = val[0] <= v <= val[1]
        checks[key] = {"value": v, "target": f"{op} {val}", "met": bool(met)}
    return checks


def evaluate_visit(
    repo: str | os.PathLike[str],
    visit: int,
    *,
    out_dir: str | None = None,
    radius_arcsec: float = 1.0,
    plot: bool = True,
) -> dict[str, Any]:
    """Compare the alerts of one visit with the simulator's truth; write JSON and PNG.

    Parameters
    ----------
    repo : str or os.PathLike
        Repository with ``truth/``, ``visits/`` and ``alerts/visit_<visit>/``.
    visit : int
    out_dir : str, optional
        Where ``evaluate.json`` and ``evaluate.png`` go; default
        ``<repo>/evaluate/visit_<visit>``.
    radius_arcsec : float
        Match radius.
    plot : bool
        Write the PNG.

    Returns
    -------
    dict
        The metrics (also written as JSON): completeness per SNR bin and at the
        target SNRs, false positives per CCD and by class, flux bias and pulls,
        astrometric error, the difference-image noise ratio, and ``targets`` with
        one ``{"value", "target", "met"}`` entry per issue-6 target.
    """
    repo = os.fspath(repo)
    visit = int(visit)
    truth = load_truth(repo, visit)
    band = str(truth.meta.get("band", "r"))
    camera_name = _camera_of(repo, visit)
    alerts, processed = _alerts_of(repo, visit)
    sources = [a["diaSource"] for a in alerts]

    camera = get_camera(camera_name)
    processed |= {int(s["detector"]) for s in sources}
    for s in sources:
        s["detector"] = camera[int(s["detector"])].name
    # only the CCDs that were processed (an alert file exists) count
    ccds = sorted(camera[d].name for d in processed)
    truth = truth[np.isin(np.asarray(truth["detector"]).astype(str), ccds)]
    model = _noise_model(repo, band, camera_name)
    snr_true = _truth_snr(truth, model)
    alert_ccds = {s["detector"] for s in sources}
    res = evaluate_sources(truth, sources, snr_true, radius_arcsec=radius_arcsec, n_ccd=len(ccds))
    fwhm_px = np.mean(model["fwhm_range"]) / 0.2
    res["noise"] = noise_ratio([a.get("cutoutDifference") for a in alerts], fwhm_px=fwhm_px)
    res["noise_ratio"] = res["noise"]["ratio"]
    res.update(
        {
            "repo": repo,
            "visit": visit,
            "band": band,
            "camera": camera_name,
            "ccds": ccds,
            "ccds_with_alerts": sorted(alert_ccds),
            "n_alerts": len(alerts),
            "match_radius_arcsec": radius_arcsec,
            "simulation": _sim_meta(repo),
        }
    )
    res["targets"] = _check_targets(res)
    _write_outputs(res, out_dir or os.path.join(repo, "evaluate", f"visit_{visit}"), plot)
    return res


def _camera_of(repo: str, visit: int) -> str:
    """The instrument of a visit's nextVisit message (``comcam`` when there is none)."""
    vpath = os.path.join(repo, "visits", f"visit_{visit}.json")
    camera_name = "comcam"
    if os.path.exists(vpath):
        with open(vpath) as f:
            camera_name = json.load(f).get("instrument", camera_name)
    return camera_name


def _write_outputs(res: dict[str, Any], out_dir: str, plot: bool) -> None:
    """Write ``evaluate.json`` (and ``evaluate.png``); record their paths in ``res``."""
    os.makedirs(out_dir, exist_ok=True)
    plot_data = res.pop("_plot")
    if plot:
        res["plot"] = os.path.join(out_dir, "evaluate.png")
        plot_evaluation(res, plot_data, res["plot"])
    res["json"] = os.path.join(out_dir, "evaluate.json")
    with open(res["json"], "w") as f:
        json.dump(res, f, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
