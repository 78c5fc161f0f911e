"""Synthetic per-CCD catalogs and a pixel-free CCD "pipeline" for PPDB tests.

A CCD run here does what ``apdask.pipeline.tasks`` does around the PPDB, without pixels:
read the CCD's history as of the visit, associate, forced-measure every known
DiaObject (a deterministic fake flux), and store, optionally with replace.
"""

from __future__ import annotations

import contextlib
import uuid

import numpy as np
import pandas as pd
import sqlalchemy
from astropy.table import Table

from apdask.core.ids import dia_forced_source_ids, dia_source_ids
from apdask.pipeline.associate import associate_ccd

AS = 1.0 / 3600.0
TABLES = ("DiaObject", "DiaSource", "DiaForcedSource", "DiaObject_To_Object_Match")
KEYS = {
    "DiaObject": ["diaObjectId", "validityStartMjdTai"],
    "DiaSource": ["diaSourceId"],
    "DiaForcedSource": ["diaObjectId", "visit", "detector"],
    "DiaObject_To_Object_Match": ["diaObjectId", "objectId"],
}


def field(detector, ra, dec, n=20, seed=0):
    """Fixed sky positions of ``n`` variable sources inside the CCD footprint."""
    rng = np.random.default_rng(seed + 1000 * detector.id)
    corners = detector.footprint(ra, dec)
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    span = hi - lo
    pra = lo[0] + span[0] * rng.uniform(0.2, 0.8, n)
    pdec = lo[1] + span[1] * rng.uniform(0.2, 0.8, n)
    return pra, pdec


def sources_for(detector, visit, mjd, pos, seed=0, n_new=3):
    """DiaSources of one CCD-visit: a detection near each field position plus new ones."""
    rng = np.random.default_rng(seed + 7919 * visit + detector.id)
    pra, pdec = pos
    extra_ra = pra[:n_new] + 30 * AS * (1 + visit % 5)
    ra = np.concatenate([pra + rng.normal(0, 0.05 * AS, pra.size), extra_ra])
    dec = np.concatenate([pdec + rng.normal(0, 0.05 * AS, pdec.size), pdec[:n_new]])
    m = ra.size
    return Table(
        {
            "diaSourceId": dia_source_ids(visit, detector.id, m),
            "visit": np.full(m, visit),
            "detector": np.full(m, detector.id),
            "midpointMjdTai": np.full(m, mjd),
            "ra": ra,
            "dec": dec,
            "raErr": np.full(m, 0.05 * AS),
            "decErr": np.full(m, 0.05 * AS),
            "x": rng.uniform(10, 4000, m),
            "y": rng.uniform(10, 4000, m),
            "psfFlux": rng.uniform(500, 5000, m),
            "psfFluxErr": np.full(m, 50.0),
            "psfNdata": np.full(m, 25),
            "bboxSize": np.full(m, 30),
            "timeProcessedMjdTai": np.full(m, mjd + 60.0 / 86400.0),
            "band": np.full(m, "r"),
            "isDipole": np.zeros(m, bool),
        }
    )


def forced_for(objects, detector, visit, mjd):
    """Deterministic forced measurements at every known DiaObject."""
    n = len(objects)
    oid = np.asarray(objects["diaObjectId"], dtype=np.int64)
    return Table(
        {
            "diaForcedSourceId": dia_forced_source_ids(visit, detector.id, n),
            "diaObjectId": oid,
            "ra": np.asarray(objects["ra"], float),
            "dec": np.asarray(objects["dec"], float),
            "visit": np.full(n, visit),
            "detector": np.full(n, detector.id),
            "psfFlux": (oid % 97).astype(float) + visit % 7,
            "psfFluxErr": np.full(n, 2.0),
            "midpointMjdTai": np.full(n, mjd),
            "band": np.full(n, "r"),
            "timeProcessedMjdTai": np.full(n, mjd + 60.0 / 86400.0),
        }
    )


