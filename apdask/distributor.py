"""Client of the file distributor that delivers raw images as they are read out.

Only the file-system distributor exists for now: a directory into which the
camera (or the simulator) moves each raw by atomic rename, so a file that exists
is complete.  An HTTP distributor is planned (issue 3).
"""

from __future__ import annotations

import os
import re
import time
from urllib.parse import unquote, urlparse

from . import config
from .exceptions import DistributorUnavailableError, ImageTimeoutError

__all__ = ["FileDistributor", "open_distributor", "check_image_name", "NAME_PATTERN"]

#: Image names the distributor accepts: no slashes, no leading dot, no traversal.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


def check_image_name(name):
    """Return ``name`` if it is a safe image file name, else raise ValueError."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        msg = (
            f"invalid image name {name!r}: use a plain file name of letters, digits, "
            "'.', '_' and '-' (no slashes or '..'), e.g. LSSTComCam_1000_R22_S11_0.fits"
        )
        raise ValueError(msg)
    return name


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

    def __init__(self, root):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            msg = (
                f"file distributor directory {self.root} does not exist; create it or "
                "point --distributor / apdask.distributor.url at the raw directory"
            )
            raise DistributorUnavailableError(msg)

    def __repr__(self):
        return f"FileDistributor({self.root!r})"

    @property
    def url(self):
        """``file://`` URL of the distributor."""
        return "file://" + self.root

    def path(self, name):
        """Path at which image ``name`` appears (validated, not waited for)."""
        return os.path.join(self.root, check_image_name(name))

    def exists(self, name):
        """Whether image ``name`` has fully arrived."""
        return os.path.isfile(self.path(name))

    def get(self, name, timeout=None, poll_interval=None):
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


def open_distributor(url):
    """Return a distributor client for ``url``.

    Parameters
    ----------
    url : str or os.PathLike
        ``file:///abs/dir`` or a plain directory path.  ``http://`` is not supported
        yet.

    Returns
    -------
    FileDistributor

    Raises
    ------
    NotImplementedError
        For ``http://`` / ``https://`` URLs.
    DistributorUnavailableError
        If the directory does not exist.
    ValueError
        For other URL schemes.
    """
    url = os.fspath(url)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        msg = (
            f"HTTP distributors are not supported yet (issue 3): {url}; use a "
            "file:///abs/dir URL or a directory path"
        )
        raise NotImplementedError(msg)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            msg = f"file URL {url!r} names host {parsed.netloc!r}; use file:///abs/dir"
            raise ValueError(msg)
        return FileDistributor(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # len 1: a Windows drive letter
        msg = f"unsupported distributor URL scheme {parsed.scheme!r} in {url!r}; use file://"
        raise ValueError(msg)
    return FileDistributor(url)
