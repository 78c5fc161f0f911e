"""Tests of apdask.isr on the test camera."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from apdask.core.camera import get_camera, njy_per_electron
from apdask.core.exposure import MASK, Exposure
from apdask.pipeline.isr import calibrate, isr_arrays, mask_cosmic_rays
from tests._pixels import add_stars, gaussian_psf, make_wcs, star_field

DARKTIME = 30.0


@pytest.fixture(scope="module")
def scene():
    det = get_camera("testcam")[0]
    rng = np.random.default_rng(42)
    truth = np.full(det.shape, 900.0)
    xs, ys, fl = star_field(det.shape, 30, 1, fmin=5e3, fmax=5e5)
    add_stars(truth, xs, ys, fl, 5.0)
    truth[400:403, 60:63] = 400_000.0  # a saturated blob (top-left amp, flipped)
    bias = rng.normal(0, 3, det.shape)
    dark = np.full(det.shape, 0.01)
    dark[:, 100] = 5.0  # hot column
    flat = rng.uniform(0.9, 1.1, det.shape)
    flat /= flat.mean()
    flat[50:52, 300] = 0.0  # dead pixels
    segs = []
    for a in det.amplifiers:
        sl = (slice(a.y0, a.y1), slice(a.x0, a.x1))
        sig = rng.poisson(truth[sl] * flat[sl] + dark[sl] * DARKTIME).astype(float)
        e = sig + bias[sl] + rng.normal(0, a.read_noise, sig.shape)
        adu = e / a.gain + 1000.0 + 0.01 * np.arange(a.ny)[:, None]  # sloped overscan level
        adu = np.minimum(adu, a.saturation)
        if a.flip_y:
            adu = adu[::-1]
        if a.flip_x:
            adu = adu[:, ::-1]
        raw = (
            1000.0
            + 0.01 * np.arange(a.ny)[:, None]
            + rng.normal(0, a.read_noise / a.gain, a.raw_shape)
        )
        raw[a.data_slice] = adu
        segs.append(raw.astype(np.float32))
    # a NaN pixel at assembled (10, 20): bottom-left amp, not flipped
    a0 = next(a for a in det.amplifiers if a.x0 == 0 and a.y0 == 0)
    segs[det.amplifiers.index(a0)][10, a0.prescan + 20] = np.nan
    return det, truth, bias, dark, flat, segs


def test_isr_recovers_image(scene):
    det, truth, bias, dark, flat, segs = scene
    img, var, mask = isr_arrays(segs, det, bias, dark, flat, DARKTIME)
    assert img.chunks == det.amp_chunks
    img, var, mask = dask.compute(img, var, mask)
    assert img.dtype == np.float32 and mask.dtype == np.uint32
    good = mask == 0
    pull = (img - truth)[good] / np.sqrt(var[good])
    assert abs(np.mean(pull)) < 0.05
    assert np.std(pull) == pytest.approx(1.0, abs=0.05)


def test_isr_masks(scene):
    det, truth, bias, dark, flat, segs = scene
    img, var, mask = dask.compute(*isr_arrays(segs, det, bias, dark, flat, DARKTIME))
    assert np.all(mask[:, 100] & MASK["BAD"])
    assert np.all(mask[50:52, 300] & MASK["BAD"])
    assert np.all(mask[400:403, 60:63] & MASK["SAT"])
    assert mask[10, 20] & MASK["NO_DATA"] and img[10, 20] == 0.0
    assert np.isfinite(img).all() and np.isfinite(var).all()
    assert (mask[200:250, 150:250] == 0).all()


def test_isr_is_lazy(scene):
    det, truth, bias, dark, flat, segs = scene
    calls = []

    def load(k):
        calls.append(k)
        return segs[k]

    import dask.array as da

    lazy = [
        da.from_delayed(dask.delayed(load)(k), a.raw_shape, dtype=np.float32)
        for k, a in enumerate(det.amplifiers)
    ]
    img, var, mask = isr_arrays(lazy, det, da.from_array(bias), dark, flat, DARKTIME)
    assert calls == []
    out = img.compute()
    assert sorted(calls) == [0, 1, 2, 3]
    assert out.shape == det.shape


def test_isr_rejects_bad_input(scene):
    det, truth, bias, dark, flat, segs = scene
    with pytest.raises(ValueError, match="amplifiers"):
        isr_arrays(segs[:2], det)
    with pytest.raises(ValueError, match="flat"):
        isr_arrays(segs, det, flat=flat[:10])


def test_calibrate_units(scene):
    det, *_ = scene
    img = np.full(det.shape, 100.0, np.float32)
    var = np.full(det.shape, 4.0, np.float32)
    mask = np.zeros(det.shape, np.uint32)
    exp = calibrate(img, var, mask, "r", 30.0, make_wcs(det.shape), meta={"visit": 1})
    s = njy_per_electron("r", 30.0)
    assert isinstance(exp, Exposure)
    np.testing.assert_allclose(exp.image, 100.0 * s, rtol=1e-6)
    np.testing.assert_allclose(exp.variance, 4.0 * s * s, rtol=1e-6)
    assert exp.meta == {"visit": 1, "band": "r", "exptime": 30.0}


def test_cosmic_rays_masked_stars_kept():
    rng = np.random.default_rng(3)
    shape = (256, 256)
    truth = np.full(shape, 900.0)
    xs, ys, fl = star_field(shape, 40, 9, fmin=2e3, fmax=5e5)
    add_stars(truth, xs, ys, fl, 4.5)
    var = truth + 36.0
    img = truth + rng.normal(0, 1, shape) * np.sqrt(var)
    crs = [(30, 40), (100, 200), (150, 60)]
    for y, x in crs:
        img[y, x] += 3000.0
    img[200, 100:110] += 2000.0  # a short track
    exp = Exposure(img.astype(np.float32), var.astype(np.float32), np.zeros(shape, np.uint32),
                   psf=gaussian_psf(4.5))  # fmt: skip
    out = mask_cosmic_rays(exp, 4.5)
    cr = (out.mask & MASK["CR"]) != 0
    for y, x in crs:
        assert cr[y, x]
        assert out.image[y, x] < truth[y, x] + 5 * np.sqrt(var[y, x])  # CR flux removed
    assert cr[200, 100:110].all()
    # no star centre is flagged (stars next to an injected CR aside)
    hits = np.array(crs + [(200, 100 + k) for k in range(10)])
    for x, y in zip(xs, ys, strict=True):
        if np.hypot(hits[:, 1] - x, hits[:, 0] - y).min() < 6:
            continue
        assert not cr[
            int(round(y)) - 2 : int(round(y)) + 3, int(round(x)) - 2 : int(round(x)) + 3
        ].any()
    assert cr.sum() < 100  # the CRs grown by a pixel, nothing else
    # the exposure's own arrays are left as they were (the mask is copied beside the image)
    np.testing.assert_array_equal(exp.mask, 0)
    # a list of the pixels above a threshold is trusted only at or below the test's own:
    # an (empty) list made at 6 σ could miss pixels the 5-σ test flags, so it is ignored
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    ignored = mask_cosmic_rays(exp, 4.5, above=none, above_nsigma=6.0)
    np.testing.assert_array_equal(ignored.mask, out.mask)
    np.testing.assert_array_equal(ignored.image, out.image)
    trusted = mask_cosmic_rays(exp, 4.5, above=none, above_nsigma=5.0)
    assert not (trusted.mask & MASK["CR"]).any()  # nothing above 5 σ listed: nothing tested


def test_cosmic_rays_kept_off_the_cores_of_wing_heavy_stars():
    """A PSF with broad wings (like Kolmogorov) has second moments far wider than its
    core: the FWHM given to the CR finder comes from the PSF's own centre/neighbour
    ratio, so bright star cores are not flagged (they were, on GalSim images)."""
    from apdask.pipeline.psf import sharpest_fwhm_px

    rng = np.random.default_rng(5)
    shape = (256, 256)
    core, wing, f_wing = 4.5, 14.0, 0.12
    psf = np.zeros((25, 25))
    add_stars(psf, [12.0], [12.0], [1 - f_wing], core)
    add_stars(psf, [12.0], [12.0], [f_wing], wing, half=12)
    psf /= psf.sum()
    yy, xx = np.mgrid[-12:13, -12:13]
    moments_fwhm = 2.3548 * np.sqrt((psf * (xx * xx + yy * yy)).sum() / 2)
    fwhm = sharpest_fwhm_px(np.array([psf, gaussian_psf(5.5)]))
    assert 4.0 < fwhm < 1.05 * core and moments_fwhm > fwhm + 1.0
    truth = np.full(shape, 900.0)
    gy, gx = np.mgrid[40:230:60, 40:230:60]
    xs, ys = gx.ravel() + 0.3, gy.ravel() - 0.2
    add_stars(truth, xs, ys, (1 - f_wing) * 2e6 * np.ones(xs.size), core)
    add_stars(truth, xs, ys, f_wing * 2e6 * np.ones(xs.size), wing, half=40)
    var = truth + 36.0
    img = truth + rng.normal(0, 1, shape) * np.sqrt(var)
    img[70, 10] += 3000.0
    exp = Exposure(img.astype(np.float32), var.astype(np.float32), np.zeros(shape, np.uint32))
    cr = (mask_cosmic_rays(exp, fwhm).mask & MASK["CR"]) != 0
    assert cr[70, 10] and cr.sum() <= 9  # the CR grown by a pixel, nothing else
    # the FWHM of the second moments would flag the star cores
    cr_moments = (mask_cosmic_rays(exp, moments_fwhm).mask & MASK["CR"]) != 0
    assert cr_moments.sum() > 9 * 4
