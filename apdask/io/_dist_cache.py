"""The HTTP distributor client's local cache: a private directory, verified downloads into it.

Re-exported by :mod:`apdask.io.distributor`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import secrets
import stat

from apdask.exceptions import CacheSecurityError, ChecksumMismatchError, ConfigurationError

__all__ = ["default_cache_base", "open_private_dir"]

#: The distributor clients' logger, whichever of their modules logs.
log = logging.getLogger("apdask.io.distributor")

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


class _RetryError(Exception):
    """A transient failure (connection refused/reset, 503, broken download)."""

    #: Connected, but no answer in time: the server is up, only slow.
    reachable: bool = False


class _CacheMixin:
    """The HTTP client's cache: verified downloads and their registration records.

    Files are opened relative to the cache directory's descriptor (``dfd``), so a
    symbolic link planted in the cache is never followed.
    """

    url: str
    cache_dir: str
    read_timeout: float
    _private_from: str | None

    def _open_cache(self):
        return open_private_dir(self.cache_dir, self._private_from)

    def _drop(self, dfd, name):
        for fn in (name, f".{name}.json"):
            with contextlib.suppress(OSError):
                os.unlink(fn, dir_fd=dfd)

    def _cached(self, dfd, name):
        """The verified cache record of ``name``, or None.

        The sidecar's SHA-256 is checked against a fresh hash of the cached file on
        every call; a file that was changed (even keeping its size), replaced by a
        symbolic link or is not a regular file of ours is discarded.
        """
        try:
            fd = os.open(f".{name}.json", _READ_FLAGS, dir_fd=dfd)
            with os.fdopen(fd) as fh:
                info = json.load(fh)
            sha, size = str(info["sha256"]), int(info["size"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self._drop(dfd, name)
            return None
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=dfd)
        except OSError:
            self._drop(dfd, name)
            return None
        try:
            st = os.fstat(fd)
            ok = stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()
            got = _hash_fd(fd) if ok else (None, None)
        finally:
            os.close(fd)
        if got != (sha, size):
            log.warning(
                "cached copy of %r in %s no longer matches its SHA-256 %s; discarding it "
                "and downloading the image again",
                name,
                self.cache_dir,
                sha,
            )
            self._drop(dfd, name)
            return None
        return info

    @staticmethod
    def _registered(resp):
        with contextlib.suppress(TypeError, ValueError):
            return float(resp.getheader("X-Registered"))
        return None

    def _mismatch(self, name, got, expected, size):
        msg = (
            f"image {name} from distributor {self.url} has SHA-256 {got} ({size} bytes) "
            f"but the distributor registered SHA-256 {expected}: its copy is corrupt (or "
            "altered in transit); nothing was used; re-upload the image "
            "(apdask distributor upload) and check the distributor's disk"
        )
        err = ChecksumMismatchError(msg)
        err.retryable = True  # type: ignore[attr-defined]  # read with getattr by _retrieve
        return err

    def _download(self, dfd, name, conn, resp):
        """Stream a 200 response into the cache atomically; verify size and SHA-256."""
        expected = (resp.getheader("X-Checksum-SHA256") or "").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            msg = (
                f"distributor {self.url} sent image {name} without a valid "
                "X-Checksum-SHA256 header, so it cannot be verified; nothing was used; "
                "is --distributor an apdask distributor?"
            )
            raise ChecksumMismatchError(msg)
        length = resp.getheader("Content-Length")
        if conn.sock is not None:
            conn.sock.settimeout(self.read_timeout)

        def read():
            try:
                return resp.read(_CHUNK)
            except (OSError, http.client.HTTPException) as e:
                msg = f"download of {name} failed: {type(e).__name__}: {e}"
                raise _RetryError(msg) from None

        tmp = f".dl-{secrets.token_hex(8)}.part"
        renamed = False
        try:  # OSErrors here are the local disk's; the network's are _RetryErrors
            fd = os.open(tmp, _CREATE_FLAGS, 0o600, dir_fd=dfd)
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as fh:
                while chunk := read():
                    digest.update(chunk)
                    fh.write(chunk)
                    size += len(chunk)
            if length is not None and size != int(length):
                raise _RetryError(f"download of {name} broke off after {size} of {length} bytes")
            if digest.hexdigest() != expected:
                raise self._mismatch(name, digest.hexdigest(), expected, size)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            renamed = True
            info = {
                "name": name,
                "size": size,
                "sha256": expected,
                "registered": self._registered(resp),
            }
            side = f".dl-{secrets.token_hex(8)}.json"
            fd = os.open(side, _CREATE_FLAGS, 0o600, dir_fd=dfd)
            try:
                with os.fdopen(fd, "w") as side_fh:
                    json.dump(info, side_fh)
                os.replace(side, f".{name}.json", src_dir_fd=dfd, dst_dir_fd=dfd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(side, dir_fd=dfd)
                raise
        except OSError as e:
            if renamed:
                self._drop(dfd, name)
            msg = (
                f"cannot write image {name} into the distributor cache {self.cache_dir} "
                f"({e.strerror or e}); free space there, or point "
                "apdask.distributor.cache_dir at a writable private directory"
            )
            raise ConfigurationError(msg) from None
        finally:
            if not renamed:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
        return {"path": os.path.join(self.cache_dir, name), **info}
