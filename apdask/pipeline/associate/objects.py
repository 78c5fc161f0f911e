"""DiaObject aggregates: one new version per touched DiaObject, from its full history.

:func:`update_objects` recomputes the DPDD aggregates of every touched DiaObject
from its full source history, including ``{b}_fpFluxMean`` from the
forced-photometry history plus this visit's forced sources.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.table import Table, vstack

from apdask.core.camera import BANDS
from apdask.core.geometry import unit_vectors
from apdask.pipeline.associate.matching import _col

__all__ = ["update_objects"]


def _bands(table: Table, n: int) -> np.ndarray:
    if "band" not in table.colnames:
        return np.full(n, "", dtype="U1")
    return np.asarray(np.ma.filled(table["band"], "")).astype(str)


def update_objects(
    matched_ids: np.ndarray,
    sources: Table,
    objects: Table | None,
    history: Table | None,
    forced_history: Table | None = None,
    mjd: float | None = None,
) -> tuple[Table, Table]:
    """Assign DiaObject ids to this visit's sources and rebuild touched objects.

    Parameters
    ----------
    matched_ids : numpy.ndarray
        Output of :func:`associate` (diaObjectId or -1 per source).
    sources : astropy.table.Table
        This visit's DiaSources (``diaSourceId``, ``ra``, ``dec``,
        ``midpointMjdTai``, ``band``, ``psfFlux``, ``psfFluxErr``...).
    objects : astropy.table.Table
        Current DiaObjects of the region (latest versions).
    history : astropy.table.Table or None
        Previous DiaSources of these objects (from the PPDB).  Rows of this
        visit's sources are appended here, so they must not be in it already.
    forced_history : astropy.table.Table, optional
        DiaForcedSources (previous and current) for ``{b}_fpFluxMean``.
    mjd : float, optional
        Visit time (MJD TAI), used as ``validityStartMjdTai``; defaults to the
        sources' ``midpointMjdTai``.

    Returns
    -------
    objects_out : astropy.table.Table
        One new version per touched DiaObject (matched or new).
    sources_out : astropy.table.Table
        Copy of ``sources`` with ``diaObjectId`` filled; an unmatched source
        creates a DiaObject whose id is the source's own ``diaSourceId``.
    """
    matched = np.asarray(matched_ids, dtype=np.int64)
    if matched.shape != (len(sources),):
        msg = f"matched_ids has {matched.size} entries for {len(sources)} sources"
        raise ValueError(msg)
    sources_out = Table(sources, copy=True)
    src_ids = np.asarray(sources["diaSourceId"], dtype=np.int64)
    object_ids = np.where(matched >= 0, matched, src_ids)
    sources_out["diaObjectId"] = object_ids
    if mjd is None:
        times = _col(sources, "midpointMjdTai", len(sources))
        times = times[np.isfinite(times)]
        mjd = float(times.max()) if times.size else np.nan

    allsrc = _stack_sources(history, sources_out)
    n_all = len(allsrc)
    a_ids = np.asarray(allsrc["diaObjectId"], dtype=np.int64) if n_all else np.zeros(0, int)
    a_ra = _col(allsrc, "ra", n_all)
    a_dec = _col(allsrc, "dec", n_all)
    a_rae = _col(allsrc, "raErr", n_all)
    a_dece = _col(allsrc, "decErr", n_all)
    a_mjd = _col(allsrc, "midpointMjdTai", n_all)
    a_flux = _col(allsrc, "psfFlux", n_all)
    a_ferr = _col(allsrc, "psfFluxErr", n_all)
    a_band = _bands(allsrc, n_all)

    obj_ids = np.asarray(list(dict.fromkeys(object_ids.tolist())), dtype=np.int64)
    columns = _aggregate(
        obj_ids, a_ids, (a_ra, a_dec, a_rae, a_dece), a_mjd, a_flux, a_ferr, a_band
    )
    # keep an older first detection that fell out of the history window
    if objects is not None and len(objects) and "firstDiaSourceMjdTai" in objects.colnames:
        prev = _lookup(
            obj_ids,
            np.asarray(objects["diaObjectId"], dtype=np.int64),
            _col(objects, "firstDiaSourceMjdTai", len(objects)),
        )
        columns["firstDiaSourceMjdTai"] = np.fmin(columns["firstDiaSourceMjdTai"], prev)
    mean, err = _forced_means(obj_ids, forced_history)
    for j, b in enumerate(BANDS):
        columns[f"{b}_fpFluxMean"], columns[f"{b}_fpFluxMeanErr"] = mean[:, j], err[:, j]
    mean, err = _science_means(obj_ids, allsrc)
    for j, b in enumerate(BANDS):
        columns[f"{b}_scienceFluxMean"], columns[f"{b}_scienceFluxMeanErr"] = mean[:, j], err[:, j]
    columns["diaObjectId"] = obj_ids
    columns["validityStartMjdTai"] = np.full(obj_ids.size, mjd, dtype=np.float64)
    objects_out = _objects_table(columns, obj_ids.size)
    return objects_out, sources_out


def _stack_sources(history: Table | None, sources_out: Table) -> Table:
    """The history and this visit's sources in one table (the aggregated columns)."""
    keep = ["diaObjectId", "ra", "dec", "raErr", "decErr", "midpointMjdTai", "band"]
    keep += ["psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr"]
    parts = []
    for cat in (history, sources_out):
        if cat is None or len(cat) == 0:
            continue
        parts.append(Table({k: cat[k] for k in keep if k in cat.colnames}))
    return vstack(parts, metadata_conflicts="silent") if parts else Table()


