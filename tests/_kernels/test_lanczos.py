"""Lanczos-3 resampling (apdask.lanczos): exactness, flat fields, noise, masking."""

import numpy as np

from apdask._kernels.lanczos import lanczos3_weights, resample


def _run(src, var, fx, fy, **kw):
    out = np.zeros(fx.shape, np.float32), np.zeros(fx.shape, np.float32), np.zeros(fx.shape, bool)
    resample(src, var, fx, fy, *out, **kw)
    return out


def test_integer_shift_is_exact_and_flat_stays_flat():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(60, 70)).astype(np.float32)
    yy, xx = np.mgrid[0:40, 0:50].astype(np.float32)
    img, var, fill = _run(src, np.ones_like(src), xx + 7, yy + 5)
    assert fill.all()
    np.testing.assert_allclose(img, src[5:45, 7:57], atol=1e-6)
    np.testing.assert_allclose(var, 1.0, atol=1e-6)  # one tap of weight 1
    img, _, _ = _run(np.full((60, 70), 3.0, np.float32), np.ones_like(src), xx + 7.3, yy + 5.6,
                     ratio=2.0)  # fmt: skip
    np.testing.assert_allclose(img, 6.0, rtol=1e-6)  # weights sum to one, then the area ratio


def test_smooth_image_and_white_noise_variance():
    yy, xx = np.mgrid[0:300, 0:300].astype(float)

    def blob(x, y):
        return 100 * np.exp(-((x - 150.3) ** 2 + (y - 140.7) ** 2) / (2 * 2.5**2))

    th = 0.02
    oy, ox = np.mgrid[0:200, 0:200].astype(float)
    fx = 40.37 + np.cos(th) * ox - np.sin(th) * oy
    fy = 30.81 + np.sin(th) * ox + np.cos(th) * oy
    img, _, _ = _run(blob(xx, yy).astype(np.float32), np.ones((300, 300), np.float32), fx, fy)
    truth = blob(fx, fy)
    assert np.abs(img - truth).max() < 0.005 * truth.max()
    assert abs(img.sum() / truth.sum() - 1) < 1e-4  # flux conserved
    noise = np.random.default_rng(2).normal(size=(300, 300)).astype(np.float32)
    img, var, _ = _run(noise, np.ones_like(noise), fx, fy, variance_scale="pixel")
    assert abs(img.var() / var.mean() - 1) < 0.03  # propagated variance = measured variance
    w = lanczos3_weights(fx - np.floor(fx))
    assert var.min() < (w**2).sum(-1).max()  # below one: interpolation averages noise
    # the default ("psf") variance is the noise power at PSF scales: sums over 10x10
    # boxes (the scale of a PSF flux) have the variance the plane predicts for
    # independent pixels; the per-pixel plane underestimates it
    img, var_psf, _ = _run(noise, np.ones_like(noise), fx, fy)
    np.testing.assert_allclose(var_psf, 1.0, rtol=1e-5)
    boxes = img.reshape(20, 10, 20, 10).sum(axis=(1, 3))
    assert abs(boxes.var() / (100 * var_psf.mean()) - 1) < 0.1
    assert boxes.var() / (100 * var.mean()) > 1.15  # (measured 1.21 here)


def test_bad_taps_and_bounds_leave_pixels_unfilled():
    src = np.ones((50, 50), np.float32)
    bad = np.zeros((50, 50), bool)
    bad[20, 20] = True
    yy, xx = np.mgrid[0:50, 0:50].astype(np.float32) + np.float32(0.5)
    img, _, fill = _run(src, src, xx, yy, bad=bad, bounds=(-0.5, 40.0, -0.5, 49.5))
    hit = ~fill
    # pixels whose 6x6 taps (floor(x)-2 .. floor(x)+3) include (20, 20), plus x > 40
    expect = np.zeros((50, 50), bool)
    expect[17:23, 17:23] = True
    expect[:, 40:] = True
    np.testing.assert_array_equal(hit, expect)
    assert (img[fill] == 1.0).all() and (img[~fill] == 0.0).all()


def _affine_case(uniform):
    rng = np.random.default_rng(3)
    src = rng.normal(size=(80, 90)).astype(np.float32)
    var = (np.full(src.shape, 2.5) if uniform else rng.uniform(1, 2, src.shape)).astype(np.float32)
    src[40, 45] = np.nan  # no data
    ny, nx = 70, 75
    ynodes, xnodes = np.array([0.0, 16, 32, 48, 64, ny - 1]), np.array([0.0, 32, 64, nx - 1])
    th = 0.3

    def pos(x, y):
        return 8.3 + np.cos(th) * x - np.sin(th) * y, -9.6 + np.sin(th) * x + np.cos(th) * y

    gx, gy = pos(*np.meshgrid(xnodes, ynodes))
    fx, fy = pos(*np.mgrid[0:ny, 0:nx][::-1].astype(float))
    return src, var, (gx, gy, ynodes, xnodes), (fx.astype(np.float32), fy.astype(np.float32))


