"""The fused (numba) and cutout-only fast paths equal the NumPy / photutils expressions
they replace."""

import numpy as np
import pytest
import scipy.fft as sfft
from astropy.table import Table
from photutils.aperture import CircularAperture, aperture_photometry

from apdask._kernels import fused as _fused
from apdask.core.exposure import IGNORE_BITS, MASK, Exposure
from apdask.pipeline.background import fit_background
from apdask.pipeline.measure.photometry import _aperture_fluxes
from apdask.pipeline.subtract.kernel import _al_factors, _stamp_convolutions, alard_lupton_basis


@pytest.fixture
def planes():
    rng = np.random.default_rng(3)
    img = rng.normal(100.0, 10.0, (203, 157)).astype(np.float32)
    var = rng.uniform(50.0, 150.0, img.shape).astype(np.float32)
    mask = np.zeros(img.shape, np.uint32)
    mask[10:14, 20:25] = MASK["NO_DATA"]
    mask[50, 60] = MASK["BAD"]
    mask[100:103, 100:104] = MASK["SAT"]
    img[30, 31] = np.nan
    var[40, 41] = np.inf
    return img, var, mask


def test_fill_nodata(planes):
    img, var, mask = planes
    out, nodata = _fused.fill_nodata(img, var, mask, MASK["NO_DATA"])
    want = ((mask & MASK["NO_DATA"]) != 0) | ~np.isfinite(img) | ~np.isfinite(var)
    np.testing.assert_array_equal(nodata, want)
    np.testing.assert_array_equal(out, np.where(want, 0, img).astype(np.float32))
    assert nodata.sum() == 20 + 2
    # every pixel has data: the image itself comes back, not a copy
    clean = np.nan_to_num(img)
    out, nodata = _fused.fill_nodata(clean, np.nan_to_num(var), mask & 0, MASK["NO_DATA"])
    assert out is clean and not nodata.any()


def test_finish_difference():
    rng = np.random.default_rng(4)
    shape = (60, 70)
    out = rng.normal(size=shape).astype(np.float32)
    want = out.copy()
    wu = np.linspace(-1, 1, shape[1]).astype(np.float32)
    wv = np.linspace(-1, 1, shape[0]).astype(np.float32)
    nodata = np.zeros(shape, bool)
    nodata[5, 6] = True
    _fused.finish_difference(out, wu, wv, (1.0, 2.0, -0.5), -2.0, nodata)
    want = -2.0 * (want - (1.0 + 2.0 * wu[None, :] - 0.5 * wv[:, None]))
    want[5, 6] = 0.0
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-5)


def test_difference_variance(planes):
    _, var, _ = planes
    var_a = var[::-1].copy()
    var_a[0, 0] = -5.0
    nodata = np.zeros(var.shape, bool)
    nodata[1, 1] = True
    out = _fused.difference_variance(var, var_a, 1.21, 0.5, 1e-3, 77.0, nodata)
    want = 0.5 * (np.maximum(var, 0) + 1.21 * np.maximum(var_a, 0))
    want[nodata | ~np.isfinite(want)] = 77.0
    np.testing.assert_allclose(out, np.maximum(want, 1e-3), rtol=1e-6)
    assert out[40, 41] == 77.0 and out[1, 1] == 77.0
    # no pixel without data
    nodata[1, 1] = False
    np.testing.assert_array_equal(
        _fused.difference_variance(var, var_a, 1.21, 0.5, 1e-3, 77.0, None),
        _fused.difference_variance(var, var_a, 1.21, 0.5, 1e-3, 77.0, nodata),
    )


