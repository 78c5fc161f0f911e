"""Small array statistics used on hot paths, one implementation each."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MAD_TO_SIGMA", "nanmedian_last", "robust_sigma"]

#: Scale of the median absolute deviation to the σ of a Gaussian.
MAD_TO_SIGMA = 1.4826


def robust_sigma(x: npt.ArrayLike, center: Any = None) -> Any:
    """Robust standard deviation, ``1.4826 × median(|x − center|)``.

    Parameters
    ----------
    x : array_like
        Values (no NaN filtering: callers pass finite values).
    center : float, optional
        Centre of the deviations; the median of ``x`` if None.

    Returns
    -------
    numpy.floating
        The scaled MAD, a NumPy scalar in the precision of ``x`` (``float()`` it for
        a Python float).  The arithmetic is exactly ``1.4826 * np.median(np.abs(x -
        np.median(x)))``, so results are bit-identical to that expression.
    """
    a = np.asarray(x)
    if center is None:
        center = np.median(a)
    return MAD_TO_SIGMA * np.median(np.abs(a - center))


def nanmedian_last(a: npt.ArrayLike) -> np.ndarray:
    """Median over the last axis, ignoring NaN; NaN where a row has no finite value.

    Equal to ``np.nanmedian(a, axis=-1)`` but vectorised (one sort instead of a
    Python-level loop over rows), about 6x faster for block statistics of an image,
    and without the all-NaN RuntimeWarning.

    Parameters
    ----------
    a : array_like
        Values, reduced over the last axis.

    Returns
    -------
    numpy.ndarray
        The medians, shape ``a.shape[:-1]``.
    """
    a = np.asarray(a)
    s = np.sort(a, axis=-1)  # NaNs sort last
    n = np.count_nonzero(~np.isnan(a), axis=-1)
    lo = np.maximum((n - 1) // 2, 0)[..., None]
    hi = np.maximum(n // 2, 0)[..., None]
    v = 0.5 * (np.take_along_axis(s, lo, -1)[..., 0] + np.take_along_axis(s, hi, -1)[..., 0])
    return np.where(n > 0, v, np.nan)
