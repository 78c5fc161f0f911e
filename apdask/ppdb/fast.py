"""Bulk transfer for the SQL PPDB: the per-CCD reads and writes at survey scale.

dax_apdb stays the owner of the schema and of the write logic; this module only
moves the rows faster, with exactly the same contents:

* **Writes.** :class:`CopyFrame` is the DataFrame apdask hands to
  ``ApdbSql.store``.  dax_apdb prepares it as always (closes validity
  intervals, fills ``validityStartMjdTai`` and ``pixelId``) and then calls
  ``to_sql``, which this subclass overrides: on PostgreSQL the rows go in with
  ``COPY ... FROM STDIN`` (binary, built with numpy; CSV when a value's binary
  form could differ, e.g. float64 data for a REAL column), on SQLite with one
  DBAPI ``executemany``, on the connection (and so inside the transaction)
  dax_apdb was given.  Values follow pandas' ``to_sql`` rules (NaN and NA become
  NULL); columns NULL in every row are left out of the COPY unless they have a
  server default.  Anything unusual (other dialects, datetime columns, the text
  ``\\N``) falls back to pandas ``to_sql``.
* **Reads.** :func:`fetch_frame` runs one ``SELECT`` and returns a DataFrame
  typed from the schema: PostgreSQL streams it with ``COPY (SELECT ...) TO
  STDOUT`` in CSV parsed by pandas' C reader, SQLite uses the DBAPI cursor;
  neither builds SQLAlchemy ``Row`` objects, the main cost of dax_apdb's reads
  (its ``ApdbSqlTableData.to_pandas`` makes numpy probe every row).

``tests/ppdb/test_ppdb_scale.py`` proves both paths equal dax_apdb's own, table
content for table content.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy

__all__ = ["CopyFrame", "fetch_frame", "register_table", "copy_stats"]

_NULL = "\\N"  # COPY's NULL marker in both directions
_FLOAT = {"double", "float"}
_INT = {"long": "int64", "int": "int32", "short": "int16", "byte": "int8"}
_INT_NULLABLE = {"long": "Int64", "int": "Int32", "short": "Int16", "byte": "Int8"}
copy_stats: dict[str, int] = {"copy_rows": 0, "binary_rows": 0, "fallback_rows": 0}
"""Rows written by the bulk path (in all, in binary, per table) and by the pandas
fallback (for tests)."""


class CopyFrame(pd.DataFrame):
    """A DataFrame whose ``to_sql`` appends in bulk (see the module docstring)."""

    @property
    def _constructor(self):
        return CopyFrame

    def astype(self, dtype: Any, *args: Any, **kwargs: Any) -> pd.DataFrame:
        """``DataFrame.astype``; ``astype({})`` is a shallow copy instead of a deep one."""
        # dax_apdb's _coerce_uint64 calls astype({}) on every frame it stores,
        # which copies each column one by one; a shallow copy is the same frame.
        if isinstance(dtype, dict) and not dtype and not args and not kwargs:
            return self.copy(deep=False)
        return super().astype(dtype, *args, **kwargs)

    def to_sql(
        self,
        name: str,
        con: Any,
        *,
        schema: str | None = None,
        if_exists: str = "fail",
        index: bool = True,
        **kwargs: Any,
    ) -> int | None:
        """``DataFrame.to_sql``, appending in bulk where the module docstring says it can."""
        dialect = getattr(getattr(con, "dialect", None), "name", None)
        bulk = {"postgresql": _copy_pg, "sqlite": _executemany_sqlite}.get(dialect or "")
        if bulk is None or if_exists != "append" or index or kwargs or not _plain(self):
            copy_stats["fallback_rows"] += len(self)
            frame = pd.DataFrame(self)
            kwargs.update(schema=schema, if_exists=if_exists, index=index)
            return frame.to_sql(name, con, **kwargs)
        if len(self):
            bulk(self, name, con, schema)
        copy_stats["copy_rows"] += len(self)
        copy_stats[name] = copy_stats.get(name, 0) + len(self)
        return len(self)


def _plain(frame):
    """Whether every column is numeric, boolean or text without the NULL marker."""
    for name, dtype in frame.dtypes.items():
        if dtype.kind in "iufb" or isinstance(dtype, pd.Int64Dtype | pd.BooleanDtype):
            continue
        if isinstance(dtype, pd.api.extensions.ExtensionDtype):
            if isinstance(pd.array([], dtype=dtype), pd.arrays.IntegerArray):
                continue
            return False
        if dtype.kind != "O":
            return False  # datetimes, timedeltas...
        ser = frame[name]
        values = ser[ser.notna()]
        if any(not isinstance(v, str | bool | int | float) for v in values):
            return False
        if any(v == _NULL for v in values if isinstance(v, str)):
            return False
    return True


def _qualified(con, name, schema):
    quote = con.dialect.identifier_preparer.quote
    return name if schema is None else f"{quote(schema)}.{quote(name)}", quote


_TableKey = tuple[str, str | None, str]  # (database URL, schema, table)
_DEFAULTS: dict[_TableKey, set[str]] = {}


_TYPES: dict[_TableKey, dict[str, str]] = {}


def register_table(url: Any, table: sqlalchemy.Table) -> None:
    """Record a reflected table's column types and which columns have a server
    default, so that a writer (a forked one too) need not look them up."""
    key = (str(url), table.schema, table.name)
    _DEFAULTS[key] = {c.name for c in table.columns if c.server_default is not None}
    _TYPES[key] = {c.name: type(c.type).__name__.upper() for c in table.columns}


def _with_defaults(con, name, schema):
    """Columns of a table that have a server default (cached per database)."""
    key = (str(con.engine.url), schema, name)
    if key not in _DEFAULTS:
        cols = sqlalchemy.inspect(con).get_columns(name, schema=schema)
        _DEFAULTS[key] = {c["name"] for c in cols if c.get("default") is not None}
    return _DEFAULTS[key]


def _copy_pg(frame, name, con, schema):
    table, quote = _qualified(con, name, schema)
    table = quote(name) if schema is None else table
    # A column that is NULL in every row is left out of the COPY (it gets NULL
    # all the same) unless the table gives it a default.
    keep_default = _with_defaults(con, name, schema)
    all_null = frame.isna().all()
    out = pd.DataFrame(frame[[c for c in frame.columns if c in keep_default or not all_null[c]]])
    wide = {c: np.float64 for c, dtype in out.dtypes.items() if dtype == np.float32}
    columns = ", ".join(quote(str(c)) for c in out.columns)
    data = _binary(out, _TYPES.get((str(con.engine.url), schema, name), {}))
    buf: io.BytesIO | io.StringIO
    if data is not None:
        copy_stats["binary_rows"] += len(out)
        sql = f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT binary)"
        buf = io.BytesIO(data)
    else:
        if wide:
            out = out.astype(wide)
        buf = io.StringIO()
        # floats print with repr (shortest round trip); float32 is widened first so
        # that a REAL or DOUBLE column receives the very value pandas would bind
        out.to_csv(buf, header=False, index=False, na_rep=_NULL, lineterminator="\n")
        buf.seek(0)
        sql = f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv, NULL '{_NULL}')"
    with con.connection.dbapi_connection.cursor() as cur:
        cur.copy_expert(sql, buf)


_BINARY: dict[str, np.dtype[Any]] = {
    "BIGINT": np.dtype(">i8"),
    "INTEGER": np.dtype(">i4"),
    "SMALLINT": np.dtype(">i2"),
    "DOUBLE_PRECISION": np.dtype(">f8"),
    "REAL": np.dtype(">f4"),
    "BOOLEAN": np.dtype("u1"),
}
_TEXT_SQL = {"CHAR", "VARCHAR", "TEXT"}


def _binary_values(ser, sql_type):
    """(values, null) of one column in its PostgreSQL binary form, or None when
    the conversion could differ from what pandas' ``to_sql`` stores."""
    target = _BINARY[sql_type]
    null = ser.isna().to_numpy()
    masked = isinstance(ser.array, pd.arrays.IntegerArray | pd.arrays.BooleanArray)
    kind = ser.dtype.kind
    if sql_type == "BOOLEAN":
        if kind != "b":
            return None
        values = ser.to_numpy(dtype=bool, na_value=False) if masked else ser.to_numpy()
        return values.astype(target), null
    if target.kind == "f":
        # a REAL receives float32 data exactly; float64 data could round twice
        if kind != "f" or (sql_type == "REAL" and ser.dtype != np.float32):
            return None
        return ser.to_numpy().astype(target), null
    if kind not in "iu":
        return None
    values = ser.to_numpy(dtype=np.int64, na_value=0) if masked else ser.to_numpy()
    info = np.iinfo(target.newbyteorder("="))
    if values.size and (values.min() < info.min or values.max() > info.max):
        return None  # out of range: let the server refuse it as it would
    return values.astype(target), null


