"""Shared fixtures: a simulated test-camera repository and a no-compute guard."""

from __future__ import annotations

import contextlib
import shutil

import dask
import pytest


@pytest.fixture(scope="session")
def sim_repo(tmp_path_factory):
    """A seeded two-visit test-camera repository (read-only: copy it before writing)."""
    from apdask.simulate import simulate_repo

    root = tmp_path_factory.mktemp("simrepo") / "repo"
    visits = simulate_repo("testcam", str(root), n_visits=2, seed=11)
    return {"root": str(root), "visits": visits}


@pytest.fixture
def repo(sim_repo, tmp_path):
    """A private, writable copy of the simulated repository."""
    dst = tmp_path / "repo"
    shutil.copytree(sim_repo["root"], dst)
    return str(dst)


@contextlib.contextmanager
def raise_if_dask_computes():
    """Fail if anything calls a dask scheduler inside the block (xarray's helper)."""

    def _scheduler(*args, **kwargs):
        raise RuntimeError("a dask computation ran while building a graph")

    with dask.config.set(scheduler=_scheduler):
        yield
