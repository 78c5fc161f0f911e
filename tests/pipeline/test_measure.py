"""Tests of apdask.detect: detection, DiaSource measurement, forced photometry, cutouts."""

from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.nddata import CCDData, VarianceUncertainty

from apdask.core.exposure import MASK
from apdask.pipeline.measure.cutouts import cutout_size
from apdask.pipeline.measure.detection import detect_sources
from apdask.pipeline.measure.photometry import forced_photometry
from apdask.pipeline.measure.sources import DIASOURCE_COLUMNS, measure_sources
from apdask.pipeline.psf import estimate_psf
from tests._pixels import add_stars, exposure_from, gaussian_psf, make_wcs
from tests.oracles import make_cutout

SHAPE = (800, 800)
FWHM = 5.0
SIGMA = 30.0  # background noise per pixel


def make_scene():
    """Difference, science and template exposures with known injected sources."""
    rng = np.random.default_rng(11)
    # a grid of isolated sources, alternating signs, fluxes giving SNR ~ 15..80
    gx, gy = np.meshgrid(np.arange(60, 760, 70.0), np.arange(60, 760, 70.0))
    xs = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    ys = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    fl = 4000 * 15 ** rng.uniform(0, 1, xs.size) * np.where(np.arange(xs.size) % 3 == 0, -1, 1)
    truth = np.zeros(SHAPE)
    add_stars(truth, xs, ys, fl, FWHM)
    # a dipole pair near (400, 30)
    add_stars(truth, [397.0, 403.0], [30.0, 30.0], [9000.0, -9000.0], FWHM)
    var = np.full(SHAPE, SIGMA**2)
    img = truth + rng.normal(0, SIGMA, SHAPE)
    mask = np.zeros(SHAPE, np.uint32)
    # a masked cosmic ray and a masked bad column
    img[745:748, 20:23] += 5000.0
    mask[745:748, 20:23] |= MASK["CR"]
    img[:, 790] += 3000.0
    mask[:, 790] |= MASK["BAD"]
    w = make_wcs(SHAPE)
    diff = exposure_from(img, var, wcs=w, psf=gaussian_psf(FWHM), mask=mask)
    # science: the same sources (abs flux) on sky; template: empty
    sci_img = 900 + np.abs(truth) + rng.normal(0, 1, SHAPE) * np.sqrt(900 + np.abs(truth))
    sci = exposure_from(sci_img, 900 + np.abs(truth), wcs=w, psf=gaussian_psf(FWHM))
    tpl = exposure_from(rng.normal(0, 3, SHAPE), np.full(SHAPE, 9.0), wcs=w, psf=gaussian_psf(FWHM))
    return diff, sci, tpl, xs, ys, fl


@pytest.fixture(scope="module")
def scene():
    return make_scene()


@pytest.fixture(scope="module")
def measured(scene):
    diff, sci, tpl, *_ = scene
    det = detect_sources(diff)
    tab = measure_sources(diff, sci, tpl, det, visit=3, detector=5, band="g", mjd=60123.5)
    return det, tab


def _match(tab, x, y):
    d = np.hypot(tab["x"] - x, tab["y"] - y)
    i = int(np.argmin(d))
    return i, d[i]


def test_detects_positive_and_negative(scene, measured):
    diff, sci, tpl, xs, ys, fl = scene
    det, tab = measured
    assert set(DIASOURCE_COLUMNS) <= set(tab.colnames)
    assert "diaSourceId" not in tab.colnames
    assert len(tab) == len(xs) + 2  # grid + dipole lobes, nothing from the CR or bad column
    for x, y, f in zip(xs, ys, fl, strict=True):
        i, d = _match(tab, x, y)
        assert d * 0.2 < 0.1  # arcsec
        assert bool(tab["isNegative"][i]) == (f < 0)
        assert not tab["isDipole"][i]


