"""The Prompt Products Database (PPDB) interface over ``lsst-dax-apdb``.

apdask keeps its catalogs as astropy Tables with the official APDB column names;
this module is the edge that converts them to and from the pandas DataFrames of
``lsst.dax.apdb``.  Reads return Tables whose columns carry the schema's units
and descriptions, with every schema column present even when empty.  Writes go
through :meth:`Ppdb.store`, one transaction per CCD, and are idempotent per
``(visit, detector)``.  See ``docs/ppdb.md``.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy.exc
from astropy.table import Column, MaskedColumn, Table
from astropy.time import Time

from . import config
from .exceptions import ConfigurationError, PpdbError

__all__ = ["create_ppdb", "region_for", "Ppdb"]

_RETRIES = 3
_BACKOFF_S = 0.2
_TRANSIENT = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
)
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


# ---------------------------------------------------------------------------
# creation and regions


def _is_url(s):
    return "://" in str(s) and not str(s).endswith((".yaml", ".yml", ".json", ".py"))


def _sqlite_path(url):
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :].split("?", 1)[0]
        if path.startswith("file:"):
            path = path[len("file:") :]
        return path
    return None


def _open_apdb_sql(url, namespace=None):
    from lsst.dax.apdb.sql import ApdbSql, ApdbSqlConfig

    path = _sqlite_path(url)
    if path is not None and not os.path.exists(path):
        msg = f"PPDB {url} does not exist; initialise it first with `apdask ppdb create {url}`"
        raise PpdbError(msg)
    cfg = ApdbSqlConfig(db_url=url, namespace=namespace)
    try:
        return _retry(lambda: ApdbSql(cfg), f"connect to PPDB {url}"), cfg
    except sqlalchemy.exc.NoSuchTableError:
        msg = (
            f"PPDB {url} is not initialised (no APDB tables"
            f"{'' if namespace is None else f' in schema {namespace!r}'}); "
            f"run `apdask ppdb create {url}`"
        )
        raise PpdbError(msg) from None


def create_ppdb(url, config_path=None, *, namespace=None, history_months=None):
    """Initialise a PPDB (APDB schema) and save its dax_apdb config file.

    Idempotent: if the database already holds a compatible APDB schema, only
    the config file is (re)written.

    Parameters
    ----------
    url : str
        SQLAlchemy URL: ``sqlite:////abs/path.db`` or
        ``postgresql+psycopg2://user@host/db``.
    config_path : str or os.PathLike, optional
        Where to save the config yaml.  Defaults to ``apdb.yaml`` next to an
        SQLite file; required for other databases.
    namespace : str, optional
        Database schema (PostgreSQL namespace) to hold the tables.
    history_months : int, optional
        Months of DiaSource/DiaForcedSource history read back; defaults to
        configuration ``ppdb.history_months``.

    Returns
    -------
    str
        The config path, usable with :meth:`Ppdb.open`.

    Raises
    ------
    ConfigurationError
        If no config path can be derived.
    PpdbError
        If the database cannot be reached or holds an incompatible schema.
    """
    from lsst.dax.apdb.sql import ApdbSql

    url = str(url)
    months = int(config.get("ppdb.history_months", history_months))
    sqlite_path = _sqlite_path(url)
    if config_path is None:
        if sqlite_path is None:
            msg = f"a config_path is needed to create the PPDB {url}; pass where to save apdb.yaml"
            raise ConfigurationError(msg)
        config_path = os.path.join(os.path.dirname(sqlite_path), "apdb.yaml")
    config_path = str(config_path)
    Path(config_path).parent.mkdir(parents=True, exist_ok=True)
    if sqlite_path is not None:
        Path(sqlite_path).parent.mkdir(parents=True, exist_ok=True)

    existing = None
    if sqlite_path is None or os.path.exists(sqlite_path):
        try:
            existing = _open_apdb_sql(url, namespace)
        except PpdbError as err:
            if "not initialised" not in str(err):
                raise
    if existing is not None:
        _, cfg = existing
    else:
        try:
            cfg = _retry(
                lambda: ApdbSql.init_database(
                    db_url=url,
                    namespace=namespace,
                    read_sources_months=months,
                    read_forced_sources_months=months,
                ),
                f"create PPDB {url}",
            )
        except sqlalchemy.exc.SQLAlchemyError as err:
            msg = f"cannot create PPDB {url}: {err}"
            raise PpdbError(msg) from err
    cfg.read_sources_months = months
    cfg.read_forced_sources_months = months
    cfg.save(config_path)
    return config_path


def region_for(detector, ra, dec, rotpa=0.0, padding_arcsec=None):
    """Sky region of one detector for PPDB reads.

    Parameters
    ----------
    detector : apdask.camera.Detector
    ra, dec, rotpa : float
        Boresight and rotation angle in degrees.
    padding_arcsec : float, optional
        Margin; defaults to configuration ``ppdb.region_padding_arcsec``.

    Returns
    -------
    lsst.sphgeom.ConvexPolygon
        Convex hull of the padded footprint corners.
    """
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    pad = float(config.get("ppdb.region_padding_arcsec", padding_arcsec))
    corners = detector.footprint(ra, dec, rotpa, padding_arcsec=pad)
    vertices = [UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in corners]
    return ConvexPolygon.convexHull(vertices)


def _retry(fn, what):
    """Call ``fn`` up to ``_RETRIES`` times on transient connection errors."""
    for attempt in range(_RETRIES):
        try:
            return fn()
        except _TRANSIENT as err:
            if attempt == _RETRIES - 1:
                cause = getattr(err, "orig", None) or err
                msg = (
                    f"cannot {what} after {_RETRIES} tries: {str(cause).strip()}"
                    "; check that the database server is running and the URL is right"
                )
                raise PpdbError(msg) from err
            time.sleep(_BACKOFF_S * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


# ---------------------------------------------------------------------------
# the interface


class Ppdb:
    """A PPDB: any ``lsst.dax.apdb.Apdb`` (SQL, or Cassandra via its config).

    Use :meth:`open` rather than the constructor.

    Parameters
    ----------
    apdb : lsst.dax.apdb.Apdb
        The opened dax_apdb instance.
    """

    def __init__(self, apdb):
        self.apdb = apdb

    def __repr__(self):
        return f"Ppdb({type(self.apdb).__name__})"

    @classmethod
    def open(cls, config_path_or_url=None, *, namespace=None):
        """Open an existing PPDB.

        Parameters
        ----------
        config_path_or_url : str or os.PathLike, optional
            A dax_apdb config yaml (from :func:`create_ppdb` or
            ``apdb-cli create-sql``), or an SQLAlchemy URL of an initialised
            database.  Defaults to configuration ``ppdb.url``.
        namespace : str, optional
            Database schema, only with a URL.

        Returns
        -------
        Ppdb

        Raises
        ------
        PpdbError
            If the database is unreachable (after 3 tries) or not initialised.
        """
        from lsst.dax.apdb import Apdb

        target = config.get("ppdb.url", config_path_or_url)
        if target is None:
            msg = "no PPDB configured; set apdask.ppdb.url to an apdb.yaml or SQLAlchemy URL"
            raise ConfigurationError(msg)
        target = str(target)
        if _is_url(target):
            apdb, _ = _open_apdb_sql(target, namespace)
            return cls(apdb)
        if not os.path.exists(target):
            msg = (
                f"PPDB config {target} does not exist; create it with "
                "`apdask ppdb create URL` or pass an SQLAlchemy URL"
            )
            raise PpdbError(msg)
        try:
            return cls(_retry(lambda: Apdb.from_uri(target), f"open PPDB {target}"))
        except sqlalchemy.exc.NoSuchTableError:
            msg = f"PPDB of {target} is not initialised; run `apdask ppdb create URL`"
            raise PpdbError(msg) from None

    # -- schema helpers ----------------------------------------------------

    @functools.cached_property
    def _defs(self):
        from lsst.dax.apdb import ApdbTables

        out = {}
        for name in ("DiaObject", "DiaSource", "DiaForcedSource"):
            table_def = self.apdb.tableDef(ApdbTables[name])
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

    def columns(self, table_name):
        """Names of the schema columns of ``"DiaObject"``, ``"DiaSource"`` or
        ``"DiaForcedSource"``."""
        return [c[0] for c in self._table_def(table_name)]

    def _table_def(self, table_name):
        try:
            return self._defs[table_name]
        except KeyError:
            msg = f"unknown PPDB table {table_name!r}; use DiaObject, DiaSource or DiaForcedSource"
            raise ValueError(msg) from None

    def as_table(self, df, table_name):
        """Convert a dax_apdb DataFrame to an astropy Table with units.

        Parameters
        ----------
        df : pandas.DataFrame or None
            Rows of the table; ``None`` or missing columns give null values.
        table_name : str
            ``"DiaObject"``, ``"DiaSource"`` or ``"DiaForcedSource"``.

        Returns
        -------
        astropy.table.Table
            All schema columns in schema order, with ``unit`` and
            ``description``.  Nullable integer/boolean columns with nulls are
            masked; float nulls are NaN.
        """
        n = 0 if df is None else len(df)
        out = Table()
        for name, dtype, _nullable, _default, description, unit in self._table_def(table_name):
            np_dtype = _NUMPY_DTYPE.get(dtype, object)
            series = None if df is None or name not in df.columns else df[name]
            if series is None:
                null = np.ones(n, dtype=bool)
            else:
                null = series.isna().to_numpy(dtype=bool)
            if np_dtype is np.str_:
                values = np.array(
                    ["" if m else str(v) for v, m in zip(series, null, strict=True)]
                    if series is not None
                    else [""] * n,
                    dtype=np.str_,
                )
                if values.dtype.itemsize == 0:
                    values = values.astype("U1")
            elif np.issubdtype(np_dtype, np.floating):
                values = (
                    np.full(n, np.nan, dtype=np_dtype)
                    if series is None
                    else series.to_numpy(dtype=np_dtype, na_value=np.nan)
                )
                null = np.zeros(n, dtype=bool)
            else:
                values = (
                    np.zeros(n, dtype=np_dtype)
                    if series is None
                    else series.to_numpy(dtype=object, na_value=0).astype(np_dtype)
                )
            kw = {"name": name, "unit": unit, "description": description}
            if null.any():
                out.add_column(MaskedColumn(values, mask=null, **kw))
            else:
                out.add_column(Column(values, **kw))
        return out

    def _to_frame(self, table, table_name):
        """Table -> DataFrame with exactly the storable schema columns."""
        n = 0 if table is None else len(table)
        data = {}
        for name, dtype, nullable, default, _desc, _unit in self._table_def(table_name):
            if name in _FILLED_BY_APDB:
                continue
            np_dtype = _NUMPY_DTYPE.get(dtype, object)
            present = table is not None and name in table.colnames
            if present:
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

    # -- reads ---------------------------------------------------------------

    def _call(self, what, fn):
        try:
            return _retry(fn, what)
        except sqlalchemy.exc.SQLAlchemyError as err:
            msg = f"PPDB failed to {what}: {err}"
            raise PpdbError(msg) from err

    def get_dia_objects(self, region):
        """Latest versions of the DiaObjects inside ``region``.

        Parameters
        ----------
        region : lsst.sphgeom.Region

        Returns
        -------
        astropy.table.Table
            DiaObject columns (see :meth:`as_table`).
        """
        df = self._call("read DiaObjects", lambda: self.apdb.getDiaObjects(region))
        return self.as_table(df, "DiaObject")

    def get_dia_sources(self, region, object_ids, mjd):
        """DiaSources of the history window before ``mjd``.

        Parameters
        ----------
        region : lsst.sphgeom.Region
            Used when ``object_ids`` is None.
        object_ids : iterable of int or None
            Read the sources of these DiaObjects.
        mjd : float
            Visit time (MJD TAI); the window is ``history_months`` before it.

        Returns
        -------
        astropy.table.Table
        """
        ids = None if object_ids is None else [int(i) for i in object_ids]
        if ids is not None and not ids:
            return self.as_table(None, "DiaSource")
        visit_time = Time(mjd, format="mjd", scale="tai")
        df = self._call("read DiaSources", lambda: self.apdb.getDiaSources(region, ids, visit_time))
        return self.as_table(df, "DiaSource")

    def get_dia_forced_sources(self, region, object_ids, mjd):
        """DiaForcedSources of the history window before ``mjd``.

        Parameters
        ----------
        region : lsst.sphgeom.Region
            When ``object_ids`` is None, the objects in this region are used.
        object_ids : iterable of int or None
        mjd : float
            Visit time (MJD TAI).

        Returns
        -------
        astropy.table.Table
        """
        if object_ids is None:
            object_ids = self.get_dia_objects(region)["diaObjectId"]
        ids = [int(i) for i in object_ids]
        if not ids:
            return self.as_table(None, "DiaForcedSource")
        visit_time = Time(mjd, format="mjd", scale="tai")
        df = self._call(
            "read DiaForcedSources",
            lambda: self.apdb.getDiaForcedSources(region, ids, visit_time),
        )
        return self.as_table(df, "DiaForcedSource")

    def contains_visit_detector(self, visit, detector, region=None, mjd=None):
        """Whether sources of this (visit, detector) are already stored.

        Parameters
        ----------
        visit, detector : int
        region : lsst.sphgeom.Region, optional
            Needed by some backends (Cassandra).
        mjd : float, optional
            Visit time (MJD TAI), needed by some backends.

        Returns
        -------
        bool
        """
        visit_time = None if mjd is None else Time(mjd, format="mjd", scale="tai")
        return bool(
            self._call(
                "check visit/detector",
                lambda: self.apdb.containsVisitDetector(
                    int(visit), int(detector), region=region, visit_time=visit_time
                ),
            )
        )

    # -- writes --------------------------------------------------------------

    def store(self, mjd, objects, sources, forced_sources, *, visit=None, detector=None):
        """Store one CCD's new DiaObject versions, DiaSources and forced sources.

        All rows go in one transaction.  If the PPDB already contains sources of
        this ``(visit, detector)`` nothing is written (idempotent re-runs).

        Parameters
        ----------
        mjd : float
            Visit time (MJD TAI); DiaObject validity starts here.
        objects, sources, forced_sources : astropy.table.Table or None
            Catalogs with schema column names.  Extra columns are dropped,
            missing nullable columns become null, missing ``*Ndata`` /
            ``nDiaSources`` become 0; ``pixelId`` and validity are filled by
            dax_apdb.
        visit, detector : int, optional
            Default to the values in ``sources`` or ``forced_sources``.

        Returns
        -------
        bool
            True if rows were written, False if the CCD was already stored.

        Raises
        ------
        PpdbError
            On a missing required column or an unreachable database.
        """
        for cat in (sources, forced_sources):
            if cat is not None and len(cat):
                if visit is None:
                    visit = int(cat["visit"][0])
                if detector is None:
                    detector = int(cat["detector"][0])
        if (
            visit is not None
            and detector is not None
            and self.contains_visit_detector(visit, detector, mjd=mjd)
        ):
            return False
        objects_df = self._to_frame(objects, "DiaObject")
        sources_df = self._to_frame(sources, "DiaSource")
        forced_df = self._to_frame(forced_sources, "DiaForcedSource")
        visit_time = Time(mjd, format="mjd", scale="tai")
        self._call(
            f"store visit {visit} detector {detector}",
            lambda: self.apdb.store(visit_time, objects_df, sources_df, forced_df),
        )
        return True
