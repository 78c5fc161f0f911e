"""Tests of apdask.pipeline.template.warp_template."""

from __future__ import annotations

import numpy as np
import pytest

from apdask._kernels import lanczos
from apdask._kernels.lanczos import lanczos3_weights
from apdask.core.exposure import MASK, TemplateTile
from apdask.exceptions import NoTemplateCoverageError
from apdask.pipeline.template import prewarp_template, shift_template, warp_template
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


def test_prewarp_then_shift_matches_a_direct_warp():
    """The template warped at prefetch on the predicted WCS and shifted onto the refined
    one (a pointing error of a few pixels) equals a warp onto the refined WCS: the
    same stars, fluxes and positions, the same variance."""
    tshape = (700, 700)
    tw = make_wcs(tshape)
    tile, xs, ys, fl = _tile(tshape, tw, 3)
    shape = (500, 520)
    predicted = make_wcs(shape, rot_deg=0.7)
    refined = make_wcs(shape, rot_deg=0.7)
    refined.wcs.crval = [150.0 + 4.1 / 3600 * 0.2, 2.0 - 2.7 / 3600 * 0.2]  # ~4 px, 3 px
    pre = prewarp_template([tile], predicted, shape, margin=16)
    assert pre.shape == (532, 552) and pre.meta["margin"] == 16
    out, figures = shift_template(pre, refined, shape)
    assert out is not None and out.shape == shape
    assert figures["residual_px"] < 0.01 and 2.0 < abs(figures["shift_x"]) < 6.0
    direct = warp_template([tile], refined, shape)
    ra, dec = tw.pixel_to_world_values(xs, ys)
    x2, y2 = refined.world_to_pixel_values(ra, dec)
    ref = np.zeros(shape)
    add_stars(ref, x2, y2, fl, FWHM)
    inner = (slice(20, -20), slice(20, -20))
    # against the analytic rendering, as good as a direct warp (2 % of the peak there);
    # two interpolations against one: 1 % of the peak between the two
    assert np.abs(out.image - ref)[inner].max() < 0.02 * ref.max()
    assert np.abs(out.image - direct.image)[inner].max() < 0.015 * ref.max()
    assert out.image[inner].sum() == pytest.approx(ref[inner].sum(), rel=0.01)
    assert out.image[inner].sum() == pytest.approx(direct.image[inner].sum(), rel=1e-3)
    np.testing.assert_allclose(out.variance[inner], 4.0, rtol=1e-5)
    assert out.meta["coverage"] == 1.0 and not out.mask.any()
    np.testing.assert_allclose(out.psf, gaussian_psf(FWHM))


def test_shift_declines_a_rotation_or_a_shift_beyond_the_margin():
    tshape = (700, 700)
    tile, *_ = _tile(tshape, make_wcs(tshape), 4)
    shape = (300, 300)
    pre = prewarp_template([tile], make_wcs(shape), shape, margin=8)
    rotated = make_wcs(shape, rot_deg=0.2)  # 0.5 px at the corners
    out, figures = shift_template(pre, rotated, shape, max_residual_px=0.25)
    assert out is None and figures["residual_px"] > 0.25
    far = make_wcs(shape)
    far.wcs.crval = [150.0 + 7.0 * 0.2 / 3600, 2.0]  # 7 px: taps beyond an 8 px margin
    out, figures = shift_template(pre, far, shape)
    assert out is None and abs(figures["shift_x"]) > 6.5


def test_shift_kernel_equals_the_general_resampler():
    rng = np.random.default_rng(5)
    src = rng.normal(size=(90, 100)).astype(np.float32)
    var = rng.uniform(1, 2, size=(90, 100)).astype(np.float32)
    bad = np.zeros(src.shape, bool)
    bad[40, 50] = True
    dy, dx = 6.37, 4.81
    img, v, b = lanczos.shift(src, var, bad, dy, dx, (70, 80))
    fy, fx = (np.mgrid[0:70, 0:80] + np.array([dy, dx])[:, None, None]).astype(np.float32)
    out, outv, fill = (
        np.zeros((70, 80), np.float32),
        np.zeros((70, 80), np.float32),
        np.zeros((70, 80), bool),
    )
    lanczos.resample(src, var, fx, fy, out, outv, fill, bad=bad)
    np.testing.assert_array_equal(b, ~fill)
    assert b.sum() == 36
    np.testing.assert_allclose(img[fill], out[fill], atol=1e-4)  # resample: tabulated weights
    np.testing.assert_allclose(v[fill], outv[fill], atol=1e-4)
