"""apdask.core.files: the one atomic write."""

from __future__ import annotations

import os
import stat

import pytest

from apdask.core.files import atomic_open, atomic_write, fsync_dir, remove_stale_temps


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask():
    old = os.umask(0)
    os.umask(old)
    return old


@pytest.mark.parametrize("payload", [b"\x00bytes", "text \u00e9", bytearray(b"ba")])
def test_atomic_write_data(tmp_path, payload):
    path = atomic_write(tmp_path / "f.bin", payload)
    expected = payload.encode() if isinstance(payload, str) else bytes(payload)
    assert path == tmp_path / "f.bin" and path.read_bytes() == expected
    assert _mode(path) == 0o666 & ~_umask()  # as open() would, not mkstemp's 0600
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_writer_replaces(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    atomic_write(path, lambda fh: fh.write(b"new"), fsync=False)
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_failed_write_leaves_destination_and_no_temp(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def writer(fh):
        fh.write(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(path, writer)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_temp_file_is_hidden_in_the_same_directory(tmp_path):
    with atomic_open(tmp_path / "a.avro") as fh:
        (tmp,) = os.listdir(tmp_path)
        assert tmp.startswith(".a.avro.") and tmp.endswith(".tmp")
        fh.write(b"x")
    assert os.listdir(tmp_path) == ["a.avro"]


def test_fsync_dir_strict(tmp_path):
    fsync_dir(tmp_path, strict=True)
    fsync_dir(tmp_path / "missing")  # silently skipped
    with pytest.raises(OSError):
        fsync_dir(tmp_path / "missing", strict=True)


def test_remove_stale_temps_after_a_crashed_write(tmp_path):
    path = tmp_path / "a.avro"
    stale = tmp_path / ".a.avro.k3x9q2zt.tmp"  # what a SIGKILL during atomic_open leaves
    young = tmp_path / ".a.avro.m1n2b3v4.tmp"
    other = tmp_path / ".b.avro.k3x9q2zt.tmp"
    for p in (stale, young, other):
        p.write_bytes(b"partial")
    os.utime(stale, (0, 0))
    os.utime(other, (0, 0))
    atomic_write(path, b"complete", fsync=False)
    assert remove_stale_temps(path) == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted(
        [".a.avro.m1n2b3v4.tmp", ".b.avro.k3x9q2zt.tmp", "a.avro"]
    )
    assert remove_stale_temps(path, older_than_s=0.0) == [young]  # only this path's
