"""Tests of apdask.pipeline.measure.trail: the Veres fit of trailed sources."""

from __future__ import annotations

import numpy as np
import pytest

from apdask.core.exposure import MASK
from apdask.pipeline.measure import trail
from apdask.pipeline.measure.detection import detect_sources
from apdask.pipeline.measure.sources import measure_sources
from apdask.pipeline.measure.trail import (
    _EDGE_LEVEL,
    fit_trail,
    is_elongated,
    psf_flux_ratio,
    psf_sigma,
    trail_on_edge,
    veres_model,
)
from tests._pixels import add_stars, exposure_from, gaussian_psf, make_wcs

FWHM = 4.0
NOISE = 10.0
SIGMA = psf_sigma(gaussian_psf(FWHM))  # the PSF stamp's, pixel response included


def add_trail(img, centre, length, angle_deg, flux):
    """A pixel-integrated Gaussian PSF swept along a segment (PSF ⊗ segment), in place."""
    a = np.deg2rad(angle_deg)
    n = max(int(8 * length), 1)
    t = (np.arange(n) + 0.5) / n - 0.5 if length > 0 else np.zeros(1)
    xs = centre[0] + length * t * np.cos(a)
    ys = centre[1] + length * t * np.sin(a)
    add_stars(img, xs, ys, np.full(len(xs), flux / len(xs)), FWHM)


def _fit(length, angle, flux, seed, centre=(60.3, 59.7), shape=(120, 120)):
    img = np.zeros(shape)
    add_trail(img, centre, length, angle, flux)
    img += np.random.default_rng(seed).normal(0, NOISE, shape)
    h = int(0.5 * length + 4 * SIGMA) + 1
    cx, cy = int(round(centre[0])), int(round(centre[1]))
    box = (cx - h, cx + h + 1, cy - h, cy + h + 1)
    fit = fit_trail(img, np.full(shape, NOISE**2), np.zeros(shape, np.uint32), box, SIGMA)
    assert fit is not None and fit["success"]
    return fit


def _angle_error(theta_rad, angle_deg):
    """Difference of two axis angles in degrees, in [-90, 90)."""
    return (np.rad2deg(theta_rad) - angle_deg + 90.0) % 180.0 - 90.0


def test_model_is_a_unit_flux_segment_and_a_psf_at_zero_length():
    yy, xx = np.mgrid[0:101, 0:101].astype(float)
    m = veres_model(xx, yy, (50.0, 50.0, 12.0, 5.0), 2.0)
    assert m.sum() == pytest.approx(1.0, rel=1e-4)
    # along the axis the profile is flat in the middle and half its height at the ends
    on = veres_model(np.array([50.0, 56.0, 62.0]), np.array([50.0, 52.5, 55.0]),
                     (50.0, 50.0, 12.0, 5.0), 2.0)  # fmt: skip
    assert on[1] == pytest.approx(on[0], rel=1e-3)
    assert on[2] == pytest.approx(0.5 * on[0], rel=1e-3)
    point = veres_model(xx, yy, (50.0, 50.0, 0.0, 0.0), 2.0)
    tiny = veres_model(xx, yy, (50.0, 50.0, 0.01, 0.0), 2.0)
    np.testing.assert_allclose(point, tiny, atol=1e-6)


@pytest.mark.parametrize(
    ("length", "angle", "flux"),
    [(5.0, 20.0, 20000.0), (10.0, -45.0, 20000.0), (20.0, 80.0, 30000.0),
     (30.0, 135.0, 40000.0), (15.0, 0.0, 25000.0)],
)  # fmt: skip
def test_fit_recovers_injected_length_angle_and_flux(length, angle, flux):
    fit = _fit(length, angle, flux, seed=int(length * 7))
    assert fit["length"] == pytest.approx(length, rel=0.10)
    assert abs(_angle_error(fit["theta"], angle)) < 3.0
    assert fit["flux"] == pytest.approx(flux, rel=0.10)
    # the errors are honest: within 5 sigma of the truth
    assert abs(fit["length"] - length) < 5 * fit["length_err"] + 0.02 * length
    assert abs(fit["flux"] - flux) < 5 * fit["flux_err"] + 0.02 * flux
    assert fit["chi2"] / fit["ndata"] == pytest.approx(1.0, abs=0.2)
    assert np.hypot(fit["x"] - 60.3, fit["y"] - 59.7) < 0.3


