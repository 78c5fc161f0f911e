"""Distributor latencies: upload, registration → waiter wake-up, timeout precision.

Starts ``apdask distributor serve`` as a subprocess on a free loopback port and
prints a JSON report::

    .venv/bin/python benchmarks/bench_distributor.py --sizes-mib 1 --waiters 1 200
    .venv/bin/python benchmarks/bench_distributor.py --sizes-mib 64 --waiters 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from apdask.exceptions import DistributorUnavailableError, ImageTimeoutError
from apdask.io.distributor import TOKEN_ENV, HttpDistributor

TOKEN = "bench-token"


def _start(root):
    env = {**os.environ, TOKEN_ENV: TOKEN}
    cmd = [sys.executable, "-m", "apdask.cli", "distributor", "serve", "--root", root,
           "--port", "0"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().split(" at ")[-1].strip()
    return proc, url


async def _waiters(url, name, n):
    import aiohttp

    done = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one():
            async with session.get(f"{url}/images/{name}", params={"wait": "60"}) as r:
                await r.read()
                done.append(time.time())
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(n)))
    return statuses, done


def _wake(url, tmp, size_mib, n_waiters, k):
    name = f"img{size_mib}_{n_waiters}_{k}.fits"
    src = os.path.join(tmp, name)
    with open(src, "wb") as fh:
        fh.write(os.urandom(int(size_mib * (1 << 20))))
    client = HttpDistributor(url, cache_dir=os.path.join(tmp, "cache"))
    result = {}

    def upload():
        time.sleep(0.5)
        t0 = time.time()
        result["rec"] = client.put(name, src, token=TOKEN)
        result["upload_s"] = time.time() - t0

    t = threading.Thread(target=upload)
    t.start()
    statuses, done = asyncio.run(_waiters(url, name, n_waiters))
    t.join()
    assert set(statuses) == {200}, statuses
    reg = result["rec"]["registered"]
    return {
        "upload_s": result["upload_s"],
        "first_waiter_done_after_registration_s": min(done) - reg,
        "last_waiter_done_after_registration_s": max(done) - reg,
    }


def _timeouts(url, tmp, timeout, reps):
    client = HttpDistributor(url, cache_dir=os.path.join(tmp, "cache"))
    over = []
    for _ in range(reps):
        t0 = time.monotonic()
        try:
            client.get("never.fits", timeout=timeout)
        except ImageTimeoutError:
            over.append(time.monotonic() - t0 - timeout)
    return over


def _unreachable(tmp, timeout):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = HttpDistributor(f"http://127.0.0.1:{port}", cache_dir=os.path.join(tmp, "c2"))
    t0 = time.monotonic()
    try:
        client.get("x.fits", timeout=timeout)
    except DistributorUnavailableError:
        return time.monotonic() - t0 - timeout
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", type=float, nargs="+", default=[1.0])
    p.add_argument("--waiters", type=int, nargs="+", default=[1, 200])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--timeout", type=float, default=2.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _start(os.path.join(tmp, "root"))
        try:
            wake = []
            for size in args.sizes_mib:
                for n in args.waiters:
                    runs = [_wake(url, tmp, size, n, k) for k in range(args.reps)]
                    wake.append({
                        "size_mib": size, "waiters": n,
                        **{key: statistics.median(r[key] for r in runs) for key in runs[0]},
                    })  # fmt: skip
            over = _timeouts(url, tmp, args.timeout, args.reps)
        finally:
            proc.terminate()
            proc.wait(10)
            proc.stdout.close()
        report = {
            "load_average": os.getloadavg(),
            "cpus": os.cpu_count(),
            "wake_medians": wake,
            "timeout_s": args.timeout,
            "timeout_overshoot_s": over,
            "unreachable_overshoot_s": _unreachable(tmp, args.timeout),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