def _forced_means(
    obj_ids: np.ndarray, forced_history: Table | None
) -> tuple[np.ndarray, np.ndarray]:
    """``{b}_fpFluxMean`` and its error per object and band, ``(n_obj, n_bands)``."""
    if forced_history is not None and len(forced_history):
        nf = len(forced_history)
        f_rows, f_obj = _rows_of(obj_ids, np.asarray(forced_history["diaObjectId"], np.int64))
        f_band = _band_codes(_bands(forced_history, nf)[f_rows])
        f_flux = _col(forced_history, "psfFlux", nf)[f_rows]
        f_err = _col(forced_history, "psfFluxErr", nf)[f_rows]
        good = (f_band >= 0) & np.isfinite(f_flux)
        key = f_obj[good] * len(BANDS) + f_band[good]
        mean, err, _ = _grouped_weighted_mean(
            key, f_flux[good], f_err[good], obj_ids.size * len(BANDS)
        )
        mean, err = mean.reshape(-1, len(BANDS)), err.reshape(-1, len(BANDS))
    else:
        mean = err = np.full((obj_ids.size, len(BANDS)), np.nan)
    return mean, err


def _science_means(obj_ids: np.ndarray, allsrc: Table) -> tuple[np.ndarray, np.ndarray]:
    """``{b}_scienceFluxMean`` and its error per object and band, ``(n_obj, n_bands)``:
    the weighted mean of the DiaSources' ``scienceFlux`` (forced PSF flux on the visit
    image at the DiaSource), as for ``{b}_psfFluxMean``."""
    n_all = len(allsrc)
    shape = (obj_ids.size, len(BANDS))
    if not n_all or "scienceFlux" not in allsrc.colnames:
        return np.full(shape, np.nan), np.full(shape, np.nan)
    rows, obj = _rows_of(obj_ids, np.asarray(allsrc["diaObjectId"], np.int64))
    band = _band_codes(_bands(allsrc, n_all)[rows])
    flux = _col(allsrc, "scienceFlux", n_all)[rows]
    err = _col(allsrc, "scienceFluxErr", n_all)[rows]
    good = (band >= 0) & np.isfinite(flux)
    key = obj[good] * len(BANDS) + band[good]
    mean, mean_err, _ = _grouped_weighted_mean(
        key, flux[good], err[good], obj_ids.size * len(BANDS)
    )
    return mean.reshape(shape), mean_err.reshape(shape)


def _lookup(ids: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values[keys == id]`` for each id (NaN where absent; keys unique)."""
    out = np.full(ids.size, np.nan)
    if keys.size == 0:
        return out
    order = np.argsort(keys, kind="stable")
    pos = np.clip(np.searchsorted(keys[order], ids), 0, keys.size - 1)
    hit = keys[order][pos] == ids
    out[hit] = values[order][pos][hit]
    return out


def _rows_of(obj_ids: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``ids`` that belong to ``obj_ids`` and their index in ``obj_ids``."""
    order = np.argsort(obj_ids, kind="stable")
    sorted_ids = obj_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(sorted_ids.size - 1, 0))
    hit = sorted_ids[pos] == ids if sorted_ids.size else np.zeros(ids.size, bool)
    rows = np.flatnonzero(hit)
    return rows, order[pos[rows]]


def _band_codes(bands: np.ndarray) -> np.ndarray:
    """Index of each band in ``BANDS`` (-1 for any other band)."""
    out = np.full(bands.size, -1, dtype=np.int64)
    for j, b in enumerate(BANDS):
        out[bands == b] = j
    return out