def test_fit_accuracy_over_random_trails():
    """The figures of docs/alerts.md: 40 trails of 5-30 px at S/N ~ 100-300."""
    rng = np.random.default_rng(5)
    dl, da, df = [], [], []
    for k in range(40):
        length, angle = rng.uniform(5, 30), rng.uniform(-90, 90)
        fit = _fit(length, angle, 25000.0, seed=1000 + k)
        dl.append(fit["length"] / length - 1)
        da.append(_angle_error(fit["theta"], angle))
        df.append(fit["flux"] / 25000.0 - 1)
    dl, da, df = np.array(dl), np.array(da), np.array(df)
    assert abs(np.median(dl)) < 0.02 and np.std(dl) < 0.03
    assert abs(np.median(da)) < 0.5 and np.std(da) < 1.0
    assert abs(np.median(df)) < 0.02 and np.std(df) < 0.02


def test_point_source_has_a_length_consistent_with_zero():
    for seed in range(4):
        fit = _fit(0.0, 0.0, 30000.0, seed=300 + seed)
        # zero length is a boundary: the fitted length is within noise of it
        assert fit["length"] < 0.25 * FWHM
        assert fit["dchi2_point"] < 9.0  # a zero length is within 3 sigma
        assert fit["flux"] == pytest.approx(30000.0, rel=0.05)


def _scene(edge_trail=True, seed=1, shape=(200, 200)):
    img = np.zeros(shape)
    add_trail(img, (60.2, 70.7), 20.0, 30.0, 20000.0)
    add_stars(img, [150.3], [50.6], [10000.0], FWHM)
    if edge_trail:
        add_trail(img, (3.0, 140.0), 16.0, 0.0, 15000.0)  # runs off the left edge
    img += np.random.default_rng(seed).normal(0, NOISE, shape)
    wcs = make_wcs(shape)
    exp = exposure_from(img, np.full(shape, NOISE**2), wcs=wcs, psf=gaussian_psf(FWHM))
    det = detect_sources(exp)
    return exp, measure_sources(exp, exp, exp, det, visit=1, detector=0, band="r", mjd=6e4)


def _row(tab, x, y):
    return tab[int(np.argmin(np.hypot(tab["x"] - x, tab["y"] - y)))]


def test_measure_sources_fits_trails_and_not_point_sources():
    exp, tab = _scene()
    scale = float(np.sqrt(abs(np.linalg.det(exp.wcs.pixel_scale_matrix)))) * 3600.0
    trail = _row(tab, 60.2, 70.7)
    assert trail["trailNdata"] > 100 and not trail["trail_flag"] and not trail["trail_flag_edge"]
    assert trail["trailLength"] == pytest.approx(20.0 * scale, rel=0.05)
    # make_wcs: +x is west, +y north; an axis 30 deg from +x towards +y has a bearing
    # of 300 deg, i.e. 120 on [0, 180)
    assert trail["trailAngle"] == pytest.approx(120.0, abs=2.0)
    assert trail["trailFlux"] == pytest.approx(20000.0 * float(exp.ap_corr), rel=0.05)
    assert trail["trailChi2"] / trail["trailNdata"] == pytest.approx(1.0, abs=0.2)
    ra, dec = exp.wcs.pixel_to_world_values(60.2, 70.7)
    assert abs(trail["trailRa"] - ra) * 3600 < 0.1 and abs(trail["trailDec"] - dec) * 3600 < 0.1
    assert 0 < trail["trailRaErr"] * 3600 < 0.05 and 0 < trail["trailLengthErr"] < 0.2 * scale
    star = _row(tab, 150.3, 50.6)
    assert star["trailNdata"] == 0 and not star["trail_flag"] and not star["trail_flag_edge"]
    assert np.isnan(star["trailLength"]) and np.isnan(star["trailFlux"])


def test_trail_crossing_the_edge_sets_trail_flag_edge():
    _, tab = _scene()
    edge = _row(tab, 3.0, 140.0)
    assert edge["trailNdata"] > 0 and edge["trail_flag_edge"]
    assert tab["trail_flag_edge"].sum() == 1


