"""Clients of the distributor that delivers raw images as they are read out.

Two kinds, chosen by :func:`open_distributor` from the URL scheme:

* ``file://DIR`` -- :class:`FileDistributor`: a directory into which the camera (or
  the simulator) moves each raw by atomic rename, so a file that exists is complete.
* ``http://HOST:PORT`` -- :class:`HttpDistributor`: the distributor service of
  :mod:`apdask.services.distributor_server` (``apdask distributor serve``).  ``get`` long-polls
  until the image is registered, downloads it atomically into a local cache and
  verifies its SHA-256.

Both block in ``get(name, timeout)`` (DMTN-092 §4) and raise
:class:`~apdask.exceptions.ImageTimeoutError` (exit 75) when the image is not
registered in time, and :class:`~apdask.exceptions.DistributorUnavailableError`
(exit 69) when the distributor cannot be reached.  The HTTP client also raises
:class:`~apdask.exceptions.ChecksumMismatchError` (exit 76) when the distributor
serves bytes that do not match the checksum it registered,
:class:`~apdask.exceptions.CacheSecurityError` (exit 77) when its cache directory is
not private, and :class:`~apdask.exceptions.DistributorFullError` (exit 73) when an
upload is refused for a full disk.  See ``docs/distributor.md``.
"""

from __future__ import annotations

import os
import time
from typing import Any
from urllib.parse import unquote, urlparse

from apdask import config
from apdask.exceptions import (
    DistributorUnavailableError,
    ImageTimeoutError,
)
from apdask.io._dist_cache import default_cache_base, open_private_dir
from apdask.io._dist_http import HttpDistributor
from apdask.io._dist_names import NAME_PATTERN, TOKEN_ENV, check_image_for_ccd, check_image_name

__all__ = [
    "FileDistributor",
    "HttpDistributor",
    "open_distributor",
    "check_image_name",
    "check_image_for_ccd",
    "open_private_dir",
    "default_cache_base",
    "NAME_PATTERN",
    "TOKEN_ENV",
]


class FileDistributor:
    """A directory that raw images appear in.

    Parameters
    ----------
    root : str or os.PathLike
        Existing directory.

    Raises
    ------
    DistributorUnavailableError
        If ``root`` is not an existing directory.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            msg = (
                f"file distributor directory {self.root} does not exist; create it or "
                "point --distributor / apdask.distributor.url at the raw directory"
            )
            raise DistributorUnavailableError(msg)

    def __repr__(self) -> str:
        return f"FileDistributor({self.root!r})"

    @property
    def url(self) -> str:
        """``file://`` URL of the distributor."""
        return "file://" + self.root

    def path(self, name: str) -> str:
        """Path at which image ``name`` appears (validated, not waited for)."""
        return os.path.join(self.root, check_image_name(name))

    def exists(self, name: str) -> bool:
        """Whether image ``name`` has fully arrived."""
        return os.path.isfile(self.path(name))

    def retrieve(
        self, name: str, timeout: float | None = None, poll_interval: float | None = None
    ) -> dict[str, Any]:
        """Like :meth:`get`, but return a dict with the registration time.

        Returns
        -------
        dict
            ``path``, ``name``, ``size``, ``sha256`` (None: not computed) and
            ``registered``: the file's mtime, i.e. when its atomic rename completed
            (``os.replace`` keeps the mtime of the finished temporary file).
        """
        path = self.get(name, timeout, poll_interval)
        st = os.stat(path)
        return {
            "path": path,
            "name": name,
            "size": st.st_size,
            "sha256": None,
            "registered": st.st_mtime,
        }

    def get(
        self, name: str, timeout: float | None = None, poll_interval: float | None = None
    ) -> str:
        """Block until image ``name`` has arrived and return its path.

        Parameters
        ----------
        name : str
            File name, e.g. ``raw_name(...)``.
        timeout : float, optional
            Seconds to wait; default ``apdask.distributor.timeout``.
        poll_interval : float, optional
            Seconds between checks; default ``apdask.distributor.poll_interval``.

        Returns
        -------
        str
            Path of the complete file.

        Raises
        ------
        ImageTimeoutError
            If the image has not arrived after ``timeout`` seconds.
        DistributorUnavailableError
            If the distributor directory disappears while waiting.
        """
        path = self.path(name)
        timeout = float(config.get("distributor.timeout", timeout))
        poll = float(config.get("distributor.poll_interval", poll_interval))
        poll = max(poll, 0.001)
        deadline = time.monotonic() + timeout
        while True:
            if os.path.isfile(path):
                return path
            now = time.monotonic()
            if now >= deadline:
                break
            if not os.path.isdir(self.root):
                msg = f"file distributor directory {self.root} disappeared while waiting"
                raise DistributorUnavailableError(msg)
            time.sleep(min(poll, deadline - now))
        msg = (
            f"image {name} did not arrive at distributor {self.url} within {timeout:g} s; "
            "check the camera/distributor or raise apdask.distributor.timeout"
        )
        raise ImageTimeoutError(msg)


def open_distributor(url: str | os.PathLike[str]) -> HttpDistributor | FileDistributor:
    """Return a distributor client for ``url``.

    Parameters
    ----------
    url : str or os.PathLike
        ``http://host:port`` (the distributor service), ``file:///abs/dir`` or a plain
        directory path.

    Returns
    -------
    HttpDistributor or FileDistributor

    Raises
    ------
    DistributorUnavailableError
        If a file distributor's directory does not exist.
    ValueError
        For other URL schemes or a malformed URL.
    """
    url = os.fspath(url)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        return HttpDistributor(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            msg = f"file URL {url!r} names host {parsed.netloc!r}; use file:///abs/dir"
            raise ValueError(msg)
        return FileDistributor(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # len 1: a Windows drive letter
        msg = (
            f"unsupported distributor URL scheme {parsed.scheme!r} in {url!r}; use "
            "http://HOST:PORT or file:///abs/dir"
        )
        raise ValueError(msg)
    return FileDistributor(url)
