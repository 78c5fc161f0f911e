"""Association of DiaSources with DiaObjects and DiaObject aggregates.

As in Rubin's ``ap_association``: candidate pairs within the matching radius come
from a ``cKDTree`` on unit vectors, and the assignment is an optimal bipartite
matching on a χ² cost (squared separation over the summed positional
variances), solved per connected component of the candidate graph so that it
stays fast for 1e5 objects.  :func:`update_objects` recomputes the DPDD
aggregates of every touched DiaObject from its full source history, including
``{b}_fpFluxMean`` from the forced-photometry history plus this visit's forced
sources.  :func:`associate_ccd` chains both for one CCD and records each new
DiaObject's nearest DRP Objects (``DiaObject_To_Object_Match`` rows).
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table, vstack
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from apdask import config
from apdask.core.camera import BANDS

__all__ = [
    "associate",
    "update_objects",
    "associate_ccd",
    "nearest_drp_objects",
    "drp_matches",
    "BANDS",
]

_DEFAULT_SIGMA_ARCSEC = 0.1
_ARCSEC = np.pi / (180.0 * 3600.0)
_FORBIDDEN = 1e12


def _unit_vectors(ra, dec):
    ra = np.radians(np.ma.filled(np.ma.asarray(ra, dtype=np.float64), np.nan))
    dec = np.radians(np.ma.filled(np.ma.asarray(dec, dtype=np.float64), np.nan))
    cd = np.cos(dec)
    return np.column_stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)])


def _chord(radius_arcsec):
    return 2.0 * np.sin(0.5 * radius_arcsec * _ARCSEC)


def _col(table, name, n, fill=np.nan):
    """Column as float64 with masked entries as NaN (``fill`` if absent)."""
    if name not in table.colnames:
        return np.full(n, fill, dtype=np.float64)
    col = table[name]
    if isinstance(col, np.ma.MaskedArray):
        return np.ma.filled(col.astype(np.float64), np.nan).view(np.ndarray)
    return np.asarray(col, dtype=np.float64)


def _sigma2_arcsec(table, rows):
    """Positional variance (arcsec²) of ``rows`` from raErr/decErr (deg), default 0.1″."""
    n = len(table)
    ra_err = _col(table, "raErr", n)[rows] * 3600.0
    dec_err = _col(table, "decErr", n)[rows] * 3600.0
    ra_err = np.where(np.isfinite(ra_err) & (ra_err > 0), ra_err, _DEFAULT_SIGMA_ARCSEC)
    dec_err = np.where(np.isfinite(dec_err) & (dec_err > 0), dec_err, _DEFAULT_SIGMA_ARCSEC)
    return 0.5 * (ra_err**2 + dec_err**2)


def _near_sources(src_ra, src_dec, obj_ra, obj_dec, radius_arcsec):
    """Indices of objects that may lie within ``radius_arcsec`` of a source.

    A cheap (ra, dec) grid prefilter: cells no smaller than the radius, the 3x3
    cells around each source marked in a bitmap over the sources' bounding box.
    Only the objects it keeps get unit vectors and a KD-tree, so 1e5 objects
    of a preloaded region cost a few vectorised comparisons.  Returns all
    (finite) objects when the prefilter does not apply (near the poles, huge
    footprints or few objects).
    """
    n_obj = obj_ra.size
    finite = np.isfinite(obj_ra) & np.isfinite(obj_dec)
    if n_obj < 4 * src_ra.size + 64:
        return np.flatnonzero(finite)
    h_dec = max(radius_arcsec, 0.01) / 3600.0 * 1.0001
    dec_lo, dec_hi = src_dec.min() - h_dec, src_dec.max() + h_dec
    ra0 = src_ra[0]
    src_dra = (src_ra - ra0 + 180.0) % 360.0 - 180.0
    max_abs_dec = max(abs(dec_lo), abs(dec_hi))
    if max_abs_dec > 85.0 or np.ptp(src_dra) > 90.0:
        return np.flatnonzero(finite)
    h_ra = h_dec / np.cos(np.radians(max_abs_dec))
    ra_lo, ra_hi = src_dra.min() - h_ra, src_dra.max() + h_ra
    n_ra = int((ra_hi - ra_lo) / h_ra) + 3
    n_dec = int((dec_hi - dec_lo) / h_dec) + 3
    if n_ra * n_dec > 2e7:
        return np.flatnonzero(finite)
    occupied = np.zeros((n_dec, n_ra), dtype=bool)
    si = np.floor((src_dec - dec_lo) / h_dec).astype(np.int64) + 1
    sj = np.floor((src_dra - ra_lo) / h_ra).astype(np.int64) + 1
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            occupied[si + di, sj + dj] = True
    obj_dra = (obj_ra - ra0 + 180.0) % 360.0 - 180.0
    inside = (
        finite & (obj_dec >= dec_lo) & (obj_dec < dec_hi) & (obj_dra >= ra_lo) & (obj_dra < ra_hi)
    )
    idx = np.flatnonzero(inside)
    oi = ((obj_dec[idx] - dec_lo) / h_dec).astype(np.int64) + 1
    oj = ((obj_dra[idx] - ra_lo) / h_ra).astype(np.int64) + 1
    return idx[occupied[oi, oj]]


def associate(sources, objects, radius_arcsec=None):
    """Match DiaSources to DiaObjects by an optimal χ² assignment.

    Parameters
    ----------
    sources : astropy.table.Table
        DiaSources with ``ra``, ``dec`` (deg), optionally ``raErr``/``decErr``.
    objects : astropy.table.Table
        DiaObjects with ``diaObjectId``, ``ra``, ``dec``, optional errors.
    radius_arcsec : float, optional
        Matching radius; defaults to configuration ``association.radius_arcsec``.

    Returns
    -------
    numpy.ndarray
        int64 of length ``len(sources)``: the matched ``diaObjectId`` or -1.
    """
    radius = float(config.get("association.radius_arcsec", radius_arcsec))
    n_src, n_obj = len(sources), len(objects)
    out = np.full(n_src, -1, dtype=np.int64)
    if n_src == 0 or n_obj == 0:
        return out
    src_ra, src_dec = _col(sources, "ra", n_src), _col(sources, "dec", n_src)
    obj_ra, obj_dec = _col(objects, "ra", n_obj), _col(objects, "dec", n_obj)
    src_ok = np.isfinite(src_ra) & np.isfinite(src_dec)  # others never match
    if not src_ok.any():
        return out
    src_idx = np.flatnonzero(src_ok)
    keep = _near_sources(src_ra[src_ok], src_dec[src_ok], obj_ra, obj_dec, radius)
    if keep.size == 0:
        return out
    src_xyz = _unit_vectors(src_ra[src_ok], src_dec[src_ok])
    obj_xyz = _unit_vectors(obj_ra[keep], obj_dec[keep])
    chord_radius = _chord(radius)
    # unbalanced, non-compact trees build faster; queries are few
    tree = cKDTree(obj_xyz, balanced_tree=False, compact_nodes=False)
    neigh = tree.query_ball_point(src_xyz, chord_radius)
    local_rows = np.repeat(np.arange(src_idx.size), [len(x) for x in neigh])
    if local_rows.size == 0:
        return out
    local_cols = np.fromiter((j for x in neigh for j in x), dtype=np.int64, count=local_rows.size)
    chord = np.linalg.norm(src_xyz[local_rows] - obj_xyz[local_cols], axis=1)
    rows, cols = src_idx[local_rows], keep[local_cols]
    sep_arcsec = 2.0 * np.arcsin(np.clip(0.5 * chord, 0.0, 1.0)) / _ARCSEC
    cost = sep_arcsec**2 / (_sigma2_arcsec(sources, rows) + _sigma2_arcsec(objects, cols))

    obj_ids = np.asarray(objects["diaObjectId"], dtype=np.int64)
    # connected components of the bipartite candidate graph (involved nodes only)
    used_obj, cols_local = np.unique(cols, return_inverse=True)
    n_nodes = n_src + used_obj.size
    graph = coo_matrix(
        (np.ones(rows.size), (rows, n_src + cols_local)), shape=(n_nodes, n_nodes)
    ).tocsr()
    _, labels = connected_components(graph, directed=False)
    comp = labels[rows]
    pairs_per_comp = np.bincount(comp)
    single = pairs_per_comp[comp] == 1
    out[rows[single]] = obj_ids[cols[single]]
    multi = ~single
    if not multi.any():
        return out
    rows, cols, cost, comp = rows[multi], cols[multi], cost[multi], comp[multi]
    # local (per-component) row/column indices, computed once for all components
    n_obj_all = np.int64(n_obj)
    ukr, inv_r = np.unique(comp * np.int64(n_src) + rows, return_inverse=True)
    ukc, inv_c = np.unique(comp * n_obj_all + cols, return_inverse=True)
    comp_r, comp_c = ukr // n_src, ukc // n_obj_all
    local_r = inv_r - np.searchsorted(comp_r, comp)
    local_c = inv_c - np.searchsorted(comp_c, comp)
    order = np.argsort(comp, kind="stable")
    comp_sorted = comp[order]
    bounds = np.flatnonzero(np.diff(comp_sorted)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [comp_sorted.size]])
    for lo, hi in zip(starts.tolist(), stops.tolist(), strict=True):
        sel = order[lo:hi]
        c_id = comp_sorted[lo]
        r0 = np.searchsorted(comp_r, c_id)
        c0 = np.searchsorted(comp_c, c_id)
        lr, lc = local_r[sel], local_c[sel]
        mat = np.full((lr.max() + 1, lc.max() + 1), _FORBIDDEN)
        mat[lr, lc] = cost[sel]
        a, b = linear_sum_assignment(mat)
        ok = mat[a, b] < _FORBIDDEN
        out[ukr[r0 + a[ok]] % n_src] = obj_ids[ukc[c0 + b[ok]] % n_obj_all]
    return out


# ---------------------------------------------------------------------------
# aggregates


def _bands(table, n):
    if "band" not in table.colnames:
        return np.full(n, "", dtype="U1")
    return np.asarray(np.ma.filled(table["band"], "")).astype(str)


def update_objects(matched_ids, sources, objects, history, forced_history=None, mjd=None):
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

    keep = ["diaObjectId", "ra", "dec", "raErr", "decErr", "midpointMjdTai", "band"]
    keep += ["psfFlux", "psfFluxErr"]
    parts = []
    for cat in (history, sources_out):
        if cat is None or len(cat) == 0:
            continue
        parts.append(Table({k: cat[k] for k in keep if k in cat.colnames}))
    allsrc = vstack(parts, metadata_conflicts="silent") if parts else Table()
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
    for j, b in enumerate(BANDS):
        columns[f"{b}_fpFluxMean"], columns[f"{b}_fpFluxMeanErr"] = mean[:, j], err[:, j]
    columns["diaObjectId"] = obj_ids
    columns["validityStartMjdTai"] = np.full(obj_ids.size, mjd, dtype=np.float64)
    objects_out = _objects_table(columns, obj_ids.size)
    return objects_out, sources_out


def _lookup(ids, keys, values):
    """``values[keys == id]`` for each id (NaN where absent; keys unique)."""
    out = np.full(ids.size, np.nan)
    if keys.size == 0:
        return out
    order = np.argsort(keys, kind="stable")
    pos = np.clip(np.searchsorted(keys[order], ids), 0, keys.size - 1)
    hit = keys[order][pos] == ids
    out[hit] = values[order][pos][hit]
    return out


def _rows_of(obj_ids, ids):
    """Rows of ``ids`` that belong to ``obj_ids`` and their index in ``obj_ids``."""
    order = np.argsort(obj_ids, kind="stable")
    sorted_ids = obj_ids[order]
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, max(sorted_ids.size - 1, 0))
    hit = sorted_ids[pos] == ids if sorted_ids.size else np.zeros(ids.size, bool)
    rows = np.flatnonzero(hit)
    return rows, order[pos[rows]]


def _band_codes(bands):
    """Index of each band in ``BANDS`` (-1 for any other band)."""
    out = np.full(bands.size, -1, dtype=np.int64)
    for j, b in enumerate(BANDS):
        out[bands == b] = j
    return out


def _segments(key):
    """Start of each run of equal ``key`` (sorted) and the run's key."""
    if key.size == 0:
        return np.zeros(0, np.int64), key
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    return starts, key[starts]