def _segments(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start of each run of equal ``key`` (sorted) and the run's key."""
    if key.size == 0:
        return np.zeros(0, np.int64), key
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return starts, key[starts]


def _grouped_weighted_mean(
    key: np.ndarray, values: np.ndarray, errors: np.ndarray, n_keys: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_weighted_mean` per key (finite values only); also the counts."""
    n = np.bincount(key, minlength=n_keys)
    mean = np.full(n_keys, np.nan)
    err = np.full(n_keys, np.nan)
    if key.size == 0:
        return mean, err, n
    e_ok = np.isfinite(errors) & (errors > 0)
    all_ok = np.bincount(key, ~e_ok, minlength=n_keys) == 0
    has = n > 0
    w = np.where(e_ok, 1.0 / np.where(e_ok, errors, 1.0) ** 2, 0.0)
    sw = np.bincount(key, w, minlength=n_keys)
    swv = np.bincount(key, w * values, minlength=n_keys)
    plain = np.bincount(key, values, minlength=n_keys) / np.maximum(n, 1)
    weighted = has & all_ok
    mean[weighted] = swv[weighted] / sw[weighted]
    err[weighted] = np.sqrt(1.0 / sw[weighted])
    unweighted = has & ~all_ok
    mean[unweighted] = plain[unweighted]
    dev2 = np.bincount(key, (values - plain[key]) ** 2, minlength=n_keys)
    many = unweighted & (n > 1)
    err[many] = np.sqrt(dev2[many] / (n[many] - 1)) / np.sqrt(n[many])
    return mean, err, n


def _aggregate(
    obj_ids: np.ndarray,
    a_ids: np.ndarray,
    position: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    a_mjd: np.ndarray,
    a_flux: np.ndarray,
    a_ferr: np.ndarray,
    a_band: np.ndarray,
) -> dict[str, Any]:
    """DPDD aggregates of ``obj_ids`` from all their sources, vectorised over objects."""
    n_obj, nb = obj_ids.size, len(BANDS)
    rows, obj = _rows_of(obj_ids, a_ids)
    cols = _position_aggregates(obj, n_obj, *(c[rows] for c in position))
    # first and last detection
    mjd = a_mjd[rows]
    fin = np.isfinite(mjd)
    first = np.full(n_obj, np.inf)
    last = np.full(n_obj, -np.inf)
    np.minimum.at(first, obj[fin], mjd[fin])
    np.maximum.at(last, obj[fin], mjd[fin])
    cols["firstDiaSourceMjdTai"] = np.where(np.isfinite(first), first, np.nan)
    cols["lastDiaSourceMjdTai"] = np.where(np.isfinite(last), last, np.nan)
    # per band psfFlux aggregates over sources with a finite flux
    band = _band_codes(a_band[rows])
    flux, ferr = a_flux[rows], a_ferr[rows]
    good = (band >= 0) & np.isfinite(flux)
    key = obj[good] * nb + band[good]
    flux, ferr, mjd = flux[good], ferr[good], mjd[good]
    order = np.lexsort((mjd, key))  # stable: equal times keep the row order
    key, flux, ferr, mjd = key[order], flux[order], ferr[order], mjd[order]
    n, stats = _flux_aggregates(key, flux, ferr, mjd, n_obj * nb)
    for j, b in enumerate(BANDS):
        cols[f"{b}_psfFluxNdata"] = n[j::nb].astype(np.int32)
        for name, values in stats.items():
            cols[f"{b}_psfFlux{name}"] = values[j::nb]
    return cols


def _position_aggregates(
    obj: np.ndarray,
    n_obj: int,
    ra: np.ndarray,
    dec: np.ndarray,
    ra_err: np.ndarray,
    dec_err: np.ndarray,
) -> dict[str, Any]:
    """Weighted mean position (through unit vectors), its errors and ``nDiaSources``."""
    cols: dict[str, Any] = {}
    n_src = np.bincount(obj, minlength=n_obj)
    e_ok = np.isfinite(ra_err) & np.isfinite(dec_err) & (ra_err > 0) & (dec_err > 0)
    all_ok = np.bincount(obj, ~e_ok, minlength=n_obj) == 0
    safe_ra_err = np.where(e_ok, ra_err, 1.0)
    safe_dec_err = np.where(e_ok, dec_err, 1.0)
    w = np.where(all_ok[obj], 2.0 / (safe_ra_err**2 + safe_dec_err**2), 1.0)
    xyz = unit_vectors(ra, dec)
    v = [np.bincount(obj, w * xyz[:, k], minlength=n_obj) for k in range(3)]
    cols["ra"] = np.degrees(np.arctan2(v[1], v[0])) % 360.0
    cols["dec"] = np.degrees(np.arctan2(v[2], np.hypot(v[0], v[1])))
    inv_ra = np.bincount(obj, 1.0 / safe_ra_err**2, minlength=n_obj)
    inv_dec = np.bincount(obj, 1.0 / safe_dec_err**2, minlength=n_obj)
    cols["raErr"] = np.where(all_ok, np.sqrt(1.0 / inv_ra), np.nan)
    cols["decErr"] = np.where(all_ok, np.sqrt(1.0 / inv_dec), np.nan)
    none = n_src == 0
    for name in ("ra", "dec", "raErr", "decErr"):
        cols[name][none] = np.nan
    cols["nDiaSources"] = n_src.astype(np.int32)
    return cols


def _flux_aggregates(
    key: np.ndarray, flux: np.ndarray, ferr: np.ndarray, mjd: np.ndarray, n_keys: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Counts and ``psfFlux{Mean,MeanErr,Sigma,Min,Max,MaxSlope,ErrMean}`` per key, the
    rows sorted by key and time."""
    mean, mean_err, n = _grouped_weighted_mean(key, flux, ferr, n_keys)
    mean_plain = np.bincount(key, flux, minlength=n_keys) / np.maximum(n, 1)
    dev2 = np.bincount(key, (flux - mean_plain[key]) ** 2, minlength=n_keys)
    sigma = np.full(n_keys, np.nan)
    many = n > 1
    sigma[many] = np.sqrt(dev2[many] / (n[many] - 1))
    lo = np.full(n_keys, np.nan)
    hi = np.full(n_keys, np.nan)
    starts, seg_key = _segments(key)
    if key.size:
        lo[seg_key] = np.minimum.reduceat(flux, starts)
        hi[seg_key] = np.maximum.reduceat(flux, starts)
    f_ok = np.isfinite(ferr)
    n_err = np.bincount(key, f_ok, minlength=n_keys)
    sum_err = np.bincount(key, np.where(f_ok, ferr, 0.0), minlength=n_keys)
    err_mean = np.full(n_keys, np.nan)
    err_mean[n_err > 0] = sum_err[n_err > 0] / n_err[n_err > 0]
    stats = {
        "Mean": mean,
        "MeanErr": mean_err,
        "Sigma": sigma,
        "Min": lo,
        "Max": hi,
        "MaxSlope": _max_slope(key, flux, mjd, n_keys),
        "ErrMean": err_mean,
    }
    return n, stats


def _max_slope(key: np.ndarray, flux: np.ndarray, mjd: np.ndarray, n_keys: int) -> np.ndarray:
    """Steepest flux change between consecutive epochs per key (the first of equals)."""
    slope = np.full(n_keys, np.nan)
    if key.size > 1:
        same = key[1:] == key[:-1]
        dt = np.diff(mjd)
        ok = same & (dt > 0)
        pair = np.flatnonzero(ok)
        s = np.diff(flux)[pair] / dt[pair]
        pk = key[pair]
        best = np.full(n_keys, -np.inf)
        np.maximum.at(best, pk, np.abs(s))
        top = np.flatnonzero(np.abs(s) == best[pk])
        _, first_top = np.unique(pk[top], return_index=True)
        chosen = top[first_top]
        slope[pk[chosen]] = s[chosen]
    return slope


def _objects_table(columns: dict[str, Any], n: int) -> Table:
    names = ["diaObjectId", "validityStartMjdTai", "ra", "raErr", "dec", "decErr"]
    for b in BANDS:
        names += [
            f"{b}_psfFluxMean",
            f"{b}_psfFluxMeanErr",
            f"{b}_psfFluxSigma",
            f"{b}_psfFluxNdata",
            f"{b}_fpFluxMean",
            f"{b}_fpFluxMeanErr",
            f"{b}_scienceFluxMean",
            f"{b}_scienceFluxMeanErr",
            f"{b}_psfFluxMin",
            f"{b}_psfFluxMax",
            f"{b}_psfFluxMaxSlope",
            f"{b}_psfFluxErrMean",
        ]
    names += ["firstDiaSourceMjdTai", "lastDiaSourceMjdTai", "nDiaSources"]
    out = Table()
    for name in names:
        dtype: Any
        if name == "diaObjectId":
            dtype = np.int64
        elif name.endswith("Ndata") or name == "nDiaSources":
            dtype = np.int32
        else:
            dtype = np.float64
        out[name] = np.asarray(columns[name], dtype=dtype).reshape(n)
    for name in ("ra", "dec", "raErr", "decErr"):
        out[name].unit = "deg"
    return out
