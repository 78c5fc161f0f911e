"""Association of one CCD: match, rebuild the touched DiaObjects, record DRP matches."""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.table import Table, vstack

from apdask.pipeline.associate.drp import drp_matches
from apdask.pipeline.associate.matching import associate
from apdask.pipeline.associate.objects import update_objects

__all__ = ["associate_ccd"]


def associate_ccd(
    sources: Table,
    history: dict[str, Any],
    mjd: float,
    forced: Table | None = None,
    *,
    radius_arcsec: float | None = None,
    drp_k: int = 3,
    drp_radius_arcsec: float = 5.0,
) -> dict[str, Any]:
    """Associate one CCD's DiaSources with its preloaded PPDB history.

    Parameters
    ----------
    sources : astropy.table.Table
        This visit's DiaSources with ``diaSourceId`` set.
    history : dict
        From :meth:`apdask.ppdb.CcdPpdb.read`: ``objects``, ``sources``,
        ``forced`` and ``drp`` Tables (``drp`` may be absent).
    mjd : float
        Visit time (MJD TAI), the new versions' ``validityStartMjdTai``.
    forced : astropy.table.Table, optional
        This visit's forced measurements at known DiaObjects (with
        ``diaObjectId``, ``band``, ``psfFlux``, ``psfFluxErr``); they count in
        ``{b}_fpFluxMean`` together with the forced history.
    radius_arcsec : float, optional
        Matching radius (default ``association.radius_arcsec``).
    drp_k, drp_radius_arcsec
        Nearest DRP Objects recorded per new DiaObject.

    Returns
    -------
    dict
        ``matched`` (diaObjectId or -1 per source), ``objects`` (new versions),
        ``sources`` (with ``diaObjectId``), ``new_objects`` (the created ones)
        and ``drp_matches`` (Table for ``DiaObject_To_Object_Match``).
    """
    objects = history["objects"]
    matched = associate(sources, objects, radius_arcsec)
    forced_history = history.get("forced")
    if forced is not None and len(forced):
        parts = [t for t in (forced_history, forced) if t is not None and len(t)]
        keep = ["diaObjectId", "band", "psfFlux", "psfFluxErr"]
        forced_history = vstack(
            [Table({c: t[c] for c in keep if c in t.colnames}) for t in parts],
            metadata_conflicts="silent",
        )
    new_versions, sources_out = update_objects(
        matched, sources, objects, history.get("sources"), forced_history, mjd=mjd
    )
    created = np.isin(
        np.asarray(new_versions["diaObjectId"], np.int64),
        np.asarray(sources_out["diaObjectId"], np.int64)[matched < 0],
    )
    new_objects = new_versions[created]
    return {
        "matched": matched,
        "objects": new_versions,
        "sources": sources_out,
        "new_objects": new_objects,
        "drp_matches": drp_matches(
            new_objects, history.get("drp"), k=drp_k, radius_arcsec=drp_radius_arcsec
        ),
    }