def _grouped_weighted_mean(key, values, errors, n_keys):
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


def _aggregate(obj_ids, a_ids, position, a_mjd, a_flux, a_ferr, a_band):
    """DPDD aggregates of ``obj_ids`` from all their sources, vectorised over objects."""
    n_obj, nb = obj_ids.size, len(BANDS)
    rows, obj = _rows_of(obj_ids, a_ids)
    ra, dec, ra_err, dec_err = (c[rows] for c in position)
    cols = {}
    # weighted mean position through unit vectors
    n_src = np.bincount(obj, minlength=n_obj)
    e_ok = np.isfinite(ra_err) & np.isfinite(dec_err) & (ra_err > 0) & (dec_err > 0)
    all_ok = np.bincount(obj, ~e_ok, minlength=n_obj) == 0
    safe_ra_err = np.where(e_ok, ra_err, 1.0)
    safe_dec_err = np.where(e_ok, dec_err, 1.0)
    w = np.where(all_ok[obj], 2.0 / (safe_ra_err**2 + safe_dec_err**2), 1.0)
    xyz = _unit_vectors(ra, dec)
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
    n_keys = n_obj * nb
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
    stats = {
        "Mean": mean, "MeanErr": mean_err, "Sigma": sigma, "Min": lo, "Max": hi,
        "MaxSlope": slope, "ErrMean": err_mean,
    }  # fmt: skip
    for j, b in enumerate(BANDS):
        cols[f"{b}_psfFluxNdata"] = n[j::nb].astype(np.int32)
        for name, values in stats.items():
            cols[f"{b}_psfFlux{name}"] = values[j::nb]
    return cols


