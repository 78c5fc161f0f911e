"""apdask.foreign: calibrated FITS from any instrument into an Exposure, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from apdask.core.exposure import MASK
from apdask.exceptions import (
    EmptyImageError,
    NoCelestialWcsError,
    NoOverlapError,
    PartialCoverageWarning,
    UnknownUnitsError,
)
from apdask.io.foreign import read_exposure
from apdask.pipeline.register import match_template, same_grid
from tests._pixels import add_stars, make_wcs

SHAPE = (128, 128)


def _field(seed=0, sky_sigma=10.0, gain=4.0):
    rng = np.random.default_rng(seed)
    truth = np.zeros(SHAPE)
    add_stars(truth, [40.0, 90.0, 64.0], [40.0, 80.0, 100.0], [5e4, 2e4, 1e4], 4.0)
    img = truth + rng.normal(0, 1, SHAPE) * np.sqrt(sky_sigma**2 + truth / gain)
    return img, truth


def _write(path, img, wcs=None, **cards):
    head = (wcs or make_wcs(SHAPE)).to_header()
    for k, v in cards.items():
        head[k.replace("_", "-") if k == "MJD_OBS" else k] = v
    fits.PrimaryHDU(np.asarray(img, np.float32), head).writeto(path)
    return path


def test_counts_with_gain_and_zero_point(tmp_path):
    img, truth = _field()
    p = _write(tmp_path / "a.fits", img, GAIN=4.0, SATURATE=2000.0, MAGZERO=30.0, FILTER="r SDSS",
               MJD_OBS=60000.5)  # fmt: skip
    e = read_exposure(p)
    scale = 10 ** (-0.4 * (30.0 - 31.4))
    assert e.meta["unit"] == "nJy" and e.meta["band"] == "r" and e.meta["mjd"] == 60000.5
    np.testing.assert_allclose(e.image, img.astype(np.float32) * scale, rtol=1e-5)
    # variance from the measured sky noise plus source counts / gain
    sky = np.hypot(*np.indices(SHAPE) - np.array([[[100]], [[64]]])) > 20
    assert np.median(e.variance[sky]) / scale**2 == pytest.approx(100.0, rel=0.15)
    core = e.variance[40, 40] / scale**2
    assert core == pytest.approx(100.0 + truth[40, 40] / 4.0, rel=0.2)
    # saturation: the brightest star's core (peak ~ 5e4 / (2π 1.7²) > 2000), grown by 1
    assert e.mask[40, 40] & MASK["SAT"] and e.mask[40, 42] & MASK["SAT"]
    assert not e.mask[100, 64] & MASK["SAT"]


def test_counts_without_zero_point_stay_in_counts(tmp_path):
    img, _ = _field()
    e = read_exposure(_write(tmp_path / "a.fits", img), gain=2.0)
    assert e.meta["unit"] == "count" and e.meta["flux_scale"] is None and e.meta["gain"] == 2.0
    np.testing.assert_allclose(e.image, img.astype(np.float32))


def test_mjy_per_sr_with_noise_map(tmp_path):
    img, _ = _field()
    noise = np.full(SHAPE, 10.0)
    fits.PrimaryHDU(noise.astype(np.float32)).writeto(tmp_path / "n.fits")
    p = _write(tmp_path / "a.fits", img, BUNIT="MJy/sr", PIXAR_SR=2.25e-14)
    e = read_exposure(p, noise=tmp_path / "n.fits")
    s = 1e15 * 2.25e-14
    np.testing.assert_allclose(e.image, img.astype(np.float32) * s, rtol=1e-5)
    np.testing.assert_allclose(e.variance, (10.0 * s) ** 2, rtol=1e-5)
    assert e.meta["variance_source"] == "noise map"


def test_multi_extension_image_variance_mask(tmp_path):
    img, _ = _field()
    head = make_wcs(SHAPE).to_header()
    mask = np.zeros(SHAPE, np.int32)
    mask[5, 7] = 4
    img[9, 9] = np.nan
    hdus = fits.HDUList([
        fits.PrimaryHDU(header=fits.Header([("MAGZERO", 31.4), ("BUNIT", "nJy")])),
        fits.ImageHDU(img.astype(np.float32), head, name="IMAGE"),
        fits.ImageHDU(np.full(SHAPE, 100.0, np.float32), head, name="VARIANCE"),
        fits.ImageHDU(mask, head, name="MASK"),
    ])  # fmt: skip
    hdus.writeto(tmp_path / "calexp.fits")
    e = read_exposure(tmp_path / "calexp.fits")
    assert e.meta["variance_source"] == "variance plane"
    assert e.mask[5, 7] & MASK["BAD"] and e.mask[9, 9] & MASK["NO_DATA"] and e.image[9, 9] == 0
    np.testing.assert_allclose(e.variance, 100.0)


def test_bad_inputs_name_problem_and_fix(tmp_path):
    img, _ = _field()
    fits.PrimaryHDU(img.astype(np.float32)).writeto(tmp_path / "nowcs.fits")
    with pytest.raises(NoCelestialWcsError, match="no celestial WCS.*TAN"):
        read_exposure(tmp_path / "nowcs.fits")
    with pytest.raises(UnknownUnitsError, match="unknown image unit 'furlong'.*--unit"):
        read_exposure(_write(tmp_path / "u.fits", img, BUNIT="furlong"))
    with pytest.raises(UnknownUnitsError, match="contradicts"):
        read_exposure(_write(tmp_path / "v.fits", img, BUNIT="MJy/sr"), unit="adu")
    with pytest.raises(EmptyImageError, match="NaN"):
        read_exposure(_write(tmp_path / "nan.fits", np.full(SHAPE, np.nan)))
    with pytest.raises(EmptyImageError, match="zero variance"):
        read_exposure(_write(tmp_path / "flat.fits", np.zeros(SHAPE)))
    with pytest.raises(EmptyImageError, match="zero"):
        read_exposure(_write(tmp_path / "z.fits", img), variance=np.zeros(SHAPE))
    assert EmptyImageError.exit_code == 65 and NoOverlapError.exit_code == 66


def test_registration_same_grid_left_alone_else_resampled(tmp_path):
    img, _ = _field()
    sci = read_exposure(_write(tmp_path / "s.fits", img, GAIN=1.0))
    same = read_exposure(_write(tmp_path / "t.fits", img, GAIN=1.0))
    out = match_template(same, sci)
    assert out.meta["resampled"] is False and out.image is same.image
    # shifted by 3.5 px in x: resampled onto the science grid
    w = make_wcs(SHAPE, crpix=((SHAPE[1] - 1) / 2 + 1 + 3.5, (SHAPE[0] - 1) / 2 + 1))
    moved = read_exposure(_write(tmp_path / "m.fits", img, wcs=w, GAIN=1.0))
    assert not same_grid(moved, sci)
    out = match_template(moved, sci)
    assert out.meta["resampled"] is True and out.shape == sci.shape
    assert 0.9 < out.meta["coverage"] < 1.0
    # template pixel x is science x + 3.5: its star at template x = 40 lands at 36.5
    row = out.image[40, 30:60]
    assert 30 + np.argmax(row) in (36, 37)


def test_partial_coverage_warns_and_masks_no_overlap_raises(tmp_path):
    img, _ = _field()
    sci = read_exposure(_write(tmp_path / "s.fits", img))
    half = make_wcs(SHAPE, crpix=((SHAPE[1] - 1) / 2 + 1 + 90, (SHAPE[0] - 1) / 2 + 1))
    part = read_exposure(_write(tmp_path / "p.fits", img, wcs=half))
    with pytest.warns(PartialCoverageWarning, match="covers only"):
        out = match_template(part, sci)
    nodata = (out.mask & MASK["NO_DATA"]) != 0
    assert 0.5 < nodata.mean() < 0.8 and np.all(out.image[nodata] == 0)
    far = read_exposure(_write(tmp_path / "f.fits", img, wcs=make_wcs(SHAPE, dec=30.0)))
    with pytest.raises(NoOverlapError, match="does not overlap"):
        match_template(far, sci)