def _binary(frame, types):
    """``COPY ... FROM STDIN (FORMAT binary)`` data of ``frame``, or None."""
    n = len(frame)
    cols: list[tuple[Any, ...]] = []  # (values, null, lengths) per column
    for name, ser in frame.items():
        sql_type = types.get(name)
        if sql_type in _BINARY:
            got = _binary_values(ser, sql_type)
            if got is None:
                return None
            values, null = got
            width = values.dtype.itemsize
            lengths = np.where(null, 0, width)
            cols.append((np.ascontiguousarray(values).view(np.uint8).reshape(n, width), null))
        elif sql_type in _TEXT_SQL and ser.dtype.kind == "O":
            null = ser.isna().to_numpy()
            if any(not isinstance(v, str) for v in ser[~null]):
                return None
            encoded = [b"" if m else v.encode() for v, m in zip(ser, null, strict=True)]
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=n)
            cols.append((encoded, null))
        else:
            return None
        cols[-1] += (lengths,)
    header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
    row_size = np.full(n, 2, dtype=np.int64) + sum(4 + c[2] for c in cols)
    ends = np.cumsum(row_size)
    starts = len(header) + ends - row_size
    buf = np.zeros(len(header) + int(ends[-1] if n else 0) + 2, dtype=np.uint8)
    buf[: len(header)] = np.frombuffer(header, np.uint8)
    buf[-2:] = 0xFF  # trailer: field count -1
    _scatter(buf, starts, np.full(n, len(cols), dtype=">i2").view(np.uint8).reshape(n, 2))
    pos = starts + 2
    for values, null, lengths in cols:
        marker = np.where(null, -1, lengths).astype(">i4").view(np.uint8).reshape(n, 4)
        _scatter(buf, pos, marker)
        keep = ~null
        if isinstance(values, list):
            for p, v, k in zip((pos + 4).tolist(), values, keep.tolist(), strict=True):
                if k and v:
                    buf[p : p + len(v)] = np.frombuffer(v, np.uint8)
        elif keep.any():
            _scatter(buf, pos[keep] + 4, values[keep])
        pos = pos + 4 + lengths
    return buf.tobytes()


