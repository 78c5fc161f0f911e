"""The Veres trail model with its derivatives, and the residuals of its fit (numba).

:func:`apdask.pipeline.measure.trail.fit_trail` fits the model (a Gaussian PSF of
width ``sigma`` convolved with the segment from ``(xc - ex, yc - ey)`` to
``(xc + ex, yc + ey)``) to a few hundred pixels by Levenberg-Marquardt, the flux solved
linearly at each step (variable projection).  :func:`veres_fit` gives the model, the
best flux and the weighted residuals in one pass over the pixels (a NumPy evaluation
took ~20 array operations, each paying its call overhead on a few hundred pixels).
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["veres_fit", "veres_jacobian"]

#: Half-lengths below this are the point-source limit (as ``trail.veres_model``).
_POINT = 1e-3


@numba.njit(cache=True)
def _terms(x, y, t, sigma, m, dm, deriv):
    """Unit-flux model ``m`` at ``(x, y)`` and, with ``deriv``, its derivatives ``dm``
    (``(n, 4)``) with respect to ``t = (xc, yc, ex, ey)``."""
    xc, yc, ex, ey = t[0], t[1], t[2], t[3]
    half = math.hypot(ex, ey)
    s2 = sigma * sigma
    if half < _POINT:  # a Gaussian: no dependence on (ex, ey)
        norm = 1.0 / (2.0 * math.pi * s2)
        for i in range(len(x)):
            dx, dy = x[i] - xc, y[i] - yc
            v = norm * math.exp(-0.5 * (dx * dx + dy * dy) / s2)
            m[i] = v
            if deriv:
                dm[i, 0] = v * dx / s2
                dm[i, 1] = v * dy / s2
                dm[i, 2] = 0.0
                dm[i, 3] = 0.0
        return
    c, s = ex / half, ey / half
    a0 = 1.0 / (math.sqrt(2.0 * math.pi) * sigma)
    k = math.sqrt(2.0 / math.pi) / sigma  # d erf(a / (√2 σ)) / da at a = 0
    r2s = math.sqrt(2.0) * sigma
    for i in range(len(x)):
        dx, dy = x[i] - xc, y[i] - yc
        u = dx * c + dy * s
        v = -dx * s + dy * c
        across = a0 * math.exp(-0.5 * v * v / s2)
        along = math.erf((u + half) / r2s) - math.erf((u - half) / r2s)
        mi = across * along / (4.0 * half)
        m[i] = mi
        if deriv:
            ep = math.exp(-0.5 * (u + half) ** 2 / s2)
            em = math.exp(-0.5 * (u - half) ** 2 / s2)
            m_u = across * k * (ep - em) / (4.0 * half)
            m_v = -v / s2 * mi
            m_h = across * k * (ep + em) / (4.0 * half) - mi / half
            dm[i, 0] = -c * m_u + s * m_v
            dm[i, 1] = -s * m_u - c * m_v
            dm[i, 2] = (-s * v * m_u + s * u * m_v) / half + c * m_h
            dm[i, 3] = (c * v * m_u - c * u * m_v) / half + s * m_h


@numba.njit(cache=True)
def veres_fit(
    x: np.ndarray, y: np.ndarray, d: np.ndarray, w: np.ndarray, t: np.ndarray, sigma: float,
    m: np.ndarray, dm: np.ndarray, r: np.ndarray, deriv: bool,
) -> float:  # fmt: skip
    """Weighted residuals of the best-flux Veres model.

    For pixels ``(x, y)`` with data ``d`` and weights ``w`` (inverse variances): the
    unit-flux model ``m`` at ``t = (xc, yc, ex, ey)`` (and, with ``deriv``, its
    derivatives ``dm``, ``(n, 4)``), written into ``m`` and ``dm``; the residuals
    ``r = (d - F m) √w`` of the flux ``F = Σ w m d / Σ w m²`` (0 where the model
    vanishes), written into ``r``.  Returns ``F``.
    """
    _terms(x, y, t, sigma, m, dm, deriv)
    num, den = 0.0, 0.0
    for i in range(len(x)):
        wm = w[i] * m[i]
        num += wm * d[i]
        den += wm * m[i]
    flux = num / den if den > 0 else 0.0
    for i in range(len(x)):
        r[i] = (d[i] - flux * m[i]) * math.sqrt(w[i])
    return flux


@numba.njit(cache=True)
def veres_jacobian(
    x: np.ndarray, y: np.ndarray, d: np.ndarray, w: np.ndarray, t: np.ndarray, sigma: float,
    steps: np.ndarray, r0: np.ndarray, jac: np.ndarray, m: np.ndarray, dm: np.ndarray,
    r: np.ndarray,
) -> None:  # fmt: skip
    """Forward-difference Jacobian of :func:`veres_fit`'s residuals at ``t`` (``r0``),
    column ``k`` with the step ``steps[k]`` of ``t[k]``, into ``jac`` (``(n, 4)``);
    ``m``, ``dm`` and ``r`` are scratch (left at the last step's point)."""
    for k in range(4):
        t1 = t.copy()
        t1[k] = t[k] + steps[k]
        dx = t1[k] - t[k]
        veres_fit(x, y, d, w, t1, sigma, m, dm, r, False)
        for i in range(len(x)):
            jac[i, k] = (r[i] - r0[i]) / dx
