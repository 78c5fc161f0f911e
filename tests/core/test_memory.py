"""apdask._alloc: freed full-frame arrays stay in the heap, so new ones do not fault in
fresh pages (a real count of the process's minor page faults, in a subprocess)."""

import subprocess
import sys

import dask
import pytest

from apdask.core import memory as _alloc

_PROBE = """
import resource, sys
import numpy as np
from apdask.core.memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
a = np.ones((4000, 4072), np.float32); del a   # first full frame: faults either way
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    a = np.ones((4000, 4072), np.float32)  # 65 MB
    del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_frames_are_reused_without_page_faults():
    default, kept = _faults("default"), _faults("keep")
    # 10 fresh 65 MB frames fault in at least 10 x 33 pages (2 MB huge pages; 5,770 here)
    assert default > 300
    assert kept < default / 10


def test_disabled_by_configuration(monkeypatch):
    monkeypatch.setattr(_alloc, "_done", None)
    with dask.config.set({"apdask.compute.keep_freed_memory": False}):
        assert _alloc.keep_freed_memory() is False
    monkeypatch.setattr(_alloc, "_done", None)
