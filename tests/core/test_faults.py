"""apdask.core.faults: the test-only kill points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from apdask.core.faults import FAULT_ENV


def _run(code, fault):
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


CODE = """
from apdask.core.faults import fault_point
fault_point("ppdb-committed", lambda: print("prepared", flush=True))
print("survived", flush=True)
"""


def test_named_point_kills_with_sigkill(tmp_path):
    proc = _run(CODE, "ppdb-committed")
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout == "prepared\n"  # the preparation ran, nothing after the point
    assert "fault injected: ppdb-committed" in proc.stderr


def test_other_or_no_fault_passes():
    for fault in (None, "sink-written"):
        proc = _run(CODE, fault)
        assert (proc.returncode, proc.stdout) == (0, "survived\n")
