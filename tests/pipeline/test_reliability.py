"""The real/bogus ``reliability`` of DIASources (apdask/pipeline/measure/reliability.py).

The shipped model must load and give scores in [0, 1]; on a small synthetic scene
measured by the pipeline, point-source transients score high and a dipole of a moved
star and an unmasked cosmic ray score low.  The column's way into the PPDB and the
alerts is checked in tests/pipeline/test_end_to_end.py.
"""

from __future__ import annotations

import json
import os
from importlib import resources

import numpy as np
import pytest

from apdask.pipeline.measure.detection import detect_sources
from apdask.pipeline.measure.reliability import (
    RELIABILITY_FEATURES,
    ReliabilityModel,
    load_reliability_model,
    reliability_features,
    score_reliability,
)
from apdask.pipeline.measure.sources import DIASOURCE_COLUMNS, measure_sources
from tests._pixels import add_stars, exposure_from, gaussian_psf, make_wcs

SHAPE = (400, 400)
FWHM = 4.0
SIGMA = 30.0  # noise of the difference, per pixel
REALS = [(60.0, 60.0), (200.3, 80.6), (330.8, 70.2), (70.4, 330.1), (210.5, 330.7), (330.2, 210.4)]
STAR = (200.2, 200.7)  # a bright star that moved by 0.4 px: a dipole
COSMIC = [(100, 200), (101, 201), (102, 202)]  # an unmasked three-pixel cosmic ray


@pytest.fixture(scope="module")
def model():
    return load_reliability_model()


def test_shipped_model_loads_and_is_small(model):
    path = resources.files("apdask.pipeline.measure").joinpath("reliability_v2.json")
    assert model.version == "apdrb-2"
    assert model.features == RELIABILITY_FEATURES
    assert model.leaf.shape[0] >= 50 and model.depth >= 2
    assert os.path.getsize(str(path)) < 150_000
    held = model.meta["held_out"]
    assert {"sim-apdask", "sim-galsim", "decam", "pooled"} <= set(held)


def test_shipped_model_meets_the_target_on_its_held_out_data(model):
    """Issue 16's target, as the training tool measured it on held-out data (images
    never used in training): at 95 % completeness on real sources, >= 90 % of the bogus
    rejected on each source of data, the DECam injections into real pixels included."""
    held = model.meta["held_out"]
    for d in ("sim-apdask", "sim-galsim", "decam", "pooled"):
        assert held[d]["completeness"] >= 0.95, d
        assert held[d]["bogus_rejected"] >= 0.90, (d, held[d])
    assert held["decam"]["n_real"] >= 200 and held["decam"]["n_bogus"] >= 300


def test_scores_lie_in_the_unit_interval(model):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (500, len(RELIABILITY_FEATURES)))
    x[:10] = 1e6
    x[10:20] = -1e6
    s = model.predict(x)
    assert s.dtype == np.float32 and s.shape == (500,)
    assert np.all((s >= 0) & (s <= 1)) and s.std() > 0.01
    assert model.predict(np.zeros((0, len(RELIABILITY_FEATURES)))).shape == (0,)


def test_trees_go_right_above_the_threshold():
    """One tree of depth 1 on feature 2: left leaf -1, right leaf +2, base 0.5."""
    k = len(RELIABILITY_FEATURES)
    m = ReliabilityModel("t", RELIABILITY_FEATURES, 0.5, np.array([[2]]), np.array([[0.25]]),
                         np.array([[-1.0, 2.0]]), {})  # fmt: skip
    x = np.zeros((3, k))
    x[:, 2] = [0.0, 0.25, 0.26]
    np.testing.assert_allclose(m.log_odds(x), [-0.5, -0.5, 2.5])
    back = ReliabilityModel.from_dict(json.loads(json.dumps(m.to_dict())))
    np.testing.assert_allclose(back.log_odds(x), m.log_odds(x))


def test_bad_models_are_refused(tmp_path, model):
    d = model.to_dict()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**d, "features": d["features"][:-1]}))
    with pytest.raises(ValueError, match="retrain it"):
        load_reliability_model(bad)
    bad.write_text(json.dumps({**d, "features": ["old", *d["features"][1:]]}))
    with pytest.raises(ValueError, match="was trained on features .* retrain"):
        load_reliability_model(bad)
    with pytest.raises(ValueError, match="at most|1 to 7"):
        ReliabilityModel.from_dict({**d, "version": "apdask-rb-1"})
    with pytest.raises(ValueError, match="compute them with reliability_features"):
        model.predict(np.zeros((3, 4)))


