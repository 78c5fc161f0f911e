"""The Prompt Products Database (PPDB) interface over ``lsst-dax-apdb``.

apdask keeps its catalogs as astropy Tables with the official APDB column names;
this module is the edge that converts them to and from the pandas DataFrames of
``lsst.dax.apdb``.  Reads return Tables whose columns carry the schema's units
and descriptions, with every schema column present even when empty.  Writes go
through :meth:`Ppdb.store`, one transaction per CCD: by default a CCD already
stored is skipped; with ``replace=True`` its earlier rows are deleted and the new
ones inserted in the same transaction (SQL backend).  :meth:`Ppdb.for_ccd` opens
the interface for one CCD's padded region (DMTN-092 §5).  See ``docs/ppdb.md``.

This module holds the :class:`Ppdb` interface and its per-CCD view; the work
behind it is split by responsibility: :mod:`apdask.ppdb.setup` (creating and
opening the database, settings, retries), :mod:`apdask.ppdb.schema` (Tables to
and from DataFrames, units and descriptions), :mod:`apdask.ppdb.reads` (the reads)
and :mod:`apdask.ppdb.sql` (what apdask does on the SQL backend directly).
Their public names are importable from here as before.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import sqlalchemy
import sqlalchemy.exc
from astropy.table import Table
from astropy.time import Time
from astropy.wcs.utils import proj_plane_pixel_scales

from apdask import config
from apdask.core.camera import Camera, Detector, get_camera
from apdask.exceptions import ConfigurationError, PpdbError
from apdask.ppdb.fast import CopyFrame
from apdask.ppdb.reads import PpdbReads
from apdask.ppdb.schema import frame_as_table, match_rows, schema_columns, table_as_frame
from apdask.ppdb.setup import _retry, create_ppdb, open_apdb
from apdask.ppdb.sql import DRP_TABLE, PpdbSql

if TYPE_CHECKING:  # for annotations only: lsst.sphgeom costs ~1.8 s of import
    from lsst.sphgeom import ConvexPolygon

__all__ = ["create_ppdb", "region_for", "region_for_image", "Ppdb", "CcdPpdb", "DRP_TABLE"]

log = logging.getLogger(__name__)

_OPEN_CACHE: dict[Any, Any] = {}
_OPEN_LOCK = threading.Lock()


def region_for(
    detector: Detector,
    ra: float,
    dec: float,
    rotpa: float = 0.0,
    padding_arcsec: float | None = None,
) -> ConvexPolygon:
    """Sky region of one detector for PPDB reads.

    Parameters
    ----------
    detector : apdask.core.camera.Detector
    ra, dec, rotpa : float
        Boresight and rotation angle in degrees.
    padding_arcsec : float, optional
        Margin; defaults to configuration ``ppdb.region_padding_arcsec``.

    Returns
    -------
    lsst.sphgeom.ConvexPolygon
        Convex hull of the padded footprint corners.
    """
    # lazy: lsst.sphgeom comes with lsst.dax.apdb (~1.8 s of import)
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    pad = float(config.get("ppdb.region_padding_arcsec", padding_arcsec))
    corners = detector.footprint(ra, dec, rotpa, padding_arcsec=pad)
    vertices = [UnitVector3d(LonLat.fromDegrees(float(r), float(d))) for r, d in corners]
    return ConvexPolygon.convexHull(vertices)


def region_for_image(
    wcs: Any, shape: tuple[int, int], padding_arcsec: float | None = None
) -> ConvexPolygon:
    """Sky region of an image with a celestial WCS, for PPDB reads (``apdask diff``).

    A foreign image has no detector in a camera: its region is the convex hull of its
    own WCS footprint (the four corners and the four edge midpoints, so that a
    distorted WCS stays inside), grown by ``padding_arcsec``.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        The image's celestial WCS.
    shape : tuple of int
        ``(ny, nx)``.
    padding_arcsec : float, optional
        Margin; defaults to configuration ``ppdb.region_padding_arcsec``.

    Returns
    -------
    lsst.sphgeom.ConvexPolygon
    """
    # lazy: lsst.sphgeom comes with lsst.dax.apdb (~1.8 s of import)
    from lsst.sphgeom import ConvexPolygon, LonLat, UnitVector3d

    pad_arcsec = float(config.get("ppdb.region_padding_arcsec", padding_arcsec))
    scale = float(np.mean(proj_plane_pixel_scales(wcs.celestial))) * 3600.0  # arcsec/px
    pad = pad_arcsec / scale
    ny, nx = shape
    lo_x, hi_x, lo_y, hi_y = -0.5 - pad, nx - 0.5 + pad, -0.5 - pad, ny - 0.5 + pad
    mid_x, mid_y = (nx - 1) / 2.0, (ny - 1) / 2.0
    xs = np.array([lo_x, mid_x, hi_x, hi_x, hi_x, mid_x, lo_x, lo_x])
    ys = np.array([lo_y, lo_y, lo_y, mid_y, hi_y, hi_y, hi_y, mid_y])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    vertices = [
        UnitVector3d(LonLat.fromDegrees(float(r) % 360.0, float(d)))
        for r, d in zip(ra, dec, strict=True)
    ]
    return ConvexPolygon.convexHull(vertices)


class Ppdb(PpdbReads, PpdbSql):
    """A PPDB: any ``lsst.dax.apdb.Apdb`` (SQL, or Cassandra via its config).

    Use :meth:`open` rather than the constructor.  The reads (history, a CCD's
    stored rows) come from :class:`apdask.ppdb.reads.PpdbReads`, the SQL-backend
    methods (``is_sql``, the DRP catalog, the write transaction) from
    :class:`apdask.ppdb.sql.PpdbSql`.

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
    def open(
        cls,
        config_path_or_url: str | os.PathLike[str] | None = None,
        *,
        namespace: str | None = None,
        cache: bool = False,
    ) -> Self:
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
        return cls(open_apdb(target, namespace))

    @classmethod
    def for_ccd(
        cls,
        config_path_or_url: str | os.PathLike[str] | None,
        ccd: str | int | Detector,
        ra: float,
        dec: float,
        rotpa: float = 0.0,
        *,
        camera: str | Camera | None = None,
        padding_arcsec: float | None = None,
        namespace: str | None = None,
        cache: bool = False,
    ) -> CcdPpdb:
        """Open the PPDB interface of one CCD (DMTN-092 §5).

        The CCD's predicted footprint for this boresight, padded by
        ``padding_arcsec`` (default ``apdask.ppdb.region_padding_arcsec``,
        20″), becomes the ``lsst.sphgeom`` region of every read.

        Parameters
        ----------
        config_path_or_url : str or os.PathLike or None
            As for :meth:`open`.
        ccd : str or int or apdask.core.camera.Detector
            CCD name (``"R22_S11"``), id, or detector object.
        ra, dec, rotpa : float
            Boresight and rotation angle, degrees.
        camera : str or apdask.core.camera.Camera, optional
            Needed when ``ccd`` is a name or id (e.g. ``"lsstcam"``).
        padding_arcsec : float, optional
        namespace : str, optional
        cache : bool
            As for :meth:`open`.

        Returns
        -------
        CcdPpdb
        """
        if isinstance(ccd, str | int):
            if camera is None:
                msg = f"CCD {ccd!r} given by name: pass camera= (e.g. 'lsstcam') too"
                raise ValueError(msg)
            if isinstance(camera, str):
                camera = get_camera(camera)
            detector = camera[ccd]
        else:
            detector = ccd
        region = region_for(detector, ra, dec, rotpa, padding_arcsec)
        db = cls.open(config_path_or_url, namespace=namespace, cache=cache)
        return CcdPpdb(db, detector, region)

    # -- schema helpers ----------------------------------------------------

    @functools.cached_property
    def _defs(self):
        return schema_columns(self.apdb)

    def columns(self, table_name: str) -> list[str]:
        """Names of the schema columns of ``"DiaObject"``, ``"DiaSource"`` or
        ``"DiaForcedSource"``."""
        return [c[0] for c in self._table_def(table_name)]

    def _table_def(self, table_name):
        try:
            return self._defs[table_name]
        except KeyError:
            msg = f"unknown PPDB table {table_name!r}; use DiaObject, DiaSource or DiaForcedSource"
            raise ValueError(msg) from None

    def as_table(self, df: pd.DataFrame | None, table_name: str) -> Table:
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
        return frame_as_table(df, self._table_def(table_name))

    def _to_frame(self, table, table_name):
        """Table -> DataFrame with exactly the storable schema columns."""
        return table_as_frame(table, self._table_def(table_name), table_name)

    # -- reads: apdask.ppdb._reads.PpdbReads ------------------------------------

    def _call(self, what, fn):
        self._after_fork()
        try:
            return _retry(fn, what)
        except sqlalchemy.exc.SQLAlchemyError as err:
            msg = f"PPDB failed to {what}: {err}"
            raise PpdbError(msg) from err

    # -- writes --------------------------------------------------------------

    def store(
        self,
        mjd: float,
        objects: Table | None,
        sources: Table | None,
        forced_sources: Table | None,
        *,
        visit: int | None = None,
        detector: int | None = None,
        replace: bool = False,
        drp_matches: Table | None = None,
    ) -> bool:
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
        matches = match_rows(drp_matches)
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


@dataclass
class CcdPpdb:
    """The PPDB interface of one CCD: a :class:`Ppdb` and the CCD's padded region.

    Made by :meth:`Ppdb.for_ccd`.

    Attributes
    ----------
    ppdb : Ppdb
    detector : apdask.core.camera.Detector
    region : lsst.sphgeom.ConvexPolygon
    """

    ppdb: Ppdb
    detector: Detector
    region: Any

    def read(self, mjd: float, *, as_of: bool = True) -> dict[str, Table]:
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

    def store(
        self,
        mjd: float,
        objects: Table | None,
        sources: Table | None,
        forced_sources: Table | None,
        **kwargs: Any,
    ) -> bool:
        """:meth:`Ppdb.store` for this CCD (``detector`` defaults to it)."""
        kwargs.setdefault("detector", self.detector.id)
        return self.ppdb.store(mjd, objects, sources, forced_sources, **kwargs)