def test_fluxes_and_pulls(scene, measured):
    diff, sci, tpl, xs, ys, fl = scene
    det, tab = measured
    pulls, rel = [], []
    for x, y, f in zip(xs, ys, fl, strict=True):
        i, _ = _match(tab, x, y)
        snr = tab["snr"][i] * np.sign(f)
        if snr > 20:
            rel.append(tab["psfFlux"][i] / f - 1)
        if snr > 100:  # 3 % is > 3 sigma here
            assert tab["psfFlux"][i] == pytest.approx(f, rel=0.03)
        pulls.append((tab["psfFlux"][i] - f) / tab["psfFluxErr"][i])
        assert tab["apFlux"][i] == pytest.approx(f, rel=0.15, abs=5 * tab["apFluxErr"][i])
        assert tab["scienceFlux"][i] == pytest.approx(abs(f), abs=4 * tab["scienceFluxErr"][i])
        assert abs(tab["templateFlux"][i]) < 5 * tab["templateFluxErr"][i]
    assert len(rel) > 50
    assert abs(np.mean(rel)) < 0.01  # no flux bias at SNR > 20
    assert np.percentile(np.abs(rel), 68) < 0.03
    pulls = np.array(pulls)
    assert abs(np.mean(pulls)) < 0.35
    assert np.std(pulls) == pytest.approx(1.0, abs=0.3)
    xpull = [(tab["x"][_match(tab, x, y)[0]] - x) / tab["xErr"][_match(tab, x, y)[0]]
             for x, y in zip(xs, ys, strict=True)]  # fmt: skip
    assert np.std(xpull) == pytest.approx(1.0, abs=0.35)


def test_columns_and_moments(scene, measured):
    diff, *_ = scene
    det, tab = measured
    assert (tab["visit"] == 3).all() and (tab["detector"] == 5).all()
    assert (tab["band"] == "g").all() and (tab["midpointMjdTai"] == 60123.5).all()
    good = ~tab["isDipole"] & (np.abs(tab["snr"]) > 30)
    sig2 = (FWHM / 2.3548) ** 2
    assert np.median(tab["ixx"][good]) == pytest.approx(sig2, rel=0.15)
    assert np.median(tab["iyy"][good]) == pytest.approx(sig2, rel=0.15)
    assert tab["ixxPSF"][0] == pytest.approx(sig2 + 1 / 12, rel=0.05)
    assert (tab["bboxSize"] > 0).all()
    assert not tab["trail_flag"].any()
    ra, dec = diff.wcs.pixel_to_world_values(tab["x"], tab["y"])
    np.testing.assert_allclose(tab["dec"], dec)
    assert np.all(tab["decErr"] > 0) and np.all(tab["raErr"] > 0)


def test_dipole_flagged(measured):
    det, tab = measured
    sel = tab["isDipole"]
    assert sel.sum() == 2
    assert sorted(tab["isNegative"][sel]) == [False, True]
    assert (tab["dipoleNdata"][sel] > 0).all()


def test_masked_pixels_not_detected(measured):
    det, tab = measured
    assert not np.any((np.abs(tab["x"] - 21) < 5) & (np.abs(tab["y"] - 746) < 5))
    assert not np.any(np.abs(tab["x"] - 790) < 3)


def test_empty_detections(scene):
    diff, sci, tpl, *_ = scene
    quiet = diff.copy_with(image=np.zeros(SHAPE, np.float32))
    det = detect_sources(quiet)
    assert len(det) == 0
    tab = measure_sources(quiet, sci, tpl, det, visit=1, detector=0, band="r", mjd=6e4)
    assert len(tab) == 0 and set(DIASOURCE_COLUMNS) <= set(tab.colnames)


def test_forced_photometry(scene):
    diff, sci, tpl, xs, ys, fl = scene
    ra, dec = diff.wcs.pixel_to_world_values(xs[:10], ys[:10])
    ra = np.append(ra, 10.0)  # off the CCD
    dec = np.append(dec, 10.0)
    tab = forced_photometry(diff, sci, ra, dec)
    assert tab.colnames == ["psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr", "x", "y",
                            "flag_edge"]  # fmt: skip
    np.testing.assert_allclose(tab["x"][:10], xs[:10], atol=1e-6)
    for k in range(10):
        assert tab["psfFlux"][k] == pytest.approx(fl[k], abs=4 * tab["psfFluxErr"][k])
        assert not tab["flag_edge"][k]
    assert tab["flag_edge"][10] and np.isnan(tab["psfFlux"][10])


