"""Trailed-source fit of elongated DiaSources (fast-moving objects).

The model is Veres et al. (2012, PASP 124, 1197), as in Rubin's
``ext_trailedSources_Veres``: a circular Gaussian PSF of width ``sigma`` convolved
with a line segment of length ``L`` at angle ``theta`` through ``(xc, yc)``,

    m(x, y) = F / (2 L) · N(v; sigma) · [erf((u + L/2) / (√2 sigma)) - erf((u - L/2) / (√2 sigma))]

with ``u`` along and ``v`` across the trail and ``N`` the unit Gaussian.  ``sigma``
is that of the Gaussian fitted to the PSF stamp (:func:`psf_sigma`), which includes
the pixel response, so the model is evaluated at pixel centres.  The segment is
parametrised by its centre and half-vector ``(ex, ey) = L/2 (cos theta, sin theta)``
(smooth through ``L = 0``, no angle wrap); the flux is solved linearly at each step
(variable projection) and the four geometric parameters by Levenberg-Marquardt.
Errors are the diagonal of ``(JᵀWJ)⁻¹`` of all five parameters at the solution;
below a length of 2 sigma, where the model depends on L², the length's error is where
Δχ² = 1 above the fitted length, and the angle's error is at most 90°.  The Gaussian
misses the wings of a real PSF, so the flux is divided by :func:`psf_flux_ratio` (the
Gaussian model's flux of the real PSF convolved with the fitted segment), which puts
it on the scale of ``psfFlux``.
Which sources are fitted, and the accuracy on injected trails, are in
``docs/alerts.md`` ("Trailed-source fit").
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.table import Table
from scipy.optimize import leastsq, minimize_scalar
from scipy.special import erf

from apdask._kernels.trail import veres_fit, veres_jacobian
from apdask.core.exposure import IGNORE_BITS, MASK, Exposure
from apdask.pipeline.measure.dipole import _bearing, _separation
from apdask.pipeline.psf import psf_fwhm

__all__ = [
    "TRAIL_COLUMNS",
    "psf_flux_ratio",
    "fit_trail",
    "fit_trails",
    "is_elongated",
    "psf_sigma",
    "veres_model",
]

#: Float columns :func:`fit_trails` fills (NaN where no fit was made).
TRAIL_COLUMNS = (
    "trailFlux", "trailFluxErr", "trailRa", "trailRaErr", "trailDec", "trailDecErr",
    "trailLength", "trailLengthErr", "trailAngle", "trailAngleErr", "trailChi2",
)  # fmt: skip

#: A source is fitted when the largest eigenvalue of its Gaussian-weighted second
#: moments exceeds the PSF's (same weight) by this factor.
MIN_ELONGATION = 1.2
#: Longest trail fitted (pixels); the stamp is the footprint's box, at most this wide.
_MAX_LENGTH = 200.0
#: Pixels where the fitted model exceeds this fraction of its peak make the edge test.
_EDGE_LEVEL = 0.01
_SQRT2 = np.sqrt(2.0)
#: Relative step of the forward differences (scipy's for ``jac="2-point"``).
_FD_STEP = float(np.sqrt(np.finfo(np.float64).eps))


def veres_model(x: np.ndarray, y: np.ndarray, t: Any, sigma: float) -> np.ndarray:
    """Unit-flux Veres trail at pixel centres ``(x, y)``: PSF (Gaussian ``sigma``)
    convolved with the segment from ``(xc - ex, yc - ey)`` to ``(xc + ex, yc + ey)``,
    ``t = (xc, yc, ex, ey)`` in pixels."""
    xc, yc, ex, ey = (float(a) for a in t)
    half = float(np.hypot(ex, ey))
    dx, dy = x - xc, y - yc
    if half < 1e-3:  # the point-source limit
        return np.exp(-0.5 * (dx * dx + dy * dy) / sigma**2) / (2.0 * np.pi * sigma**2)
    c, s = ex / half, ey / half
    u = dx * c + dy * s
    v = -dx * s + dy * c
    across = np.exp(-0.5 * (v / sigma) ** 2) / (np.sqrt(2.0 * np.pi) * sigma)
    along = erf((u + half) / (_SQRT2 * sigma)) - erf((u - half) / (_SQRT2 * sigma))
    return across * along / (4.0 * half)


def psf_sigma(psf: np.ndarray) -> float:
    """Width (pixels) of the Gaussian that fits a PSF stamp best (least squares, flux
    free, centred on the stamp): the ``sigma`` of the Veres model for that PSF.

    The best flux of a given width is linear (and not negative), so only the width is
    searched: bounded Brent on ``[0.2, stamp size]``.
    """
    p = np.asarray(psf, float)
    n = p.shape[0]
    o = (np.arange(n) - n // 2) ** 2
    r2 = (o[:, None] + o[None, :]).astype(float)
    pp = float((p * p).sum())

    def cost(s: float) -> float:  # χ² at the best flux (≥ 0) of width s
        g = np.exp(-0.5 * r2 / (s * s))
        gp = max(float((g * p).sum()), 0.0)
        return pp - gp * gp / float((g * g).sum())

    sol = minimize_scalar(cost, bounds=(0.2, float(n)), method="bounded", options={"xatol": 1e-9})
    return float(sol.x) if sol.success else max(float(psf_fwhm(p)) / 2.3548, 0.3)


def psf_flux_ratio(psf: np.ndarray, sigma: float, fit: dict[str, Any]) -> float:
    """Flux the Gaussian model assigns to a unit-flux trail of the real PSF.

    The PSF stamp convolved with the fitted segment (by FFT: the segment's transfer
    function is ``sinc(2 k·e)``) is fitted by the Gaussian Veres model of the same
    geometry; the fitted flux divided by this ratio is the flux on the PSF's scale
    (as ``psfFlux``).  1 for a Gaussian PSF; about 0.9 for a PSF with 20 % of its
    light in wide wings.
    """
    p = np.asarray(psf, float)
    ex, ey = 0.5 * (fit["x1"] - fit["x0"]), 0.5 * (fit["y1"] - fit["y0"])
    if not np.hypot(ex, ey) <= _MAX_LENGTH:  # no grid for a runaway fit (NaN included)
        return 1.0
    h = p.shape[0] // 2
    ny = p.shape[0] + 2 * int(np.ceil(abs(ey))) + 8
    nx = p.shape[1] + 2 * int(np.ceil(abs(ex))) + 8
    grid = np.zeros((ny, nx))
    cy, cx = ny // 2, nx // 2
    grid[cy - h : cy - h + p.shape[0], cx - h : cx - h + p.shape[1]] = p
    ky = np.fft.fftfreq(ny)[:, None]
    kx = np.fft.rfftfreq(nx)[None, :]
    f = np.fft.rfft2(np.fft.ifftshift(grid)) * np.sinc(2.0 * (kx * ex + ky * ey))
    true = np.fft.fftshift(np.fft.irfft2(f, s=(ny, nx)))
    yy, xx = np.mgrid[:ny, :nx].astype(float)
    gauss = veres_model(xx, yy, (cx, cy, ex, ey), sigma)
    den = float((gauss * gauss).sum())
    ratio = float((gauss * true).sum()) / den if den > 0 else 1.0
    return ratio if np.isfinite(ratio) and ratio > 0.2 else 1.0


def is_elongated(
    ixx: Any, iyy: Any, ixy: Any, pxx: float, pyy: float, pxy: float = 0.0
) -> np.ndarray:
    """Sources whose moments' major axis exceeds the PSF's by :data:`MIN_ELONGATION`
    (the sources :func:`fit_trails` fits); NaN moments are not elongated."""
    ixx, iyy, ixy = (np.asarray(a, float) for a in (ixx, iyy, ixy))
    major = 0.5 * (ixx + iyy) + np.sqrt(np.maximum(0.25 * (ixx - iyy) ** 2 + ixy * ixy, 0.0))
    p_major = 0.5 * (pxx + pyy) + np.sqrt(max(0.25 * (pxx - pyy) ** 2 + pxy * pxy, 0.0))
    with np.errstate(invalid="ignore"):
        return np.asarray(np.isfinite(major) & (major > MIN_ELONGATION * p_major))


def _start(d: np.ndarray, x: np.ndarray, y: np.ndarray, ok: np.ndarray, sigma: float, noise):
    """``(xc, yc, ex, ey)`` from the unweighted moments of the significant pixels."""
    wgt = np.where(ok & (d > 2.0 * noise), d, 0.0)
    s = wgt.sum()
    if s <= 0:
        return None
    xc, yc = (wgt * x).sum() / s, (wgt * y).sum() / s
    dx, dy = x - xc, y - yc
    ixx, iyy, ixy = (wgt * dx * dx).sum() / s, (wgt * dy * dy).sum() / s, (wgt * dx * dy).sum() / s
    theta = 0.5 * np.arctan2(2.0 * ixy, ixx - iyy)
    tr, det = ixx + iyy, np.sqrt(max((ixx - iyy) ** 2 + 4 * ixy * ixy, 0.0))
    l1, l2 = 0.5 * (tr + det), 0.5 * (tr - det)
    # a uniform segment of length L adds L²/12 along it; the cut at 2 sigma_noise
    # trims the profile's wings about equally across and along
    half = 0.5 * min(np.sqrt(12.0 * max(l1 - l2, 0.0)), _MAX_LENGTH)
    return np.array([xc, yc, half * np.cos(theta), half * np.sin(theta)])


def fit_trail(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int, int, int],
    sigma: float,
    sign: float = 1.0,
    start: np.ndarray | None = None,
    max_nfev: int = 200,
) -> dict[str, Any] | None:
    """Fit the Veres trail model to the pixels of ``box`` of a difference image.

    Parameters
    ----------
    image, variance, mask : numpy.ndarray
        The difference image's planes.
    box : tuple of int
        ``(x0, x1, y0, y1)``, end exclusive; clipped to the image.
    sigma : float
        Gaussian width of the PSF (pixels).
    sign : float, optional
        -1 for a negative source (the image is negated).
    start : numpy.ndarray, optional
        Starting ``(xc, yc, ex, ey)``; default from the stamp's moments.
    max_nfev : int, optional
        Most model evaluations.

    Returns
    -------
    dict or None
        ``x``, ``y`` (centre), ``length`` (px), ``theta`` (rad, of +x towards +y,
        in (-π/2, π/2]), ``flux`` (image units), their errors ``x_err``, ``y_err``,
        ``length_err``, ``theta_err``, ``flux_err``, ``chi2``, ``ndata``, ``success``,
        ``dchi2_point`` (χ² of a zero-length trail at the same centre, less ``chi2``)
        and the end points ``x0``, ``y0``, ``x1``, ``y1``; None when the box holds
        fewer usable pixels than 10 or no significant pixel.
    """
    ny, nx = image.shape
    x0, x1 = max(int(box[0]), 0), min(int(box[1]), nx)
    y0, y1 = max(int(box[2]), 0), min(int(box[3]), ny)
    if x1 <= x0 or y1 <= y0:
        return None
    d = sign * image[y0:y1, x0:x1].astype(float)
    v = variance[y0:y1, x0:x1].astype(float)
    m = mask[y0:y1, x0:x1]
    ok = np.isfinite(d) & np.isfinite(v) & (v > 0) & ((m & IGNORE_BITS) == 0)
    ndata = int(ok.sum())
    if ndata < 10:
        return None
    yy, xx = np.mgrid[y0:y1, x0:x1]
    x, y, dd = xx[ok].astype(float), yy[ok].astype(float), d[ok]
    w = 1.0 / v[ok]
    t0 = start if start is not None else _start(d, xx, yy, ok, sigma, np.sqrt(np.median(v[ok])))
    if t0 is None:
        return None
    model = _Residuals(x, y, dd, w, sigma)
    t, success = _levenberg_marquardt(model, t0, max_nfev)
    chi2 = float((model.residuals(t) ** 2).sum())
    flux = model.flux
    cov = _covariance(*model.derivatives(t), flux, np.sqrt(w))
    resid = model.residuals
    # chi² of a point source at the same centre: a length is significant by sqrt(Δχ²)
    dchi2 = max(float((resid(np.array([t[0], t[1], 0.0, 0.0])) ** 2).sum()) - chi2, 0.0)
    out = _result(t, flux, cov, chi2, ndata, success)
    out["dchi2_point"] = dchi2
    length = out["length"]
    if length < 2.0 * sigma:
        # near L = 0 the model depends on L², so χ² ≈ min + k (L² - L_fit²)² and the
        # linear error is wrong (degenerate at L = 0): k from a probe at twice the
        # length (at least 2 sigma), the error where Δχ² = 1
        lp = max(2.0 * sigma, 2.0 * length)
        c, sn = np.cos(out["theta"]), np.sin(out["theta"])
        probe = np.array([t[0], t[1], 0.5 * lp * c, 0.5 * lp * sn])
        d_probe = max(float((resid(probe) ** 2).sum()) - chi2, 1e-12)
        k = d_probe / (lp * lp - length * length) ** 2
        out["length_err"] = float(np.sqrt(length**2 + 1 / np.sqrt(k)) - length)
    return out


def _levenberg_marquardt(model: _Residuals, t0: np.ndarray, max_nfev: int) -> tuple[Any, bool]:
    """MINPACK's ``lmder`` on ``model`` from ``t0``: the solution and whether it converged.

    The call ``least_squares(model.residuals, t0, jac=model.jacobian, method="lm",
    x_scale=1.0, max_nfev=max_nfev)`` makes (the same tolerances, step bound and
    scales: the same steps to the same solution, bit for bit), through
    ``scipy.optimize.leastsq``: without ``least_squares``' wrappers of the residuals and
    the Jacobian and its Jacobian at the solution, which the fit does not use (~0.5 ms
    of a trail fit's ~2 ms).  Success is ``least_squares``' (``status > 0``).
    """
    t0 = np.atleast_1d(np.asarray(t0, float))
    if not np.all(np.isfinite(model.residuals(t0))):  # as least_squares checks
        raise ValueError("Residuals are not finite in the initial point.")
    t, _, _, _, info = leastsq(
        model.residuals, t0, Dfun=model.jacobian, full_output=True, ftol=1e-8, xtol=1e-8,
        gtol=1e-8, maxfev=int(max_nfev), factor=100.0, diag=np.ones(len(t0)),
    )  # fmt: skip
    return t, info in (1, 2, 3, 4)


class _Residuals:
    """Weighted residuals of the best-flux Veres model of given pixels
    (:func:`apdask._kernels.trail.veres_fit`) and their forward-difference Jacobian;
    the last point's model, its derivatives and flux are kept (``m``, ``dm``, ``flux``).

    The Jacobian is the one ``least_squares(jac="2-point")`` forms (the same steps),
    without its per-column Python machinery: the fit takes the same path to the same
    solution.  (The exact derivatives would converge in fewer steps, but to another
    local minimum on some faint sources, and so change which fits fail.)
    """

    def __init__(self, x, y, d, w, sigma):
        self.x, self.y, self.d, self.w, self.sigma = x, y, d, w, float(sigma)
        n = len(x)
        self.m, self.dm, self.r = np.empty(n), np.empty((n, 4)), np.empty(n)
        self.t: np.ndarray | None = None
        self.flux = 0.0

    def _at(self, t: np.ndarray, deriv: bool = False) -> None:
        if deriv or self.t is None or not np.array_equal(t, self.t):
            args = (self.x, self.y, self.d, self.w, t, self.sigma, self.m, self.dm, self.r)
            self.flux = float(veres_fit(*args, deriv))
            self.t = t.copy()

    def residuals(self, t: np.ndarray) -> np.ndarray:
        """Weighted residuals at ``t = (xc, yc, ex, ey)`` (a new array)."""
        self._at(np.ascontiguousarray(t, dtype=float))
        return self.r.copy()

    def derivatives(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The unit-flux model at ``t`` and its derivatives, ``(n,)`` and ``(n, 4)``."""
        self._at(np.ascontiguousarray(t, dtype=float), deriv=True)
        return self.m, self.dm

    def jacobian(self, t: np.ndarray) -> np.ndarray:
        """Forward differences at ``t``, steps ``√ε · max(1, |t|)`` as scipy's."""
        t = np.ascontiguousarray(t, dtype=float)
        f0 = self.residuals(t)
        h = _FD_STEP * np.where(t >= 0, 1.0, -1.0) * np.maximum(1.0, np.abs(t))
        jac = np.empty((len(f0), len(t)))
        veres_jacobian(self.x, self.y, self.d, self.w, t, self.sigma, h, f0, jac, self.m,
                       self.dm, self.r)  # fmt: skip
        self.t = None  # the scratch arrays no longer hold the model at t
        return jac


def _covariance(m, dm, flux, sw) -> np.ndarray:
    """``(JᵀWJ)⁻¹`` of ``(flux, xc, yc, ex, ey)`` from the unit-flux model ``m`` and its
    derivatives ``dm`` at the solution."""
    jac = np.column_stack([m * sw, flux * dm * sw[:, None]])
    return np.linalg.pinv(jac.T @ jac)


def _result(t, flux, cov, chi2, ndata, success) -> dict[str, Any]:
    """The fit's values and errors in length and angle from ``(flux, xc, yc, ex, ey)``."""
    xc, yc, ex, ey = (float(a) for a in t)
    half = float(np.hypot(ex, ey))
    theta = float(np.arctan2(ey, ex))
    if theta <= -0.5 * np.pi:
        theta += np.pi
    elif theta > 0.5 * np.pi:
        theta -= np.pi
    var = np.diag(cov)
    cxy = cov[3:, 3:]
    if half > 1e-6:
        g_len = 2.0 * np.array([ex, ey]) / half
        g_ang = np.array([-ey, ex]) / half**2
        len_err = float(np.sqrt(max(g_len @ cxy @ g_len, 0.0)))
        ang_err = min(float(np.sqrt(max(g_ang @ cxy @ g_ang, 0.0))), 0.5 * np.pi)
    else:
        len_err = float(2.0 * np.sqrt(max(0.5 * (var[3] + var[4]), 0.0)))
        ang_err = 0.5 * np.pi
    return {
        "x": xc, "y": yc, "length": 2.0 * half, "theta": theta, "flux": float(flux),
        "x_err": float(np.sqrt(max(var[1], 0.0))), "y_err": float(np.sqrt(max(var[2], 0.0))),
        "length_err": len_err, "theta_err": ang_err,
        "flux_err": float(np.sqrt(max(var[0], 0.0))),
        "chi2": chi2, "ndata": ndata, "success": success,
        "x0": xc - ex, "y0": yc - ey, "x1": xc + ex, "y1": yc + ey,
    }  # fmt: skip


def trail_on_edge(exposure: Exposure, fit: dict[str, Any], sigma: float) -> bool:
    """The fitted trail reaches off the image or onto ``EDGE``/``NO_DATA`` pixels: a
    pixel where the model exceeds :data:`_EDGE_LEVEL` of its peak is one of those."""
    ny, nx = exposure.shape
    reach = sigma * np.sqrt(-2.0 * np.log(_EDGE_LEVEL))
    xa, xb = sorted((fit["x0"], fit["x1"]))
    ya, yb = sorted((fit["y0"], fit["y1"]))
    if xa - reach < -0.5 or ya - reach < -0.5 or xb + reach > nx - 0.5 or yb + reach > ny - 0.5:
        return True
    # the box within the image (the test above leaves the model inside it, but the
    # rounding outwards can reach one pixel past the last row or column)
    bx0, bx1 = max(int(np.floor(xa - reach)), 0), min(int(np.ceil(xb + reach)) + 1, nx)
    by0, by1 = max(int(np.floor(ya - reach)), 0), min(int(np.ceil(yb + reach)) + 1, ny)
    yy, xx = np.mgrid[by0:by1, bx0:bx1]
    ex, ey = 0.5 * (fit["x1"] - fit["x0"]), 0.5 * (fit["y1"] - fit["y0"])
    mod = veres_model(xx, yy, (fit["x"], fit["y"], ex, ey), sigma)
    near = mod > _EDGE_LEVEL * mod.max()
    bits = MASK["EDGE"] | MASK["NO_DATA"]
    return bool(np.any((exposure.mask[by0:by1, bx0:bx1] & bits)[near]))


def _within(fit: dict[str, Any], box: tuple[int, int, int, int]) -> bool:
    """The fitted trail is one the box's pixels can say anything about: its centre in
    the box and its length at most the box's diagonal.  The unbounded fit can run away
    on a blend or a galaxy's residual (a NIRCam cluster field gave a 20,000-px
    "trail", whose flux correction then asked for a 21,143 × 12,923 grid)."""
    x0, x1, y0, y1 = box
    return bool(
        x0 - 0.5 <= fit["x"] <= x1 - 0.5
        and y0 - 0.5 <= fit["y"] <= y1 - 0.5
        and fit["length"] <= np.hypot(x1 - x0, y1 - y0)
    )


def fit_trails(
    tab: Table,
    difference: Exposure,
    detections: Table,
    psf_at: Any,
    flux_scale: float = 1.0,
) -> None:
    """Fill the ``trail*`` columns, ``trailNdata``, ``trail_flag`` and ``trail_flag_edge``.

    The sources fitted are those :func:`is_elongated` selects from ``ixx``, ``iyy``,
    ``ixy`` and ``ixxPSF``, ``iyyPSF``, ``ixyPSF``; each is fitted on its footprint's
    box grown by 3 PSF sigma.  ``trailNdata`` is the pixels of the fit (0: not
    fitted), ``trail_flag`` is set where a fit was attempted and failed (too few
    pixels, no convergence or a non-finite result; its values are then NaN) and
    ``trail_flag_edge`` where the fitted trail reaches the image's edge.

    Parameters
    ----------
    tab : astropy.table.Table
        DiaSources of ``measure_sources`` (``x``, ``y``, moments, ``isNegative``),
        changed in place.
    difference : apdask.core.exposure.Exposure
    detections : astropy.table.Table
        The detections of ``tab`` (same rows): their ``bbox_*``.
    psf_at : callable
        ``(x, y) -> PSF stamp``.
    flux_scale : float, optional
        Aperture correction applied to the fitted flux, as to ``psfFlux``.
    """
    n = len(tab)
    out = {c: np.full(n, np.nan) for c in TRAIL_COLUMNS}
    ndata, failed, edge = np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool)
    col = {c: np.asarray(tab[c], float) for c in ("ixx", "iyy", "ixy", "ixxPSF", "iyyPSF")}
    pxy = np.asarray(tab["ixyPSF"], float) if n else np.zeros(0)
    todo = np.zeros(n, bool)
    for i in range(n):
        todo[i] = bool(
            is_elongated(col["ixx"][i], col["iyy"][i], col["ixy"][i], col["ixxPSF"][i],
                         col["iyyPSF"][i], float(pxy[i]))
        )  # fmt: skip
    neg = np.asarray(tab["isNegative"], bool) if n else np.zeros(0, bool)
    sigmas: dict[bytes, float] = {}
    for i in np.flatnonzero(todo).tolist():
        xs, ys = float(tab["x"][i]), float(tab["y"][i])
        psf = np.asarray(psf_at(xs, ys), float)
        key = psf.tobytes()
        if key not in sigmas:  # one fit per distinct PSF stamp
            sigmas[key] = psf_sigma(psf)
        sigma = sigmas[key]
        grow = int(np.ceil(3.0 * sigma))
        bx0, bx1 = int(detections["bbox_x0"][i]) - grow, int(detections["bbox_x1"][i]) + grow
        by0, by1 = int(detections["bbox_y0"][i]) - grow, int(detections["bbox_y1"][i]) + grow
        cap = int(_MAX_LENGTH) // 2 + grow
        ix, iy = int(round(xs)), int(round(ys))
        box = (
            max(bx0, ix - cap),
            min(bx1, ix + cap + 1),
            max(by0, iy - cap),
            min(by1, iy + cap + 1),
        )
        sign = -1.0 if neg[i] else 1.0
        fit = fit_trail(difference.image, difference.variance, difference.mask, box, sigma, sign)
        good = (
            fit is not None
            and fit["success"]
            and np.isfinite([fit["flux"], fit["flux_err"], fit["length"], fit["x"], fit["y"]]).all()
            and _within(fit, box)
        )
        if not good or fit is None:
            failed[i] = True
            continue
        ratio = psf_flux_ratio(psf, sigma, fit)
        fit["flux"], fit["flux_err"] = fit["flux"] / ratio, fit["flux_err"] / ratio
        ndata[i] = fit["ndata"]
        edge[i] = trail_on_edge(difference, fit, sigma)
        _fill_row(out, i, fit, difference, sign * flux_scale)
    for c in TRAIL_COLUMNS:
        tab[c] = out[c].astype(np.float64 if c in ("trailRa", "trailDec") else np.float32)
    tab["trailNdata"] = ndata
    tab["trail_flag"] = failed
    tab["trail_flag_edge"] = edge


