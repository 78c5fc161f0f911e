"""Tests of apdask.evaluate: metrics against injected truth (no pipeline run)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from apdask.evaluate import evaluate_sources, expected_snr, plot_evaluation


def _truth(n=200, seed=0):
    rng = np.random.default_rng(seed)
    ra = 150 + rng.uniform(0, 0.1, n)
    dec = -30 + rng.uniform(0, 0.1, n)
    flux = rng.uniform(1e3, 1e4, n)
    return Table({"kind": ["transient"] * n, "ra": ra, "dec": dec, "flux": flux,
                  "template_flux": np.zeros(n), "detector": ["R22_S11"] * n})  # fmt: skip


def test_perfect_catalogue_gives_unit_pulls_and_no_false_positives(tmp_path):
    t = _truth()
    rng = np.random.default_rng(1)
    err = 0.05 * t["flux"]
    meas = t["flux"] + rng.normal(0, 1, len(t)) * err
    src = [{"ra": r, "dec": d, "psfFlux": f, "psfFluxErr": e, "detector": "R22_S11"}
           for r, d, f, e in zip(t["ra"], t["dec"], meas, err, strict=True)]  # fmt: skip
    # two spurious sources far from any truth position
    src += [
        {"ra": 151.0, "dec": -31.0, "psfFlux": 1.0, "psfFluxErr": 1.0, "detector": "R22_S11"},
        {"ra": 151.1, "dec": -31.0, "psfFlux": 1.0, "psfFluxErr": 1.0, "detector": "R22_S11"},
    ]
    snr = np.full(len(t), 20.0)
    res = evaluate_sources(t, src, snr, n_ccd=2)
    assert res["completeness_snr_ge_7"] == 1.0
    assert res["n_false_positives"] == 2 and res["false_positives_per_ccd"] == 1.0
    assert res["flux_pull_sigma"] == pytest.approx(1.0, abs=0.15)
    assert abs(res["flux_bias_median"]) < 0.02
    assert res["astrometric_error_median_arcsec_all"] < 1e-6
    data = res.pop("_plot")
    res.update(visit=1, ccds=["R22_S11"], noise_ratio=1.0)
    plot_evaluation(res, data, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_missing_sources_lower_completeness():
    t = _truth(100)
    src = [
        {"ra": r, "dec": d, "psfFlux": f, "psfFluxErr": 1.0, "detector": "R22_S11"}
        for r, d, f in zip(t["ra"][:50], t["dec"][:50], t["flux"][:50], strict=True)
    ]
    res = evaluate_sources(t, src, np.full(100, 10.0))
    assert res["completeness_snr_ge_7"] == pytest.approx(0.5)
    assert res["n_false_positives"] == 0


def test_expected_snr_matches_a_direct_noise_sum():
    # Gaussian PSF sigma 2 px, science variance 900 e², no template noise, faint source
    snr = expected_snr(1000.0, 2.3548 * 2, 2.3548 * 1, 900.0, 0.0, 1.0)
    y, x = np.mgrid[-20:21, -20:21]
    p = np.exp(-0.5 * (x * x + y * y) / 4.0)
    p /= p.sum()
    sigma = np.sqrt(900.0 * (p * p).sum()) / (p * p).sum()
    assert snr == pytest.approx(1000.0 / np.sqrt(sigma**2 + 4 / 3 * 1000.0), rel=0.02)
