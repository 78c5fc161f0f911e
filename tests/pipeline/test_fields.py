"""Tests of apdask.pipeline.measure.fields: flags, psfLnL, extendedness, ra_dec_Cov."""

from __future__ import annotations

import numpy as np
import pytest

from apdask.core.exposure import MASK
from apdask.pipeline.measure.detection import detect_sources
from apdask.pipeline.measure.fields import FIELD_COLUMNS, extendedness
from apdask.pipeline.measure.sources import measure_sources
from tests._pixels import add_stars, exposure_from, gaussian_psf, make_wcs

FWHM = 4.0
SIGMA = 10.0
SHAPE = (200, 200)


@pytest.fixture(scope="module")
def measured():
    """Point sources, one extended source, one with a SUSPECT pixel, one at the edge."""
    rng = np.random.default_rng(5)
    img = np.zeros(SHAPE)
    add_stars(img, [50.2, 150.4, 100.0], [50.3, 50.1, 150.0], [8000.0, 6000.0, 7000.0], FWHM)
    add_stars(img, [150.0], [150.0], [30000.0], 3.0 * FWHM, half=25)  # extended
    add_stars(img, [5.0], [100.0], [8000.0], FWHM)  # 5 px from the left edge
    img += rng.normal(0, SIGMA, SHAPE)
    mask = np.zeros(SHAPE, np.uint32)
    mask[150, 100] |= MASK["SUSPECT"]
    wcs = make_wcs(SHAPE, rot_deg=30.0)
    exp = exposure_from(img, np.full(SHAPE, SIGMA**2), wcs=wcs, psf=gaussian_psf(FWHM), mask=mask)
    det = detect_sources(exp)
    tab = measure_sources(exp, exp, exp, det, visit=1, detector=0, band="r", mjd=60000.0)
    return exp, tab


def _at(tab, x, y):
    return tab[int(np.argmin(np.hypot(tab["x"] - x, tab["y"] - y)))]


def test_every_added_flag_is_a_boolean_and_columns_are_present(measured):
    _, tab = measured
    assert set(FIELD_COLUMNS) <= set(tab.colnames)
    for c in tab.colnames:
        if c.startswith("pixelFlags") or "_flag" in c or c == "dipoleFitAttempted":
            assert tab[c].dtype == bool, c


def test_extendedness_separates_point_and_extended_sources(measured):
    _, tab = measured
    for x, y in ((50.2, 50.3), (150.4, 50.1), (100.0, 150.0)):
        assert _at(tab, x, y)["extendedness"] == 0.0
    assert _at(tab, 150.0, 150.0)["extendedness"] == 1.0
    assert extendedness([1.0, 1.5, 2.0, np.nan])[:3].tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_pixel_flags_follow_the_mask_planes(measured):
    _, tab = measured
    sus = _at(tab, 100.0, 150.0)
    assert sus["pixelFlags_suspect"] and sus["pixelFlags_suspectCenter"]
    assert not _at(tab, 50.2, 50.3)["pixelFlags_suspect"]
    assert not tab["pixelFlags_offimage"].any() and not tab["pixelFlags_streak"].any()
    edge = _at(tab, 5.0, 100.0)
    assert edge["apFlux_flag_apertureTruncated"] and edge["apFlux_flag"]
    assert not _at(tab, 50.2, 50.3)["apFlux_flag_apertureTruncated"]


def test_psf_lnl_is_the_gaussian_likelihood_of_the_fit(measured):
    _, tab = measured
    row = _at(tab, 50.2, 50.3)
    expected = -0.5 * (row["psfChi2"] + row["psfNdata"] * np.log(2 * np.pi * SIGMA**2))
    assert row["psfLnL"] == pytest.approx(expected, rel=1e-5)
    assert not row["psfFlux_flag_noGoodPixels"] and not row["shape_flag"]
    assert not row["forced_PsfFlux_flag"]


def test_ra_dec_cov_follows_the_rotated_wcs(measured):
    exp, tab = measured
    row = _at(tab, 50.2, 50.3)
    cd = exp.wcs.pixel_scale_matrix
    cov = cd @ np.diag([row["xErr"] ** 2, row["yErr"] ** 2]) @ cd.T
    assert row["ra_dec_Cov"] == pytest.approx(cov[0, 1], rel=1e-4)
    assert row["ra_dec_Cov"] != 0.0