def test_edge_check_of_a_trail_ending_at_the_last_column():
    """The model's box rounds outwards: one ending within a pixel of the last column or
    row is checked on the pixels that exist (it indexed one past them and raised)."""
    shape = (60, 80)
    mask = np.zeros(shape, np.uint32)
    reach = SIGMA * np.sqrt(-2.0 * np.log(_EDGE_LEVEL))
    x1, y1 = 79.4 - reach, 58.9 - reach  # inside by 0.1 px: not off the image
    fit = {"x0": x1 - 12.0, "y0": y1 - 9.0, "x1": x1, "y1": y1,
           "x": x1 - 6.0, "y": y1 - 4.5}  # fmt: skip
    assert not trail_on_edge(exposure_from(np.zeros(shape), np.ones(shape), mask=mask), fit, SIGMA)
    mask[-2:, :] |= MASK["EDGE"]
    mask[:, -2:] |= MASK["EDGE"]
    assert trail_on_edge(exposure_from(np.zeros(shape), np.ones(shape), mask=mask), fit, SIGMA)


def test_a_runaway_fit_is_flagged_not_used(monkeypatch):
    """A fit whose length exceeds its box's diagonal (seen on a NIRCam cluster field:
    20,000 px, and a 2-GB grid for its flux correction) is a failed fit: trail_flag."""
    real = trail.fit_trail

    def runaway(*args, **kwargs):
        fit = real(*args, **kwargs)
        if fit is not None and np.hypot(fit["x"] - 60.2, fit["y"] - 70.7) < 3:
            ex, ey = 1e4, 5e3  # the end points of a 22,000-px segment about the centre
            fit = {**fit, "length": 2 * np.hypot(ex, ey), "x0": fit["x"] - ex,
                   "x1": fit["x"] + ex, "y0": fit["y"] - ey, "y1": fit["y"] + ey}  # fmt: skip
        return fit

    monkeypatch.setattr(trail, "fit_trail", runaway)
    _, tab = _scene(edge_trail=False)
    row = _row(tab, 60.2, 70.7)
    assert row["trail_flag"] and row["trailNdata"] == 0 and np.isnan(row["trailLength"])
    assert trail.psf_flux_ratio(gaussian_psf(FWHM), SIGMA, {"x0": 0.0, "x1": 2e4, "y0": 0.0,
                                                            "y1": 1e4}) == 1.0  # fmt: skip


def test_is_elongated_selects_trails_against_the_psf():
    assert not is_elongated(3.0, 3.0, 0.0, 3.0, 3.0)
    assert is_elongated(8.0, 3.0, 0.0, 3.0, 3.0)
    assert is_elongated(3.0, 3.0, 2.0, 3.0, 3.0)  # elongated along the diagonal
    assert not is_elongated(np.nan, 3.0, 0.0, 3.0, 3.0)


def test_negative_trail_is_fitted_with_a_negative_flux():
    """An asteroid in the template: a negative trail on the difference image."""
    shape = (120, 120)
    img = np.zeros(shape)
    add_trail(img, (60.4, 59.6), 18.0, -30.0, -20000.0)
    img += np.random.default_rng(8).normal(0, NOISE, shape)
    exp = exposure_from(img, np.full(shape, NOISE**2), wcs=make_wcs(shape), psf=gaussian_psf(FWHM))
    tab = measure_sources(
        exp, exp, exp, detect_sources(exp), visit=1, detector=0, band="r", mjd=6e4
    )
    row = _row(tab, 60.4, 59.6)
    scale = float(np.sqrt(abs(np.linalg.det(exp.wcs.pixel_scale_matrix)))) * 3600.0
    assert row["isNegative"] and row["trailNdata"] > 0 and not row["trail_flag"]
    assert row["trailFlux"] == pytest.approx(-20000.0 * float(exp.ap_corr), rel=0.05)
    assert row["trailLength"] == pytest.approx(18.0 * scale, rel=0.05)
    # -30 deg from +x (west) towards +y (north): the axis points west-south-west,
    # bearing 240, i.e. 60 on [0, 180)
    assert row["trailAngle"] == pytest.approx(60.0, abs=2.0)


def _winged(img, xs, ys, fluxes):
    """A PSF with 20 % of its light in wide wings (FWHM 4 and 10 px)."""
    add_stars(img, xs, ys, 0.8 * np.asarray(fluxes), FWHM, half=20)
    add_stars(img, xs, ys, 0.2 * np.asarray(fluxes), 10.0, half=20)


