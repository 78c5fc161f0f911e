"""Tests of apdask.distributor."""

import os
import threading
import time

import pytest

from apdask.distributor import FileDistributor, open_distributor
from apdask.exceptions import DistributorUnavailableError, ImageTimeoutError


def test_immediate_get(tmp_path):
    (tmp_path / "a.fits").write_bytes(b"x")
    d = FileDistributor(tmp_path)
    assert d.get("a.fits", timeout=0) == os.path.join(str(tmp_path), "a.fits")


def test_late_arrival(tmp_path):
    d = FileDistributor(tmp_path)

    def writer():
        time.sleep(0.5)
        tmp = tmp_path / ".b.tmp"
        tmp.write_bytes(b"data")
        os.replace(tmp, tmp_path / "b.fits")

    t = threading.Thread(target=writer)
    t.start()
    t0 = time.monotonic()
    path = d.get("b.fits", timeout=10, poll_interval=0.05)
    t.join()
    assert path.endswith("b.fits")
    assert 0.4 < time.monotonic() - t0 < 5


def test_timeout(tmp_path):
    d = FileDistributor(tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ImageTimeoutError, match="c.fits") as exc:
        d.get("c.fits", timeout=0.5, poll_interval=0.1)
    assert time.monotonic() - t0 < 1.0
    assert "\n" not in str(exc.value) and str(tmp_path) in str(exc.value)


def test_timeout_default_from_config(tmp_path):
    import dask.config

    with dask.config.set({"apdask.distributor.timeout": 0.2}), pytest.raises(ImageTimeoutError):
        FileDistributor(tmp_path).get("d.fits")


@pytest.mark.parametrize("name", ["../etc/passwd", "a/b.fits", ".hidden", "", "x..y", "a b"])
def test_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="invalid image name"):
        FileDistributor(tmp_path).get(name, timeout=0)


def test_open_distributor(tmp_path):
    assert open_distributor(f"file://{tmp_path}").root == str(tmp_path)
    assert open_distributor(str(tmp_path)).root == str(tmp_path)
    with pytest.raises(NotImplementedError, match="issue 3"):
        open_distributor("http://localhost:8080")
    with pytest.raises(DistributorUnavailableError):
        open_distributor(str(tmp_path / "missing"))
