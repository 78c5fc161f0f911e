"""The reads of :class:`apdask.ppdb.database.Ppdb`: history for association, and a CCD's rows.

A mixin, as :class:`apdask.ppdb.sql.PpdbSql`: dax_apdb's calls on any backend, the
bulk SQL path where it applies, and, on the SQL backend, the rows one CCD stored
(:meth:`PpdbReads.get_ccd_rows`, what a re-run re-sends alerts from).  Its methods
are documented here and called on :class:`apdask.ppdb.database.Ppdb`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy
from astropy.time import Time

from apdask.core.records import CcdRows
from apdask.ppdb.schema import rows_inside, sort_rows

__all__ = ["PpdbReads"]

_MJD_TOL = 1e-9  # days (86 µs): equality of validity timestamps, as apdask.ppdb.sql


class PpdbReads:
    """The read methods of :class:`apdask.ppdb.database.Ppdb` (a mixin).

    It uses the host's ``apdb``, ``_call``, ``as_table`` and the SQL helpers of
    :class:`apdask.ppdb.sql.PpdbSql`.
    """

    apdb: Any
    _call: Any
    as_table: Any
    is_sql: Any
    _bulk: Any
    _htm_column: Any
    _require_sql: Any
    _table: Any
    _region_filter: Any
    _select_frame: Any
    _read_history: Any

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
        return self.as_table(sort_rows(rows_inside(df, region), "DiaObject"), "DiaObject")

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
        return self.as_table(sort_rows(df, "DiaSource", before), "DiaSource")

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
        return self.as_table(sort_rows(df, "DiaForcedSource", before), "DiaForcedSource")

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

    def get_ccd_rows(self, visit, detector, mjd):
        """The rows one CCD of one visit stored (SQL backend).

        Parameters
        ----------
        visit, detector : int
        mjd : float
            The visit's time (MJD TAI): its DiaObject versions start then.

        Returns
        -------
        apdask.core.records.CcdRows
            The CCD's DiaSources and, for their DiaObjects, the versions valid at
            ``mjd`` (``validityStart <= mjd < validityEnd``, or no end).

        Raises
        ------
        PpdbError
            On a backend other than SQL, or an unreachable database.
        """
        self._require_sql("reading one CCD's stored rows")
        src = self._table("DiaSource")
        cols = [c for c in src.columns if c.name != self._htm_column]
        query = sqlalchemy.select(*cols).where(
            src.c.visit == int(visit), src.c.detector == int(detector)
        )
        what = f"read visit {visit} detector {detector}"
        df = self._call(what, lambda: self._select_frame(query, "DiaSource"))
        sources = self.as_table(sort_rows(df, "DiaSource"), "DiaSource")
        oids = np.ma.filled(np.ma.asarray(sources["diaObjectId"], dtype=np.int64), -1)
        ids = sorted({int(i) for i in oids if i >= 0})
        if not ids:
            return CcdRows(sources, self.as_table(None, "DiaObject"))
        obj = self._table("DiaObject")
        cols = [c for c in obj.columns if c.name != self._htm_column]
        t = float(mjd) + _MJD_TOL
        end = obj.c.validityEndMjdTai
        query = sqlalchemy.select(*cols).where(
            obj.c.diaObjectId.in_(ids),
            obj.c.validityStartMjdTai <= t,
            sqlalchemy.or_(end.is_(None), end > t),
        )
        df = self._call(what, lambda: self._select_frame(query, "DiaObject"))
        return CcdRows(sources, self.as_table(sort_rows(df, "DiaObject"), "DiaObject"))
