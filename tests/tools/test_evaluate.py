"""Tests of apdask.evaluate: metrics against injected truth (no pipeline run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.table import Table

from apdask.tools.evaluate import (
    _noise_model,
    _truth_snr,
    evaluate_sources,
    expected_snr,
    plot_evaluation,
    psf_noise_factors,
)


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


def test_kolmogorov_noise_equivalent_area_is_larger_than_a_gaussians():
    pytest.importorskip("galsim")
    sigma_px = 1.0 / 2.3548 / 0.2  # 1.0" FWHM on 0.2" pixels
    nea_k, kern_k, pois_k = psf_noise_factors("kolmogorov", 1.0, 0.7)
    nea_g, kern_g, pois_g = psf_noise_factors("gaussian", 1.0, 0.7)
    assert 1.3 < nea_k / (4 * np.pi * sigma_px**2) < 1.45
    assert 1.3 < nea_k / nea_g < 1.45
    # GalSim's pixel-integrated Gaussian: the analytic factors of expected_snr to ~3 %
    s_t = 0.7 / 2.3548 / 0.2
    assert nea_g == pytest.approx(4 * np.pi * sigma_px**2, rel=0.03)
    assert kern_g == pytest.approx(4 * np.pi * sigma_px**4 / (2 * sigma_px**2 - s_t**2), rel=0.04)
    assert pois_g == pytest.approx(4 / 3, rel=0.01)
    assert kern_k < nea_k and pois_k > pois_g
    # cached per FWHM rounded to 0.01"
    again = psf_noise_factors("kolmogorov", 1.001, 0.699)
    assert again is psf_noise_factors("kolmogorov", 1.0, 0.7)


def _fake_repo(tmp_path, **sim):
    (tmp_path / "truth").mkdir(parents=True)
    meta = {"fwhm_range": [0.9, 1.1], "template_fwhm": 0.7, "template_depth": 10.0, **sim}
    (tmp_path / "truth" / "simulation.json").write_text(json.dumps(meta))
    return tmp_path


@pytest.mark.parametrize("engine, psf, lo, hi", [
    ("galsim", "kolmogorov", 0.84, 0.90),  # 1/sqrt(1.37) = 0.85 if background-limited
    ("galsim", "moffat", 0.80, 0.87),
    ("galsim", "gaussian", 0.985, 0.997),  # pixel-integrated: NEA ~2 % above 4πσ²
    ("apdask", "gaussian", 1.0, 1.0),
])  # fmt: skip
def test_evaluate_takes_the_psf_from_simulation_json(tmp_path, engine, psf, lo, hi):
    pytest.importorskip("galsim")
    n = 40
    rng = np.random.default_rng(3)
    truth = Table({"kind": ["transient"] * n, "detector": ["T00"] * n,
                   "x": rng.uniform(0, 512, n), "y": rng.uniform(0, 512, n),
                   "flux": rng.uniform(2e3, 2e4, n), "template_flux": np.zeros(n)})  # fmt: skip
    ref = _noise_model(_fake_repo(tmp_path / "ref"), "r", "testcam")  # no engine: analytic
    model = _noise_model(_fake_repo(tmp_path / "sim", engine=engine, psf=psf), "r", "testcam")
    assert ref["psf"] is None
    assert model["psf"] == (psf if engine == "galsim" else None)
    ratio = _truth_snr(truth, model) / _truth_snr(truth, ref)
    assert np.all((ratio >= lo - 1e-12) & (ratio <= hi + 1e-12)), ratio
    if engine == "galsim":  # brighter sources have more Poisson noise, a larger PSF factor
        assert np.ptp(ratio) > 0


def test_unknown_galsim_psf_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown GalSim psf"):
        _noise_model(_fake_repo(tmp_path, engine="galsim", psf="airy"), "r", "testcam")