def _fill_row(
    out: dict[str, np.ndarray], i: int, fit: dict[str, Any], exp: Exposure, scale: float
) -> None:
    """The schema's trail values of one source from a :func:`fit_trail` result."""
    wcs = exp.wcs
    (ra0, ra1, rac), (de0, de1, dec) = wcs.pixel_to_world_values(
        [fit["x0"], fit["x1"], fit["x"]], [fit["y0"], fit["y1"], fit["y"]]
    )
    cd = wcs.pixel_scale_matrix
    scale_arcsec = 3600.0 * float(np.sqrt(abs(np.linalg.det(cd))))
    xe, ye = fit["x_err"], fit["y_err"]
    out["trailFlux"][i] = fit["flux"] * scale
    out["trailFluxErr"][i] = fit["flux_err"] * abs(scale)
    out["trailRa"][i] = float(np.mod(rac, 360.0))
    out["trailDec"][i] = float(dec)
    # angular errors (the RA one as ∂RA cos Dec, as the schema documents)
    out["trailRaErr"][i] = float(np.hypot(cd[0, 0] * xe, cd[0, 1] * ye))
    out["trailDecErr"][i] = float(np.hypot(cd[1, 0] * xe, cd[1, 1] * ye))
    if fit["length"] > 1e-6:
        out["trailLength"][i] = 3600.0 * float(_separation(ra0, de0, ra1, de1))
        # a trail has no head: the bearing of its axis, in [0, 180)
        out["trailAngle"][i] = float(np.mod(_bearing(ra0, de0, ra1, de1), 180.0))
    else:
        out["trailLength"][i] = 0.0
        out["trailAngle"][i] = float(np.mod(90.0 - np.rad2deg(fit["theta"]), 180.0))
    out["trailLengthErr"][i] = fit["length_err"] * scale_arcsec
    out["trailAngleErr"][i] = float(np.rad2deg(fit["theta_err"]))
    out["trailChi2"][i] = fit["chi2"]
