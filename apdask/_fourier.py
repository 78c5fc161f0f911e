"""Fourier helpers shared by subtraction and detection."""

from __future__ import annotations

import numpy as np

__all__ = ["small_kernel_rfft2"]


def small_kernel_rfft2(kernels, fy, fx):
    """``rfft2`` on an ``fy × fx`` grid of small odd kernels centred on the origin.

    Each kernel (``n × n``, centre at ``n // 2``) is placed with its centre at
    pixel (0, 0), wrapping around, as for a 'same'-size convolution.  It is
    non-zero in only ``n`` rows and columns, so its transform is
    ``E_y · K · E_x`` with DFT matrices ``E_y`` (``fy × n``) and ``E_x``
    (``n × (fx // 2 + 1)``): one matrix product instead of a full-frame FFT,
    equal to ``scipy.fft.rfft2`` of the padded array to single precision.

    Parameters
    ----------
    kernels : sequence of numpy.ndarray
        Odd square kernels, all of the same size.
    fy, fx : int
        The transform grid.

    Returns
    -------
    numpy.ndarray
        complex64, shape ``(len(kernels), fy, fx // 2 + 1)``.
    """
    n = np.shape(kernels[0])[0]
    off = np.arange(n) - n // 2
    # phases reduced modulo the period first: exact for any grid size
    ex = np.exp(-2j * np.pi * (np.outer(off, np.arange(fx // 2 + 1)) % fx) / fx)
    ey = np.exp(-2j * np.pi * (np.outer(np.arange(fy), off) % fy) / fy)
    ex, ey = ex.astype(np.complex64), ey.astype(np.complex64)
    out = np.empty((len(kernels), fy, fx // 2 + 1), np.complex64)
    for i, k in enumerate(kernels):
        np.matmul(ey, np.asarray(k, np.complex64) @ ex, out=out[i])
    return out
