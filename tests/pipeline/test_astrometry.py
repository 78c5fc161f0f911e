"""Tests of apdask.pipeline.astrometry.refine_wcs on synthetic star fields."""

from __future__ import annotations

import numpy as np
import pytest

from apdask.pipeline.astrometry import refine_wcs
from tests._pixels import make_wcs, sky_exposure, star_field

SHAPE = (1500, 1500)


@pytest.fixture(scope="module")
def field():
    true = make_wcs(SHAPE, rot_deg=0.04)
    xs, ys, fl = star_field(SHAPE, 600, 5, fmin=3e3, fmax=3e5)
    exp = sky_exposure(SHAPE, xs, ys, fl, 5.0, seed=6)
    ra, dec = true.pixel_to_world_values(xs, ys)
    return exp, xs, ys, fl, ra, dec


@pytest.mark.parametrize(("dra", "ddec"), [(2.0, -1.5), (-0.4, 0.3), (3.5, 2.0)])
def test_recovers_shift_and_rotation(field, dra, ddec):
    exp, xs, ys, fl, ra, dec = field
    pred = make_wcs(SHAPE)
    pred.wcs.crval = [150.0 + dra / 3600 / np.cos(np.deg2rad(2.0)), 2.0 + ddec / 3600]
    exp = exp.copy_with(wcs=pred)
    wcs, info = refine_wcs(exp, ra, dec, ref_flux=fl)
    assert info["ok"]
    assert info["n_matched"] > 100
    assert info["rms_arcsec"] < 0.03
    assert info["shift_arcsec"] == pytest.approx(np.hypot(dra, ddec), abs=0.3)
    assert info["rotation_deg"] == pytest.approx(-0.04, abs=0.005)
    x2, y2 = wcs.world_to_pixel_values(ra, dec)
    err = np.hypot(x2 - xs, y2 - ys) * 0.2
    assert np.sqrt(np.mean(err**2)) < 0.03


def test_too_few_matches_returns_input(field):
    exp, xs, ys, fl, ra, dec = field
    pred = make_wcs(SHAPE)
    exp = exp.copy_with(wcs=pred)
    # references far away from the CCD
    wcs, info = refine_wcs(exp, ra[:3] + 1.0, dec[:3])
    assert wcs is pred
    assert not info["ok"]
    assert info["n_matched"] < 5
    assert np.isnan(info["rms_arcsec"])
