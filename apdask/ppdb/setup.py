"""Setting a PPDB up: creating and opening the dax_apdb database, with retries.

:func:`create_ppdb` initialises the APDB schema and saves its config file;
:func:`open_apdb` opens an existing one from that file or an SQLAlchemy URL.
Both retry transient database errors (:func:`_retry`), with the limits read from
configuration ``apdask.ppdb.*`` (:func:`_setting`).  :class:`apdask.ppdb.database.Ppdb`
builds on them; see ``docs/ppdb.md``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy
import sqlalchemy.exc

from apdask import config
from apdask.exceptions import ConfigurationError, PpdbError, PpdbLockTimeoutError

if TYPE_CHECKING:  # for annotations only: lsst.dax.apdb costs ~1.8 s of import
    from lsst.dax.apdb import Apdb

__all__ = ["create_ppdb", "open_apdb"]

log = logging.getLogger("apdask.ppdb")  # the PPDB's one logger, as before the split

_RETRIES = 3  # defaults when configuration lacks ppdb.retries / ppdb.retry_backoff_s
_BACKOFF_S = 0.2
_BACKOFF_CAP_S = 5.0
_TRANSIENT = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.DisconnectionError,
)


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


def driver_url(url: str) -> str:
    """``url`` with a PostgreSQL driver that is installed.

    SQLAlchemy maps a plain ``postgresql://`` URL to psycopg 3; the ``postgres``
    extra installs psycopg2.  A plain URL is therefore given the installed driver
    (psycopg 3 first), so that the URL a user types works.

    Raises
    ------
    ConfigurationError
        A PostgreSQL URL with no PostgreSQL driver installed.
    """
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            rest = url[len(plain) :]
            for module, scheme in (("psycopg", "postgresql+psycopg://"),
                                   ("psycopg2", "postgresql+psycopg2://")):  # fmt: skip
                if importlib.util.find_spec(module) is not None:
                    return scheme + rest
            msg = (
                f"no PostgreSQL driver for {url}; install one with "
                "`pip install 'apdask[postgres]'` (psycopg2)"
            )
            raise ConfigurationError(msg)
    return url


def _open_apdb_sql(url, namespace=None):
    # lazy: lsst.dax.apdb costs ~1.8 s of import; only opening a PPDB needs it
    from lsst.dax.apdb.sql import ApdbSql, ApdbSqlConfig
    from lsst.dax.apdb.versionTuple import IncompatibleVersionError

    url = driver_url(url)
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


def open_apdb(target: str, namespace: str | None = None) -> Apdb:
    """Open the dax_apdb instance of an existing PPDB.

    Parameters
    ----------
    target : str
        A dax_apdb config yaml or an SQLAlchemy URL of an initialised database.
    namespace : str, optional
        Database schema, only with a URL.

    Returns
    -------
    lsst.dax.apdb.Apdb

    Raises
    ------
    PpdbError
        If the database is unreachable (after the configured retries), not
        initialised, or holds an incompatible schema version.
    """
    # lazy: lsst.dax.apdb costs ~1.8 s of import; only opening a PPDB needs it
    from lsst.dax.apdb import Apdb
    from lsst.dax.apdb.versionTuple import IncompatibleVersionError

    if _is_url(target):
        apdb, _ = _open_apdb_sql(target, namespace)
        return apdb
    if not os.path.exists(target):
        msg = (
            f"PPDB config {target} does not exist; create it with "
            "`apdask ppdb create URL` or pass an SQLAlchemy URL"
        )
        raise PpdbError(msg)
    try:
        return _retry(lambda: Apdb.from_uri(target), f"open PPDB {target}")
    except sqlalchemy.exc.NoSuchTableError:
        msg = f"PPDB of {target} is not initialised; run `apdask ppdb create URL`"
        raise PpdbError(msg) from None
    except IncompatibleVersionError as err:
        raise _incompatible(err, target) from err


def create_ppdb(
    url: str,
    config_path: str | os.PathLike[str] | None = None,
    *,
    namespace: str | None = None,
    history_months: int | None = None,
) -> str:
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
    url = driver_url(url)
    # lazy: lsst.dax.apdb costs ~1.8 s of import; only opening a PPDB needs it
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


def _is_lock_contention(cause):
    """Whether a database error is SQLite's busy/locked one (contention, not an outage)."""
    text = str(cause).lower()
    return "database is locked" in text or "database table is locked" in text


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
                if _is_lock_contention(cause):
                    msg = (
                        f"cannot {what} after {tries} tries: {str(cause).strip()}: SQLite "
                        "lock contention (other readers or writers held the database); "
                        "raise apdask.ppdb.sqlite_timeout_s or apdask.ppdb.retries, or use "
                        "PostgreSQL for many concurrent writers"
                    )
                    raise PpdbLockTimeoutError(msg) from err
                msg = (
                    f"cannot {what} after {tries} tries: {str(cause).strip()}"
                    "; check that the database server is running and the URL is right"
                )
                raise PpdbError(msg) from err
            delay = min(backoff * 2**attempt, _BACKOFF_CAP_S) * random.uniform(0.5, 1.5)
            log.info("retrying to %s in %.2f s after: %s", what, delay, err)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
