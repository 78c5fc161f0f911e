"""A full disk: a small tmpfs where the repository, the products or the reports go.

Each case asserts a documented exit code, one line on stderr naming the problem and
the fix, no traceback, and nothing half-written.  Mounting a tmpfs needs root (CI runs
as root); elsewhere the cases are skipped with that reason.
"""

from __future__ import annotations

import os
import subprocess
import sys

import dask
import pytest

from apdask.cli.main import main
from apdask.exceptions import ProductWriteError
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, run_visit

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux tmpfs")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs, unmounted afterwards."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _no_partial_files(root):
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_simulate_onto_a_full_disk_exits_74_with_one_line(tiny_fs, capsys):
    rc = main(["simulate", "--camera", "testcam", "--repo", str(tiny_fs / "r"), "--visits", "1"])
    err = capsys.readouterr().err
    assert rc == 74, err
    (line,) = [x for x in err.splitlines() if x.startswith("apdask: error:")]
    assert "no space left on the device" in line and "free disk space" in line
    assert "Traceback" not in err
    assert not _no_partial_files(tiny_fs)


def test_products_on_a_full_disk_fail_the_ccds_after_their_alerts(repo, tiny_fs):
    """ENOSPC while writing a difference image: ProductWriteError (73) names the file and
    the fix; the alerts and PPDB rows are there, and no partial image is left."""
    import json
    from pathlib import Path

    msg = json.loads(Path(repo, "visits", "visit_1000.json").read_text())
    ensure_ppdb(repo)
    with (
        dask.config.set({"apdask.products.dir": str(tiny_fs)}),
        pytest.raises(ProductWriteError, match="No space left on device") as e,
    ):
        run_visit(NextVisit.from_dict(msg), repo=repo, timeout=10)
    assert e.value.exit_code == 73 and "free disk space" in str(e.value)
    assert os.listdir(os.path.join(repo, "alerts", "visit_1000"))
    assert not list(tiny_fs.rglob("*.fits")) or all(
        p.stat().st_size > 0 for p in tiny_fs.rglob("*.fits")
    )
    assert not _no_partial_files(tiny_fs)


def test_an_unexpected_error_is_one_line_and_exit_70(monkeypatch, capsys):
    """A bug (an error apdask did not map) is not a traceback: one line, exit 70, and
    -v shows the traceback."""
    import apdask.cli.data as data

    def boom(args):
        raise KeyError("surprise")

    monkeypatch.setattr(data, "simulate_command", boom)
    assert main(["simulate", "--repo", "x"]) == 70
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected KeyError" in err and "-v" in err
    assert main(["-v", "simulate", "--repo", "x"]) == 70
    assert "Traceback" in capsys.readouterr().err