def _objects_table(columns, n):
    names = ["diaObjectId", "validityStartMjdTai", "ra", "raErr", "dec", "decErr"]
    for b in BANDS:
        names += [
            f"{b}_psfFluxMean",
            f"{b}_psfFluxMeanErr",
            f"{b}_psfFluxSigma",
            f"{b}_psfFluxNdata",
            f"{b}_fpFluxMean",
            f"{b}_fpFluxMeanErr",
            f"{b}_psfFluxMin",
            f"{b}_psfFluxMax",
            f"{b}_psfFluxMaxSlope",
            f"{b}_psfFluxErrMean",
        ]
    names += ["firstDiaSourceMjdTai", "lastDiaSourceMjdTai", "nDiaSources"]
    out = Table()
    for name in names:
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


# ---------------------------------------------------------------------------
# DRP objects


def nearest_drp_objects(ra, dec, drp_ra, drp_dec, drp_ids, k=3, radius_arcsec=5.0):
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
    tree = cKDTree(_unit_vectors(drp_ra, drp_dec))
    kk = min(k, drp_ids.size)
    chord, j = tree.query(_unit_vectors(ra, dec), k=kk, distance_upper_bound=_chord(radius_arcsec))
    chord = chord.reshape(n, kk)
    j = j.reshape(n, kk)
    ok = np.isfinite(chord)
    ids[:, :kk][ok] = drp_ids[j[ok]]
    dist[:, :kk][ok] = 2.0 * np.arcsin(np.clip(0.5 * chord[ok], 0.0, 1.0)) / _ARCSEC
    return ids, dist


