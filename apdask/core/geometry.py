"""Sky geometry: unit vectors on the sphere and chord distances, one implementation."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["ARCSEC", "chord_radius", "chord_to_arcsec", "unit_vectors"]

#: One arcsecond in radians.
ARCSEC = np.pi / (180.0 * 3600.0)


def unit_vectors(ra: npt.ArrayLike, dec: npt.ArrayLike) -> np.ndarray:
    """Unit vectors ``(x, y, z)`` of sky positions.

    Parameters
    ----------
    ra, dec : array_like
        Right ascension and declination in degrees; masked entries become NaN.

    Returns
    -------
    numpy.ndarray
        float64 ``(n, 3)``.
    """
    ra = np.radians(np.ma.filled(np.ma.asarray(ra, dtype=np.float64), np.nan))
    dec = np.radians(np.ma.filled(np.ma.asarray(dec, dtype=np.float64), np.nan))
    cd = np.cos(dec)
    return np.column_stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)])


def chord_radius(radius_arcsec: Any) -> Any:
    """Chord length between unit vectors separated by ``radius_arcsec`` on the sky.

    Parameters
    ----------
    radius_arcsec : float or array_like
        Angular separation in arcseconds.

    Returns
    -------
    float or numpy.ndarray
        ``2 sin(θ / 2)``.
    """
    return 2.0 * np.sin(0.5 * radius_arcsec * ARCSEC)


def chord_to_arcsec(chord: Any) -> Any:
    """Angular separation in arcseconds of unit vectors a ``chord`` apart.

    Parameters
    ----------
    chord : float or array_like
        Chord length (clipped to ``[0, 2]``).

    Returns
    -------
    float or numpy.ndarray
        ``2 arcsin(chord / 2)`` in arcseconds.
    """
    return 2.0 * np.arcsin(np.clip(0.5 * chord, 0.0, 1.0)) / ARCSEC