@pytest.mark.parametrize("length", [0.0, 8.0, 25.0])
def test_flux_is_on_the_psf_scale_for_a_non_gaussian_psf(length):
    """The Gaussian model misses a winged PSF's wings (about -8 % of the flux); the
    ratio of the model to the real PSF ⊗ segment puts the flux back on its scale."""
    psf = np.zeros((41, 41))
    _winged(psf, [20], [20], [1.0])
    psf /= psf.sum()
    shape, flux, a = (160, 160), 30000.0, 0.5
    img = np.zeros(shape)
    m = max(int(8 * length), 1)
    t = (np.arange(m) + 0.5) / m - 0.5 if length else np.zeros(1)
    _winged(img, 80.3 + length * t * np.cos(a), 79.6 + length * t * np.sin(a), np.full(m, flux / m))
    img += np.random.default_rng(int(length)).normal(0, NOISE, shape)
    sigma = psf_sigma(psf)
    h = int(0.5 * length + 4 * sigma) + 1
    box = (80 - h, 81 + h, 80 - h, 81 + h)
    fit = fit_trail(img, np.full(shape, NOISE**2), np.zeros(shape, np.uint32), box, sigma)
    assert fit["flux"] < 0.95 * flux  # the Gaussian model alone
    ratio = psf_flux_ratio(psf, sigma, fit)
    assert fit["flux"] / ratio == pytest.approx(flux, rel=0.03)
    assert psf_flux_ratio(gaussian_psf(FWHM), SIGMA, fit) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "t", [(10.2, 9.1, 2.5, -1.5), (10.0, 9.0, 1e-4, 0.0), (9.0, 11.0, -6.0, 0.3)]
)
def test_veres_fit_kernel_equals_numpy_model(t):
    """The numba pass: the model of veres_model, the best flux, the weighted residuals
    and derivatives equal to central differences of the model (point limit included)."""
    from apdask._kernels.trail import veres_fit

    rng = np.random.default_rng(0)
    n, sigma = 300, 1.7
    x, y = rng.uniform(0, 20, n), rng.uniform(0, 20, n)
    d = rng.normal(size=n) + 50 * veres_model(x, y, (10, 9, 3, -2), sigma)
    w = rng.uniform(0.5, 2.0, n)
    t = np.array(t)
    m, dm, r = np.empty(n), np.empty((n, 4)), np.empty(n)
    flux = veres_fit(x, y, d, w, t, sigma, m, dm, r, True)
    want = veres_model(x, y, t, sigma)
    np.testing.assert_allclose(m, want, rtol=1e-12, atol=1e-15)
    f = (w * want * d).sum() / (w * want * want).sum()
    assert flux == pytest.approx(f, rel=1e-12)
    np.testing.assert_allclose(r, (d - f * want) * np.sqrt(w), rtol=1e-10, atol=1e-12)
    num = [
        (veres_model(x, y, t + e, sigma) - veres_model(x, y, t - e, sigma)) / 2e-6
        for e in np.eye(4) * 1e-6
    ]
    np.testing.assert_allclose(dm, np.column_stack(num), rtol=0, atol=1e-8 * np.abs(m).max())


@pytest.mark.parametrize("max_nfev", [200, 4])
@pytest.mark.parametrize(
    ("length", "flux", "seed"), [(20.0, 3e4, 1), (0.0, 3e3, 2), (6.0, 600.0, 3)]
)
def test_levenberg_marquardt_is_least_squares_lm_bit_for_bit(length, flux, seed, max_nfev):
    """The MINPACK call through leastsq takes least_squares(method="lm")'s steps: the
    same solution and success, on trails, points, faint sources and stopped fits."""
    from scipy.optimize import least_squares

    shape = (80, 80)
    img = np.zeros(shape)
    add_trail(img, (40.2, 39.6), length, 30.0, flux)
    img += np.random.default_rng(seed).normal(0, NOISE, shape)
    yy, xx = np.mgrid[20:60, 20:60]
    x, y, d = xx.ravel().astype(float), yy.ravel().astype(float), img[20:60, 20:60].ravel()
    w = np.full(len(d), 1.0 / NOISE**2)
    t0 = np.array([40.0, 40.0, 3.0, 1.0])
    ref = trail._Residuals(x, y, d, w, SIGMA)
    want = least_squares(ref.residuals, t0, jac=ref.jacobian, method="lm", x_scale=1.0,
                         max_nfev=max_nfev)  # fmt: skip
    assert want.success == (max_nfev == 200)
    t, success = trail._levenberg_marquardt(trail._Residuals(x, y, d, w, SIGMA), t0, max_nfev)
    np.testing.assert_array_equal(t, want.x)
    assert success == want.success
