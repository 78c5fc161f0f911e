"""Tests of apdask.pipeline.template.warp_template."""

from __future__ import annotations

import numpy as np
import pytest

from apdask._kernels.lanczos import lanczos3_weights
from apdask.core.exposure import MASK, TemplateTile
from apdask.exceptions import NoTemplateCoverageError
from apdask.pipeline.template import warp_template
from tests._pixels import add_stars, gaussian_psf, make_wcs, star_field

FWHM = 3.5


def _tile(shape, wcs, seed, tile_id="t0", n=300):
    xs, ys, fl = star_field(shape, n, seed, fmin=1e3, fmax=1e5)
    img = np.zeros(shape)
    add_stars(img, xs, ys, fl, FWHM)
    tile = TemplateTile(img.astype(np.float32), np.full(shape, 4.0, np.float32), wcs, "r",
                        tile_id, gaussian_psf(FWHM))  # fmt: skip
    return tile, xs, ys, fl


def test_warp_matches_analytic_rendering():
    tshape = (700, 700)
    tw = make_wcs(tshape)
    tile, xs, ys, fl = _tile(tshape, tw, 1)
    shape = (500, 520)
    target = make_wcs(shape, rot_deg=0.7)
    target.wcs.crval = [150.0 + 3e-4, 2.0 - 2e-4]
    out = warp_template([tile], target, shape)
    assert out.image.shape == shape and out.image.dtype == np.float32
    assert not (out.mask & MASK["NO_DATA"]).any()
    ra, dec = tw.pixel_to_world_values(xs, ys)
    x2, y2 = target.world_to_pixel_values(ra, dec)
    ref = np.zeros(shape)
    add_stars(ref, x2, y2, fl, FWHM)
    inner = (slice(20, -20), slice(20, -20))
    # flux conserved
    assert out.image[inner].sum() == pytest.approx(ref[inner].sum(), rel=0.01)
    # per-star aperture fluxes and pixel residuals
    assert np.abs(out.image - ref)[inner].max() < 0.02 * ref.max()
    # the variance at PSF scales (default) is the input variance, 4
    np.testing.assert_allclose(out.variance[inner], 4.0, rtol=1e-5)
    # that of each warped pixel: 4 * sum of the squared normalised Lanczos-3 weights
    out = warp_template([tile], target, shape, variance_scale="pixel")
    yy, xx = np.mgrid[0 : shape[0] : 7, 0 : shape[1] : 7]
    tx, ty = tw.world_to_pixel_values(*target.pixel_to_world_values(xx, yy))
    wx, wy = lanczos3_weights(tx - np.floor(tx)), lanczos3_weights(ty - np.floor(ty))
    expect = 4.0 * (wx**2).sum(-1) / wx.sum(-1) ** 2 * (wy**2).sum(-1) / wy.sum(-1) ** 2
    np.testing.assert_allclose(out.variance[::7, ::7], expect, rtol=2e-3)
    assert out.variance.min() < 2.5 < 3.9 < out.variance.max()  # it depends on the phase
    np.testing.assert_allclose(out.psf, gaussian_psf(FWHM))
    assert out.meta["tiles"] == ["t0"]


def test_partial_coverage_and_two_tiles():
    shape = (400, 400)
    target = make_wcs(shape)
    # tile A covers the left ~half of the CCD, tile B (with NaNs) a band further right
    ta = make_wcs((400, 220), crpix=(200.5 + 0, 200.5))
    tile_a, *_ = _tile((400, 220), ta, 2, "a")
    tb = make_wcs((400, 100), crpix=(200.5 - 220, 200.5))
    tile_b, *_ = _tile((400, 100), tb, 3, "b")
    tile_b.image[100:110, 40:50] = np.nan
    out = warp_template([tile_a, tile_b], target, shape)
    nodata = (out.mask & MASK["NO_DATA"]) != 0
    assert not nodata[:, :215].any()
    assert nodata[:, 330:].all()
    assert nodata[100:110, 260:270].all()
    assert not nodata[200:300, 230:310].any()
    assert np.isfinite(out.image).all()
    assert out.meta["tiles"] == ["a", "b"]
    assert out.meta["coverage"] == pytest.approx(1.0 - nodata.mean())


def test_no_coverage_raises():
    shape = (200, 200)
    far = make_wcs(shape, ra=10.0, dec=-40.0)
    tile, *_ = _tile(shape, make_wcs(shape), 4, n=10)
    with pytest.raises(NoTemplateCoverageError):
        warp_template([tile], far, shape)
    with pytest.raises(NoTemplateCoverageError):
        warp_template([], far, shape)


def test_overlapping_tiles_leave_no_seam():
    # one sky image cut into two tiles that overlap by 64 px, as patches of a coadd
    # are: the warp must not depend on where the cut is, even for a star on it
    big_shape = (300, 600)
    big_wcs = make_wcs(big_shape)
    img = np.zeros(big_shape)
    cut = 330  # tile A is columns 0..cut-1, tile B cut-64..599
    ys = np.arange(40.3, 270, 23.0)
    xs = cut - 3.0 + 0.37 * np.arange(len(ys)) % 1.0 - 1.0 * (np.arange(len(ys)) % 5)
    add_stars(img, xs, ys, np.full(len(ys), 1e5), FWHM)
    var = np.full(big_shape, 4.0, np.float32)
    whole = TemplateTile(img.astype(np.float32), var, big_wcs, "r", "whole", gaussian_psf(FWHM))
    a = TemplateTile(img[:, :cut].astype(np.float32), var[:, :cut],
                     make_wcs((300, cut), crpix=big_wcs.wcs.crpix), "r", "a", None)  # fmt: skip
    b0 = cut - 64
    wb = make_wcs((300, 600 - b0), crpix=(big_wcs.wcs.crpix[0] - b0, big_wcs.wcs.crpix[1]))
    b = TemplateTile(img[:, b0:].astype(np.float32), var[:, b0:], wb, "r", "b", None)
    shape = (260, 400)
    target = make_wcs(shape, rot_deg=0.3)
    target.wcs.crval = [150.0 + 2e-4, 2.0 + 1e-4]
    ref = warp_template([whole], target, shape)
    out = warp_template([a, b], target, shape)
    assert out.meta["tiles"] == ["a", "b"]
    assert not (out.mask & MASK["NO_DATA"]).any()
    inner = (slice(10, -10), slice(10, -10))
    # identical pixels either way (float32 rounding only)
    np.testing.assert_allclose(out.image[inner], ref.image[inner], atol=1e-3 * img.max())
    np.testing.assert_allclose(out.variance[inner], ref.variance[inner], rtol=1e-5)
