"""The simulator's fast asteroids: trailed sources, one visit each (issue 16).

An asteroid moves across the sky during the 30 s exposure, so its image is the PSF
convolved with a line segment (``docs/formats.md``).  Each CCD of each visit gets
its own asteroids (a fast mover is elsewhere at the next visit): position uniform on
the CCD away from its edges and 40 px from each other (fewer where they do not fit),
length uniform in 5-30 px, axis angle uniform, and a point-source S/N (of the whole
flux) log-uniform in 20-300.  They are absent from the templates.  Rendered as
pixel-integrated Gaussians at points 0.2 px apart along the segment, with the PSF of
the CCD at the trail's midpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from astropy.wcs import WCS

from apdask.core.camera import Detector
from apdask.tools._sim_model import _ASTEROID, _render_stars, _rng, _snr_to_flux

__all__: list[str] = []

#: Trail lengths (pixels) and point-source S/N of the simulated asteroids.
_LENGTH_PX = (5.0, 30.0)
_SNR = (20.0, 300.0)
#: Least distance (pixels) between two asteroids' midpoints on a CCD.
_SPACING = 40.0
#: Spacing (pixels) of the PSFs summed along a trail.
_STEP = 0.2


def _bearing_deg(w: WCS, x0: Any, y0: Any, x1: Any, y1: Any) -> tuple[np.ndarray, np.ndarray]:
    """Length (arcsec) and axis bearing (deg east of north, [0, 180)) of segments."""
    (ra0, ra1), (de0, de1) = (np.deg2rad(a) for a in w.pixel_to_world_values([x0, x1], [y0, y1]))
    y = np.sin(ra1 - ra0) * np.cos(de1)
    x = np.cos(de0) * np.sin(de1) - np.sin(de0) * np.cos(de1) * np.cos(ra1 - ra0)
    h = np.sin(0.5 * (de1 - de0)) ** 2 + np.cos(de0) * np.cos(de1) * np.sin(0.5 * (ra1 - ra0)) ** 2
    length = 3600.0 * np.rad2deg(2.0 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))
    return length, np.mod(np.rad2deg(np.arctan2(y, x)), 180.0)


def make_asteroids(
    seed: int, p: dict[str, Any], det: Detector, w: WCS, n: int, band: str, sky_e: float,
    fwhm_range: tuple[float, float],
) -> dict[str, np.ndarray]:  # fmt: skip
    """``n`` asteroids on one CCD of one visit: ``id``, ``x``, ``y``, ``ra``, ``dec``
    (the trail's midpoint), ``flux`` (nJy, the whole trail), ``length_px``,
    ``theta`` (rad, of +x towards +y), ``trail_length`` (arcsec) and ``trail_angle``
    (bearing of the axis, deg in [0, 180))."""
    rng = _rng(seed, _ASTEROID, p["visit"], det.id)
    ny, nx = det.shape
    margin = 0.5 * _LENGTH_PX[1] + 15.0
    cx = rng.uniform(margin, nx - 1 - margin, 20 * n)
    cy = rng.uniform(margin, ny - 1 - margin, 20 * n)
    keep: list[int] = []
    for i in range(len(cx)):  # trails not on top of each other
        if all(np.hypot(cx[i] - cx[j], cy[i] - cy[j]) > _SPACING for j in keep):
            keep.append(i)
        if len(keep) == n:
            break
    x, y = cx[keep], cy[keep]
    n = len(keep)
    length = rng.uniform(*_LENGTH_PX, n)
    theta = rng.uniform(-0.5 * np.pi, 0.5 * np.pi, n)
    snr = np.exp(rng.uniform(np.log(_SNR[0]), np.log(_SNR[1]), n))
    flux = _snr_to_flux(band, sky_e, snr, fwhm_range)
    ra, dec = w.pixel_to_world_values(x, y)
    ex, ey = 0.5 * length * np.cos(theta), 0.5 * length * np.sin(theta)
    sky_len, angle = _bearing_deg(w, x - ex, y - ey, x + ex, y + ey)
    # ids unique per (visit, CCD, k), apart from the static sky's and transients'
    ids = 900_000_000_000 + (int(p["visit"]) % 100_000) * 1_000_000 + det.id * 1_000
    return {
        "id": ids + np.arange(n, dtype=np.int64), "x": x, "y": y,
        "ra": np.mod(ra, 360.0), "dec": dec, "flux": flux, "length_px": length,
        "theta": theta, "trail_length": sky_len, "trail_angle": angle,
    }  # fmt: skip


def render_trails(
    img: np.ndarray,
    ast: dict[str, np.ndarray],
    k_njy: float,
    sigma_at: Callable[[float, float], Any],
) -> None:
    """Add the asteroids (electrons) to ``img``: PSF ⊗ segment, as Gaussians summed
    every :data:`_STEP` pixels along each trail; ``sigma_at(x, y)`` is the PSF width."""
    for i in range(len(ast["x"])):
        m = max(int(np.ceil(ast["length_px"][i] / _STEP)), 1)
        t = (np.arange(m) + 0.5) / m - 0.5
        xs = ast["x"][i] + ast["length_px"][i] * t * np.cos(ast["theta"][i])
        ys = ast["y"][i] + ast["length_px"][i] * t * np.sin(ast["theta"][i])
        sig = np.full(m, float(sigma_at(ast["x"][i], ast["y"][i])))
        _render_stars(img, xs, ys, np.full(m, ast["flux"][i] / k_njy / m), sig)
