"""Tests of apdask.distributor."""

import logging
import os
import stat
import threading
import time

import pytest

from apdask.core.camera import get_camera
from apdask.core.records import Fetched
from apdask.exceptions import (
    CacheSecurityError,
    DistributorUnavailableError,
    HeaderMismatchError,
    ImageTimeoutError,
)
from apdask.io.distributor import (
    FileDistributor,
    HttpDistributor,
    check_image_for_ccd,
    check_image_name,
    open_distributor,
    open_private_dir,
)
from apdask.pipeline.tasks import header_task
from apdask.services.distributor_server import LogAggregator
from tests._raws import second_snap, write_variant


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


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "a/b.fits", ".hidden", "", "x..y", "a b", "a.fits\n", "a.fits\r",
     "a.fits\x00", "\na.fits", "T_1_T00_0.fits\n"],
)  # fmt: skip
def test_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="invalid image name"):
        FileDistributor(tmp_path).get(name, timeout=0)
    with pytest.raises(ValueError, match="invalid image name"):
        check_image_for_ccd(name, get_camera("testcam"), get_camera("testcam")["T00"])


def test_names_matched_over_the_whole_string():
    """``$`` would accept a trailing newline; the names are matched with fullmatch."""
    assert check_image_name("a.fits") == "a.fits"
    assert check_image_name("A" * 201) == "A" * 201
    for bad in ("a.fits\n", "A" * 202):
        with pytest.raises(ValueError):
            check_image_name(bad)


# --------------------------------------------------------------------------------------
# The HTTP client's cache directory


def _mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_default_cache_is_private_under_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    client = HttpDistributor("http://127.0.0.1:8765")
    assert client.cache_dir == str(tmp_path / "xdg" / "apdask" / "distributor" / "127.0.0.1_8765")
    os.close(open_private_dir(client.cache_dir, str(tmp_path / "xdg" / "apdask")))
    for sub in ("apdask", "apdask/distributor", "apdask/distributor/127.0.0.1_8765"):
        assert _mode(tmp_path / "xdg" / sub) == 0o700, sub
    # Without XDG_CACHE_HOME (or a relative one): ~/.cache, never the shared /tmp.
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    client = HttpDistributor("http://example.org:81")
    assert client.cache_dir == str(tmp_path / "home/.cache/apdask/distributor/example.org_81")


def test_cache_symlink_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    link = tmp_path / "cache"
    link.symlink_to(target)
    with pytest.raises(CacheSecurityError, match="symbolic link") as exc:
        open_private_dir(str(link))
    assert exc.value.exit_code == 77
    assert "apdask.distributor.cache_dir" in str(exc.value)
    # A link further down (an attacker's planted .../apdask/distributor) as well.
    (tmp_path / "xdg" / "apdask").mkdir(parents=True, mode=0o700)
    (tmp_path / "xdg" / "apdask" / "distributor").symlink_to(target)
    with pytest.raises(CacheSecurityError, match="symbolic link"):
        open_private_dir(str(tmp_path / "xdg/apdask/distributor/h_1"), str(tmp_path / "xdg/apdask"))
    assert os.listdir(target) == []


@pytest.mark.parametrize("mode", [0o755, 0o770, 0o707, 0o701])
def test_cache_open_to_others_refused(tmp_path, mode):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(CacheSecurityError, match=f"mode {mode:o}.*chmod 700") as exc:
        open_private_dir(str(cache))
    assert exc.value.exit_code == 77
    cache.chmod(0o700)
    os.close(open_private_dir(str(cache)))


def test_cache_of_another_user_refused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(cache, 65534, 65534)  # nobody
    else:  # cannot give a directory away: pretend to be someone else instead
        uid = os.geteuid() + 1
        monkeypatch.setattr(os, "geteuid", lambda: uid)
    with pytest.raises(CacheSecurityError, match="belongs to uid") as exc:
        open_private_dir(str(cache))
    assert exc.value.exit_code == 77


def test_cache_not_a_directory_refused(tmp_path):
    (tmp_path / "cache").write_bytes(b"x")
    with pytest.raises(CacheSecurityError, match="not a directory"):
        open_private_dir(str(tmp_path / "cache"))


# --------------------------------------------------------------------------------------
# The server's log aggregation


def test_log_aggregator_counts_repeats(caplog):
    now = [0.0]
    agg = LogAggregator(window=10.0, burst=3, clock=lambda: now[0])
    logger = logging.getLogger("aiohttp.server")
    logger.addFilter(agg)
    try:
        with caplog.at_level(logging.INFO):
            for i in range(1000):
                try:
                    raise ValueError(i)
                except ValueError:
                    logger.exception("Error handling request from %s", f"127.0.0.{i % 200}")
            assert len(caplog.records) == 3  # the burst, each with its traceback
            assert agg.suppressed == 997
            now[0] = 10.5
            logger.error("Error handling request from %s", "x")  # a new window
            agg.flush(force=True)
    finally:
        logger.removeFilter(agg)
    messages = [r.getMessage() for r in caplog.records]
    summary = [m for m in messages if "suppressed" in m]
    assert summary == [
        "997 more log messages like 'Error handling request from %s' (ValueError) from "
        "aiohttp.server were suppressed in the last 10 s"
    ]
    assert len(messages) == 5  # 3 + the summary + the first of the new window


