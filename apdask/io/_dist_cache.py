"""The HTTP distributor client's local cache: a private directory nobody else can touch.

Re-exported by :mod:`apdask.io.distributor`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat

from apdask.exceptions import (
    CacheSecurityError,
)

__all__ = ["default_cache_base", "open_private_dir"]

_CHUNK = 1 << 20
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def default_cache_base() -> str:
    """Parent of the per-distributor caches: ``$XDG_CACHE_HOME/apdask/distributor``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache`` (and is ignored unless absolute, as the
    XDG base-directory specification says).
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "apdask", "distributor")


def _cache_fix(path):
    return (
        f"remove it (rm -rf {path}) so that apdask recreates it, or point "
        "apdask.distributor.cache_dir at a private directory of yours"
    )


def open_private_dir(path: str, private_from: str | None = None) -> int:
    """Open directory ``path``, creating it with mode 0700; refuse one that is not private.

    Every component from ``private_from`` (default: ``path`` itself) down to ``path``
    is created with mode 0700 if missing and opened with ``O_NOFOLLOW`` relative to its
    parent, so a symbolic link planted there is refused instead of followed; each must
    belong to the current user and give no access to group or others.

    Parameters
    ----------
    path : str
        Absolute directory path.
    private_from : str, optional
        The first component (an ancestor of ``path`` or ``path``) that must be private.

    Returns
    -------
    int
        A file descriptor of the directory; the caller closes it.

    Raises
    ------
    CacheSecurityError
        A component is a symbolic link or not a directory, belongs to another user, or
        is accessible to group or others.
    """
    path = os.path.abspath(path)
    private_from = os.path.abspath(private_from or path)
    parent = os.path.dirname(private_from)
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        msg = f"cannot create the distributor cache under {parent}: {e.strerror or e}"
        raise CacheSecurityError(msg) from None
    current = parent
    try:
        for part in os.path.relpath(path, parent).split(os.sep):
            current = os.path.join(current, part)
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            try:
                sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    what = "a symbolic link" if os.path.islink(current) else "not a directory"
                else:
                    what = f"not accessible ({e.strerror or e})"
                msg = (
                    f"distributor cache {current} is {what}; refusing to use it (another "
                    f"user could redirect or replace the downloads); {_cache_fix(current)}"
                )
                raise CacheSecurityError(msg) from None
            os.close(fd)
            fd = sub
            st = os.fstat(fd)
            uid = os.geteuid()
            if st.st_uid != uid:
                msg = (
                    f"distributor cache {current} belongs to uid {st.st_uid}, not to you "
                    f"(uid {uid}); refusing to use it; {_cache_fix(current)}"
                )
                raise CacheSecurityError(msg)
            if st.st_mode & 0o077:
                msg = (
                    f"distributor cache {current} has mode {stat.S_IMODE(st.st_mode):o}, "
                    f"open to other users; run chmod 700 {current}, or "
                    f"{_cache_fix(current)}"
                )
                raise CacheSecurityError(msg)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _hash_fd(fd):
    h = hashlib.sha256()
    size = 0
    while chunk := os.read(fd, _CHUNK):
        h.update(chunk)
        size += len(chunk)
    return h.hexdigest(), size