def run_ccd(view, visit, mjd, pos, *, replace=False, seed=0):
    """Read as of the visit, associate, forced-measure and store one CCD."""
    history = view.read(mjd)
    sources = sources_for(view.detector, visit, mjd, pos, seed=seed)
    forced = forced_for(history["objects"], view.detector, visit, mjd)
    out = associate_ccd(sources, history, mjd, forced)
    stored = view.store(
        mjd, out["objects"], out["sources"], forced, visit=visit,
        replace=replace, drp_matches=out["drp_matches"],
    )  # fmt: skip
    return stored, out


def dump(db):
    """Full contents of the PPDB tables, ordered by key (DataFrames)."""
    out = {}
    with db._engine.connect() as conn:
        for name in TABLES:
            t = db._table(name)
            res = conn.execute(sqlalchemy.select(t))
            df = pd.DataFrame(res.fetchall(), columns=list(res.keys()))
            out[name] = df.sort_values(KEYS[name], kind="stable").reset_index(drop=True)
    return out


def counts(db):
    """Row counts and duplicate-key counts per table."""
    data = dump(db)
    return {name: (len(df), int(df.duplicated(KEYS[name]).sum())) for name, df in data.items()}


PG_URL = "postgresql+psycopg2://postgres@127.0.0.1/test"


def pg_engine(url=PG_URL):
    """A SQLAlchemy engine on the local PostgreSQL; skips the test if it is not reachable."""
    import pytest

    pytest.importorskip("psycopg2")
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as err:
        pytest.skip(f"PostgreSQL not reachable: {err}")
    return engine


@contextlib.contextmanager
def pg_ppdb(config_path, prefix="apdask", url=PG_URL):
    """A PPDB in a fresh PostgreSQL schema (``create_ppdb``), dropped afterwards.

    Skips the test when PostgreSQL is not reachable.  Yields the config path.
    """
    import sqlalchemy

    from apdask.ppdb import database as ppdb

    engine = pg_engine(url)
    namespace = f"{prefix}_{uuid.uuid4().hex[:10]}"
    try:
        yield ppdb.create_ppdb(url, config_path, namespace=namespace)
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE'))
        engine.dispose()


class PrivatePostgres:
    """A throwaway PostgreSQL cluster from the installed binaries: ``url``, and
    :meth:`stop` / :meth:`start` to take it down and bring it back mid-test."""

    def __init__(self, max_connections=100):
        import functools
        import os
        import shutil
        import socket
        import subprocess
        import tempfile

        import pytest

        try:
            bindir = subprocess.run(
                ["pg_config", "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError) as err:
            pytest.skip(f"no PostgreSQL binaries to start a private cluster: {err}")
        initdb = os.path.join(bindir, "initdb")
        self.pg_ctl = os.path.join(bindir, "pg_ctl")
        if not (os.path.exists(initdb) and os.path.exists(self.pg_ctl)):
            pytest.skip(f"initdb/pg_ctl not found in {bindir}")
        self.as_user = []
        self.root = tempfile.mkdtemp(prefix="apdask-pg-")
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "log")
        self.options = (
            f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
            f"-c max_connections={max_connections} -c fsync=off -c synchronous_commit=off"
        )
        self._run = functools.partial(subprocess.run, check=True, capture_output=True)
        self._run([*self.as_user, initdb, "-D", self.data, "-A", "trust", "-U", "postgres",
                   "--no-sync"])  # fmt: skip
        self.url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    def start(self):
        self._run([*self.as_user, self.pg_ctl, "-D", self.data, "-w", "-l", self.log, "-o",
                   self.options, "start"])  # fmt: skip

    def stop(self, mode="fast"):
        self._run([*self.as_user, self.pg_ctl, "-D", self.data, "-m", mode, "-w", "stop"])

    def remove(self):
        import shutil
        import subprocess

        subprocess.run([*self.as_user, self.pg_ctl, "-D", self.data, "-m", "immediate", "-w",
                        "stop"], capture_output=True, check=False)  # fmt: skip
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def private_postgres(max_connections=100):
    """A running :class:`PrivatePostgres`; yields its URL and removes it afterwards."""
    pg = PrivatePostgres(max_connections)
    try:
        pg.start()
        yield pg.url
    finally:
        pg.remove()
