"""The PPDB schema at the edge: astropy Tables to and from dax_apdb DataFrames.

apdask's catalogs are astropy Tables with the official APDB column names;
dax_apdb reads and writes pandas DataFrames.  :func:`frame_as_table` gives a read
every schema column, in schema order, with its unit and description;
:func:`table_as_frame` gives a write exactly the storable columns, nulls checked
against the schema.  The tables apdask adds (DRP Objects and their matches) have
their shapes here too.  Used by :class:`apdask.ppdb.database.Ppdb`; see ``docs/ppdb.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from astropy.table import Column, MaskedColumn, Table
from numpy.typing import ArrayLike

from apdask.exceptions import PpdbError

#: One column of :func:`schema_columns`: name, datatype, nullable, default, description, unit.
_ColumnDef = tuple[str, str, bool, Any, str, str | None]

__all__ = [
    "schema_columns",
    "frame_as_table",
    "table_as_frame",
    "sort_rows",
    "rows_inside",
    "match_rows",
    "matches_as_table",
    "drp_as_table",
]

# Columns that dax_apdb fills itself on store().
_FILLED_BY_APDB = {"pixelId", "validityStartMjdTai", "validityEndMjdTai"}

_NUMPY_DTYPE = {
    "long": np.int64,
    "int": np.int32,
    "short": np.int16,
    "byte": np.int8,
    "double": np.float64,
    "float": np.float32,
    "boolean": np.bool_,
    "char": np.str_,
    "string": np.str_,
    "text": np.str_,
}
_PANDAS_NULLABLE = {
    "long": "Int64",
    "int": "Int32",
    "short": "Int16",
    "byte": "Int8",
    "boolean": "boolean",
}
_SORT_KEYS = {
    "DiaObject": ["diaObjectId", "validityStartMjdTai"],
    "DiaSource": ["diaSourceId"],
    "DiaForcedSource": ["diaObjectId", "visit", "detector"],
}
_MATCH_UNITS = {
    "diaObjectId": (np.int64, None, "Id of diaObject."),
    "objectId": (np.int64, None, "Id of a nearby DRP Object."),
    "dist": (float, "arcsec", "The distance between the diaObject and the object."),
    "lnP": (float, None, "Natural log of the probability that the diaObject is the object."),
}


def schema_columns(apdb: Any) -> dict[str, list[_ColumnDef]]:
    """Schema of the DiaObject, DiaSource and DiaForcedSource tables of ``apdb``.

    Returns
    -------
    dict
        Table name to a list of ``(name, datatype, nullable, default,
        description, unit)``, one per column in schema order.
    """
    # lazy: lsst.dax.apdb costs ~1.8 s of import; only opening a PPDB needs it
    from lsst.dax.apdb import ApdbTables

    out = {}
    for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
        table_def = apdb.tableDef(ApdbTables[name])
        out[name] = [
            (
                c.name,
                getattr(c.datatype, "value", str(c.datatype)),
                bool(c.nullable),
                c.value,
                c.description or "",
                (c.annotations or {}).get("fits_tunit"),
            )
            for c in table_def.columns
        ]
    return out


def frame_as_table(df: pd.DataFrame | None, table_def: Sequence[_ColumnDef]) -> Table:
    """A dax_apdb DataFrame as an astropy Table (see :meth:`apdask.ppdb.database.Ppdb.as_table`).

    ``table_def`` is one table's list from :func:`schema_columns`.
    """
    n = 0 if df is None else len(df)
    cols = []
    for name, dtype, _nullable, _default, description, unit in table_def:
        np_dtype = _NUMPY_DTYPE.get(dtype, object)
        series = None if df is None or name not in df.columns else df[name]
        values, null = _column_values(series, np_dtype, n)
        kw = {"name": name, "unit": unit, "description": description, "copy": False}
        if null is not None and null.any():
            cols.append(MaskedColumn(values, mask=null, **kw))
        else:
            cols.append(Column(values, **kw))
    return Table(cols, copy=False)


def table_as_frame(
    table: Table | None, table_def: Sequence[_ColumnDef], table_name: str
) -> pd.DataFrame:
    """Table -> DataFrame with exactly the storable schema columns.

    ``table_def`` is the list of ``table_name`` from :func:`schema_columns`.
    """
    n = 0 if table is None else len(table)
    data = {}
    for name, dtype, nullable, default, _desc, _unit in table_def:
        if name in _FILLED_BY_APDB:
            continue
        np_dtype = _NUMPY_DTYPE.get(dtype, object)
        if table is not None and name in table.colnames:
            col = table[name]
            mask = np.ma.getmaskarray(col)
            raw = np.ma.getdata(col)
            if np.issubdtype(np.asarray(raw).dtype, np.floating) and not np.issubdtype(
                np_dtype, np.floating
            ):
                mask = mask | np.isnan(raw)
        else:
            mask = np.ones(n, dtype=bool)
            raw = None
        values: np.ndarray
        if np.issubdtype(np_dtype, np.floating):
            values = (
                np.full(n, np.nan, dtype=np_dtype)
                if raw is None
                else np.asarray(raw, dtype=np_dtype).copy()
            )
            values[mask] = np.nan
            if not nullable and np.isnan(values).any():
                if default is not None:
                    values[np.isnan(values)] = default
                else:
                    msg = (
                        f"{table_name}.{name} is required but has nulls/NaN; "
                        "fill it before storing to the PPDB"
                    )
                    raise PpdbError(msg)
            data[name] = values
            continue
        if mask.any() and not nullable:
            fill = default
            if fill is None and (name.endswith("Ndata") or name == "nDiaSources"):
                fill = 0
            if fill is None:
                msg = (
                    f"{table_name}.{name} is required but "
                    f"{'missing' if raw is None else 'has nulls'}; "
                    "fill it before storing to the PPDB"
                )
                raise PpdbError(msg)
            if raw is None:
                raw = np.full(n, fill)
            else:
                raw = np.where(mask, fill, raw)
            mask = np.zeros(n, dtype=bool)
        if np_dtype is np.str_:
            obj = np.empty(n, dtype=object)
            if raw is not None:
                obj[:] = [str(v) for v in np.asarray(raw)]
            obj[mask] = None
            data[name] = pd.Series(obj, dtype=object)
            continue
        pd_dtype = _PANDAS_NULLABLE.get(dtype, object)
        if raw is None:
            data[name] = pd.Series(pd.array([None] * n, dtype=pd_dtype))
        elif mask.any():
            raw = np.where(mask, 0, np.asarray(raw)).astype(np_dtype)
            if np_dtype is np.bool_:
                data[name] = pd.Series(pd.arrays.BooleanArray(raw, mask))
            else:
                data[name] = pd.Series(pd.arrays.IntegerArray(raw, mask))
        else:
            data[name] = np.asarray(raw).astype(np_dtype)
    return pd.DataFrame(data, index=pd.RangeIndex(n))


def sort_rows(
    df: pd.DataFrame | None, table_name: str, before: float | None = None
) -> pd.DataFrame | None:
    """Drop rows at or after ``before`` (MJD) and order rows by primary key."""
    if df is None or len(df) == 0:
        return df
    if before is not None and "midpointMjdTai" in df.columns:
        df = df[df["midpointMjdTai"].to_numpy(dtype=float, na_value=np.nan) < before]
    keys = _SORT_KEYS[table_name]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def rows_inside(df: pd.DataFrame | None, region: Any) -> pd.DataFrame | None:
    """Rows of ``df`` whose (ra, dec) lie in ``region``.

    The SQL selects whole HTM pixels of the region's envelope, up to a few
    times its area; only the objects inside it are the CCD's.
    """
    if df is None or len(df) == 0:
        return df
    ra = np.radians(df["ra"].to_numpy(dtype=float, na_value=np.nan))
    dec = np.radians(df["dec"].to_numpy(dtype=float, na_value=np.nan))
    inside = np.asarray(region.contains(ra, dec), dtype=bool)
    return df if inside.all() else df[inside]


def _column_values(series, np_dtype, n):
    """numpy values and null mask (None: no nulls) of one DataFrame column."""
    if series is None:
        if np_dtype is np.str_:
            return np.full(n, "", dtype="U1"), np.ones(n, dtype=bool)
        if np.issubdtype(np_dtype, np.floating):
            return np.full(n, np.nan, dtype=np_dtype), None
        return np.zeros(n, dtype=np_dtype), np.ones(n, dtype=bool)
    if np.issubdtype(np_dtype, np.floating):
        if isinstance(series.dtype, np.dtype) and series.dtype.kind == "f":
            return series.to_numpy().astype(np_dtype, copy=False), None
        return series.to_numpy(dtype=np_dtype, na_value=np.nan), None
    if (
        np_dtype is not np.str_
        and isinstance(series.dtype, np.dtype)
        and series.dtype.kind in "iub"
    ):
        return series.to_numpy().astype(np_dtype, copy=False), None
    null = series.isna().to_numpy(dtype=bool)
    if np_dtype is not np.str_ and isinstance(
        series.array, pd.arrays.IntegerArray | pd.arrays.BooleanArray
    ):
        return series.to_numpy(dtype=np_dtype, na_value=0), null
    if np_dtype is np.str_:
        values = np.array(
            ["" if m else str(v) for v, m in zip(series, null, strict=True)], dtype=np.str_
        )
        if values.dtype.itemsize == 0:
            values = values.astype("U1")
        return values, null
    return series.to_numpy(dtype=object, na_value=0).astype(np_dtype), null


def match_rows(table: Table | None) -> list[dict[str, Any]]:
    """DiaObject_To_Object_Match rows (list of dicts) from a Table, or []."""
    if table is None or len(table) == 0:
        return []
    n = len(table)
    out: list[dict[str, Any]] = []
    lnp = (
        np.ma.filled(np.ma.asarray(table["lnP"], dtype=float), np.nan)
        if "lnP" in table.colnames
        else np.full(n, np.nan)
    )
    dist: np.ndarray = np.ma.filled(np.ma.asarray(table["dist"], dtype=float), np.nan)
    for oid, did, d, p in zip(
        np.asarray(table["diaObjectId"], np.int64).tolist(),
        np.asarray(table["objectId"], np.int64).tolist(),
        dist.tolist(),
        lnp.tolist(),
        strict=True,
    ):
        out.append(
            {
                "diaObjectId": oid,
                "objectId": did,
                "dist": None if np.isnan(d) else d,
                "lnP": None if np.isnan(p) else p,
            }
        )
    return out


def matches_as_table(frames: Sequence[pd.DataFrame]) -> Table:
    """``DiaObject_To_Object_Match`` rows read in ``frames`` as one Table.

    Ordered by (diaObjectId, dist, objectId); ``dist`` in arcsec.
    """
    df = pd.concat(frames) if frames else pd.DataFrame(columns=list(_MATCH_UNITS))
    df = df.sort_values(["diaObjectId", "dist", "objectId"], kind="stable")
    out = Table()
    for name, (dtype, unit, desc) in _MATCH_UNITS.items():
        values = df[name].to_numpy(dtype=dtype, na_value=np.nan if dtype is float else 0)
        out[name] = Column(values, unit=unit, description=desc)
    return out


def drp_as_table(ids: ArrayLike, ra: ArrayLike, dec: ArrayLike) -> Table:
    """DRP Objects as a Table: ``objectId``, ``ra``, ``dec`` (deg)."""
    return Table(
        [
            Column(ids, name="objectId", description="DRP Object id."),
            Column(ra, name="ra", unit="deg", description="DRP Object right ascension."),
            Column(dec, name="dec", unit="deg", description="DRP Object declination."),
        ]
    )
