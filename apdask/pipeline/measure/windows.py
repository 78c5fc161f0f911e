"""Stacks of square windows of an image around many pixels, gathered by slicing."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from apdask.pipeline.stars import stamps_at

__all__ = ["windows"]


def windows(
    arr: np.ndarray, xs: npt.ArrayLike, ys: npt.ArrayLike, half: int, fill: Any = np.nan
) -> np.ndarray:
    """``(n, 2 half + 1, 2 half + 1)`` windows of ``arr`` centred on integer ``(xs, ys)``;
    pixels off the array are ``fill``.

    Equal to :func:`apdask.pipeline.stars.stamps_at`, but the windows inside the array
    are copied row by row from a strided view instead of gathered pixel by pixel
    through full-size index arrays (~10x faster for large windows).
    """
    arr = np.asarray(arr)
    xs, ys = np.asarray(xs, np.int64).ravel(), np.asarray(ys, np.int64).ravel()
    ny, nx = arr.shape
    size = 2 * half + 1
    inside = (xs >= half) & (ys >= half) & (xs < nx - half) & (ys < ny - half)
    if inside.all():
        return sliding_window_view(arr, (size, size))[ys - half, xs - half]
    out = np.empty((len(xs), size, size), arr.dtype)
    for k in np.flatnonzero(inside).tolist():
        out[k] = arr[ys[k] - half : ys[k] + half + 1, xs[k] - half : xs[k] + half + 1]
    out[~inside] = stamps_at(arr, xs[~inside], ys[~inside], half, fill)
    return out
