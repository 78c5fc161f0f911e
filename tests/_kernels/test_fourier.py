"""Tile-by-tile (overlap-save) convolution equals the full-frame linear convolution."""

import numpy as np
import pytest
from scipy import signal

from apdask._kernels.fourier import convolve_tiles, fast_length, tile_size
from apdask.pipeline.subtract.decorrelate import _truncated_psi, decorrelation_kernel
from apdask.pipeline.subtract.kernel import alard_lupton_basis

CASES = [((700, 1100), 256, 2), ((90, 130), None, 1)]  # several tiles, one tile


@pytest.mark.parametrize(("shape", "tile", "threads"), CASES)
def test_tiles_equal_full_frame_convolution(shape, tile, threads):
    rng = np.random.default_rng(0)
    a, b = (rng.normal(size=shape).astype(np.float32) for _ in range(2))
    k1, k2, k3 = rng.normal(size=(17, 17)), rng.normal(size=(41, 41)), rng.normal(size=(5, 5))
    wy, wx = np.linspace(-1, 1, shape[0]), np.linspace(0, 2, shape[1])
    out, out2 = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    jobs = [
        (out, [(None, None, [(0, k1), (1, k2)]), (wy, wx, [(0, k3)]), (None, wx, [(1, k1)])]),
        (out2, [(wy, None, [(1, k1)])]),
    ]
    convolve_tiles([a, b], jobs, threads=threads, tile=tile)

    def conv(img, k):
        return signal.fftconvolve(img.astype(float), k, mode="same")

    want = conv(a, k1) + conv(b, k2) + np.outer(wy, wx) * conv(a, k3) + wx * conv(b, k1)
    want2 = wy[:, None] * conv(b, k1)
    np.testing.assert_allclose(out, want, atol=2e-6 * np.abs(want).max())
    np.testing.assert_allclose(out2, want2, atol=2e-6 * np.abs(want2).max())
    if tile is not None:  # several tiles along both axes: the seams are covered
        assert shape[0] > tile_size(shape[0], 20, tile)[1]
        assert shape[1] > 2 * tile_size(shape[1], 20, tile)[1]


def test_tile_size():
    # 9 equal cores, not 8 full and a sliver; 500 = 2²·5³, not good_size's 486 = 2·3⁵
    assert tile_size(4000, 20, None) == (500, 445)
    assert tile_size(300, 20, None) == (360, 300)  # one tile: the whole axis
    size, core = tile_size(4000, 100, None)  # margins at most a quarter of the tile
    assert (size, core) == (1000, 800)


def test_fast_length():
    got = [fast_length(n) for n in (1, 7, 27, 28, 81, 483, 520, 1000)]
    assert got == [1, 8, 27, 30, 90, 500, 540, 1000]


def test_truncated_decorrelation_kernel_keeps_the_filter():
    """ψ cut where its wings fall below 1e-5 has the untruncated filter's transform."""
    basis = alard_lupton_basis([1.0, 2.0, 4.0], [4, 3, 2], 21)
    kern = basis[0] * 1.3 + 0.2 * basis[3]
    for v_a in (0.1, 1.0):
        psi = _truncated_psi(kern, 1.0, v_a, 10)
        full = decorrelation_kernel(kern, 1.0, v_a, size=61)
        assert psi.shape[0] < full.shape[0]
        assert psi.sum() == pytest.approx(1.0)
        n = 64
        f_t = np.abs(np.fft.rfft2(psi, s=(n, n)))
        f_f = np.abs(np.fft.rfft2(full, s=(n, n)))
        assert np.abs(f_t - f_f).max() < 1e-4 * f_f.max()
