"""The SQL side of the PPDB: what apdask does on dax_apdb's database directly.

dax_apdb's calls cover the common reads and writes on any backend.  On its SQL
backend (SQLite, PostgreSQL) apdask also works on the tables itself: reads as of
a time and in bulk (:mod:`apdask.ppdb.fast`), the per-CCD write transaction
with replace semantics, and the DRP Object table with its
``DiaObject_To_Object_Match`` rows.  :class:`PpdbSql` holds these methods;
:class:`apdask.ppdb.database.Ppdb` inherits them.  See ``docs/ppdb.md``.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import functools
import logging
import os
import random
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy
from astropy.table import Table
from astropy.time import Time

from apdask.exceptions import PpdbError, PpdbLockTimeoutError
from apdask.ppdb.fast import fetch_frame, register_table
from apdask.ppdb.schema import drp_as_table, matches_as_table
from apdask.ppdb.setup import _setting

if TYPE_CHECKING:  # for annotations only: lsst.sphgeom costs ~1.8 s of import
    from lsst.sphgeom import Region

__all__ = ["PpdbSql", "DRP_TABLE"]

DRP_TABLE = "apdask_DrpObject"
"""Name (before the APDB table prefix) of the DRP Object table apdask manages."""
_MJD_TOL = 1e-9  # days (86 µs): equality of validity timestamps
_LOCK_TIMEOUT_S = 300.0  # default of apdask.ppdb.sqlite_lock_timeout_s
log = logging.getLogger("apdask.ppdb")


@contextlib.contextmanager
def sqlite_write_lock(
    db_path: str | os.PathLike[str], what: str = "write", timeout: float | None = None
) -> Iterator[None]:
    """Serialise SQLite writers: an exclusive ``flock`` on ``<db_path>.lock``.

    SQLite admits one writer at a time, and a writer refused by its busy timeout
    fails ("database is locked").  With 189 CCDs storing at once on a loaded
    machine the busy handler's sleeps are not a queue, and CCDs were lost.  Every
    apdask writer (any process or thread on this host) instead takes this lock
    around its write transaction and waits for it, polling with a short jittered
    back-off, for up to ``timeout`` seconds (``apdask.ppdb.sqlite_lock_timeout_s``,
    default 300 s: five times the 60 s alert latency budget; a late CCD is better
    than a lost one).  Inside the lock the transaction meets only readers.

    Where the lock file cannot be opened (a read-only directory) the write goes on
    without it, as before, under SQLite's own busy timeout.

    Raises
    ------
    PpdbLockTimeoutError
        The lock was not obtained in time: lock contention, not an unreachable server.
    """
    if timeout is None:
        timeout = float(_setting("sqlite_lock_timeout_s", _LOCK_TIMEOUT_S))
    lock_path = f"{db_path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError:
        try:
            fd = os.open(lock_path, os.O_RDONLY)
        except OSError as err:
            log.warning("writing without the SQLite write lock %s: %s", lock_path, err)
            yield
            return
    try:
        t0 = time.monotonic()
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            waited = time.monotonic() - t0
            if waited >= timeout:
                msg = (
                    f"cannot {what}: the SQLite PPDB {db_path} stayed locked by other writers "
                    f"for {waited:.0f} s (lock contention on {lock_path}); raise "
                    "apdask.ppdb.sqlite_lock_timeout_s, or use PostgreSQL for many "
                    "concurrent writers"
                )
                raise PpdbLockTimeoutError(msg)
            time.sleep(min(delay, timeout - waited) * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.25)
        waited = time.monotonic() - t0
        if waited > 1.0:
            log.info("waited %.1f s for the SQLite write lock to %s", waited, what)
        yield
    finally:
        os.close(fd)  # releases the flock


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


class PpdbSql:
    """The SQL-backend methods of :class:`apdask.ppdb.database.Ppdb`.

    A mixin: it uses the host's ``apdb``, ``_lock``, ``_after_fork``, ``_call``
    and ``_table_def``.
    """

    apdb: Any
    _lock: Any
    _after_fork: Any
    _call: Any
    _table_def: Any

    @property
    def is_sql(self) -> bool:
        """Whether the backend is dax_apdb's SQL one (SQLite or PostgreSQL)."""
        # lazy: lsst.dax.apdb costs ~1.8 s of import; only opening a PPDB needs it
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

    def _write_lock(self, what):
        """:func:`sqlite_write_lock` for an SQLite file, nothing for a server database."""
        url = self._engine.url
        path = url.database
        if path and path.startswith("file:"):  # dax_apdb opens SQLite by URI (mode=rw)
            path = urllib.parse.unquote(urllib.parse.urlparse(path).path)
        if url.get_backend_name() != "sqlite" or path in (None, "", ":memory:"):
            return contextlib.nullcontext()
        return sqlite_write_lock(path, what)

    @functools.cached_property
    def _sql_metadata(self):
        return sqlalchemy.MetaData(schema=self.apdb.getConfig().namespace)

    def _table(self, name):
        """The SQLAlchemy table of APDB table ``name``, located through the
        apdb's own config (prefix and namespace), reflected once."""
        # lazy: lsst.dax.apdb costs ~1.8 s of import; only opening a PPDB needs it
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
        # lazy: lsst.sphgeom comes with lsst.dax.apdb (~1.8 s of import)
        from lsst.sphgeom import HtmPixelization

        pix = self.apdb.getConfig().pixelization
        return HtmPixelization(pix.htm_level), pix.htm_max_ranges

    def _pixel_ids(self, ra, dec):
        # lazy: lsst.sphgeom comes with lsst.dax.apdb (~1.8 s of import)
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
        (:func:`apdask.ppdb.fast.fetch_frame`)."""
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

    @property
    def _htm_column(self):
        return self.apdb.getConfig().pixelization.htm_index_column

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

    # -- DRP catalog -----------------------------------------------------------

    def get_drp_objects(self, region: Region) -> Table:
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
        empty = drp_as_table(np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
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
        return drp_as_table(ids[order], ra[inside][order], dec[inside][order])

    def get_drp_matches(self, object_ids: Iterable[int]) -> Table:
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
        return matches_as_table(frames)

    def load_drp_objects(self, drp: Table, *, batch: int = 50_000) -> int:
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
            with self._write_lock("load DRP Objects"), self._engine.begin() as conn:
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

    # -- the write transaction -------------------------------------------------

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
        with self._write_lock(f"store visit {visit} detector {detector}"), engine.begin() as conn:
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
