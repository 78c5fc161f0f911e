"""The Prompt Products Database (PPDB) interface over ``lsst-dax-apdb``.

apdask keeps its catalogs as astropy Tables with the official APDB column names;
this module is the edge that converts them to and from the pandas DataFrames of
``lsst.dax.apdb``.  Reads return Tables whose columns carry the schema's units
and descriptions, with every schema column present even when empty.  Writes go
through :meth:`Ppdb.store`, one transaction per CCD: by default a CCD already
stored is skipped; with ``replace=True`` its earlier rows are deleted and the new
ones inserted in the same transaction (SQL backend).  :meth:`Ppdb.for_ccd` opens
the interface for one CCD's padded region (DMTN-092 §5).  See ``docs/ppdb.md``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy
import sqlalchemy.exc
from astropy.table import Column, MaskedColumn, Table
from astropy.time import Time

from . import config
from ._ppdb_fast import CopyFrame, fetch_frame, register_table
from .exceptions import ConfigurationError, PpdbError

__all__ = ["create_ppdb", "region_for", "Ppdb", "CcdPpdb", "DRP_TABLE"]

log = logging.getLogger(__name__)

_RETRIES = 3  # defaults when configuration lacks ppdb.retries / ppdb.retry_backoff_s
_BACKOFF_S = 0.2
_BACKOFF_CAP_S = 5.0
DRP_TABLE = "apdask_DrpObject"
"""Name (before the APDB table prefix) of the DRP Object table apdask manages."""
_MJD_TOL = 1e-9  # days (86 µs): equality of validity timestamps
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


def _setting(key, default):
    """Configuration ``apdask.ppdb.<key>``, or ``default`` when it is not set."""
    try:
        value = config.get(f"ppdb.{key}")
    except KeyError:
        return default
    return default if value is None else value


def _incompatible(err, target):
    msg = (
        f"PPDB {target} has an incompatible schema version: {err}. "
        "Migrate it with dax_apdb's migration tools (dax_apdb_migrate) or create a new "
        "PPDB with `apdask ppdb create URL`"
    )
    return PpdbError(msg)


def _open_apdb_sql(url, namespace=None):
    from lsst.dax.apdb.sql import ApdbSql, ApdbSqlConfig
    from lsst.dax.apdb.versionTuple import IncompatibleVersionError

    path = _sqlite_path(url)
    if path is not None and not os.path.exists(path):
        msg = f"PPDB {url} does not exist; initialise it first with `apdask ppdb create {url}`"
        raise PpdbError(msg)
    cfg = ApdbSqlConfig(db_url=url, namespace=namespace)
    if path is not None:
        cfg.connection_config.connection_timeout = float(_setting("sqlite_timeout_s", 30.0))
    try:
        return _retry(lambda: ApdbSql(cfg), f"connect to PPDB {url}"), cfg
    except sqlalchemy.exc.NoSuchTableError:
        msg = (
            f"PPDB {url} is not initialised (no APDB tables"
            f"{'' if namespace is None else f' in schema {namespace!r}'}); "
            f"run `apdask ppdb create {url}`"
        )
        raise PpdbError(msg) from None
    except IncompatibleVersionError as err:
        raise _incompatible(err, url) from err


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
    if sqlite_path is not None:
        cfg.connection_config.connection_timeout = float(_setting("sqlite_timeout_s", 30.0))
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
    """Call ``fn``, retrying transient database errors a bounded number of times.

    ``apdask.ppdb.retries`` tries in all (default 3) with exponential backoff from
    ``apdask.ppdb.retry_backoff_s`` (0.2 s, capped at 5 s, with ±50 % jitter so
    that many writers refused at once, e.g. by PostgreSQL's ``max_connections``,
    do not retry in lock step).  Transient are SQLAlchemy ``OperationalError``
    (connection refused, too many clients, SQLite busy, deadlock detected),
    ``InterfaceError`` and ``DisconnectionError``; the transaction that failed
    was rolled back, so the whole call is safe to repeat.
    """
    tries = max(1, int(_setting("retries", _RETRIES)))
    backoff = float(_setting("retry_backoff_s", _BACKOFF_S))
    for attempt in range(tries):
        try:
            return fn()
        except _TRANSIENT as err:
            if attempt == tries - 1:
                cause = getattr(err, "orig", None) or err
                msg = (
                    f"cannot {what} after {tries} tries: {str(cause).strip()}"
                    "; check that the database server is running and the URL is right"
                )
                raise PpdbError(msg) from err
            delay = min(backoff * 2**attempt, _BACKOFF_CAP_S) * random.uniform(0.5, 1.5)
            log.info("retrying to %s in %.2f s after: %s", what, delay, err)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class _BoundEngine:
    """Engine stand-in whose ``begin()`` yields one open connection.

    Handing it to a shallow copy of an ``ApdbSql`` makes ``ApdbSql.store`` run
    inside a transaction opened by apdask, so that deletions (replace
    semantics) and the DRP matches commit or roll back together with it.
    """

    def __init__(self, engine, connection):
        self._engine = engine
        self._connection = connection

    @contextlib.contextmanager
    def begin(self):
        yield self._connection

    def connect(self):
        return contextlib.nullcontext(self._connection)

    def __getattr__(self, name):
        return getattr(self._engine, name)


# ---------------------------------------------------------------------------
# the interface

_SORT_KEYS = {
    "DiaObject": ["diaObjectId", "validityStartMjdTai"],
    "DiaSource": ["diaSourceId"],
    "DiaForcedSource": ["diaObjectId", "visit", "detector"],
}
_OPEN_CACHE = {}
_OPEN_LOCK = threading.Lock()


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
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _after_fork(self):
        """Drop pooled connections inherited from a parent process.

        dax_apdb pools connections by default; a forked child must not reuse
        its parent's sockets (SQLAlchemy's ``dispose(close=False)`` recipe).
        """
        if self._pid != os.getpid():
            engine = getattr(self.apdb, "_engine", None)
            if engine is not None:
                engine.dispose(close=False)
            self._pid = os.getpid()

    def __repr__(self):
        return f"Ppdb({type(self.apdb).__name__})"

    @classmethod
    def open(cls, config_path_or_url=None, *, namespace=None, cache=False):
        """Open an existing PPDB.

        Parameters
        ----------
        config_path_or_url : str or os.PathLike, optional
            A dax_apdb config yaml (from :func:`create_ppdb` or
            ``apdb-cli create-sql``), or an SQLAlchemy URL of an initialised
            database.  Defaults to configuration ``ppdb.url``.
        namespace : str, optional
            Database schema, only with a URL.
        cache : bool
            Reuse an instance already opened by this process for the same
            target.  Opening parses the schema (about 1 s), so per-CCD tasks
            pass True.  An instance is safe to share between threads, and
            between forked processes: a child drops the pooled connections it
            inherited before its first query.

        Returns
        -------
        Ppdb

        Raises
        ------
        PpdbError
            If the database is unreachable (after the configured retries), not
            initialised, or holds an incompatible schema version.
        """
        target = config.get("ppdb.url", config_path_or_url)
        if target is None:
            msg = "no PPDB configured; set apdask.ppdb.url to an apdb.yaml or SQLAlchemy URL"
            raise ConfigurationError(msg)
        key = (str(target), namespace, os.getpid())
        if cache:
            with _OPEN_LOCK:
                hit = _OPEN_CACHE.get(key)
            if hit is not None:
                return hit
        out = cls._open(str(target), namespace)
        if cache:
            with _OPEN_LOCK:
                _OPEN_CACHE[key] = out
        return out

    @classmethod
    def _open(cls, target, namespace):
        from lsst.dax.apdb import Apdb
        from lsst.dax.apdb.versionTuple import IncompatibleVersionError

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
        except IncompatibleVersionError as err:
            raise _incompatible(err, target) from err

    @classmethod
    def for_ccd(cls, config_path_or_url, ccd, ra, dec, rotpa=0.0, *, camera=None,
                padding_arcsec=None, namespace=None, cache=False):  # fmt: skip
        """Open the PPDB interface of one CCD (DMTN-092 §5).

        The CCD's predicted footprint for this boresight, padded by
        ``padding_arcsec`` (default ``apdask.ppdb.region_padding_arcsec``,
        20″), becomes the ``lsst.sphgeom`` region of every read.

        Parameters
        ----------
        config_path_or_url : str or os.PathLike or None
            As for :meth:`open`.
        ccd : str or int or apdask.camera.Detector
            CCD name (``"R22_S11"``), id, or detector object.
        ra, dec, rotpa : float
            Boresight and rotation angle, degrees.
        camera : str or apdask.camera.Camera, optional
            Needed when ``ccd`` is a name or id (e.g. ``"lsstcam"``).
        padding_arcsec : float, optional
        namespace : str, optional
        cache : bool
            As for :meth:`open`.

        Returns
        -------
        CcdPpdb
        """
        detector = ccd
        if isinstance(ccd, str | int):
            if camera is None:
                msg = f"CCD {ccd!r} given by name: pass camera= (e.g. 'lsstcam') too"
                raise ValueError(msg)
            if isinstance(camera, str):
                from .camera import get_camera

                camera = get_camera(camera)
            detector = camera[ccd]
        region = region_for(detector, ra, dec, rotpa, padding_arcsec)
        db = cls.open(config_path_or_url, namespace=namespace, cache=cache)
        return CcdPpdb(db, detector, region)

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
        cols = []
        for name, dtype, _nullable, _default, description, unit in self._table_def(table_name):
            np_dtype = _NUMPY_DTYPE.get(dtype, object)
            series = None if df is None or name not in df.columns else df[name]
            values, null = _column_values(series, np_dtype, n)
            kw = {"name": name, "unit": unit, "description": description, "copy": False}
            if null is not None and null.any():
                cols.append(MaskedColumn(values, mask=null, **kw))
            else:
                cols.append(Column(values, **kw))
        return Table(cols, copy=False)

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

    # -- SQL backend helpers -------------------------------------------------

    @property
    def is_sql(self):
        """Whether the backend is dax_apdb's SQL one (SQLite or PostgreSQL)."""
        from lsst.dax.apdb.sql import ApdbSql

        return isinstance(self.apdb, ApdbSql)

    def _require_sql(self, what):
        if not self.is_sql:
            msg = (
                f"{what} needs the SQL backend, this PPDB is {type(self.apdb).__name__}; "
                "see docs/ppdb.md (Cassandra) for the equivalent"
            )
            raise PpdbError(msg)

    @property
    def _engine(self):
        # dax_apdb has no public accessor for its engine; apdask uses it for
        # the operations dax_apdb lacks (as-of reads, deletes, DRP tables).
        self._after_fork()
        return self.apdb._engine

    @functools.cached_property
    def _sql_metadata(self):
        return sqlalchemy.MetaData(schema=self.apdb.getConfig().namespace)

    def _table(self, name):
        """The SQLAlchemy table of APDB table ``name``, located through the
        apdb's own config (prefix and namespace), reflected once."""
        from lsst.dax.apdb import ApdbTables

        cfg = self.apdb.getConfig()
        full = ApdbTables[name].table_name(prefix=cfg.prefix)
        md = self._sql_metadata
        key = full if md.schema is None else f"{md.schema}.{full}"
        with self._lock:
            if key in md.tables:
                return md.tables[key]
            table = sqlalchemy.Table(full, md, autoload_with=self._engine)
        register_table(self._engine.url, table)
        return table

    def _drp_table(self, create=False):
        """The DRP Object table apdask keeps next to the APDB tables (or None)."""
        cfg = self.apdb.getConfig()
        full = f"{cfg.prefix}{DRP_TABLE}"
        md = self._sql_metadata
        key = full if md.schema is None else f"{md.schema}.{full}"
        with self._lock:
            if key in md.tables:
                table = md.tables[key]
            else:
                table = sqlalchemy.Table(
                    full,
                    md,
                    sqlalchemy.Column("objectId", sqlalchemy.BigInteger, primary_key=True),
                    sqlalchemy.Column("ra", sqlalchemy.Float(precision=53), nullable=False),
                    sqlalchemy.Column("dec", sqlalchemy.Float(precision=53), nullable=False),
                    sqlalchemy.Column("pixelId", sqlalchemy.BigInteger, nullable=False, index=True),
                )
        if create:
            table.create(self._engine, checkfirst=True)
            return table
        exists = sqlalchemy.inspect(self._engine).has_table(full, schema=md.schema)
        return table if exists else None

    def _pixelization(self):
        from lsst.sphgeom import HtmPixelization

        pix = self.apdb.getConfig().pixelization
        return HtmPixelization(pix.htm_level), pix.htm_max_ranges

    def _pixel_ids(self, ra, dec):
        from lsst.sphgeom import LonLat, UnitVector3d

        pixelator, _ = self._pixelization()
        return np.fromiter(
            (
                pixelator.index(UnitVector3d(LonLat.fromDegrees(float(r), float(d))))
                for r, d in zip(ra, dec, strict=True)
            ),
            dtype=np.int64,
            count=len(ra),
        )

    def _region_filter(self, column, region):
        pixelator, max_ranges = self._pixelization()
        terms = []
        for lo, hi in pixelator.envelope(region, max_ranges).ranges():
            hi -= 1
            terms.append(column == lo if lo == hi else column.between(lo, hi))
        return sqlalchemy.or_(*terms)

    def _select_frame(self, query, table_name=None, types=None):
        """Rows of ``query``; typed from the schema of ``table_name`` (or from
        ``types``, ``(name, datatype, nullable)``) when given, in bulk
        (:func:`apdask._ppdb_fast.fetch_frame`)."""
        types = {c[0]: (c[1], c[2]) for c in types or ()}
        if table_name is not None:
            types = {c[0]: (c[1], c[2]) for c in self._table_def(table_name)}
        names = [c.name for c in query.selected_columns]
        with self._engine.connect() as conn:
            if names and all(n in types for n in names):
                sql = query.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})
                return fetch_frame(conn, str(sql), [(n, *types[n]) for n in names])
            result = conn.execute(query)
            return pd.DataFrame(result.fetchall(), columns=list(result.keys()))

    @property
    def _bulk(self):
        """Whether reads and writes take the bulk path (``apdask.ppdb.bulk``, default
        True; SQL backend only).  False runs everything through dax_apdb's calls."""
        return self.is_sql and bool(_setting("bulk", True))

    # -- reads ---------------------------------------------------------------

    def _call(self, what, fn):
        self._after_fork()
        try:
            return _retry(fn, what)
        except sqlalchemy.exc.SQLAlchemyError as err:
            msg = f"PPDB failed to {what}: {err}"
            raise PpdbError(msg) from err

    def _sorted(self, df, table_name, before=None):
        """Drop rows at or after ``before`` (MJD) and order rows by primary key."""
        if df is None or len(df) == 0:
            return df
        if before is not None and "midpointMjdTai" in df.columns:
            df = df[df["midpointMjdTai"].to_numpy(dtype=float, na_value=np.nan) < before]
        keys = _SORT_KEYS[table_name]
        return df.sort_values(keys, kind="stable").reset_index(drop=True)

    def get_dia_objects(self, region, *, as_of=None):
        """DiaObjects inside ``region``: the latest versions, or those valid at ``as_of``.

        Parameters
        ----------
        region : lsst.sphgeom.Region
        as_of : float, optional
            MJD TAI.  When given, return each object's version valid just
            before this time (``validityStart < as_of`` and ``validityEnd`` null
            or later), ignoring versions written at or after it.  A CCD's
            re-run, or a run racing with the other CCDs of its visit, then sees
            exactly the history that existed before its visit (SQL backend).

        Returns
        -------
        astropy.table.Table
            DiaObject columns (see :meth:`as_table`), ordered by diaObjectId.
        """
        if as_of is None and not self._bulk:
            df = self._call("read DiaObjects", lambda: self.apdb.getDiaObjects(region))
        else:
            if as_of is not None:
                self._require_sql("reading DiaObjects as of a time")
            table = self._table("DiaObject")
            cols = [c for c in table.columns if c.name != self._htm_column]
            end = table.c.validityEndMjdTai
            where = [self._region_filter(table.c[self._htm_column], region)]
            if as_of is None:  # the latest versions, as dax_apdb's getDiaObjects
                where.append(end.is_(None))
            else:
                t = float(as_of)
                where += [table.c.validityStartMjdTai < t, sqlalchemy.or_(end.is_(None), end >= t)]
            query = sqlalchemy.select(*cols).where(*where)
            df = self._call("read DiaObjects", lambda: self._select_frame(query, "DiaObject"))
        return self.as_table(self._sorted(self._inside(df, region), "DiaObject"), "DiaObject")

    @staticmethod
    def _inside(df, region):
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

    @property
    def _htm_column(self):
        return self.apdb.getConfig().pixelization.htm_index_column

    def get_dia_sources(self, region, object_ids, mjd, *, before=None):
        """DiaSources of the history window before ``mjd``.

        Parameters
        ----------
        region : lsst.sphgeom.Region
            Used when ``object_ids`` is None.
        object_ids : iterable of int or None
            Read the sources of these DiaObjects.
        mjd : float
            Visit time (MJD TAI); the window is ``history_months`` before it.
        before : float, optional
            Drop sources with ``midpointMjdTai >= before`` (e.g. the visit's own,
            from an earlier run of it).

        Returns
        -------
        astropy.table.Table
            Ordered by diaSourceId.
        """
        ids = None if object_ids is None else [int(i) for i in object_ids]
        if ids is not None and not ids:
            return self.as_table(None, "DiaSource")
        if ids is not None and self._bulk:
            df = self._read_history("DiaSource", ids, mjd, before)
        else:
            visit_time = Time(mjd, format="mjd", scale="tai")
            df = self._call(
                "read DiaSources", lambda: self.apdb.getDiaSources(region, ids, visit_time)
            )
        return self.as_table(self._sorted(df, "DiaSource", before), "DiaSource")

    def _read_history(self, table_name, ids, mjd, before):
        """dax_apdb's history read by DiaObject ids (``_getSourcesByIDs``), in bulk.

        The same rows (``diaObjectId`` in ``ids``, ``midpointMjdTai`` within
        the configured months before ``mjd``) and columns (the table's without
        ``pixelId``), in one query; rows at or after ``before`` are left in
        the database.
        """
        cfg = self.apdb.getConfig()
        if table_name == "DiaSource":
            months = cfg.read_sources_months
        else:
            months = cfg.read_forced_sources_months
        if not months:  # dax_apdb reads nothing then
            return None
        table = self._table(table_name)
        cols = [c for c in table.columns if c.name != self._htm_column]
        start = float(Time(mjd, format="mjd", scale="tai").tai.mjd) - months * 30
        where = [table.c.diaObjectId.in_(sorted(ids)), table.c.midpointMjdTai >= start]
        if before is not None:
            where.append(table.c.midpointMjdTai < float(before))
        query = sqlalchemy.select(*cols).where(*where)
        return self._call(f"read {table_name}s", lambda: self._select_frame(query, table_name))

    def get_dia_forced_sources(self, region, object_ids, mjd, *, before=None):
        """DiaForcedSources of the history window before ``mjd``.

        Parameters
        ----------
        region : lsst.sphgeom.Region
            When ``object_ids`` is None, the objects in this region are used.
        object_ids : iterable of int or None
        mjd : float
            Visit time (MJD TAI).
        before : float, optional
            Drop rows with ``midpointMjdTai >= before``.

        Returns
        -------
        astropy.table.Table
            Ordered by (diaObjectId, visit, detector).
        """
        if object_ids is None:
            object_ids = self.get_dia_objects(region)["diaObjectId"]
        ids = [int(i) for i in object_ids]
        if not ids:
            return self.as_table(None, "DiaForcedSource")
        if self._bulk:
            df = self._read_history("DiaForcedSource", ids, mjd, before)
        else:
            visit_time = Time(mjd, format="mjd", scale="tai")
            df = self._call(
                "read DiaForcedSources",
                lambda: self.apdb.getDiaForcedSources(region, ids, visit_time),
            )
        return self.as_table(self._sorted(df, "DiaForcedSource", before), "DiaForcedSource")

    def get_drp_objects(self, region):
        """DRP Objects inside ``region`` (loaded with :meth:`load_drp_objects`).

        Parameters
        ----------
        region : lsst.sphgeom.Region

        Returns
        -------
        astropy.table.Table
            ``objectId``, ``ra``, ``dec`` (deg), ordered by objectId; empty when
            no DRP catalog was loaded or the backend is not SQL.
        """
        empty = _drp_as_table(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
        if not self.is_sql:
            return empty
        table = self._call("look up the DRP Object table", self._drp_table)
        if table is None:
            return empty
        query = sqlalchemy.select(table.c.objectId, table.c.ra, table.c.dec).where(
            self._region_filter(table.c.pixelId, region)
        )
        types = [("objectId", "long", False), ("ra", "double", False), ("dec", "double", False)]
        df = self._call("read DRP Objects", lambda: self._select_frame(query, types=types))
        if len(df) == 0:
            return empty
        ra, dec = df["ra"].to_numpy(float), df["dec"].to_numpy(float)
        inside = np.asarray(region.contains(np.radians(ra), np.radians(dec)), dtype=bool)
        ids = df["objectId"].to_numpy(np.int64)[inside]
        order = np.argsort(ids, kind="stable")
        return _drp_as_table(ids[order], ra[inside][order], dec[inside][order])

    def get_drp_matches(self, object_ids):
        """``DiaObject_To_Object_Match`` rows of these DiaObjects.

        Parameters
        ----------
        object_ids : iterable of int

        Returns
        -------
        astropy.table.Table
            ``diaObjectId``, ``objectId``, ``dist`` (arcsec), ``lnP``, ordered by
            (diaObjectId, dist).
        """
        self._require_sql("reading DiaObject_To_Object_Match")
        ids = sorted({int(i) for i in object_ids})
        table = self._table("DiaObject_To_Object_Match")
        frames = []
        for lo in range(0, len(ids), 1000):
            query = sqlalchemy.select(table).where(table.c.diaObjectId.in_(ids[lo : lo + 1000]))
            frames.append(self._call("read DRP matches", lambda q=query: self._select_frame(q)))
        df = pd.concat(frames) if frames else pd.DataFrame(columns=list(_MATCH_UNITS))
        df = df.sort_values(["diaObjectId", "dist", "objectId"], kind="stable")
        out = Table()
        for name, (dtype, unit, desc) in _MATCH_UNITS.items():
            values = df[name].to_numpy(dtype=dtype, na_value=np.nan if dtype is float else 0)
            out[name] = Column(values, unit=unit, description=desc)
        return out

    # -- DRP catalog -----------------------------------------------------------

    def load_drp_objects(self, drp, *, batch=50_000):
        """Load (or refresh) DRP Objects into the PPDB's DRP Object table.

        Rows whose ``objectId`` is already present are replaced, so loading the
        same catalog twice leaves one copy.

        Parameters
        ----------
        drp : astropy.table.Table
            ``objectId``, ``ra``, ``dec`` (deg), e.g. ``Butler.get_drp_objects()``.
        batch : int
            Rows per insert statement.

        Returns
        -------
        int
            Number of rows loaded.
        """
        self._require_sql("loading DRP Objects")
        for name in ("objectId", "ra", "dec"):
            if name not in drp.colnames:
                msg = f"DRP catalog lacks column {name!r}; give objectId, ra, dec (deg)"
                raise PpdbError(msg)
        ids = np.asarray(drp["objectId"], dtype=np.int64)
        ra = np.asarray(drp["ra"], dtype=np.float64)
        dec = np.asarray(drp["dec"], dtype=np.float64)
        pix = self._pixel_ids(ra, dec)
        table = self._call("create the DRP Object table", lambda: self._drp_table(create=True))

        def _load():
            with self._engine.begin() as conn:
                for lo in range(0, ids.size, batch):
                    part = ids[lo : lo + batch].tolist()
                    conn.execute(table.delete().where(table.c.objectId.in_(part)))
                    rows = [
                        {"objectId": i, "ra": r, "dec": d, "pixelId": p}
                        for i, r, d, p in zip(
                            part,
                            ra[lo : lo + batch].tolist(),
                            dec[lo : lo + batch].tolist(),
                            pix[lo : lo + batch].tolist(),
                            strict=True,
                        )
                    ]
                    if rows:
                        conn.execute(table.insert(), rows)

        self._call("load DRP Objects", _load)
        return int(ids.size)

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

    def store(self, mjd, objects, sources, forced_sources, *, visit=None, detector=None,
              replace=False, drp_matches=None):  # fmt: skip
        """Store one CCD's new DiaObject versions, DiaSources and forced sources.

        All rows go in one transaction.  By default, if the PPDB already holds
        sources of this ``(visit, detector)`` nothing is written (a re-run is
        skipped).  With ``replace=True`` the CCD's earlier rows are deleted
        first, in the same transaction: its DiaSources and DiaForcedSources,
        the DiaObject versions it created (the previous versions are re-opened)
        and the DRP matches of the DiaObjects it created.

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
        replace : bool
            Replace the CCD's earlier rows instead of skipping (SQL backend).
        drp_matches : astropy.table.Table, optional
            ``DiaObject_To_Object_Match`` rows (``diaObjectId``, ``objectId``,
            ``dist`` in arcsec, ``lnP``) for the new DiaObjects, written in the
            same transaction (SQL backend).

        Returns
        -------
        bool
            True if rows were written, False if the CCD was already stored.

        Raises
        ------
        PpdbError
            On a missing required column, an unreachable database, or a
            replace that would rewrite history (a DiaObject the CCD touched has
            a version from a later visit).
        """
        for cat in (sources, forced_sources):
            if cat is not None and len(cat):
                if visit is None:
                    visit = int(cat["visit"][0])
                if detector is None:
                    detector = int(cat["detector"][0])
        if replace and (visit is None or detector is None):
            msg = "replace=True needs the visit and detector; pass visit= and detector="
            raise PpdbError(msg)
        objects_df = self._to_frame(objects, "DiaObject")
        sources_df = self._to_frame(sources, "DiaSource")
        forced_df = self._to_frame(forced_sources, "DiaForcedSource")
        visit_time = Time(mjd, format="mjd", scale="tai")
        what = f"store visit {visit} detector {detector}"
        if not self.is_sql:
            if replace:
                self._require_sql("replace=True")
            if drp_matches is not None and len(drp_matches):
                log.warning(
                    "DRP matches are not stored by the %s backend", type(self.apdb).__name__
                )
            if (
                visit is not None
                and detector is not None
                and self.contains_visit_detector(visit, detector, mjd=mjd)
            ):
                return False
            self._call(what, lambda: self.apdb.store(visit_time, objects_df, sources_df, forced_df))
            return True
        matches = _match_rows(drp_matches)
        if self._bulk:  # dax_apdb's own store, with the rows appended in bulk
            objects_df, sources_df, forced_df = (
                CopyFrame(df) for df in (objects_df, sources_df, forced_df)
            )
        return self._call(
            what,
            lambda: self._store_sql(
                visit_time, objects_df, sources_df, forced_df, matches, visit, detector, replace
            ),
        )

    def _store_sql(self, visit_time, objects_df, sources_df, forced_df, matches, visit, detector,
                   replace):  # fmt: skip
        """One transaction: (delete the CCD's rows |skip if present), store, matches."""
        # Reflect the tables first: reflection inside the transaction would take
        # a second connection, which SQLite's write lock blocks.
        for name in ("DiaObject", "DiaSource", "DiaForcedSource", "DiaObject_To_Object_Match"):
            self._table(name)
        if replace and self.apdb.getConfig().dia_object_index == "last_object_table":
            self._table("DiaObjectLast")
        engine = self._engine
        with engine.begin() as conn:
            if visit is not None and detector is not None:
                if replace:
                    self._delete_ccd(conn, int(visit), int(detector), float(visit_time.tai.mjd))
                elif self._contains(conn, int(visit), int(detector)):
                    return False
            bound = copy.copy(self.apdb)
            bound._engine = _BoundEngine(engine, conn)
            bound.store(visit_time, objects_df, sources_df, forced_df)
            if matches:
                conn.execute(self._table("DiaObject_To_Object_Match").insert(), matches)
        return True

    def _contains(self, conn, visit, detector):
        for name in ("DiaSource", "DiaForcedSource"):
            t = self._table(name)
            q = sqlalchemy.select(t.c.visit).where(t.c.visit == visit, t.c.detector == detector)
            if conn.execute(q.limit(1)).first() is not None:
                return True
        return False

    def _delete_ccd(self, conn, visit, detector, t):
        """Delete one CCD's rows inside ``conn``'s transaction (replace semantics)."""
        src = self._table("DiaSource")
        forced = self._table("DiaForcedSource")
        obj = self._table("DiaObject")
        match = self._table("DiaObject_To_Object_Match")
        touched_ids = sqlalchemy.select(src.c.diaObjectId).where(
            src.c.visit == visit, src.c.detector == detector
        )
        later = conn.execute(
            sqlalchemy.select(sqlalchemy.func.count())
            .select_from(obj)
            .where(obj.c.diaObjectId.in_(touched_ids), obj.c.validityStartMjdTai > t + _MJD_TOL)
        ).scalar_one()
        if later:
            msg = (
                f"cannot replace visit {visit} detector {detector}: {later} of its DiaObject "
                "versions were superseded by later visits; re-run those visits too (newest "
                "last) or restore the PPDB from a backup"
            )
            raise PpdbError(msg)
        same_t = obj.c.validityStartMjdTai.between(t - _MJD_TOL, t + _MJD_TOL)
        conn.execute(obj.delete().where(obj.c.diaObjectId.in_(touched_ids), same_t))
        conn.execute(
            obj.update()
            .where(
                obj.c.diaObjectId.in_(touched_ids),
                obj.c.validityEndMjdTai.between(t - _MJD_TOL, t + _MJD_TOL),
            )
            .values(validityEndMjdTai=None)
        )
        if self.apdb.getConfig().dia_object_index == "last_object_table":
            last = self._table("DiaObjectLast")
            conn.execute(last.delete().where(last.c.diaObjectId.in_(touched_ids)))
            names = [c.name for c in last.columns]
            conn.execute(
                last.insert().from_select(
                    names,
                    sqlalchemy.select(*[obj.c[n] for n in names]).where(
                        obj.c.diaObjectId.in_(touched_ids), obj.c.validityEndMjdTai.is_(None)
                    ),
                )
            )
        surviving = sqlalchemy.select(obj.c.diaObjectId).where(obj.c.diaObjectId.in_(touched_ids))
        conn.execute(
            match.delete().where(
                match.c.diaObjectId.in_(touched_ids), match.c.diaObjectId.not_in(surviving)
            )
        )
        for table in (src, forced):
            conn.execute(table.delete().where(table.c.visit == visit, table.c.detector == detector))


_MATCH_UNITS = {
    "diaObjectId": (np.int64, None, "Id of diaObject."),
    "objectId": (np.int64, None, "Id of a nearby DRP Object."),
    "dist": (float, "arcsec", "The distance between the diaObject and the object."),
    "lnP": (float, None, "Natural log of the probability that the diaObject is the object."),
}


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


def _match_rows(table):
    """DiaObject_To_Object_Match rows (list of dicts) from a Table, or []."""
    if table is None or len(table) == 0:
        return []
    n = len(table)
    out = []
    lnp = (
        np.ma.filled(np.ma.asarray(table["lnP"], dtype=float), np.nan)
        if "lnP" in table.colnames
        else np.full(n, np.nan)
    )
    dist = np.ma.filled(np.ma.asarray(table["dist"], dtype=float), np.nan)
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


def _drp_as_table(ids, ra, dec):
    return Table(
        [
            Column(ids, name="objectId", description="DRP Object id."),
            Column(ra, name="ra", unit="deg", description="DRP Object right ascension."),
            Column(dec, name="dec", unit="deg", description="DRP Object declination."),
        ]
    )


@dataclass
class CcdPpdb:
    """The PPDB interface of one CCD: a :class:`Ppdb` and the CCD's padded region.

    Made by :meth:`Ppdb.for_ccd`.

    Attributes
    ----------
    ppdb : Ppdb
    detector : apdask.camera.Detector
    region : lsst.sphgeom.ConvexPolygon
    """

    ppdb: Ppdb
    detector: object
    region: object

    def read(self, mjd, *, as_of=True):
        """Everything association needs for a visit at ``mjd`` (DMTN-092 §5).

        Parameters
        ----------
        mjd : float
            Visit time, MJD TAI (any time after the previous visit and not
            later than this visit's midpoint).
        as_of : bool
            Read the state as it was before this visit (SQL backend): object
            versions valid at ``mjd``, sources and forced sources earlier than
            ``mjd``.  Makes re-runs and concurrent CCDs of one visit see the
            same history.  False reads the latest versions (any backend).

        Returns
        -------
        dict
            ``objects``, ``sources`` (12-month DiaSource history of those
            objects), ``forced`` (DiaForcedSource history) and ``drp`` (DRP
            Objects in the region), each an astropy Table with units.
        """
        db, region = self.ppdb, self.region
        when = float(mjd) if as_of else None
        objects = db.get_dia_objects(region, as_of=when)
        ids = [int(i) for i in objects["diaObjectId"]]
        return {
            "objects": objects,
            "sources": db.get_dia_sources(region, ids, mjd, before=when),
            "forced": db.get_dia_forced_sources(region, ids, mjd, before=when),
            "drp": db.get_drp_objects(region),
        }

    def store(self, mjd, objects, sources, forced_sources, **kwargs):
        """:meth:`Ppdb.store` for this CCD (``detector`` defaults to it)."""
        kwargs.setdefault("detector", self.detector.id)
        return self.ppdb.store(mjd, objects, sources, forced_sources, **kwargs)