def test_matched_inputs_and_snr(planes):
    img, var, mask = planes
    sat = (mask & MASK["SAT"]) != 0
    img0, var0, bad = _fused.matched_inputs(img, var, mask, IGNORE_BITS, sat, 2)
    want = ((mask & IGNORE_BITS) != 0) | ~np.isfinite(img) | ~np.isfinite(var)
    want |= _fused.dilate(sat, 2)
    np.testing.assert_array_equal(bad, want)
    np.testing.assert_array_equal(img0, np.where(want, 0, img))
    np.testing.assert_array_equal(var0, np.where(want, 0, var))
    assert bad[98:105, 98:106].all() and not bad[97, 97]
    # the same with the saturated pixels given as mask bits (found in the same pass)
    got = _fused.matched_inputs(img, var, mask, IGNORE_BITS, MASK["SAT"], 2)
    for a, ref in zip(got, (img0, var0, bad), strict=True):
        np.testing.assert_array_equal(a, ref)
    # large saturated areas take the dilation path: same result
    big = np.zeros(img.shape, bool)
    big[:150] = True
    _, _, bad_big = _fused.matched_inputs(img, var, mask, IGNORE_BITS, big, 2)
    np.testing.assert_array_equal(bad_big[:152], True)
    mask_big = mask.copy()
    mask_big[:150] |= MASK["SAT"]
    _, _, bad_bits = _fused.matched_inputs(img, var, mask_big, IGNORE_BITS, MASK["SAT"], 2)
    np.testing.assert_array_equal(bad_bits[:152], True)
    np.testing.assert_array_equal(bad_bits[152:], bad_big[152:])
    snr = _fused.snr_map(img0, var0, bad)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where((var0 > 0) & ~bad, img0 / np.sqrt(var0), 0)
    np.testing.assert_allclose(snr, want, rtol=1e-6)
    in_place = var0.copy()
    np.testing.assert_array_equal(_fused.snr_map(img0, in_place, bad, out=in_place), snr)


def test_separable_stamp_convolutions_equal_fft():
    rng = np.random.default_rng(5)
    img = rng.normal(size=(300, 300)).astype(np.float32)
    sig, size, fit_half = [0.8, 1.6, 3.2], 21, 15
    basis = alard_lupton_basis(sig, [4, 3, 2], size)
    xs, ys = np.array([60, 150, 240]), np.array([70, 160, 230])
    raw, m = _stamp_convolutions(img, basis, xs, ys, fit_half, _al_factors(sig, [4, 3, 2], size))
    got = np.einsum("br,nrp->nbp", m, raw.astype(float)).reshape(len(xs), len(basis), 31, 31)
    kh = size // 2
    th = fit_half + kh
    for n, (x, y) in enumerate(zip(xs, ys, strict=True)):
        st = img[y - th : y + th + 1, x - th : x + th + 1].astype(float)
        for b in (0, 7, len(basis) - 1):
            full = sfft.irfft2(sfft.rfft2(st, s=(120, 120)) * sfft.rfft2(basis[b], s=(120, 120)),
                               s=(120, 120))  # fmt: skip
            want = full[2 * kh : 2 * kh + 2 * fit_half + 1, 2 * kh : 2 * kh + 2 * fit_half + 1]
            np.testing.assert_allclose(got[n, b], want, atol=2e-6 * np.abs(want).max())


def test_background_cutout_equals_full_map(planes):
    img, _, mask = planes
    img = np.nan_to_num(img) + np.linspace(0, 50, img.shape[1])[None, :]
    lazy = fit_background(img, mask, box=32, lazy=True)
    full = fit_background(img, mask, box=32)
    np.testing.assert_allclose(lazy[84:97, 74:87], full[84:97, 74:87], rtol=1e-6)
    coarse, jy, ty, jx, tx = lazy.bilinear()
    y, x = np.mgrid[: img.shape[0], : img.shape[1]]
    j, i, t, u = jy[y], jx[x], ty[y], tx[x]
    blend = (1 - t) * ((1 - u) * coarse[j, i] + u * coarse[j, i + 1]) + t * (
        (1 - u) * coarse[j + 1, i] + u * coarse[j + 1, i + 1]
    )
    np.testing.assert_allclose(blend, full, rtol=1e-5)


def test_aperture_fluxes_equal_photutils(planes):
    img, var, mask = planes
    exp = Exposure(img, var, mask, None, None, {})
    tab = Table({"x": [31.0, 80.3, 101.7, 155.5], "y": [30.2, 90.6, 101.0, 200.0]})
    _aperture_fluxes(tab, exp, 6.0)
    bad = ((mask & IGNORE_BITS) != 0) | ~np.isfinite(img) | ~np.isfinite(var)
    res = aperture_photometry(
        np.where(bad, 0, img), CircularAperture(np.column_stack([tab["x"], tab["y"]]), r=6.0),
        error=np.sqrt(np.where(bad, 0, np.maximum(var, 0))), mask=bad,
    )  # fmt: skip
    np.testing.assert_allclose(tab["apFlux"], res["aperture_sum"], rtol=1e-6)
    np.testing.assert_allclose(tab["apFluxErr"], res["aperture_sum_err"], rtol=1e-6)