def _scatter(buf, starts, rows):
    """Write ``rows[i]`` (bytes, one row per start) at ``buf[starts[i]:]``."""
    buf[starts[:, None] + np.arange(rows.shape[1])] = rows


def _executemany_sqlite(frame, name, con, schema):
    table, quote = _qualified(con, name, schema)
    table = quote(name) if schema is None else table
    columns = []
    for _, ser in frame.items():
        null = ser.isna().to_numpy()
        if isinstance(ser.array, pd.arrays.IntegerArray | pd.arrays.BooleanArray):
            kind = bool if isinstance(ser.array, pd.arrays.BooleanArray) else np.int64
            values = ser.to_numpy(dtype=kind, na_value=0).tolist()  # Python scalars
        else:
            values = ser.to_numpy().tolist()
        if null.any():
            values = [None if m else v for v, m in zip(values, null.tolist(), strict=True)]
        columns.append(values)
    names = ", ".join(quote(str(c)) for c in frame.columns)
    marks = ", ".join("?" * len(columns))
    cursor = con.connection.dbapi_connection.cursor()
    try:
        cursor.executemany(
            f"INSERT INTO {table} ({names}) VALUES ({marks})", zip(*columns, strict=True)
        )
    finally:
        cursor.close()


# ---------------------------------------------------------------------------
# reads