def test_open_distributor(tmp_path):
    assert open_distributor(f"file://{tmp_path}").root == str(tmp_path)
    assert open_distributor(str(tmp_path)).root == str(tmp_path)
    http = open_distributor("http://localhost:8080/")
    assert isinstance(http, HttpDistributor)
    assert (http.host, http.port, http.url) == ("localhost", 8080, "http://localhost:8080")
    with pytest.raises(ValueError, match="http://HOST:PORT or file://"):
        open_distributor("ftp://localhost/raw")
    with pytest.raises(DistributorUnavailableError):
        open_distributor(str(tmp_path / "missing"))


def test_file_retrieve_reports_registration_time(tmp_path):
    (tmp_path / "a.fits").write_bytes(b"xyz")
    os.utime(tmp_path / "a.fits", (1_700_000_000.0, 1_700_000_000.0))
    info = FileDistributor(tmp_path).retrieve("a.fits", timeout=0)
    assert info["registered"] == 1_700_000_000.0
    assert info["size"] == 3 and info["path"] == str(tmp_path / "a.fits")


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("TestCam_1000_T00_0.fits", True),
        ("TestCam_1000_T00_1.fits", True),
        ("visit1000-ccd0.fits", True),  # not the raw naming convention: header decides
        ("TestCam_1000_T01_0.fits", False),  # another CCD of the camera
        ("LSSTComCam_1000_T01_0.fits", False),
    ],
)
def test_image_name_must_match_ccd(name, ok):
    camera = get_camera("testcam")
    if ok:
        assert check_image_for_ccd(name, camera, camera["T00"]) == name
    else:
        with pytest.raises(HeaderMismatchError, match=r"T01.*--ccd T00"):
            check_image_for_ccd(name, camera, camera["T00"])


def test_image_name_of_another_instrument(tmp_path):
    camera = get_camera("testcam")
    with pytest.raises(HeaderMismatchError, match="instrument LSSTCam"):
        check_image_for_ccd("LSSTCam_1000_T00_0.fits", camera, camera["T00"])


# --------------------------------------------------------------------------------------
# Header checks of the fetched snaps (apdask.pipeline.tasks.header_task)


def _fetched(*paths):
    return [Fetched(str(p), os.path.basename(p), 0.0, 0.0, 0.0) for p in paths]


@pytest.mark.parametrize(("close", "warns"), [(30.2, False), (31.0, True), (27.0, True)])
def test_effective_exptime_overrides_anticipated(sim_repo, tmp_path, caplog, close, warns):
    """SHCLSBEG/END move the closing blade: t_eff = close (blades take 1 s each)."""
    camera = get_camera("testcam")
    src = os.path.join(sim_repo["root"], "raw", "TestCam_1000_T00_0.fits")
    dst = tmp_path / "TestCam_1000_T00_0.fits"
    shutter = {"open_begin": 0.0, "open_end": 1.0, "close_begin": close, "close_end": close + 1}
    write_variant(src, dst, shutter=shutter)
    with caplog.at_level(logging.WARNING, logger="apdask.pipeline.tasks"):
        header = header_task(_fetched(dst), camera["T00"], "r", 30.0, 1000)
    assert header.exptime == pytest.approx(close)
    warned = [r.getMessage() for r in caplog.records if "anticipated" in r.getMessage()]
    assert bool(warned) is warns
    if warns:
        assert f"{close:.3f} s" in warned[0] and "30.000 s" in warned[0]


def test_two_snaps_exptime_summed_and_distinct(sim_repo, tmp_path):
    camera = get_camera("testcam")
    src = os.path.join(sim_repo["root"], "raw", "TestCam_1000_T00_0.fits")
    snap1 = second_snap(src, tmp_path / "TestCam_1000_T00_1.fits")
    header = header_task(_fetched(src, snap1), camera["T00"], "r", 30.0, 1000)
    assert header.exptime == pytest.approx(60.0)
    assert [m.snap for m in header.metas] == [0, 1]
    first, second = header.metas
    assert first.mjd_mid < header.mjd < second.mjd_mid
    assert header.darktimes == (first.darktime, second.darktime)
    # The same snap twice is refused.
    copy = write_variant(src, tmp_path / "copy.fits")
    with pytest.raises(HeaderMismatchError, match="SNAP=0"):
        header_task(_fetched(src, copy), camera["T00"], "r", 30.0, 1000)
