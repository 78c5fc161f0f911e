"""Sky footprints of the Butler: WCS cards, tile corners and polygon overlap tests.

Polygons are ``(N, 2)`` arrays of ra/dec in degrees, tested on the tangent plane at
their centre.  Re-exported by :mod:`apdask.io.butler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import ArrayLike

from apdask.core.geometry import unit_vectors

__all__ = ["polygons_overlap", "wcs_from_attrs", "wcs_to_attrs"]


def wcs_to_attrs(wcs: WCS) -> dict[str, Any]:
    """FITS cards of a celestial WCS as a JSON-able dict (``wcs.to_header()``)."""
    hdr = wcs.to_header()
    return {k: v for k, v in hdr.items() if k not in ("COMMENT", "HISTORY", "")}


def wcs_from_attrs(cards: Mapping[str, Any], shape: tuple[int, int] | None = None) -> WCS:
    """Rebuild a WCS from :func:`wcs_to_attrs` output; ``shape`` is ``(ny, nx)``."""
    w = WCS(fits.Header(cards))
    if shape is not None:
        w.pixel_shape = (int(shape[1]), int(shape[0]))
    return w


def _tile_corners(wcs, shape):
    ny, nx = shape
    xs = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5])
    ys = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5])
    r, d = wcs.pixel_to_world_values(xs, ys)
    return np.column_stack([np.mod(r, 360.0), d])


def _gnomonic(radec, ra0, dec0):
    """Tangent-plane projection (radians) about ``(ra0, dec0)``; NaN behind the plane."""
    ra = np.deg2rad(radec[:, 0])
    dec = np.deg2rad(radec[:, 1])
    a0, d0 = np.deg2rad(ra0), np.deg2rad(dec0)
    cosc = np.sin(d0) * np.sin(dec) + np.cos(d0) * np.cos(dec) * np.cos(ra - a0)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.cos(dec) * np.sin(ra - a0) / cosc
        y = (np.cos(d0) * np.sin(dec) - np.sin(d0) * np.cos(dec) * np.cos(ra - a0)) / cosc
    bad = cosc <= 1e-6
    x[bad] = np.nan
    y[bad] = np.nan
    return np.column_stack([x, y])


def _hull(points):
    """Convex hull (monotone chain), counter-clockwise."""
    pts = sorted(map(tuple, points))
    if len(pts) <= 2:
        return np.array(pts)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, ...]] = []
    upper: list[tuple[float, ...]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def _sat_overlap(a, b):
    """Separating-axis test for two convex polygons (vertex arrays)."""
    for poly in (a, b):
        n = len(poly)
        for i in range(n):
            edge = poly[(i + 1) % n] - poly[i]
            axis = np.array([-edge[1], edge[0]])
            pa, pb = a @ axis, b @ axis
            if pa.max() < pb.min() or pb.max() < pa.min():
                return False
    return True


def polygons_overlap(corners_a: ArrayLike, corners_b: ArrayLike) -> bool:
    """Whether two sky polygons (``(N, 2)`` ra/dec degrees) overlap.

    Both are projected onto the tangent plane at the centre of ``corners_b`` and
    their convex hulls tested with the separating-axis theorem.  Polygons more than
    ~90° apart never overlap.
    """
    a = np.asarray(corners_a, dtype=float)
    b = np.asarray(corners_b, dtype=float)
    vec = unit_vectors(b[:, 0], b[:, 1]).mean(axis=0)
    ra0 = np.rad2deg(np.arctan2(vec[1], vec[0])) % 360.0
    dec0 = np.rad2deg(np.arctan2(vec[2], np.hypot(vec[0], vec[1])))
    pa, pb = _gnomonic(a, ra0, dec0), _gnomonic(b, ra0, dec0)
    if not (np.all(np.isfinite(pa)) and np.all(np.isfinite(pb))):
        return False
    return _sat_overlap(_hull(pa), _hull(pb))


def _points_in_polygon(ra, dec, corners):
    """Boolean mask of points inside the convex hull of ``corners`` (tangent plane)."""
    corners = np.asarray(corners, dtype=float)
    vec = unit_vectors(corners[:, 0], corners[:, 1]).mean(axis=0)
    ra0 = np.rad2deg(np.arctan2(vec[1], vec[0])) % 360.0
    dec0 = np.rad2deg(np.arctan2(vec[2], np.hypot(vec[0], vec[1])))
    hull = _hull(_gnomonic(corners, ra0, dec0))
    p = _gnomonic(np.column_stack([ra, dec]), ra0, dec0)
    inside = np.all(np.isfinite(p), axis=1)
    for i in range(len(hull)):
        e = hull[(i + 1) % len(hull)] - hull[i]
        with np.errstate(invalid="ignore"):
            inside &= (e[0] * (p[:, 1] - hull[i][1]) - e[1] * (p[:, 0] - hull[i][0])) >= 0
    return inside