def test_kernel_stamps_reuse_the_psf_models_stars():
    from apdask.pipeline.psf import PsfGrid
    from apdask.pipeline.subtract.stamps import _model_stars

    stars = {"x": np.array([50.2, 12.0, 80.0, 140.0]), "y": np.array([60.0, 70.0, 81.4, 100.0]),
             "snr": np.array([90.0, 80.0, 70.0, 60.0]), "neighbour": np.array([0.0, 0, 0.05, 0]),
             "isolation": 25.0}  # fmt: skip
    model = PsfGrid(np.ones((1, 1, 5, 5)) / 25, [100.0], [100.0], stars=stars)
    sci = Exposure(np.zeros((200, 200)), np.ones((200, 200)), np.zeros((200, 200), np.uint32),
                   None, None, psf_model=model)  # fmt: skip
    bad = np.zeros((200, 200), bool)
    bad[100, 150] = True  # within 20 px of the fourth star
    got = _model_stars(sci, 22.0, 0.01, 20, bad)
    # the 2nd is too near the edge, the 3rd has a 5 % neighbour, the 4th a bad pixel
    np.testing.assert_array_equal(got["x"], [50.2])
    assert _model_stars(sci, 30.0, 0.01, 20, bad) is None  # searched less isolated
    assert _model_stars(sci.copy_with(psf_model=None), 22.0, 0.01, 20, bad) is None


