"""Atomic file writes: one utility, one durability policy.

Every file apdask writes for someone else to read (raws, visit messages, truth
tables, calibration reports, visit reports, alert and spool containers, batch
scripts) goes through :func:`atomic_write` or :func:`atomic_open`, so a reader
never sees a partial file and a crash never leaves one behind.

The policy
----------
1. Write to a temporary file ``.<name>.<random>.tmp`` in the destination's own
   directory (same file system, so the rename is atomic; the leading dot and the
   ``.tmp`` suffix keep it out of ``*.fits``/``*.json``/``*.avro`` globs).
2. Flush and ``fsync`` the temporary file.
3. Give it the mode a plain ``open(path, "w")`` would (``0o666`` less the umask;
   ``mkstemp`` alone would leave ``0o600``).
4. ``os.replace`` it onto the destination.
5. ``fsync`` the directory, so the rename itself survives a power cut.

On any error the temporary file is removed and the destination is untouched.  Only
a crash (SIGKILL, power cut) leaves one behind; :func:`remove_stale_temps` removes
those of a destination once it has been written again.
``fsync=False`` skips steps 2 and 5 (the result is still atomic, only not
durable); it exists for scratch output in tests and is not used by the package.
The parent directory must exist; callers create it.

Two writers keep their own code, for reasons this module cannot serve: the
distributor server streams an upload on the event loop and renames it only after
its checksum matched (``apdask.services._dist_service``; fsync of the file and of
the directory as above), and the HTTP distributor client writes its cache relative
to a directory descriptor, so that a planted symbolic link is never followed
(``apdask.io._dist_cache``).  The server's registration log is appended, not
replaced (``apdask.services._dist_storage``).
"""

from __future__ import annotations

import contextlib
import glob
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_open", "atomic_write", "fsync_dir", "remove_stale_temps"]

#: What :func:`atomic_write` accepts: bytes, text (written as UTF-8) or a callable
#: that writes into the open binary file.
Payload = bytes | bytearray | memoryview | str | Callable[[BinaryIO], object]


def _file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` less the process umask."""
    try:
        with open("/proc/self/status") as fh:  # reads the umask without changing it
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):  # pragma: no cover - not Linux
        pass
    return 0o644  # pragma: no cover


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Open ``path`` for an all-or-nothing binary write (see the module policy).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its directory must exist.
    fsync : bool, optional
        Flush the file and its directory to disk (default). ``False`` keeps the
        write atomic but not durable.

    Yields
    ------
    BinaryIO
        The temporary file. When the ``with`` block ends without an error it is
        renamed onto ``path``; on an error it is removed and ``path`` is untouched.

    Examples
    --------
    >>> with atomic_open(tmp_dir / "alerts.avro") as fh:  # doctest: +SKIP
    ...     fh.write(header)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def atomic_write(
    path: str | os.PathLike[str], data_or_writer: Payload, *, fsync: bool = True
) -> Path:
    """Write ``path`` all or nothing, with the module's one durability policy.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; its directory must exist.
    data_or_writer : bytes, str or callable
        The content (``str`` is encoded as UTF-8), or a callable given the open
        binary temporary file that writes the content itself.
    fsync : bool, optional
        Flush the file and its directory to disk (default).

    Returns
    -------
    pathlib.Path
        The path written.
    """
    path = Path(path)
    with atomic_open(path, fsync=fsync) as fh:
        if isinstance(data_or_writer, str):
            fh.write(data_or_writer.encode("utf-8"))
        elif isinstance(data_or_writer, bytes | bytearray | memoryview):
            fh.write(data_or_writer)
        else:
            data_or_writer(fh)
    return path


def fsync_dir(directory: str | os.PathLike[str], *, strict: bool = False) -> None:
    """``fsync`` a directory so that a rename or unlink in it is durable.

    Parameters
    ----------
    directory : str or os.PathLike
        The directory.
    strict : bool, optional
        Raise the ``OSError`` when the directory cannot be opened or synced. By
        default such platforms and file systems are skipped silently; a server that
        promises durability before it answers (the distributor) passes ``True``.

    Raises
    ------
    OSError
        Only with ``strict=True``.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        if strict:
            raise
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        if strict:
            raise
    finally:
        os.close(fd)


def remove_stale_temps(path: str | os.PathLike[str], older_than_s: float = 60.0) -> list[Path]:
    """Remove the temporary files that crashed atomic writes of ``path`` left behind.

    Call it after ``path`` was written: the destination is complete, so the
    ``.<name>.<random>.tmp`` files of earlier, killed writes of it are garbage.  Files
    younger than ``older_than_s`` are left alone (another writer of the same path
    may still be at work).

    Parameters
    ----------
    path : str or os.PathLike
        The destination that was just written.
    older_than_s : float, optional
        Minimum age, in seconds, of a temporary file to remove.

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    path = Path(path)
    now = time.time()
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()
                removed.append(tmp)
    return removed
