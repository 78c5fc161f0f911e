"""A DIAObject's history, and a visit's rows, as astropy Tables in one call.

:func:`object_history` gives everything the PPDB holds about one DIAObject: its
versions (one per visit that updated it), its DIASources and its forced sources;
:func:`visit_tables` gives what one visit (or one CCD of it) wrote.  Both return a
dict ``{"objects": ..., "sources": ..., "forced": ...}`` of astropy Tables with every
schema column in schema order, with the schema's units and descriptions (as
:meth:`apdask.ppdb.database.Ppdb.as_table`), sorted by time.

They read the tables of dax_apdb's SQL backend (SQLite, PostgreSQL) directly, as
:mod:`apdask.ppdb.sql` does: dax_apdb's own calls read by sky region and time window
only.  See ``docs/ppdb.md``.
"""

from __future__ import annotations

import operator
import warnings
from typing import TYPE_CHECKING, Any

import sqlalchemy
from astropy.table import Table

from apdask.exceptions import DiaObjectNotFoundError, NoDetectionsWarning

if TYPE_CHECKING:
    from apdask.ppdb.database import Ppdb

__all__ = ["HISTORY_KEYS", "object_history", "visit_tables"]

#: Keys of the dicts returned here, and the PPDB table behind each.
HISTORY_KEYS = {"objects": "DiaObject", "sources": "DiaSource", "forced": "DiaForcedSource"}
_MJD_TOL = 1e-6  # days (86 ms): a DiaObject version starts at its visit's midpointMjdTai


