"""Tests of apdask.pipeline.measure.dipole: the two-PSF fit of dipoles."""

from __future__ import annotations

import numpy as np
import pytest

from apdask.pipeline.measure.detection import detect_sources
from apdask.pipeline.measure.dipole import fit_dipole
from apdask.pipeline.measure.sources import measure_sources
from tests._pixels import add_stars, exposure_from, gaussian_psf, make_wcs

FWHM = 4.0
SIGMA = 10.0
SHAPE = (120, 120)


def _dipole(sep, angle_deg, f_pos, f_neg, seed, centre=(60.3, 59.8)):
    """A synthetic difference image with one dipole: ``(exposure, (x+, y+), (x-, y-))``."""
    rng = np.random.default_rng(seed)
    a = np.deg2rad(angle_deg)
    dx, dy = 0.5 * sep * np.cos(a), 0.5 * sep * np.sin(a)
    pos, neg = (centre[0] + dx, centre[1] + dy), (centre[0] - dx, centre[1] - dy)
    img = np.zeros(SHAPE)
    add_stars(img, [pos[0]], [pos[1]], [f_pos], FWHM)
    add_stars(img, [neg[0]], [neg[1]], [-f_neg], FWHM)
    img += rng.normal(0, SIGMA, SHAPE)
    exp = exposure_from(img, np.full(SHAPE, SIGMA**2), wcs=make_wcs(SHAPE), psf=gaussian_psf(FWHM))
    return exp, pos, neg


@pytest.mark.parametrize(
    ("sep", "angle", "f_pos", "f_neg"),
    [(2.0, 30.0, 20000.0, 15000.0), (3.0, 200.0, 12000.0, 12000.0),
     (5.0, 95.0, 8000.0, 10000.0), (10.0, 300.0, 6000.0, 6000.0)],
)  # fmt: skip
def test_fit_recovers_injected_separation_and_fluxes(sep, angle, f_pos, f_neg):
    exp, pos, neg = _dipole(sep, angle, f_pos, f_neg, seed=int(sep * 10))
    # start from positions off by a few tenths of a pixel, as detection centroids are
    start_p = (pos[0] + 0.4, pos[1] - 0.3)
    start_n = (neg[0] - 0.3, neg[1] + 0.4)
    fit = fit_dipole(exp, gaussian_psf(FWHM), start_p, start_n)
    assert fit is not None
    got = np.hypot(fit["x_pos"] - fit["x_neg"], fit["y_pos"] - fit["y_neg"])
    assert got == pytest.approx(sep, abs=0.2)
    assert fit["flux_pos"] == pytest.approx(f_pos, rel=0.05)
    assert fit["flux_neg"] == pytest.approx(f_neg, rel=0.05)
    # the errors are honest: the fitted fluxes lie within 4 sigma of the truth
    assert abs(fit["flux_pos"] - f_pos) < 4 * fit["err_pos"]
    assert fit["chi2"] / fit["ndata"] == pytest.approx(1.0, abs=0.25)


def test_measure_sources_fills_both_lobes_with_one_fit():
    """Through the pipeline's measurement: both lobes carry the same dipole fit, in
    arcsec and as a bearing from the negative to the positive lobe."""
    exp, pos, neg = _dipole(6.0, 0.0, 9000.0, 7000.0, seed=3)
    det = detect_sources(exp)
    tab = measure_sources(exp, exp, exp, det, visit=1, detector=0, band="r", mjd=60000.0)
    lobes = tab[tab["dipoleFitAttempted"]]
    assert len(lobes) == 2 and set(lobes["isNegative"]) == {True, False}
    assert np.all(lobes["isDipole"])
    for c in ("dipoleMeanFlux", "dipoleFluxDiff", "dipoleLength", "dipoleAngle", "dipoleNdata"):
        assert lobes[c][0] == lobes[c][1]
    row = lobes[0]
    scale = float(np.sqrt(abs(np.linalg.det(exp.wcs.pixel_scale_matrix)))) * 3600.0
    assert row["dipoleLength"] == pytest.approx(6.0 * scale, abs=0.2 * scale)
    assert row["dipoleMeanFlux"] == pytest.approx(8000.0, rel=0.05)
    assert row["dipoleFluxDiff"] == pytest.approx(2000.0, abs=3 * float(row["dipoleFluxDiffErr"]))
    # make_wcs: +x is west (RA decreases), so the positive lobe at +x lies at bearing 270
    assert row["dipoleAngle"] == pytest.approx(270.0, abs=3.0)
    assert row["dipoleNdata"] > 50


def test_sources_without_a_second_lobe_get_no_fit():
    exp, *_ = _dipole(40.0, 0.0, 9000.0, 9000.0, seed=4)  # two lone sources, far apart
    det = detect_sources(exp)
    tab = measure_sources(exp, exp, exp, det, visit=1, detector=0, band="r", mjd=60000.0)
    assert len(tab) == 2
    assert not tab["dipoleFitAttempted"].any() and not tab["isDipole"].any()
    assert np.all(np.isnan(tab["dipoleMeanFlux"])) and np.all(tab["dipoleNdata"] == 0)