@pytest.mark.parametrize("sign", [1, -1])
def test_segments_equal_photutils_detect_sources(sign):
    from photutils.segmentation import detect_sources

    rng = np.random.default_rng(6)
    img = rng.normal(size=(256, 300))
    yy, xx = np.mgrid[:256, :300]
    for x, y, a in zip(rng.uniform(0, 300, 40), rng.uniform(0, 256, 40), rng.uniform(-30, 30, 40),
                       strict=True):  # fmt: skip
        img += a * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / 2.0**2)
    seg, peak = _fused.segments(img, 3.0, 5, sign)
    ref = detect_sources(sign * img, 3.0, n_pixels=5)
    assert len(seg) == len(ref.labels) > 10
    for (area, x0, x1, y0, y1, px, py), p, lab, sl, a in zip(
        seg, peak, ref.labels, ref.slices, ref.areas, strict=True
    ):
        assert (area, x0, x1, y0, y1) == (a, sl[1].start, sl[1].stop, sl[0].start, sl[0].stop)
        win = np.where(ref.data[sl] == lab, sign * img[sl], -np.inf)
        wy, wx = np.unravel_index(np.argmax(win), win.shape)
        assert (px, py) == (wx + x0, wy + y0) and p == win[wy, wx]
    assert len(_fused.segments(img, 1e9, 5, sign)[0]) == 0
    ys, xs = _fused.above(img, 3.0, sign)
    want = np.nonzero(sign * img > 3.0)
    np.testing.assert_array_equal(ys, want[0])
    np.testing.assert_array_equal(xs, want[1])
    # both signs from one pass, float32 (the S/N map's type), and given to segments
    img32 = img.astype(np.float32)
    both = _fused.above_both(img32, 3.0)[0 if sign > 0 else 1]
    for got, exp in zip(both, np.nonzero(sign * img32 > np.float32(3.0)), strict=True):
        np.testing.assert_array_equal(got, exp)
    given, listed = _fused.segments(img32, 3.0, 5, sign, both), _fused.segments(img32, 3.0, 5, sign)
    for a, b in zip(given, listed, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("target", [1, 7, 100, 10**9])
def test_thinned_values_equal_numpy(target):
    """Every step-th valid value, as the compress-and-slice it replaces (blocks of the
    block counts with and without invalid pixels, a short last block)."""
    rng = np.random.default_rng(8)
    img = rng.normal(size=(60, 150)).astype(np.float32)
    img[rng.uniform(size=img.shape) < 0.02] = 0.0
    img[rng.uniform(size=img.shape) < 0.02] = np.nan
    img[3, 5] = np.inf
    ignored = rng.uniform(size=img.shape) < 0.05
    ignored[10:20] = True
    v = img[~ignored]
    v = v[np.isfinite(v) & (v != 0)]
    want = v[:: max(1, v.size // target)]
    np.testing.assert_array_equal(_fused.thinned_values(img, ignored, target), want)
    assert _fused.thinned_values(img, np.ones(img.shape, bool), target).size == 0


def _cr_reference(img, bkg, var, skip, cr, r1, r2, nsigma):
    """The NumPy expression :func:`apdask._kernels.fused.cr_candidates` replaces."""
    d = img - bkg
    s = np.sqrt(np.maximum(var, 0.0))
    p, ps = np.pad(d, 1, mode="edge"), np.pad(s, 1, mode="edge")
    ny, nx = img.shape
    sharp = np.zeros(img.shape, bool)
    for (ay, ax), (by, bx), r in (
        ((0, 1), (2, 1), r1), ((1, 0), (1, 2), r1), ((0, 0), (2, 2), r2), ((0, 2), (2, 0), r2),
    ):  # fmt: skip
        n = 0.5 * (p[ay : ay + ny, ax : ax + nx] + p[by : by + ny, bx : bx + nx])
        vn = 0.25 * (ps[ay : ay + ny, ax : ax + nx] ** 2 + ps[by : by + ny, bx : bx + nx] ** 2)
        sharp |= (d - r * n) > nsigma * np.sqrt(s * s + r * r * vn)
    return sharp & (d > nsigma * s) & ~skip & ~cr


def test_cosmic_ray_passes_equal_numpy():
    from scipy import ndimage

    from apdask.pipeline.background import Background

    rng = np.random.default_rng(7)
    img = rng.normal(0, 3.0, (120, 140)).astype(np.float32)
    yy, xx = np.mgrid[:120, :140]
    img += (500 * np.exp(-0.5 * ((xx - 70) ** 2 + (yy - 60) ** 2) / 2.0**2)).astype(np.float32)
    hits = (rng.integers(0, 120, 40), rng.integers(0, 140, 40))
    img[hits] += 200.0
    img[0, 5] += 300.0  # on the border
    # a sloped background, evaluated in the pass from its coarse grid
    model = Background(np.array([[0.0, 4.0, 8.0], [2.0, 6.0, 10.0]]), np.array([30.0, 90.0]),
                       np.array([20.0, 70.0, 120.0]), img.shape)  # fmt: skip
    img += model.full()
    var = np.full(img.shape, 9.0, np.float32)
    mask = np.zeros(img.shape, np.uint32)
    mask[10:12, 10:40] = MASK["SAT"]
    mask[50, 50] = MASK["EDGE"]  # not a bit the pass skips
    skip = (mask & MASK["SAT"]) != 0
    cr = np.zeros(img.shape, bool)
    cr[hits[0][:3], hits[1][:3]] = True
    ratios = (np.float32(1.6), np.float32(2.5), np.float32(5.0))
    ys, xs = _fused.cr_candidates(img, model.bilinear(), var, mask, MASK["SAT"], cr, *ratios)
    got = np.zeros(img.shape, bool)
    got[ys, xs] = True
    want = _cr_reference(img, model.full(), var, skip, cr, *ratios)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal((ys, xs), np.nonzero(want))  # raster order
    assert 30 < got.sum() <= 38 and got[0, 5] and not got[55:66, 65:76].any()
    # testing only the pixels above nsigma σ (the star search's) finds the same
    planes = _fused.search_planes(img, model.bilinear(), mask, MASK["SAT"], 1.5,
                                  variance=var, nsigma=5.0)  # fmt: skip
    above = _fused.cr_candidates(img, model.bilinear(), var, mask, MASK["SAT"], cr, *ratios,
                                 above=planes.bright)  # fmt: skip
    np.testing.assert_array_equal(above, (ys, xs))

    grown = np.zeros(img.shape, bool)
    grown[_fused.grow_pixels(ys, xs, 2, img.shape)] = True
    np.testing.assert_array_equal(grown, ndimage.binary_dilation(got, iterations=2))
    np.testing.assert_array_equal(
        _fused.grow_pixels(ys, xs, 2, img.shape), np.nonzero(grown)
    )  # raster order, each pixel once
    bad = ndimage.binary_dilation(got, iterations=1)
    bad[:, :3] = True  # a wide band: the box doubles until it finds good pixels
    want = img.copy()
    for y, x in zip(*np.nonzero(bad), strict=True):
        h = 2
        while True:
            win = np.where(bad, np.nan, img)[max(y - h, 0) : y + h + 1, max(x - h, 0) : x + h + 1]
            if np.isfinite(win).any():
                want[y, x] = np.nanmedian(win)
                break
            h *= 2
    by, bx = np.nonzero(bad)
    out = _fused.interpolate_pixels(img.copy(), bad, by, bx)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    # a second pass after repairing the candidates: testing only next to the repaired
    # pixels finds what a full pass finds (a blob's shoulders, sharp once its core is gone)
    blob = img.copy()
    core = np.array([[150, 200, 150], [200, 900, 200], [150, 200, 150]], np.float32)
    blob[29:32, 99:102] += core
    first = _fused.cr_candidates(blob, model.bilinear(), var, mask, MASK["SAT"], cr, *ratios)
    done = cr.copy()
    done[first] = True
    _fused.interpolate_pixels(blob, done, *first)
    args2 = (blob, model.bilinear(), var, mask, MASK["SAT"], done, *ratios)
    full = _fused.cr_candidates(*args2)
    assert len(full[0]) > 0 and not done[full].any()
    np.testing.assert_array_equal(_fused.cr_candidates(*args2, near=first), full)


def test_smoothed_residual_equals_ndimage(planes):
    from scipy import ndimage

    img, _, mask = planes
    model = fit_background(np.nan_to_num(img) + np.linspace(0, 50, img.shape[1])[None, :], mask,
                        box=32, lazy=True)  # fmt: skip
    bkg = model.full()
    got, bad = _fused.smoothed_residual(img, model.bilinear(), mask, IGNORE_BITS, 1.9)
    want_bad = ~np.isfinite(img) | ((mask & IGNORE_BITS) != 0)
    np.testing.assert_array_equal(bad, want_bad)
    data = np.where(want_bad, 0.0, img - bkg).astype(np.float32)
    want = ndimage.gaussian_filter(data, 1.9, mode="constant", truncate=3.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_search_planes_screen_the_pixels_above_nsigma(planes):
    img, var, mask = planes
    img = img.copy()
    img[60:63, 70:74] += 400.0  # a blob, and pixels of it masked or of negative variance
    mask[61, 71] = MASK["SAT"]
    var = var.copy()
    var[62, 72] = -5.0
    model = fit_background(np.nan_to_num(img), mask, box=32, lazy=True)
    got = _fused.search_planes(img, model.bilinear(), mask, IGNORE_BITS, 1.9, variance=var,
                               nsigma=5.0)  # fmt: skip
    d = img - model.full()
    want = d > np.float32(5.0) * np.sqrt(np.maximum(var, np.float32(0.0)))
    np.testing.assert_array_equal(got.bright, np.nonzero(want))
    assert want[61, 71] and want[62, 72] and want.sum() >= 12
    np.testing.assert_array_equal(got.bad_pixels, np.nonzero(got.bad))
    sample = np.where(~got.bad & np.isfinite(var), var, np.nan)[::4, ::4]
    np.testing.assert_array_equal(got.variance_sample, sample)  # (203, 157): edges included
    sm, bad = _fused.smoothed_residual(img, model.bilinear(), mask, IGNORE_BITS, 1.9)
    np.testing.assert_array_equal(got.smoothed, sm)
    np.testing.assert_array_equal(got.bad, bad)
    # without a variance: no bright pixels
    assert len(_fused.search_planes(img, model.bilinear(), mask, IGNORE_BITS, 1.9).bright[0]) == 0


def test_stamps_less_background_equal_windows_of_the_map(planes):
    img, _, mask = planes
    model = fit_background(np.nan_to_num(img) + np.linspace(0, 50, img.shape[1])[None, :], mask,
                        box=32, lazy=True)  # fmt: skip
    ys, xs = np.array([5, 100, 197]), np.array([5, 80, 150])
    got = _fused.stamps_less_background(img, model.bilinear(), ys, xs, 5)
    coarse, jy, ty, jx, tx = model.bilinear()  # the blend of the full-frame passes
    t, u, one = ty[:, None], tx[None, :], np.float32(1.0)
    full = (one - t) * ((one - u) * coarse[jy][:, jx] + u * coarse[jy][:, jx + 1]) + t * (
        (one - u) * coarse[jy + 1][:, jx] + u * coarse[jy + 1][:, jx + 1]
    )
    for k, (y, x) in enumerate(zip(ys, xs, strict=True)):
        win = np.s_[y - 5 : y + 6, x - 5 : x + 6]
        want = img[win].astype(np.float64) - full[win].astype(np.float64)
        np.testing.assert_array_equal(got[k], want)


def test_boxes_clear_of_pixels_equal_boxes_clear():
    rng = np.random.default_rng(4)
    bad = rng.random((70, 90)) < 0.002
    bad[0, 0] = bad[69, 89] = bad[30, 45] = True
    ys, xs = rng.integers(-3, 73, 400), rng.integers(-3, 93, 400)
    ys[:3], xs[:3] = (30, 34, 27), (45, 41, 49)  # the pixel itself, box corners
    for half in (0, 1, 4, 12):
        want = _fused.boxes_clear(bad, ys, xs, half)
        got = _fused.boxes_clear_of(np.nonzero(bad), bad.shape, ys, xs, half)
        np.testing.assert_array_equal(got, want)
    assert not got[:3].any() and got.any()
    none = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert _fused.boxes_clear_of(none, bad.shape, ys, xs, 3).all()


@pytest.mark.parametrize("nx", [64, 61])
def test_flagged_pixels_equal_nonzero(nx):
    from apdask._kernels.fused._isr import _flagged_pixels

    rng = np.random.default_rng(nx)
    flags = rng.random((40, nx)) < 0.02
    flags[5] = True  # a full row
    flags[7, -1] = flags[8, 0] = True
    for f in (flags, flags[:, 1:]):  # rows read 8 flags at a time, or one by one
        counts = np.count_nonzero(f, axis=1).astype(np.int64)
        np.testing.assert_array_equal(_flagged_pixels(f, counts), np.nonzero(f))


def _psf_fit_one(image, variance, mask, psf, x, y, bkg=None):
    """Reference: the one-position PSF fit the batched fit replaced (apdask <= 9d1c12e)."""
    from apdask.pipeline.psf import shifted_psf
    from apdask.pipeline.stars import cutout_at

    half = psf.shape[0] // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    p = shifted_psf(psf, x - ix, y - iy)
    d = cutout_at(image, ix, iy, half, np.float32(np.nan)).astype(float)
    if bkg is not None:
        d = d - cutout_at(bkg, ix, iy, half, np.float32(0.0))
    v = cutout_at(variance, ix, iy, half, np.float32(np.nan)).astype(float)
    m = cutout_at(mask, ix, iy, half, np.uint32(MASK["NO_DATA"]))
    ok = np.isfinite(d) & np.isfinite(v) & ((m & IGNORE_BITS) == 0)
    edge = not bool(ok.all())
    ok &= p > 1e-4 * p.max()
    n = int(ok.sum())
    if n < 3:
        return np.nan, np.nan, n, np.nan, True, (np.nan, np.nan, np.nan)
    pp = p[ok]
    s2 = (pp * pp).sum()
    flux = (pp * d[ok]).sum() / s2
    err = np.sqrt((pp * pp * v[ok]).sum()) / s2
    chi2 = (((d[ok] - flux * pp) ** 2) / np.maximum(v[ok], 1e-30)).sum()
    gy, gx = np.gradient(p)
    return flux, err, n, chi2, edge, ((gx[ok] ** 2).sum(), (gy[ok] ** 2).sum(), s2)


def test_batched_psf_fits_equal_one_at_a_time(planes):
    from apdask.pipeline.measure.photometry import _psf_fit_many
    from apdask.pipeline.psf import PsfGrid, psfs_at

    img, var, mask = planes
    yy, xx = np.mgrid[-7:8, -7:8]
    stamps = np.array([[np.exp(-0.5 * (xx**2 + yy**2) / s**2) for s in (1.5, 2.0)],
                       [np.exp(-0.5 * (xx**2 + yy**2) / s**2) for s in (2.2, 2.6)]])  # fmt: skip
    stamps /= stamps.sum(axis=(2, 3), keepdims=True)
    model = PsfGrid(stamps, [40.0, 120.0], [50.0, 150.0])
    exp = Exposure(img, var, mask, None, stamps[0, 0], psf_model=model)
    x = np.array([30.2, 80.7, 101.3, 0.4, 156.2, 60.0, 41.9])
    y = np.array([30.9, 90.1, 101.6, 5.0, 202.4, 12.2, 40.1])  # CR, SAT, edges, NaN, bad
    bkg = fit_background(np.nan_to_num(img), mask, box=32, lazy=True)
    psfs = psfs_at(exp, None, x, y)
    for k in range(len(x)):
        np.testing.assert_allclose(psfs[k], model.at(x[k], y[k]), rtol=1e-12)
    for b in (None, bkg):
        f, fe, nd, chi2, edge, g, _lnv = _psf_fit_many(img, var, mask, psfs, x, y, b, full=True)
        for k in range(len(x)):
            ref = _psf_fit_one(img, var, mask, psfs[k], x[k], y[k], b)
            got = [f[k], fe[k], nd[k], chi2[k], *(a[k] for a in g)]
            np.testing.assert_allclose(got, [*ref[:4], *ref[5]], rtol=1e-6, atol=1e-4)
            assert edge[k] == ref[4]
        assert np.array_equal(_psf_fit_many(img, var, mask, psfs, x, y, b)[0], f, equal_nan=True)
    assert edge.sum() >= 3


def test_combine_inputs(planes):
    img, var, mask = planes
    img_t, var_t, mask_t = (a[::-1].copy() for a in planes)
    mask_t[7, 8] = MASK["DETECTED"] | MASK["CR"]
    bad_bits, clear = MASK["BAD"] | MASK["CR"], MASK["DETECTED"]
    got, bad, n_s, n_t = _fused.combine_inputs(
        (img, var, mask), (img_t, var_t, mask_t), MASK["NO_DATA"], bad_bits, clear
    )
    nd_s = ((mask & MASK["NO_DATA"]) != 0) | ~np.isfinite(img) | ~np.isfinite(var)
    nd_t = nd_s[::-1]
    both = mask | mask_t
    np.testing.assert_array_equal(got, both & ~np.uint32(clear))
    np.testing.assert_array_equal(bad, nd_s | nd_t | ((both & bad_bits) != 0))
    assert got[7, 8] == MASK["CR"] and bad[7, 8]
    assert (n_s, n_t) == (nd_s.sum(), nd_t.sum()) == (22, 22)
    clean = [np.nan_to_num(a) for a in (img, var)] + [mask & 0]
    assert _fused.combine_inputs(clean, clean, MASK["NO_DATA"], bad_bits, clear)[2:] == (0, 0)


def test_one_blas_thread_limits_blas_inside_only():
    import threadpoolctl

    def blas_threads():
        info = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
        return [p["num_threads"] for p in info]

    before = blas_threads()
    inside = _fused.one_blas_thread(blas_threads)()
    assert inside and all(n == 1 for n in inside)
    assert blas_threads() == before  # restored on return


@pytest.mark.parametrize("threads", [1, 2])
def test_in_thread_gives_the_result_and_raises_what_fn_raised(threads):
    """With one thread the call waits until its result is asked for, in the caller's
    thread; with two it runs in another thread at once, whose passes take one core."""
    import threading

    import dask

    def where(x):
        return x + 1, threading.current_thread(), _fused.inner_threads()

    def fails():
        raise ValueError("no")

    with dask.config.set({"apdask.compute.inner_threads": threads}):
        got = _fused.in_thread(where, 41)
        failed = _fused.in_thread(fails)
        value, thread, inner = got()
        with pytest.raises(ValueError, match="no"):
            failed()
        assert _fused.inner_threads() == threads  # the caller's own count is kept
    assert value == 42 and inner == 1
    assert (thread is threading.current_thread()) == (threads == 1)


@pytest.mark.parametrize("flip", [(False, False), (True, False), (False, True), (True, True)])
def test_amp_pass(flip):
    """One amplifier's ISR pass equals the NumPy chain, bit for bit, flips, non-finite
    raw, bias and dark pixels, hot darks, weak and dead flat pixels included."""
    rng = np.random.default_rng(7)
    raw = rng.normal(2.0e4, 300.0, (60, 48)).astype(np.float32)
    raw[5, 7], raw[10, 3:6], raw[20, 30] = np.nan, np.inf, 2.0e6
    data = (slice(2, 52), slice(4, 40))
    row = rng.normal(1.0e3, 5.0, 50).astype(np.float32)
    bias, dark = rng.normal(0, 2, (50, 36)), rng.uniform(0, 0.1, (50, 36))
    flat = rng.uniform(0.9, 1.1, (50, 36))
    bias[3, 3], bias[4, 4], dark[9, 9], dark[10, 10] = np.nan, np.inf, 5.0, np.nan
    flat[1, 1], flat[2, 2], flat[3, 5] = 0.3, -1.0, np.nan
    bias, dark, flat = (a.astype(np.float32) for a in (bias, dark, flat))
    bits = (MASK["SAT"], MASK["NO_DATA"], MASK["BAD"])
    img, var, mask, lost = _fused.amp_pass(
        raw, data, row, flip_y=flip[0], flip_x=flip[1], gain=1.7, saturation=1.0e6,
        bias=bias, dark=dark, darktime=31.0, flat=flat, read_noise=5.0, flat_bad=0.5,
        dark_hot=1.0, bits=bits,
    )  # fmt: skip
    d = raw[data]
    finite = np.isfinite(d)
    d = np.where(finite, d, np.float32(0))
    sat = d >= 1.0e6
    want = (d - row[:, None]) * np.float32(1.7)
    if flip[0]:
        want, sat, finite = want[::-1], sat[::-1], finite[::-1]
    if flip[1]:
        want, sat, finite = want[:, ::-1], sat[:, ::-1], finite[:, ::-1]
    dead = ~np.isfinite(flat) | (flat <= 0)
    f = np.where(dead, np.float32(1), flat)
    with np.errstate(over="ignore"):  # the infinite bias pixel: nan_to_num's float max
        want = want - np.nan_to_num(bias) - np.nan_to_num(dark) * np.float32(31.0)
        want = want / f
    want_var = np.maximum(want, 0) / f + np.float32(25.0) / (f * f)
    want[~finite] = 0
    want_mask = (
        np.where(sat, MASK["SAT"], 0)
        | np.where(~finite, MASK["NO_DATA"], 0)
        | np.where(~np.isfinite(bias) | ~np.isfinite(dark) | (dark > 1.0) | dead | (flat <= 0.5),
                   MASK["BAD"], 0)
    ).astype(np.uint32)  # fmt: skip
    np.testing.assert_array_equal(img, want)
    np.testing.assert_array_equal(var, want_var)
    np.testing.assert_array_equal(mask, want_mask)
    assert lost == np.count_nonzero(sat | ~finite) == 4


def test_place_block_equals_numpy():
    """The scaled copy of a block into a frame equals NumPy's multiply, then ``*=``, bit
    for bit (non-finite values and overflow included), and touches nothing else."""
    rng = np.random.default_rng(9)
    block = rng.normal(0, 1e3, (30, 20)).astype(np.float32)
    block[1, 1], block[2, 2], block[3, 3] = np.nan, -np.inf, 3e38
    for scales in ((np.float32(0.7),), (np.float32(0.7), np.float32(1.3)), (np.float32(9.0), 2.5)):
        got = np.full((50, 40), 5.0, np.float32)
        want = got.copy()
        _fused.place_block(got, block, 10, 15, *scales)
        dst = want[10:40, 15:35]
        with np.errstate(over="ignore"):
            np.multiply(block, scales[0], out=dst)
            for s in scales[1:]:
                dst *= s
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    with pytest.raises(ValueError, match="one or two"):
        _fused.place_block(got, block, 0, 0)


def test_local_peaks_equal_maximum_filter():
    from scipy import ndimage

    rng = np.random.default_rng(8)
    img = rng.normal(size=(90, 110)).astype(np.float32)
    img[40, 50] = img[40, 51] = 9.0  # a plateau: both are peaks
    img[0, 0], img[89, 109], img[0, 60] = 8.0, 8.0, 8.0  # corners and an edge
    img[20, 20] = np.nan  # never a peak, and its neighbours are not either
    img[70, ::2] = 7.0  # a row of 55 peaks (more than a row keeps as it goes)
    for t in (-np.inf, 0.5, 3.0):
        ys, xs = _fused.local_peaks(img, t)
        pad = np.pad(np.nan_to_num(img, nan=np.inf), 1, constant_values=-np.inf)
        peak = (ndimage.maximum_filter(pad, 3)[1:-1, 1:-1] == img) & (img > t)
        np.testing.assert_array_equal((ys, xs), np.nonzero(peak))
    assert (40, 51) in zip(*_fused.local_peaks(img, 3.0), strict=True)


def test_background_in_bands_side_by_side_equals_one_pass():
    import dask.config

    rng = np.random.default_rng(11)
    img = rng.normal(100.0, 5.0, (1700, 300)).astype(np.float32)  # 26 block rows: 3 bands
    img += np.linspace(0, 30, 300, dtype=np.float32)[None, :]
    img[200:260, 40:100] = np.nan  # a block with no data
    mask = np.zeros(img.shape, np.uint32)
    mask[500:700, 100:130] = MASK["SAT"]
    maps = []
    for threads in (1, 2, 3):
        with dask.config.set({"apdask.compute.inner_threads": threads}):
            maps.append(fit_background(img, mask, lazy=True).coarse)
            maps.append(fit_background(img, None, lazy=True).coarse)
    for k in range(2, len(maps)):
        np.testing.assert_array_equal(maps[k], maps[k % 2])
