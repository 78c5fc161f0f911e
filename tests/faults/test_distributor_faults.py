"""Faults of the HTTP distributor: idle and slow clients, a flood of bad requests, a full disk.

Runnable alone: ``pytest tests/faults``.  Everything is on loopback and bounded in
count and time.  The default run holds 1,000 idle connections against a server with
1,024 descriptors while 20 clients upload and read back for 5 s (and 300 against
256 descriptors); the full load test, 1,000 idle plus 200 clients for 30 s, is marked
``slow``.

Each case asserts the outcome a client sees (status codes, bytes, exit codes) and
what the server holds (file descriptors, memory, its log); timings are generous,
because the machine may be loaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import time

import pytest

from apdask.cli.main import main
from apdask.exceptions import ConfigurationError, DistributorFullError
from apdask.io.distributor import TOKEN_ENV, HttpDistributor
from apdask.services.distributor_server import BackgroundServer

TOKEN = "fault-test-token"
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


# --------------------------------------------------------------------------------------
# helpers


def _raise_own_nofile(n):
    """Let this (client) process hold ``n`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@contextlib.contextmanager
def _server_process(root, nofile, stderr_path, **config):
    """``apdask distributor serve`` with soft and hard RLIMIT_NOFILE = ``nofile``."""
    env = {**os.environ, TOKEN_ENV: TOKEN}
    for key, value in config.items():
        env[f"DASK_APDASK__DISTRIBUTOR__{key.upper()}"] = str(value)

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    cmd = [sys.executable, "-m", "apdask.cli", "distributor", "serve", "--root", str(root),
           "--port", "0"]  # fmt: skip
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=limit
        )
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, (line, _tail(stderr_path))
        yield proc, int(line.rsplit(":", 1)[1])
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(20)
        proc.stdout.close()


def _tail(path, n=2000):
    with open(path, "rb") as fh:
        return fh.read()[-n:].decode(errors="replace")


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _rss_mb(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _get(port, path, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


async def _with_retries(op, stats, deadline_s=90.0):
    """Run ``op`` (returns (status, payload)) with backoff on 503 and connection errors."""
    import aiohttp

    deadline = time.monotonic() + deadline_s
    backoff = 0.1
    while True:
        try:
            status, payload = await op()
            if status != 503:
                return status, payload
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass
        stats["retries"] += 1
        if time.monotonic() + backoff > deadline:
            return None, None
        await asyncio.sleep(backoff)
        backoff = min(2 * backoff, 2.0)


async def _load(port, pid, *, n_idle, idle_ips, n_clients, duration, payload_bytes=16_000):
    """Hold ``n_idle`` half-open connections while ``n_clients`` upload and read back.

    Returns the counters and the server's peak file descriptors and RSS.
    """
    import aiohttp

    stats = collections.Counter()
    per_client = collections.Counter()
    peaks = {"fds": _fds(pid), "rss_mb": _rss_mb(pid)}
    before = dict(peaks)
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{port}"

    async def idle(i):
        ip = idle_ips[i % len(idle_ips)]
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(ip, 0)
                )
            except OSError:
                stats["idle_connect_failed"] += 1
                await asyncio.sleep(0.5)
                continue
            stats["idle_opened"] += 1
            try:
                writer.write(b"PUT /images/x.fits HTTP/1.1\r\nHost: x\r\nContent-Le")
                answer = await reader.read()  # until the server closes it
                stats["idle_refused_503" if answer.startswith(b"HTTP/1.1 503") else
                      "idle_closed_by_server"] += 1  # fmt: skip
            except OSError:
                stats["idle_closed_by_server"] += 1
            finally:
                writer.close()
            await asyncio.sleep(0.25)  # bounded churn

    async def client(i, session):
        n = 0
        while not stop.is_set():
            name = f"C{i}_{n}.fits"
            body = os.urandom(payload_bytes)
            headers = {"Authorization": f"Bearer {TOKEN}",
                       "X-Checksum-SHA256": hashlib.sha256(body).hexdigest()}  # fmt: skip

            async def put(name=name, body=body, headers=headers):
                async with session.put(f"{url}/images/{name}", data=body, headers=headers) as r:
                    return r.status, await r.read()

            async def get(name=name):
                async with session.get(f"{url}/images/{name}") as r:
                    return r.status, await r.read()

            status, _ = await _with_retries(put, stats)
            if status not in (200, 201):
                stats["upload_errors"] += 1
                stats[f"upload_status_{status}"] += 1
            else:
                status, got = await _with_retries(get, stats)
                if status == 200 and got == body:
                    stats["ok"] += 1
                    per_client[i] += 1
                else:
                    stats["read_errors"] += 1
            n += 1

    async def sample():
        while not stop.is_set():
            peaks["fds"] = max(peaks["fds"], _fds(pid))
            peaks["rss_mb"] = max(peaks["rss_mb"], _rss_mb(pid))
            await asyncio.sleep(0.25)

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        idlers = [asyncio.ensure_future(idle(i)) for i in range(n_idle)]
        sampler = asyncio.ensure_future(sample())
        await asyncio.sleep(1.0)  # the flood first
        t0 = time.monotonic()
        clients = [asyncio.ensure_future(client(i, session)) for i in range(n_clients)]
        await asyncio.sleep(duration)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 180)
        elapsed = time.monotonic() - t0
        for task in (*idlers, sampler):
            task.cancel()
        await asyncio.gather(*idlers, sampler, return_exceptions=True)
    return {
        **stats,
        "clients_with_an_upload": len(per_client),
        "elapsed_s": round(elapsed, 1),
        "fds_before": before["fds"],
        "fds_peak": peaks["fds"],
        "rss_mb_before": round(before["rss_mb"], 1),
        "rss_mb_peak": round(peaks["rss_mb"], 1),
    }


def _run_load_test(tmp_path, *, nofile, n_idle, n_clients, duration, **config):
    _raise_own_nofile(n_idle + n_clients + 512)
    stderr_path = tmp_path / "server.err"
    with _server_process(tmp_path / "dist", nofile, stderr_path, **config) as (proc, port):
        idle_ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
        figures = asyncio.run(
            _load(port, proc.pid, n_idle=n_idle, idle_ips=idle_ips, n_clients=n_clients,
                  duration=duration)
        )  # fmt: skip
        status, body = _get(port, "/health")
        assert status == 200, body
        health = json.loads(body)
        # Once the attackers are gone, their descriptors are returned.
        deadline = time.monotonic() + 60
        while _fds(proc.pid) > figures["fds_before"] + 20 and time.monotonic() < deadline:
            time.sleep(0.5)
        figures["fds_after"] = _fds(proc.pid)
        assert proc.poll() is None, _tail(stderr_path)
    for key in ("header_timeouts", "refused", "dropped_for_newer", "max_connections"):
        figures[f"server_{key}"] = health[key]
    figures["server_log_bytes"] = os.path.getsize(stderr_path)
    print(f"\ndistributor load test: {json.dumps(figures, sort_keys=True)}")
    # What a client sees: every upload and read-back succeeded (with retries).
    assert figures.get("upload_errors", 0) == 0 and figures.get("read_errors", 0) == 0, figures
    assert figures["clients_with_an_upload"] == n_clients, figures
    assert figures["ok"] >= n_clients, figures
    # What the server holds: never near its descriptor limit, memory bounded.
    assert figures["fds_peak"] < nofile - 16, figures
    assert figures["fds_after"] <= figures["fds_before"] + 20, figures
    assert figures["rss_mb_peak"] < figures["rss_mb_before"] + 400, figures
    # The idle connections were shed by the limits, not held.
    shed = figures["server_header_timeouts"] + figures["server_refused"]
    assert shed + figures["server_dropped_for_newer"] > 0, figures
    assert figures["server_log_bytes"] < 256_000, figures
    return figures


# --------------------------------------------------------------------------------------
# Idle / half-open connections and real clients


@linux_only
def test_1000_idle_connections_uploads_keep_succeeding(tmp_path):
    """1,000 half-open connections against a server limited to 1,024 descriptors."""
    _run_load_test(tmp_path, nofile=1024, n_idle=1000, n_clients=20, duration=5.0,
                   header_timeout=3.0, log_window=2.0)  # fmt: skip


@linux_only
def test_idle_flood_small_descriptor_budget(tmp_path):
    """300 half-open connections against a server limited to 256 descriptors."""
    _run_load_test(tmp_path, nofile=256, n_idle=300, n_clients=10, duration=4.0,
                   header_timeout=2.0, log_window=2.0)  # fmt: skip


@linux_only
@pytest.mark.slow
def test_idle_flood_1000_with_200_clients(tmp_path):
    """The issue's attack: ~1,000 idle connections (1,024 descriptors) plus 200 clients."""
    _run_load_test(tmp_path, nofile=1024, n_idle=1000, n_clients=200, duration=30.0)


# --------------------------------------------------------------------------------------
# A flood of bad requests: the log stays small


@linux_only
def test_bad_request_flood_log_is_aggregated(tmp_path):
    stderr_path = tmp_path / "server.err"
    with _server_process(tmp_path / "dist", 1024, stderr_path, log_window=1.0) as (proc, port):

        def bad(n):
            sent = 0
            for _ in range(n):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=30) as s,
                ):
                    s.sendall(b"GET /images HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n")
                    answer = s.recv(200)
                    assert answer.split(b" ", 2)[1] == b"400", answer
                    sent += 1
            return sent

        sent = bad(1500)
        time.sleep(2.5)  # a window passes: the summary is written
        status, _ = _get(port, "/health")
        assert status == 200 and proc.poll() is None
        log_bytes = os.path.getsize(stderr_path)
    text = _tail(stderr_path, 100_000)
    assert sent >= 1400
    assert "Error handling request" in text  # the first ones are logged in full
    assert "more log messages like 'Error handling request from %s'" in text, text[-3000:]
    # Unaggregated, each bad request logged a traceback of ~1-2 kB (MBs in all).
    assert log_bytes < 64_000, log_bytes


# --------------------------------------------------------------------------------------
# A really full disk (a small tmpfs, root only)


@pytest.fixture
def tiny_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
                          capture_output=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_full_tmpfs_upload_is_507_and_leaves_nothing(tiny_disk, tmp_path, monkeypatch, capsys):
    root = tiny_disk / "dist"
    first = os.urandom(1_500_000)
    second = os.urandom(3_000_000)
    src = tmp_path / "TestCam_1_T00_0.fits"
    src.write_bytes(second)
    with BackgroundServer(root, TOKEN) as srv:
        client = HttpDistributor(srv.url, cache_dir=str(tmp_path / "cache"))
        one = tmp_path / "one.fits"
        one.write_bytes(first)
        assert client.put("one.fits", one, token=TOKEN)["size"] == len(first)
        # Chunked (no Content-Length): the server finds out while writing (ENOSPC).
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
        headers = {"Authorization": f"Bearer {TOKEN}",
                   "X-Checksum-SHA256": hashlib.sha256(second).hexdigest()}  # fmt: skip
        chunks = (second[i : i + 65536] for i in range(0, len(second), 65536))
        conn.request("PUT", "/images/two.fits", body=chunks, headers=headers)
        resp = conn.getresponse()
        err = json.loads(resp.read())
        conn.close()
        assert resp.status == 507 and err["error"] == "insufficient_storage", err
        assert "No space left on device" in err["message"], err
        # With a Content-Length: refused before the body, with the free space.
        with pytest.raises(DistributorFullError, match="bytes are free") as exc:
            client.put("two.fits", src, token=TOKEN)
        assert exc.value.exit_code == 73
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        assert main(["distributor", "upload", "--distributor", srv.url, str(src)]) == 73
        out = capsys.readouterr().err
        assert "disk is full" in out and "Traceback" not in out
        # Nothing half-written is left, the registry is intact, and the server still works.
        assert sorted(os.listdir(root)) == [".registry.jsonl", "one.fits"]
        assert [r["name"] for r in client.index()] == ["one.fits"]
        small = tmp_path / "small.fits"
        small.write_bytes(b"s" * 1000)
        assert client.put("small.fits", small, token=TOKEN)["size"] == 1000
        with open(client.get("one.fits", timeout=10), "rb") as fh:
            assert fh.read() == first
    with BackgroundServer(root, TOKEN) as srv:  # restarted: the same registry
        names = sorted(r["name"] for r in HttpDistributor(srv.url, cache_dir=str(tmp_path / "c2"))
                       .index())  # fmt: skip
        assert names == ["one.fits", "small.fits"]


def test_full_client_cache_is_a_clear_error(tiny_disk, tmp_path):
    data = os.urandom(1_000_000)
    cache = tiny_disk / "cache"
    with open(tiny_disk / "filler", "wb") as fh:  # leave ~0.5 MB
        fh.write(b"\0" * (4 * 1024 * 1024 - 600_000))
    with BackgroundServer(tmp_path / "dist", TOKEN) as srv:
        src = tmp_path / "a.fits"
        src.write_bytes(data)
        client = HttpDistributor(srv.url, cache_dir=str(cache))
        client.put("a.fits", src, token=TOKEN)
        t0 = time.monotonic()
        with pytest.raises(ConfigurationError, match="No space left on device") as exc:
            client.get("a.fits", timeout=30)
        assert time.monotonic() - t0 < 20  # at once, not retried as "unreachable"
        assert exc.value.exit_code == 78 and str(cache) in str(exc.value)
        assert os.listdir(cache) == []  # no partial download left
        os.remove(tiny_disk / "filler")
        with open(client.get("a.fits", timeout=30), "rb") as fh:
            assert fh.read() == data