def drp_matches(objects, drp, k=3, radius_arcsec=5.0):
    """``DiaObject_To_Object_Match`` rows: up to ``k`` nearest DRP Objects per DiaObject.

    Parameters
    ----------
    objects : astropy.table.Table
        DiaObjects (``diaObjectId``, ``ra``, ``dec``).
    drp : astropy.table.Table or None
        DRP Objects (``objectId``, ``ra``, ``dec``).
    k : int
    radius_arcsec : float

    Returns
    -------
    astropy.table.Table
        ``diaObjectId``, ``objectId``, ``dist`` (arcsec) and ``lnP`` (NaN: no
        probability model yet), nearest first per DiaObject.
    """
    n = 0 if objects is None else len(objects)
    if n and drp is not None and len(drp):
        ids, dist = nearest_drp_objects(
            _col(objects, "ra", n), _col(objects, "dec", n),
            np.asarray(drp["ra"], float), np.asarray(drp["dec"], float),
            drp["objectId"], k=k, radius_arcsec=radius_arcsec,
        )  # fmt: skip
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


def associate_ccd(sources, history, mjd, forced=None, *, radius_arcsec=None, drp_k=3,
                  drp_radius_arcsec=5.0):  # fmt: skip
    """Associate one CCD's DiaSources with its preloaded PPDB history.

    Parameters
    ----------
    sources : astropy.table.Table
        This visit's DiaSources with ``diaSourceId`` set.
    history : dict
        From :meth:`apdask.ppdb.database.CcdPpdb.read`: ``objects``, ``sources``,
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