def _scene():
    """Difference, science and template: six transients, one moved star, one cosmic ray."""
    rng = np.random.default_rng(7)
    psf = gaussian_psf(FWHM)
    w = make_wcs(SHAPE)
    star_flux = 3e5
    flux_real = 30 * SIGMA * np.sqrt(4 * np.pi * (FWHM / 2.3548) ** 2)  # S/N ~ 30
    diff = np.zeros(SHAPE)
    rx, ry = zip(*REALS, strict=True)
    add_stars(diff, rx, ry, [flux_real] * len(REALS), FWHM)
    add_stars(diff, [STAR[0] + 0.4], [STAR[1]], [star_flux], FWHM)
    add_stars(diff, [STAR[0]], [STAR[1]], [-star_flux], FWHM)
    for x, y in COSMIC:
        diff[y, x] += 60 * SIGMA
    tpl = np.zeros(SHAPE)
    add_stars(tpl, [STAR[0]], [STAR[1]], [star_flux], FWHM)
    sci = tpl + diff
    difference = exposure_from(diff + rng.normal(0, SIGMA, SHAPE), np.full(SHAPE, SIGMA**2),
                               wcs=w, psf=psf)  # fmt: skip
    sci_var = 0.8 * SIGMA**2 + np.abs(sci) / 10
    science = exposure_from(sci + rng.normal(0, 1, SHAPE) * np.sqrt(sci_var), sci_var, wcs=w,
                            psf=psf)  # fmt: skip
    template = exposure_from(tpl + rng.normal(0, 0.3 * SIGMA, SHAPE),
                             np.full(SHAPE, (0.3 * SIGMA) ** 2), wcs=w, psf=psf)  # fmt: skip
    return difference, science, template


@pytest.fixture(scope="module")
def measured():
    difference, science, template = _scene()
    tab = measure_sources(difference, science, template, detect_sources(difference), visit=1,
                          detector=2, band="r", mjd=60000.5)  # fmt: skip
    return difference, tab


def _near(tab, x, y, r=3.0):
    return np.flatnonzero(np.hypot(tab["x"] - x, tab["y"] - y) < r)


def test_transients_score_high_and_artefacts_low(measured, model):
    _, tab = measured
    assert set(DIASOURCE_COLUMNS) <= set(tab.colnames)
    assert tab.colnames[-2:] == ["reliability", "reliabilityVersion"]
    assert tab["reliability"].dtype == np.float32
    assert np.all(tab["reliabilityVersion"] == model.version)
    for x, y in REALS:
        (i,) = _near(tab, x, y)
        assert tab["reliability"][i] > 0.8, (x, y, tab["reliability"][i])
    lobes = _near(tab, *STAR, r=4.0)
    assert len(lobes) >= 1 and tab["isDipole"][lobes].any()
    assert np.all(tab["reliability"][lobes] < 0.2), tab["reliability"][lobes]
    cr = _near(tab, 101, 201)
    assert len(cr) == 1
    assert tab["reliability"][cr[0]] < 0.2
    assert len(tab) == len(REALS) + len(lobes) + 1  # nothing else


def test_features_are_finite_and_in_order(measured):
    difference, tab = measured
    f = reliability_features(tab, difference)
    assert f.shape == (len(tab), len(RELIABILITY_FEATURES)) and np.isfinite(f).all()
    (i,) = _near(tab, *REALS[0])
    row = dict(zip(RELIABILITY_FEATURES, f[i], strict=True))
    assert row["log_abs_snr"] == pytest.approx(np.log10(abs(tab["snr"][i])))
    assert row["psf_correlation"] > 0.8 and row["opposite_core"] < 0.2
    assert row["is_negative"] == 0 and row["is_dipole"] == 0
    # the shape contrasts: a point source is best matched by the PSF's width, with its
    # peak where a PSF fit puts it; the cosmic ray is sharper than the PSF
    assert row["narrow_vs_psf"] < -0.05 and row["broad_vs_psf"] < 0
    assert 0.8 < row["peak_over_fit"] < 1.25
    (c,) = _near(tab, 101, 201)
    cr = dict(zip(RELIABILITY_FEATURES, f[c], strict=True))
    assert cr["narrow_vs_psf"] > 0.05 and cr["peak_over_fit"] > 2.5


def test_empty_and_unmeasured_tables(measured, model):
    difference, tab = measured
    empty = score_reliability(tab[:0].copy(), difference, model=model)
    assert len(empty) == 0 and "reliability" in empty.colnames
    nan = tab[:2].copy()
    for c in ("psfFlux", "templateFlux", "ixx", "apFlux"):
        nan[c] = np.nan
    s = score_reliability(nan, difference, model=model)["reliability"]
    assert np.all((s >= 0) & (s <= 1))
    with pytest.raises(ValueError, match="no PSF"):
        reliability_features(tab, difference.copy_with(psf=None))
