"""Nearest DRP Objects of DiaObjects (``DiaObject_To_Object_Match`` rows)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from astropy.table import Table
from scipy.spatial import cKDTree

from apdask.core.geometry import chord_radius, chord_to_arcsec, unit_vectors
from apdask.pipeline.associate.matching import _col

__all__ = ["drp_matches", "nearest_drp_objects"]


def nearest_drp_objects(
    ra: npt.ArrayLike,
    dec: npt.ArrayLike,
    drp_ra: npt.ArrayLike,
    drp_dec: npt.ArrayLike,
    drp_ids: npt.ArrayLike,
    k: int = 3,
    radius_arcsec: float = 5.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``k`` nearest DRP Objects of each position (DMTN-092 DRP ids).

    Parameters
    ----------
    ra, dec : array_like
        Positions in degrees.
    drp_ra, drp_dec : array_like
        DRP Object positions in degrees.
    drp_ids : array_like of int
        DRP Object ids.
    k : int
        Maximum number of neighbours.
    radius_arcsec : float
        Search radius.

    Returns
    -------
    ids : numpy.ndarray
        int64, shape ``(n, k)``, nearest first; -1 where fewer are in range.
    dist_arcsec : numpy.ndarray
        float64, shape ``(n, k)``; NaN where no neighbour.
    """
    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    n = ra.size
    ids = np.full((n, k), -1, dtype=np.int64)
    dist = np.full((n, k), np.nan)
    drp_ids = np.asarray(drp_ids, dtype=np.int64)
    if n == 0 or drp_ids.size == 0 or k <= 0:
        return ids, dist
    tree = cKDTree(unit_vectors(drp_ra, drp_dec))
    kk = min(k, drp_ids.size)
    chord, j = tree.query(
        unit_vectors(ra, dec), k=kk, distance_upper_bound=chord_radius(radius_arcsec)
    )
    chord = chord.reshape(n, kk)
    j = j.reshape(n, kk)
    ok = np.isfinite(chord)
    ids[:, :kk][ok] = drp_ids[j[ok]]
    dist[:, :kk][ok] = chord_to_arcsec(chord[ok])
    return ids, dist


def drp_matches(
    objects: Table | None, drp: Table | None, k: int = 3, radius_arcsec: float = 5.0
) -> Table:
    """``DiaObject_To_Object_Match`` rows: up to ``k`` nearest DRP Objects per DiaObject.

    Parameters
    ----------
    objects : astropy.table.Table
        DiaObjects (``diaObjectId``, ``ra``, ``dec``).
    drp : astropy.table.Table or None
        DRP Objects (``objectId``, ``ra``, ``dec``).
    k : int
        Maximum number of DRP Objects per DiaObject.
    radius_arcsec : float
        Search radius.

    Returns
    -------
    astropy.table.Table
        ``diaObjectId``, ``objectId``, ``dist`` (arcsec) and ``lnP`` (NaN: no
        probability model yet), nearest first per DiaObject.
    """
    n = 0 if objects is None else len(objects)
    if n and objects is not None and drp is not None and len(drp):
        ids, dist = nearest_drp_objects(
            _col(objects, "ra", n),
            _col(objects, "dec", n),
            np.asarray(drp["ra"], float),
            np.asarray(drp["dec"], float),
            drp["objectId"],
            k=k,
            radius_arcsec=radius_arcsec,
        )
        found = ids >= 0
        rows, _ = np.nonzero(found)
        oid = np.asarray(objects["diaObjectId"], dtype=np.int64)[rows]
        obj, d = ids[found], dist[found]
    else:
        oid = obj = np.zeros(0, np.int64)
        d = np.zeros(0)
    out = Table({"diaObjectId": oid, "objectId": obj, "dist": d, "lnP": np.full(d.size, np.nan)})
    out["dist"].unit = "arcsec"
    return out