def test_cutout_round_trip(scene):
    diff, *_ = scene
    b = make_cutout(diff, 400.2, 300.7, 31)
    ccd = CCDData.read(io.BytesIO(b), format="fits")
    assert ccd.shape == (31, 31)
    assert str(ccd.unit) == "nJy"
    assert isinstance(ccd.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(ccd.data, diff.image[301 - 15 : 301 + 16, 400 - 15 : 400 + 16])
    np.testing.assert_array_equal(ccd.uncertainty.array, diff.variance[286:317, 385:416])
    ra, dec = diff.wcs.pixel_to_world_values(400, 301)
    r2, d2 = ccd.wcs.pixel_to_world_values(15, 15)
    assert r2 == pytest.approx(ra, abs=1e-9) and d2 == pytest.approx(dec, abs=1e-9)
    from astropy.io import fits

    with fits.open(io.BytesIO(b)) as hdul:
        np.testing.assert_allclose(hdul["PSFIMAGE"].data, diff.psf, rtol=1e-6)
        assert hdul["MASK"].data.dtype.kind in "ui"
    np.testing.assert_allclose(ccd.psf, diff.psf, rtol=1e-6)  # CCDData reads PSFIMAGE
    # edge: padded with NaN and NO_DATA
    b = make_cutout(diff, 2.0, 5.0, 30)
    ccd = CCDData.read(io.BytesIO(b), format="fits")
    assert ccd.shape == (31, 31)
    assert np.isnan(ccd.data[0, 0]) and np.isfinite(ccd.data[15, 15])
    # The cost of a stamp is a benchmark figure (benchmarks/bench_alerts.py), not a
    # timed assertion here: `make test` must pass on a loaded machine.


def test_cutout_size():
    assert cutout_size(5) == 31
    assert cutout_size(30) == 31
    assert cutout_size(45) == 45
    assert cutout_size(64) == 65
    assert cutout_size(500) == 101


def test_psf_from_difference_scene_not_needed(scene):
    diff, *_ = scene
    with pytest.raises(Exception, match="PSF"):
        detect_sources(diff.copy_with(psf=None))
    assert estimate_psf is not None


def test_aperture_correction_recovers_wing_light():
    """Stars with 6 % of their light in broad wings, PSF model = the core only."""
    from apdask.pipeline.measure.photometry import aperture_correction

    rng = np.random.default_rng(3)
    shape, core, wing, f_wing = (900, 900), 4.0, 14.0, 0.06
    gx, gy = np.meshgrid(np.arange(70, 850, 78.0), np.arange(70, 850, 78.0))
    xs = gx.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    ys = gy.ravel() + rng.uniform(-0.5, 0.5, gx.size)
    fl = rng.uniform(2e5, 1e6, xs.size)
    truth = np.zeros(shape)
    add_stars(truth, xs, ys, (1 - f_wing) * fl, core)
    add_stars(truth, xs, ys, f_wing * fl, wing, half=40)
    sky = 400.0
    img = truth + sky + rng.normal(0, 1, shape) * np.sqrt(sky + truth)
    exp = exposure_from(img, sky + truth, psf=gaussian_psf(core))
    psf = gaussian_psf(core)
    corr, n, radius = aperture_correction(exp, lambda x, y: psf, fwhm=core)
    # expected: light within the aperture over the core-model PSF flux of a noise-free star
    yy, xx = np.mgrid[-40:41, -40:41]
    star = np.zeros((81, 81))
    add_stars(star, [40.0], [40.0], [1 - f_wing], core)
    add_stars(star, [40.0], [40.0], [f_wing], wing, half=40)
    p = np.zeros((81, 81))
    p[28:53, 28:53] = psf
    inside = np.hypot(xx, yy) <= radius
    # the wing beyond the annulus (r_in = radius + 4) is the local sky to both
    ann = (np.hypot(xx, yy) >= radius + 4) & (np.hypot(xx, yy) <= radius + 12)
    s = star - np.median(star[ann])
    expect = s[inside].sum() / ((p * s).sum() / (p * p).sum())
    assert n >= 20 and radius == 20.0
    assert corr == pytest.approx(expect, abs=0.005)
    assert corr > 1.03  # the wing light the core model misses
    # no stars: the correction is undetermined and left at 1
    flat = exposure_from(rng.normal(sky, 20, shape), np.full(shape, sky), psf=psf)
    assert aperture_correction(flat, lambda x, y: psf, fwhm=core) == (
        1.0,
        0,
        pytest.approx(np.nan, nan_ok=True),
    )


def _bright_scene():
    """A 600 × 900 matched-filter image of unit noise with bright sources on an 80-px
    grid: ``(psf, sigma, filt, vfilt, xs, ys, flux, xx, phi)``; ``phi`` is the matched
    filter's profile on the 41 × 41 box around a source and ``xx`` its x offsets."""
    from apdask.pipeline.psf import _gaussian_psf

    rng = np.random.default_rng(5)
    sig = 4.0 / 2.3548
    ny, nx = 600, 900
    filt = rng.normal(0.0, 1.0, (ny, nx))
    vfilt = np.ones((ny, nx), np.float32)
    gx, gy = np.meshgrid(np.arange(60, nx - 50, 80), np.arange(60, ny - 50, 80))
    xs, ys = gx.ravel(), gy.ravel()
    flux = rng.uniform(5e4, 1e5, len(xs))
    yy, xx = np.mgrid[-20:21, -20:21]
    phi = np.exp(-(xx**2 + yy**2) / (4 * sig**2))  # matched-filter profile
    return _gaussian_psf(sig), sig, filt, vfilt, xs, ys, flux, xx, phi


def test_local_residual_power_of_bright_sources():
    """Bright sources whose neighbours leave non-round residuals (a kernel that is
    wrong in one part of the CCD) get that residual power as S/N-map variance; the
    power is taken from the *other* sources nearby, so a variable star keeps its own
    signal, and its S/N peak stays on it."""
    from apdask.pipeline.measure.bright import _bright_variance

    psf, sig, filt, vfilt, xs, ys, flux, xx, phi = _bright_scene()
    ny, nx = filt.shape
    dip = (xx / sig) * phi  # a sub-pixel misregistration's residual
    left = xs < nx / 2
    for x, y, f in zip(xs[left], ys[left], flux[left], strict=True):
        filt[y - 20 : y + 21, x - 20 : x + 21] += 9.3e-5 * f * dip  # peaks of 4-8 sigma
    var_l = np.flatnonzero(left)[len(np.flatnonzero(left)) // 2]  # variable stars, one
    var_r = np.flatnonzero(~left)[len(np.flatnonzero(~left)) // 2]  # in each half
    for k in (var_l, var_r):
        filt[ys[k] - 20 : ys[k] + 21, xs[k] - 20 : xs[k] + 21] -= 40.0 * phi
    order = np.argsort(-flux)
    src = {"x": xs[order], "y": ys[order], "flux": flux[order]}
    before = filt.copy()
    _bright_variance(filt, vfilt, np.zeros((ny, nx), bool), src, psf)
    np.testing.assert_array_equal(filt, before)  # only the variance changes
    snr = filt / np.sqrt(vfilt)
    peak0, peak = [], []
    for i in np.flatnonzero(left):
        if i != var_l:
            win = np.s_[ys[i] - 20 : ys[i] + 21, xs[i] - 20 : xs[i] + 21]
            peak0.append(np.abs(before[win]).max())
            peak.append(np.abs(snr[win]).max())
    assert np.sum(np.array(peak0) > 5.0) >= 5  # residuals above a 5 sigma threshold
    assert max(peak) < 4.5  # are no longer detections
    # no residuals in the right half: its variance is (almost) untouched
    right = np.zeros((ny, nx), bool)
    right[:, nx // 2 + 30 :] = True
    assert np.median(vfilt[right]) == pytest.approx(1.0, abs=0.01)
    for k in (var_l, var_r):
        box = snr[ys[k] - 20 : ys[k] + 21, xs[k] - 20 : xs[k] + 21]
        py, px = np.unravel_index(np.argmin(box), box.shape)
        assert abs(py - 20) <= 1 and abs(px - 20) <= 1  # the peak stays on the star
        assert box[20, 20] < -5.0  # and it is still detected
    assert snr[ys[var_r], xs[var_r]] < -35.0  # in the clean half at full S/N


def test_bright_variable_star_keeps_its_peak_on_the_star():
    """Every bright source leaves the same round residual (a 1e-4 flux mismatch), so
    the ring term adds variance in 2-px radial bins; a variable bright star among
    them must still peak at its centre (stepped bins put it 4 px off)."""
    from apdask.pipeline.measure.bright import _bright_variance

    psf, sig, filt, vfilt, xs, ys, flux, xx, phi = _bright_scene()
    ny, nx = filt.shape
    for x, y, f in zip(xs, ys, flux, strict=True):
        filt[y - 20 : y + 21, x - 20 : x + 21] += 1e-4 * f * phi
    k = len(xs) // 2
    filt[ys[k] - 20 : ys[k] + 21, xs[k] - 20 : xs[k] + 21] -= 300.0 * phi
    order = np.argsort(-flux)
    src = {"x": xs[order], "y": ys[order], "flux": flux[order]}
    _bright_variance(filt, vfilt, np.zeros((ny, nx), bool), src, psf)
    box = (filt / np.sqrt(vfilt))[ys[k] - 20 : ys[k] + 21, xs[k] - 20 : xs[k] + 21]
    py, px = np.unravel_index(np.argmin(box), box.shape)
    assert (py, px) == (20, 20)
    assert box[20, 20] < -20.0  # still far above the threshold


def test_stamps_at_equal_gathered_pixels():
    """Windows copied by slicing equal the pixels gathered one by one, on and off the
    image (off: ``fill``)."""
    from apdask.pipeline.stars import stamps_at

    def gathered(a, xs, ys, half, fill):
        ny, nx = a.shape
        o = np.arange(-half, half + 1)
        yy, xx = ys[:, None, None] + o[None, :, None], xs[:, None, None] + o[None, None, :]
        on = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        return np.where(on, a[np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)],
                        np.asarray(fill).astype(a.dtype))  # fmt: skip

    rng = np.random.default_rng(0)
    img = rng.normal(size=(50, 60)).astype(np.float32)
    mask = (img > 0).astype(np.uint32)
    for half in (0, 3, 40):
        xs, ys = rng.integers(-5, 65, 30), rng.integers(-5, 55, 30)
        for a, fill in ((img, np.nan), (mask, 7)):
            got = stamps_at(a, xs, ys, half, fill)
            assert got.dtype == a.dtype
            np.testing.assert_array_equal(got, gathered(a, xs, ys, half, fill))
    xs, ys = np.array([20, 30]), np.array([25, 26])  # all inside
    np.testing.assert_array_equal(stamps_at(img, xs, ys, 5), gathered(img, xs, ys, 5, np.nan))


def test_background_near_sources_equals_the_full_fit():
    """The local background of the forced PSF fits, measured only in the blocks the fits
    read, equals fit_background's there (and falls back to it on a tiny grid or an
    all-masked block)."""
    from apdask.core.exposure import MASK
    from apdask.pipeline.background import fit_background
    from apdask.pipeline.measure.sources import _background_near

    rng = np.random.default_rng(3)
    ny, nx = 700, 900
    yy, xx = np.mgrid[:ny, :nx]
    img = (rng.normal(size=(ny, nx)) + 0.01 * xx + 5 * np.sin(yy / 90.0)).astype(np.float32)
    mask = np.zeros((ny, nx), np.uint32)
    mask[100:180, 300:420] |= MASK["SAT"]
    xs, ys = np.array([3.2, 450.7, 899.0, 310.0]), np.array([5.0, 350.2, 690.4, 140.0])
    full = fit_background(img, mask, lazy=True)
    near = _background_near(img, mask, xs, ys, 12)
    used = np.isfinite(near.coarse)
    assert 0 < used.mean() < 1
    np.testing.assert_array_equal(near.coarse[used], full.coarse[used])
    _, jy, _, jx, _ = near.bilinear()
    for bx, by in zip(xs, ys, strict=True):  # every cell a fit blends is measured
        ix, iy = int(np.floor(bx + 0.5)), int(np.floor(by + 0.5))
        rows = jy[np.clip(np.arange(iy - 12, iy + 13), 0, ny - 1)]
        cols = jx[np.clip(np.arange(ix - 12, ix + 13), 0, nx - 1)]
        assert used[rows.min() : rows.max() + 2, cols.min() : cols.max() + 2].all()
    mask[:80, :80] |= MASK["BAD"]  # a block without good pixels: the full fit
    near = _background_near(img, mask, xs, ys, 12)
    np.testing.assert_array_equal(near.coarse, fit_background(img, mask, lazy=True).coarse)
    small = _background_near(img[:100], mask[:100], xs[:1], ys[:1], 12)
    np.testing.assert_array_equal(
        small.coarse, fit_background(img[:100], mask[:100], lazy=True).coarse
    )


def test_centroids_equal_one_at_a_time():
    """The sub-pixel peaks of all detections at once equal subpixel_peak on each
    detection's signed 3x3 window; a detection on the border keeps its pixel."""
    from astropy.table import Table

    from apdask.pipeline.measure.sources import _centroids
    from apdask.pipeline.stars import subpixel_peak

    rng = np.random.default_rng(5)
    filt = rng.normal(size=(40, 50)).astype(np.float32)
    det = Table({"x": [10, 0, 25, 49, 30], "y": [12, 5, 39, 20, 30], "sign": [1, 1, -1, 1, -1]})
    xs, ys, flag = _centroids(filt, det)
    np.testing.assert_array_equal(flag, [False, True, True, True, False])
    for i in (0, 4):
        ix, iy, s = int(det["x"][i]), int(det["y"][i]), det["sign"][i]
        x, y = subpixel_peak(
            s * filt[iy - 1 : iy + 2, ix - 1 : ix + 2], np.array([1]), np.array([1])
        )
        assert xs[i] == pytest.approx(x[0] + ix - 1, abs=1e-12)
        assert ys[i] == pytest.approx(y[0] + iy - 1, abs=1e-12)
    assert (xs[1], ys[1]) == (0.0, 5.0)
