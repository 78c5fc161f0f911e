"""The HTTP distributor service and its client, and process-ccd against it.

The server runs on a free loopback port, on its own event loop in a thread
(``BackgroundServer``) or as the ``apdask distributor serve`` subprocess.
"""

import asyncio
import base64
import hashlib
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import dask.config
import numpy as np
import pytest

from apdask.alerts.sinks import read_alerts
from apdask.cli.main import main
from apdask.exceptions import (
    CacheSecurityError,
    ChecksumMismatchError,
    ConfigurationError,
    DistributorFullError,
    DistributorUnavailableError,
    ImageTimeoutError,
)
from apdask.io.distributor import TOKEN_ENV, HttpDistributor
from apdask.services.distributor_server import BackgroundServer, ServerLimits
from apdask.tools.evaluate import load_truth, match_truth
from tests._raws import second_snap
from tests.cli.test_cli import _nothing_written

TOKEN = "s3cret-test-token"


@pytest.fixture
def server(tmp_path):
    with BackgroundServer(tmp_path / "dist", TOKEN) as srv:
        yield srv


@pytest.fixture
def client(server, tmp_path):
    return HttpDistributor(server.url, cache_dir=str(tmp_path / "cache"))


def _request(port, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, dict(resp.getheaders()), data
    finally:
        conn.close()


def _put(port, name, body, token=TOKEN, sha=None, extra=None):
    headers = {"X-Checksum-SHA256": sha or hashlib.sha256(body).hexdigest()}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(extra or {})
    return _request(port, "PUT", f"/images/{name}", body, headers)


def _visible(srv):
    """Image names a reader can see: the index and the files in the root."""
    status, _, body = _request(srv.port, "GET", "/images")
    assert status == 200
    listed = sorted(r["name"] for r in json.loads(body)["images"])
    on_disk = sorted(os.listdir(srv.root)) if os.path.isdir(srv.root) else []
    return listed, [f for f in on_disk if f != ".registry.jsonl"]


def _read(path):
    with open(path, "rb") as fh:
        return fh.read()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _later(delay, fn, *args):
    t = threading.Timer(delay, fn, args)
    t.start()
    return t


# --------------------------------------------------------------------------------------
# Protocol


def test_upload_get_head_index(server, client, tmp_path):
    src = tmp_path / "a.bin"
    src.write_bytes(os.urandom(300_000))
    t0 = time.time()
    rec = client.put("a.fits", src, token=TOKEN)
    assert rec["size"] == 300_000 and rec["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert t0 <= rec["registered"] <= time.time()
    info = client.retrieve("a.fits", timeout=5)
    assert _read(info["path"]) == src.read_bytes()
    assert info["registered"] == rec["registered"]
    # A second get is answered from the verified local copy (304, no download).
    again = client.retrieve("a.fits", timeout=5)
    assert again["path"] == info["path"] and again["registered"] == rec["registered"]
    assert client.index() == [rec]
    assert client.exists("a.fits") and not client.exists("b.fits")
    status, headers, body = _request(server.port, "HEAD", "/images/a.fits")
    assert status == 200 and body == b"" and headers["Content-Length"] == "300000"
    assert headers["X-Checksum-SHA256"] == rec["sha256"]
    assert float(headers["X-Registered"]) == rec["registered"]
    # Raw images are immutable: the same bytes again are fine, other bytes conflict.
    assert _put(server.port, "a.fits", src.read_bytes())[0] == 200
    assert _put(server.port, "a.fits", b"other")[0] == 409
    # The Digest header (RFC 3230) is accepted as well.
    body = b"digest body"
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    hdr = {"Digest": f"sha-256={digest}", "Authorization": f"Bearer {TOKEN}"}
    assert _request(server.port, "PUT", "/images/d.fits", body, hdr)[0] == 201


def test_long_poll_wakes_when_the_image_lands(server, client):
    timer = _later(0.5, _put, server.port, "late.fits", b"late bytes")
    t0 = time.monotonic()
    info = client.retrieve("late.fits", timeout=10)
    elapsed = time.monotonic() - t0
    timer.join()
    assert _read(info["path"]) == b"late bytes"
    assert 0.4 < elapsed < 3.0


@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"]
)
def test_upload_without_valid_token_is_401_and_stores_nothing(server, auth):
    headers = {"X-Checksum-SHA256": hashlib.sha256(b"x" * 99).hexdigest()}
    if auth is not None:
        headers["Authorization"] = auth
    status, resp_headers, body = _request(
        server.port, "PUT", "/images/a.fits", b"x" * 1000, headers
    )
    assert status == 401
    assert "Bearer" in resp_headers["WWW-Authenticate"]
    assert TOKEN_ENV in json.loads(body)["message"]
    assert _visible(server) == ([], [])


def test_expect_continue_refused_before_the_body(server):
    """With ``Expect: 100-continue`` a bad token is refused before any body is sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(
            b"PUT /images/a.fits HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n"
            b"Authorization: Bearer nope\r\nExpect: 100-continue\r\n\r\n"
        )
        assert s.recv(200).startswith(b"HTTP/1.1 401")
    assert _visible(server) == ([], [])


def test_checksum_required_and_verified(server):
    status, _, body = _request(server.port, "PUT", "/images/a.fits", b"abc",
                               {"Authorization": f"Bearer {TOKEN}"})  # fmt: skip
    assert status == 400 and json.loads(body)["error"] == "checksum_required"
    status, _, body = _put(server.port, "a.fits", b"abc", sha=hashlib.sha256(b"abd").hexdigest())
    assert status == 400 and json.loads(body)["error"] == "checksum_mismatch"
    status, _, body = _put(server.port, "a.fits", b"abc", sha="zz")
    assert status == 400 and "64 hex" in json.loads(body)["message"]
    assert _visible(server) == ([], [])


def test_cut_off_upload_is_never_visible(server, client):
    data = os.urandom(200_000)
    answers = []
    waiter = threading.Thread(
        target=lambda: answers.append(_request(server.port, "GET", "/images/cut.fits?wait=1.5"))
    )
    waiter.start()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            f"PUT /images/cut.fits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"X-Checksum-SHA256: {hashlib.sha256(data).hexdigest()}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:100_000]
        )
        time.sleep(0.3)
    # The reader waiting meanwhile never sees a partial image.
    waiter.join()
    status, _, body = answers[0]
    assert status == 404 and json.loads(body)["error"] == "not_registered"
    deadline = time.monotonic() + 5
    while _visible(server) != ([], []) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _visible(server) == ([], [])  # no image and no temporary file left behind
    # The name is not blocked: a complete upload afterwards works.
    assert _put(server.port, "cut.fits", data)[0] == 201
    assert _read(client.get("cut.fits", timeout=2)) == data


@pytest.mark.parametrize(
    "path",
    [
        "/images/..%2F..%2Fescape.fits",
        "/images/%2Ftmp%2Fescape.fits",
        "/images/.hidden",
        "/images/a%20b.fits",
        "/images/..",
        "/images/a/b.fits",
        "/images/../escape.fits",
    ],
)
def test_unsafe_names_rejected(server, tmp_path, path):
    before = sorted(os.listdir(tmp_path))
    status, _, _ = _put(server.port, path.removeprefix("/images/"), b"evil")
    assert status in (400, 404, 405)
    status, _, _ = _request(server.port, "GET", path + "?wait=0")
    assert status in (400, 404)
    assert sorted(os.listdir(tmp_path)) == before
    assert _visible(server) == ([], [])
    assert not os.path.exists("/tmp/escape.fits")


def test_bad_wait_and_client_side_name_check(server, client):
    assert _request(server.port, "GET", "/images/a.fits?wait=-1")[0] == 400
    assert _request(server.port, "GET", "/images/a.fits?wait=1e9")[0] == 400
    assert _request(server.port, "GET", "/images/a.fits?wait=abc")[0] == 400
    with pytest.raises(ValueError, match="invalid image name"):
        client.get("../etc/passwd", timeout=1)


# --------------------------------------------------------------------------------------
# Faults: timeout, unreachable, restart


def test_timeout_names_image_and_distributor(server, client):
    t0 = time.monotonic()
    with pytest.raises(ImageTimeoutError) as exc:
        client.get("never.fits", timeout=1.0)
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 1.5
    msg = str(exc.value)
    assert "never.fits" in msg and server.url in msg and "\n" not in msg


def test_unreachable_is_not_a_timeout(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.monotonic()
    with pytest.raises(DistributorUnavailableError, match="unreachable") as exc:
        HttpDistributor(url, cache_dir=str(tmp_path)).get("a.fits", timeout=1.0)
    assert 0.9 <= time.monotonic() - t0 < 2.0
    assert url in str(exc.value) and "a.fits" in str(exc.value)
    # A host name that does not resolve fails at once.
    t0 = time.monotonic()
    with pytest.raises(DistributorUnavailableError, match="does not resolve"):
        HttpDistributor("http://no-such-host.invalid:8765", cache_dir=str(tmp_path)).get(
            "a.fits", timeout=30
        )
    assert time.monotonic() - t0 < 15


def test_restart_while_waiting_reconnects(tmp_path):
    root = tmp_path / "dist"
    first = BackgroundServer(root, TOKEN).start()
    _put(first.port, "early.fits", b"early")
    early = json.loads(_request(first.port, "GET", "/images")[2])["images"][0]
    client = HttpDistributor(first.url, cache_dir=str(tmp_path / "cache"))
    result = {}

    def reader():
        try:
            result["info"] = client.retrieve("late.fits", timeout=15)
        except Exception as e:  # reported below
            result["error"] = e

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.5)
    first.stop()  # the reader's long-poll is cut; it retries with backoff
    time.sleep(1.0)
    assert t.is_alive() and not result
    with BackgroundServer(root, TOKEN, port=first.port) as second:
        # The restarted server knows the earlier image and its registration time.
        assert json.loads(_request(second.port, "GET", "/images")[2])["images"] == [early]
        time.sleep(0.5)
        assert _put(second.port, "late.fits", b"late")[0] == 201
        t.join(10)
    assert "error" not in result, result
    assert _read(result["info"]["path"]) == b"late"


def test_restart_then_clean_timeout_or_unavailable(tmp_path):
    root = tmp_path / "dist"
    srv = BackgroundServer(root, TOKEN).start()
    client = HttpDistributor(srv.url, cache_dir=str(tmp_path / "cache"))
    _later(0.3, srv.stop)
    # Down at the deadline: unavailable (69), not a timeout.
    t0 = time.monotonic()
    with pytest.raises(DistributorUnavailableError):
        client.get("x.fits", timeout=1.5)
    assert time.monotonic() - t0 < 2.5
    # Restarted in time, image never comes: a clean timeout (75).
    srv2 = BackgroundServer(root, TOKEN, port=srv.port)
    timer = _later(0.5, srv2.start)
    t0 = time.monotonic()
    with pytest.raises(ImageTimeoutError):
        client.get("x.fits", timeout=2.0)
    assert 2.0 <= time.monotonic() - t0 < 3.0
    timer.join()
    srv2.stop()


def test_server_refuses_to_start_without_token(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    argv = ["distributor", "serve", "--root", str(tmp_path / "d"), "--port", "0"]
    assert main(argv) == 78
    assert TOKEN_ENV in capsys.readouterr().err
    with pytest.raises(ConfigurationError):
        BackgroundServer(tmp_path / "d", "").start()


# --------------------------------------------------------------------------------------
# The subprocess server: many waiters, flat thread count, the CLI upload


def _threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


async def _many_waiters(url, name, n):
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one():
            async with session.get(f"{url}/images/{name}", params={"wait": "20"}) as r:
                return r.status, len(await r.read())

        return await asyncio.gather(*(one() for _ in range(n)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads via /proc")
def test_200_concurrent_waiters_cost_no_threads(tmp_path, monkeypatch, capsys):
    env = {**os.environ, TOKEN_ENV: TOKEN}
    cmd = [sys.executable, "-m", "apdask.cli", "distributor", "serve", "--root",
           str(tmp_path / "dist"), "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:"), line
        port = int(url.rsplit(":", 1)[1])
        idle = _threads(proc.pid)
        payload = os.urandom(50_000)
        src = tmp_path / "TestCam_1_T00_0.fits"
        src.write_bytes(payload)
        samples = []

        def sample_then_upload():
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                health = json.loads(_request(port, "GET", "/health")[2])
                if health["waiting"] == 200:
                    break
                time.sleep(0.05)
            samples.append((health["waiting"], _threads(proc.pid)))
            monkeypatch.setenv(TOKEN_ENV, TOKEN)
            assert main(["distributor", "upload", "--distributor", url, str(src)]) == 0

        timer = threading.Thread(target=sample_then_upload)
        timer.start()
        t0 = time.monotonic()
        results = asyncio.run(_many_waiters(url, src.name, 200))
        elapsed = time.monotonic() - t0
        timer.join()
        assert results == [(200, len(payload))] * 200
        assert elapsed < 15
        waiting, busy = samples[0]
        assert waiting == 200
        assert busy == idle, f"{idle} threads idle, {busy} with 200 waiters"
        assert "registered TestCam_1_T00_0.fits" in capsys.readouterr().out
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()


# --------------------------------------------------------------------------------------
# process-ccd against the HTTP distributor


def _ccd_args(repo, url, images, timeout):
    args = ["process-ccd", "--ccd", "T00", "--ra", "150.0", "--dec", "-30.0", "--filter", "r",
            "--exptime", "30", "--distributor", url, "--repo", repo,
            "--timeout", str(timeout)]  # fmt: skip
    for name in images:
        args += ["--image", name]
    return args


@pytest.fixture
def cache_dir(tmp_path):
    with dask.config.set({"apdask.distributor.cache_dir": str(tmp_path / "cache")}):
        yield tmp_path / "cache"


def test_process_ccd_exit_codes(repo, server, cache_dir, capsys):
    # Image never arrives: 75 within 1 s after the timeout, nothing written.
    t0 = time.monotonic()
    assert main(_ccd_args(repo, server.url, ["TestCam_1000_T00_0.fits"], 2)) == 75
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert 2.0 <= elapsed <= 3.0, elapsed
    assert err.count("\n") == 1 and "TestCam_1000_T00_0.fits" in err and server.url in err
    # Nobody listening: 69, a different error.
    dead = f"http://127.0.0.1:{_free_port()}"
    assert main(_ccd_args(repo, dead, ["TestCam_1000_T00_0.fits"], 1)) == 69
    err = capsys.readouterr().err
    assert "unreachable" in err and dead in err
    # An image name of another CCD fails at once, without waiting for the timeout.
    t0 = time.monotonic()
    assert main(_ccd_args(repo, server.url, ["TestCam_1000_T01_0.fits"], 60)) == 65
    assert time.monotonic() - t0 < 10
    assert "--ccd T00" in capsys.readouterr().err
    _nothing_written(repo)


def test_process_ccd_detname_header_checked(repo, capsys):
    """A name outside the raw convention is fetched; its header's DETNAME is then checked."""
    shutil.copy(os.path.join(repo, "raw", "TestCam_1000_T01_0.fits"),
                os.path.join(repo, "raw", "renamed.fits"))  # fmt: skip
    assert main(_ccd_args(repo, f"file://{repo}/raw", ["renamed.fits"], 5)) == 65
    err = capsys.readouterr().err
    assert "DETNAME=T01" in err and "T00" in err
    _nothing_written(repo)


def test_process_ccd_late_two_snaps(repo, server, cache_dir, tmp_path, capsys):
    """Both snaps uploaded 5 s after start: process-ccd blocks, then succeeds."""
    snap0 = os.path.join(repo, "raw", "TestCam_1000_T00_0.fits")
    snap1 = second_snap(snap0, tmp_path / "up" / "TestCam_1000_T00_1.fits")
    names = [os.path.basename(snap0), os.path.basename(snap1)]
    uploader = HttpDistributor(server.url, cache_dir=str(tmp_path / "up-cache"))

    def upload():
        for path in (snap0, snap1):
            uploader.put(os.path.basename(path), path, token=TOKEN)

    t0 = time.time()
    timer = _later(5.0, upload)
    # The second snap is the first one re-noised: their noise is correlated, so the
    # difference's noise is ~1.4x the propagated sigma and the subtraction QA would
    # rightly fail the CCD.  This test is about the distributor: QA off for it.
    qa_off = {"apdask.subtract.qa.noise_ratio_fail": 10.0,
              "apdask.subtract.qa.snr_sigma_fail": 10.0}  # fmt: skip
    with dask.config.set(qa_off):
        code = main(_ccd_args(repo, server.url, names, 60))
    timer.join()
    out, err = capsys.readouterr()
    assert code == 0, err
    ccd = json.loads(out)["ccds"][0]
    assert ccd["exptime"] == pytest.approx(60.0)  # both snaps' effective exposure
    lat = ccd["latency"]
    assert t0 + 5.0 <= lat["image_registered"] <= lat["image_fetched"]
    assert lat["image_fetched"] <= lat["processing_started"] <= lat["alerts_written"]
    assert lat["alerts_written"] <= lat["processing_ended"]
    assert lat["arrival_to_alerts_s"] == pytest.approx(
        lat["alerts_written"] - lat["image_registered"]
    )
    assert 0 < lat["arrival_to_alerts_s"] < 120
    registered = {r["name"]: r["registered"] for r in uploader.index()}
    assert lat["image_registered"] == max(registered.values())
    # The sum of the two snaps, over the summed exposure time, gives the true fluxes.
    alerts = read_alerts(f"{repo}/alerts/visit_1000")
    assert len(alerts) == ccd["n_alerts"] > 0
    truth = load_truth(repo, 1000)
    truth = truth[truth["detector"] == "T00"]
    m = match_truth(truth, [a["diaSource"] for a in alerts])
    assert m["fraction"] >= 0.8, m
    bright = m["flux_meas"] / m["flux_err"] > 20
    assert bright.sum() >= 3
    ratio = m["flux_meas"][bright] / m["flux_true"][bright]
    # One snap only, or the exposure time not summed, would be off by a factor of two.
    # (The test's second snap repeats most of the first one's noise, so the scatter is
    # larger than the quoted errors: the bound per source is loose, the median tight.)
    assert abs(np.median(ratio) - 1) < 0.05, ratio
    assert np.all(np.abs(ratio - 1) < 0.25), ratio
    print(f"\nlatency image registered -> alerts written: {lat['arrival_to_alerts_s']:.2f} s")


# --------------------------------------------------------------------------------------
# Hostile names and a cache that cannot be fooled


def test_name_with_trailing_newline_refused(server):
    for path in ("/images/a.fits%0A", "/images/a.fits%0D%0A", "/images/a.fits%00"):
        status, _, body = _put(server.port, path.removeprefix("/images/"), b"evil")
        assert status == 400 and json.loads(body)["error"] == "bad_request", path
        assert _request(server.port, "GET", path + "?wait=0")[0] == 400
    assert _visible(server) == ([], [])


def test_tampered_same_size_cache_is_not_returned(server, client, caplog):
    data = os.urandom(100_000)
    assert _put(server.port, "a.fits", data)[0] == 201
    path = client.get("a.fits", timeout=5)
    assert _read(path) == data
    evil = bytearray(data)
    evil[5000] ^= 0xFF  # same size, one byte changed
    with open(path, "r+b") as fh:
        fh.write(evil)
    # The cached copy is re-hashed before it is offered with If-None-Match: it is
    # discarded and the real bytes are downloaded again.
    with caplog.at_level(logging.WARNING, logger="apdask.distributor"):
        again = client.retrieve("a.fits", timeout=5)
    assert again["path"] == path and _read(path) == data
    assert any("no longer matches" in r.getMessage() for r in caplog.records)
    # The sidecar lying as well (hash of the tampered bytes) changes nothing: the
    # server does not confirm that hash, so the image is fetched again.
    side = os.path.join(client.cache_dir, ".a.fits.json")
    rec = json.loads(_read(side))
    with open(path, "wb") as fh:
        fh.write(evil)
    rec["sha256"] = hashlib.sha256(evil).hexdigest()
    with open(side, "w") as fh:
        json.dump(rec, fh)
    assert _read(client.get("a.fits", timeout=5)) == data
    # A cached file replaced by a symbolic link is not followed.
    os.remove(path)
    os.symlink("/etc/hostname", path)
    assert _read(client.get("a.fits", timeout=5)) == data and not os.path.islink(path)


def test_corrupt_server_copy_is_a_checksum_error(server, client, capsys):
    data = os.urandom(50_000)
    assert _put(server.port, "bad.fits", data)[0] == 201
    with open(os.path.join(server.root, "bad.fits"), "r+b") as fh:
        fh.seek(100)
        fh.write(b"\0" * 8)  # the server's disk flips bits; size unchanged
    t0 = time.monotonic()
    with pytest.raises(ChecksumMismatchError) as exc:
        client.get("bad.fits", timeout=30)
    assert time.monotonic() - t0 < 20  # not after the whole timeout
    msg = str(exc.value)
    assert exc.value.exit_code == 76
    assert "bad.fits" in msg and hashlib.sha256(data).hexdigest() in msg
    assert "unreachable" not in msg and "start it" not in msg
    assert sorted(os.listdir(client.cache_dir)) == []  # nothing corrupt was kept


def test_symlinked_cache_dir_refused(server, tmp_path):
    target = tmp_path / "victim"
    target.mkdir(mode=0o700)
    (tmp_path / "cache").symlink_to(target)
    assert _put(server.port, "a.fits", b"bytes")[0] == 201
    client = HttpDistributor(server.url, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CacheSecurityError, match="symbolic link") as exc:
        client.get("a.fits", timeout=5)
    assert exc.value.exit_code == 77
    assert os.listdir(target) == []


# --------------------------------------------------------------------------------------
# A full disk: 507 with the reason, shown by the client


def _dev_full_mkstemp(monkeypatch, tmp_path):
    """Make the server's upload files /dev/full: every write fails with ENOSPC."""
    from apdask.services import _dist_service  # where the upload file is made

    def mkstemp(prefix="", suffix="", dir=None):
        return os.open("/dev/full", os.O_WRONLY), str(tmp_path / f"{prefix}gone{suffix}")

    monkeypatch.setattr(_dist_service.tempfile, "mkstemp", mkstemp)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_is_507_with_reason(server, client, tmp_path, monkeypatch, capsys):
    data = os.urandom(3 << 20)
    src = tmp_path / "TestCam_1_T00_0.fits"
    src.write_bytes(data)
    _dev_full_mkstemp(monkeypatch, tmp_path)
    status, _, body = _put(server.port, "a.fits", data)
    err = json.loads(body)
    assert status == 507 and err["error"] == "insufficient_storage"
    assert "disk is full" in err["message"] and "nothing was stored" in err["message"]
    with pytest.raises(DistributorFullError, match="disk is full") as exc:
        client.put("a.fits", src, token=TOKEN)
    assert exc.value.exit_code == 73 and "HTTP 507" in str(exc.value)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main(["distributor", "upload", "--distributor", server.url, str(src)]) == 73
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "disk is full" in err and "Traceback" not in err
    assert _visible(server) == ([], [])
    monkeypatch.undo()
    assert client.put("a.fits", src, token=TOKEN)["size"] == len(data)  # space again


def test_upload_larger_than_free_space_refused_before_the_body(server, monkeypatch):
    from apdask.services import _dist_storage  # where the free space is looked up

    monkeypatch.setattr(_dist_storage, "_free_bytes", lambda path: 5 << 20)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(
            f"PUT /images/big.fits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"X-Checksum-SHA256: {'0' * 64}\r\nContent-Length: {100 << 20}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 507"), answer
    assert b"100 bytes" not in answer and b"5242880 bytes are free" in answer
    assert _visible(server) == ([], [])


# --------------------------------------------------------------------------------------
# Idle, slow and greedy clients (the load test proper is in tests/faults)


def _health(port):
    return json.loads(_request(port, "GET", "/health")[2])


def _closed_within(sock, seconds):
    """Whether the server closes ``sock`` within ``seconds`` (reading what it sends)."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return False, data
    except ConnectionResetError:
        pass
    return True, data


@pytest.fixture
def strict(tmp_path):
    limits = ServerLimits(header_timeout=1.0, body_timeout=1.0, max_connections_per_ip=4)
    with BackgroundServer(tmp_path / "dist", TOKEN, limits=limits) as srv:
        yield srv


def test_half_open_connection_closed_after_header_timeout(strict):
    with socket.create_connection(("127.0.0.1", strict.port), timeout=30) as idle, \
         socket.create_connection(("127.0.0.1", strict.port), timeout=30) as slow:  # fmt: skip
        slow.sendall(b"GET /images HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        t0 = time.monotonic()
        assert _closed_within(idle, 30)[0]
        assert _closed_within(slow, 30)[0]
        assert 0.9 <= time.monotonic() - t0 < 30
    assert _health(strict.port)["header_timeouts"] >= 2
    # A kept-alive connection that goes idle is closed as well.
    with socket.create_connection(("127.0.0.1", strict.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        closed, data = _closed_within(s, 30)
        assert closed and data.startswith(b"HTTP/1.1 200")


def test_stalled_upload_body_is_408_and_stores_nothing(strict):
    data = os.urandom(10_000)
    with socket.create_connection(("127.0.0.1", strict.port), timeout=30) as s:
        s.sendall(
            f"PUT /images/slow.fits HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"X-Checksum-SHA256: {hashlib.sha256(data).hexdigest()}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[:100]
        )
        closed, answer = _closed_within(s, 30)
    assert closed and answer.startswith(b"HTTP/1.1 408"), answer
    assert b"body_timeout" in answer
    assert _visible(strict) == ([], [])
    assert _put(strict.port, "slow.fits", data)[0] == 201  # a prompt upload still works


def _connect_from(ip, port):
    s = socket.socket()
    s.settimeout(30)
    s.bind((ip, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_connections_per_address_are_capped(tmp_path):
    limits = ServerLimits(header_timeout=60.0, max_connections_per_ip=4)
    with BackgroundServer(tmp_path / "dist", TOKEN, limits=limits) as srv:
        first = [_connect_from("127.0.0.2", srv.port) for _ in range(4)]
        try:
            # A fifth from the same address, with the others young: 503 at once.
            with _connect_from("127.0.0.2", srv.port) as s:
                closed, answer = _closed_within(s, 30)
            assert closed and answer.startswith(b"HTTP/1.1 503"), answer
            assert b"too_many_connections" in answer
            # Another address is not affected.
            assert _request(srv.port, "GET", "/images")[0] == 200
            # Once the idle ones are older than 1 s, a newcomer replaces the oldest.
            time.sleep(1.5)
            with _connect_from("127.0.0.2", srv.port) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                closed, answer = _closed_within(s, 30)
            assert closed and answer.startswith(b"HTTP/1.1 200"), answer
            assert _closed_within(first[0], 30)[0]  # the oldest idle one was dropped
            assert not _closed_within(first[1], 0.2)[0]  # the others are still open
            health = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert health["refused"] == 1 and health["dropped_for_newer"] == 1
            assert health["max_connections_per_ip"] == 4
        finally:
            for s in first:
                s.close()


def test_oversized_request_head_refused(server):
    status, _, _ = _request(server.port, "GET", "/images", headers={"X-Big": "a" * 10_000})
    assert status in (400, 431)
    many = {f"X-H{i}": "v" for i in range(100)}
    assert _request(server.port, "GET", "/images", headers=many)[0] in (400, 431)
    assert _request(server.port, "GET", "/images")[0] == 200


def test_limits_from_config_are_checked():
    with dask.config.set({"apdask.distributor.header_timeout": 3}):
        assert ServerLimits.from_config().header_timeout == 3.0
    for bad in (0, -1, "abc", float("nan"), float("inf"), True):
        match = "DASK_APDASK__DISTRIBUTOR__BODY_TIMEOUT"
        with (
            dask.config.set({"apdask.distributor.body_timeout": bad}),
            pytest.raises(ConfigurationError, match=match),
        ):
            ServerLimits.from_config()


def test_process_ccd_corrupt_image_and_unsafe_cache_exit_codes(repo, server, cache_dir, capsys):
    name = "TestCam_1000_T00_0.fits"
    assert _put(server.port, name, _read(os.path.join(repo, "raw", name)))[0] == 201
    with open(os.path.join(server.root, name), "r+b") as fh:
        fh.seek(5000)
        fh.write(b"\xff" * 16)  # the distributor's copy rots, same size
    assert main(_ccd_args(repo, server.url, [name], 30)) == 76
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SHA-256" in err and name in err
    assert "unreachable" not in err and "Traceback" not in err
    # A cache directory that is a symbolic link: 77, before anything is fetched.
    link = cache_dir.parent / "linked-cache"
    link.symlink_to(cache_dir.parent)
    with dask.config.set({"apdask.distributor.cache_dir": str(link)}):
        assert main(_ccd_args(repo, server.url, [name], 30)) == 77
    err = capsys.readouterr().err
    assert "symbolic link" in err and "Traceback" not in err
    _nothing_written(repo)