def fetch_frame(con: Any, sql: str, columns: Sequence[tuple[str, str, bool]]) -> pd.DataFrame:
    """Rows of ``sql`` as a DataFrame typed from the schema.

    Parameters
    ----------
    con : sqlalchemy.engine.Connection
    sql : str
        A complete ``SELECT`` with literal values, its result columns in the
        order of ``columns``.
    columns : list of (str, str, bool)
        ``(name, felis datatype, nullable)`` of each result column.

    Returns
    -------
    pandas.DataFrame
        float columns as float64 (NULL is NaN), non-null integers as numpy
        integers, nullable integers and booleans as pandas masked arrays, text
        as object (NULL is NaN).
    """
    if con.dialect.name == "postgresql":
        return _fetch_pg(con, sql, columns)
    cursor = con.connection.dbapi_connection.cursor()
    try:
        cursor.execute(sql)
        rows = cursor.fetchall()
    finally:
        cursor.close()
    data = {}
    cols = list(zip(*rows, strict=True)) if rows else [()] * len(columns)
    for (name, dtype, nullable), values in zip(columns, cols, strict=True):
        data[name] = _typed(values, dtype, nullable)
    return pd.DataFrame(data, index=pd.RangeIndex(len(rows)))


def _typed(values, dtype, nullable):
    """One column of DBAPI values (None is NULL) as a typed array."""
    if dtype in _FLOAT:
        return np.array(values, dtype=np.float64)  # None -> NaN
    if dtype in _INT or dtype == "boolean":
        np_dtype = np.bool_ if dtype == "boolean" else _INT[dtype]
        if not nullable:
            return np.array(values, dtype=np_dtype)
        obj = np.array(values, dtype=object)
        mask = np.equal(obj, None)  # type: ignore[call-overload]  # stubs lack object None
        data = np.zeros(obj.size, dtype=np_dtype)
        if not mask.all():
            data = np.where(mask, 0, obj).astype(np_dtype)
        if dtype == "boolean":
            return pd.arrays.BooleanArray(data, mask)
        return pd.arrays.IntegerArray(data, mask)
    return pd.Series(list(values), dtype=object)


def _fetch_pg(con, sql, columns):
    buf = io.BytesIO()  # bytes straight to the C parser, no decoding
    copy = f"COPY ({sql}) TO STDOUT WITH (FORMAT csv, NULL '{_NULL}')"
    with con.connection.dbapi_connection.cursor() as cur:
        cur.copy_expert(copy, buf)
    names = [c[0] for c in columns]
    if buf.tell() == 0:
        return pd.DataFrame({n: _typed((), t, nl) for n, t, nl in columns})
    buf.seek(0)
    dtypes: dict[str, Any] = {}
    na: dict[str, list[str]] = {}
    for name, dtype, nullable in columns:
        if dtype in _FLOAT:
            dtypes[name], na[name] = "float64", [_NULL, "NaN"]
        elif dtype in _INT:
            dtypes[name], na[name] = (_INT_NULLABLE if nullable else _INT)[dtype], [_NULL]
        elif dtype == "boolean":
            dtypes[name], na[name] = ("boolean" if nullable else "bool"), [_NULL]
        else:
            dtypes[name], na[name] = object, [_NULL]
    return pd.read_csv(
        buf,
        header=None,
        names=names,
        dtype=dtypes,
        na_values=na,
        keep_default_na=False,
        true_values=["t"],
        false_values=["f"],
        low_memory=False,
    )