def _integer(value: Any, name: str, hint: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        msg = f"{name} must be an integer, got {value!r} ({type(value).__name__}); {hint}"
        raise TypeError(msg) from None


def _read(ppdb: Ppdb, table_name: str, where: list[Any], order: list[str], what: str) -> Table:
    """Rows of ``table_name`` matching ``where`` as a schema Table, in ``order``."""
    table = ppdb._table(table_name)
    htm = ppdb._htm_column
    cols = [c for c in table.columns if c.name != htm]
    query = sqlalchemy.select(*cols).where(*where).order_by(*(table.c[k] for k in order))
    df = ppdb._call(what, lambda: ppdb._select_frame(query, table_name))
    return ppdb.as_table(df, table_name)


def object_history(ppdb: Ppdb, dia_object_id: int) -> dict[str, Table]:
    """Everything the PPDB holds about one DIAObject, as astropy Tables.

    Parameters
    ----------
    ppdb : apdask.ppdb.Ppdb
        An open PPDB on the SQL backend (SQLite or PostgreSQL).
    dia_object_id : int
        The object's ``diaObjectId`` (an alert's ``diaObject["diaObjectId"]``, or a
        row of :func:`visit_tables`).

    Returns
    -------
    dict of str to astropy.table.Table
        ``"objects"``: every version of the DiaObject (one per visit that gave it a
        DIASource), ordered by ``validityStartMjdTai``; the current one has a null
        ``validityEndMjdTai`` (NaN).  ``"sources"``: its DIASources, ordered by
        ``midpointMjdTai``: the light curve, for
        :func:`apdask.tools.plot.light_curve`.  ``"forced"``: its forced sources
        (``DiaForcedSource``), ordered by ``midpointMjdTai`` and ``detector``.  Every
        table has all schema columns with their units and descriptions, and
        ``meta["diaObjectId"]``.

    Raises
    ------
    DiaObjectNotFoundError
        The PPDB has no row of this ``diaObjectId``.
    PpdbError
        The PPDB is unreachable, or not on the SQL backend.
    TypeError
        ``dia_object_id`` is not an integer.

    Examples
    --------
    >>> hist = object_history(Ppdb.open("repo/ppdb/apdb.yaml"), 268435456000)  # doctest: +SKIP
    >>> hist["sources"]["midpointMjdTai", "band", "psfFlux", "psfFluxErr"]  # doctest: +SKIP
    """
    oid = _integer(dia_object_id, "dia_object_id", "give one diaObjectId, e.g. 268435456000")
    ppdb._require_sql("object_history")
    order = {
        "objects": ["validityStartMjdTai"],
        "sources": ["midpointMjdTai", "diaSourceId"],
        "forced": ["midpointMjdTai", "detector", "diaForcedSourceId"],
    }
    out = {}
    for key, name in HISTORY_KEYS.items():
        t = ppdb._table(name)
        out[key] = _read(ppdb, name, [t.c.diaObjectId == oid], order[key], f"read {name}s")
        out[key].meta["diaObjectId"] = oid
    if not any(len(t) for t in out.values()):
        msg = (
            f"no DiaObject {oid} in the PPDB ({ppdb!r}): no DiaObject, DiaSource or "
            "DiaForcedSource row has this diaObjectId; take one from an alert "
            "(alert['diaObject']['diaObjectId']) or from visit_tables(ppdb, visit)['sources']"
        )
        raise DiaObjectNotFoundError(msg)
    return out


def visit_tables(ppdb: Ppdb, visit: int, detector: int | None = None) -> dict[str, Table]:
    """What one visit (or one CCD of it) wrote to the PPDB, as astropy Tables.

    Parameters
    ----------
    ppdb : apdask.ppdb.Ppdb
        An open PPDB on the SQL backend (SQLite or PostgreSQL).
    visit : int
    detector : int, optional
        Only this CCD, by its integer id (the PPDB's ``detector`` column; for a name,
        ``apdask.core.camera.get_camera(camera)[name].id``).

    Returns
    -------
    dict of str to astropy.table.Table
        ``"sources"``: the DIASources of the visit, ordered by ``detector`` and
        ``diaSourceId``.  ``"forced"``: its forced sources, ordered by ``detector``
        and ``diaObjectId``.  ``"objects"``: the DiaObject versions the visit wrote,
        one per object it gave a DIASource (its ``validityStartMjdTai`` is the visit's
        ``midpointMjdTai``), ordered by ``diaObjectId``.  Every table has all schema
        columns with units and descriptions, and ``meta["visit"]`` (and
        ``meta["detector"]``).  A visit with no rows gives empty tables and a
        :class:`~apdask.exceptions.NoDetectionsWarning`.

    Raises
    ------
    PpdbError
        The PPDB is unreachable, or not on the SQL backend.
    TypeError
        ``visit`` or ``detector`` is not an integer.
    """
    visit = _integer(visit, "visit", "e.g. visit=1000")
    hint = "give the CCD's integer id: get_camera(camera)[name].id"
    det = None if detector is None else _integer(detector, "detector", hint)
    ppdb._require_sql("visit_tables")
    src, forced = ppdb._table("DiaSource"), ppdb._table("DiaForcedSource")

    def rows_of(t: sqlalchemy.Table) -> list[Any]:
        return [t.c.visit == visit] + ([] if det is None else [t.c.detector == det])

    out = {
        "sources": _read(ppdb, "DiaSource", rows_of(src), ["detector", "diaSourceId"],
                         "read DiaSources"),
        "forced": _read(ppdb, "DiaForcedSource", rows_of(forced), ["detector", "diaObjectId"],
                        "read DiaForcedSources"),
    }  # fmt: skip
    times = sorted({float(t) for t in out["sources"]["midpointMjdTai"]})
    obj = ppdb._table("DiaObject")
    if times:
        ids = sqlalchemy.select(src.c.diaObjectId).where(*rows_of(src))
        start = obj.c.validityStartMjdTai
        when = sqlalchemy.or_(*(start.between(t - _MJD_TOL, t + _MJD_TOL) for t in times))
        where = [obj.c.diaObjectId.in_(ids), when]
        out["objects"] = _read(ppdb, "DiaObject", where, ["diaObjectId"], "read DiaObjects")
    else:
        out["objects"] = ppdb.as_table(None, "DiaObject")
    out = {key: out[key] for key in HISTORY_KEYS}
    for t in out.values():
        t.meta["visit"] = visit
        if det is not None:
            t.meta["detector"] = det
    if not len(out["sources"]) and not len(out["forced"]):
        of = f"visit {visit}" + ("" if det is None else f" detector {det}")
        msg = (
            f"the PPDB has no DiaSource or DiaForcedSource of {of}: not processed yet, "
            "or nothing was detected"
        )
        warnings.warn(msg, NoDetectionsWarning, stacklevel=2)
    return out