def test_warp_on_a_coarse_grid_equals_resample():
    from apdask._kernels.lanczos import node_weights, warp

    for uniform in (False, True):
        src, var, (gx, gy, yn, xn), (fx, fy) = _affine_case(uniform)
        ny, nx = fx.shape
        for scale in ("psf", "pixel"):
            bounds = (-0.5, 89.5, -0.5, 79.5)  # to the edge: taps beyond repeat it
            ref = _run(src, var, fx, fy, bad=~np.isfinite(src), bounds=bounds, ratio=1.3,
                       variance_scale=scale)  # fmt: skip
            out = np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32)
            fill = np.zeros((ny, nx), bool)
            fill[:5, :5] = True  # already filled: left alone
            ref[2][:5, :5] = True
            ref[0][:5, :5] = ref[1][:5, :5] = 0.0
            n = warp(src, var, gx, gy, node_weights(yn, ny), node_weights(xn, nx), *out, fill,
                     bounds=bounds, ratio=1.3, variance_scale=scale)  # fmt: skip
            np.testing.assert_array_equal(fill, ref[2])
            assert n == ref[2].sum() - 25 and 0 < n < ny * nx - 25
            np.testing.assert_allclose(out[0], ref[0], atol=1e-4)  # resample: float32 positions
            np.testing.assert_allclose(out[1], ref[1], rtol=1e-5)


def test_warp_window_writes_at_its_origin():
    from apdask._kernels.lanczos import node_weights, warp

    src, var, (gx, gy, yn, xn), _ = _affine_case(False)
    ny, nx = 70, 75
    rows, cols = node_weights(yn, ny), node_weights(xn, nx)
    whole = np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32), np.zeros((ny, nx), bool)
    warp(src, var, gx, gy, rows, cols, *whole, bounds=(2.0, 86.0, 2.0, 76.0))
    part = np.zeros((ny, nx), np.float32), np.zeros((ny, nx), np.float32), np.zeros((ny, nx), bool)
    n = warp(src, var, gx, gy, (rows[0][10:30], rows[1][10:30]), (cols[0][20:60], cols[1][20:60]),
             *part, bounds=(2.0, 86.0, 2.0, 76.0), origin=(10, 20))  # fmt: skip
    assert n == part[2].sum() == whole[2][10:30, 20:60].sum()
    assert not part[2][:10].any() and not part[2][:, :20].any()
    np.testing.assert_array_equal(part[0][10:30, 20:60], whole[0][10:30, 20:60])


def test_shift_beyond_the_edge_repeats_it_and_no_bad_plane():
    from apdask._kernels.lanczos import any_set, shift

    rng = np.random.default_rng(6)
    src = rng.normal(size=(40, 50)).astype(np.float32)
    var = rng.uniform(1, 2, size=src.shape).astype(np.float32)
    for dy, dx in ((-1.3, 2.6), (3.2, -2.7), (9.4, 12.8)):  # taps off every edge
        img, v, b = shift(src, var, None, dy, dx, (35, 45))
        assert not b.any()
        fy, fx = (np.mgrid[0:35, 0:45] + np.array([dy, dx])[:, None, None]).astype(np.float32)
        ref = _run(src, var, fx, fy, bounds=(-1e9, 1e9, -1e9, 1e9))
        np.testing.assert_allclose(img, ref[0], atol=1e-4)
        np.testing.assert_allclose(v, ref[1], rtol=1e-4)
    mask = np.zeros((30, 5000), np.uint32)
    assert not any_set(mask, 4)
    mask[29, 4999] = 6
    assert any_set(mask, 4) and not any_set(mask, 8)


def test_shift_entirely_beyond_an_edge_repeats_it():
    from apdask._kernels.lanczos import shift

    src = np.tile(np.arange(10, dtype=np.float32), (12, 1))
    img, _, _ = shift(src, src, None, 2.0, -30.5, (4, 5))  # all left of column 0
    np.testing.assert_allclose(img, 0.0, atol=1e-6)
    img, _, _ = shift(src, src, None, 2.0, 40.5, (4, 5))  # all right of column 9
    np.testing.assert_allclose(img, 9.0, rtol=1e-6)
