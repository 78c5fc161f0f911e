"""Clients of the distributor that delivers raw images as they are read out.

Two kinds, chosen by :func:`open_distributor` from the URL scheme:

* ``file://DIR`` -- :class:`FileDistributor`: a directory into which the camera (or
  the simulator) moves each raw by atomic rename, so a file that exists is complete.
* ``http://HOST:PORT`` -- :class:`HttpDistributor`: the distributor service of
  :mod:`apdask.distributor_server` (``apdask distributor serve``).  ``get`` long-polls
  until the image is registered, downloads it atomically into a local cache and
  verifies its SHA-256.

Both block in ``get(name, timeout)`` (DMTN-092 §4) and raise
:class:`~apdask.exceptions.ImageTimeoutError` (exit 75) when the image is not
registered in time, and :class:`~apdask.exceptions.DistributorUnavailableError`
(exit 69) when the distributor cannot be reached.  See ``docs/distributor.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import tempfile
import time
from urllib.parse import quote, unquote, urlparse

from apdask import config
from apdask.exceptions import (
    ConfigurationError,
    DistributorUnavailableError,
    HeaderMismatchError,
    ImageTimeoutError,
)

__all__ = [
    "FileDistributor",
    "HttpDistributor",
    "open_distributor",
    "check_image_name",
    "check_image_for_ccd",
    "NAME_PATTERN",
    "TOKEN_ENV",
]

#: Environment variable holding the distributor's upload token (never in config files).
TOKEN_ENV = "APDASK_DISTRIBUTOR_TOKEN"

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


_RAW_NAME = re.compile(
    r"^(?P<instrument>[A-Za-z0-9]+)_(?P<visit>\d+)_(?P<ccd>.+)_(?P<snap>\d+)\.fits$"
)


def check_image_for_ccd(name, camera, detector):
    """Refuse an image name that, by the raw naming convention, belongs to another CCD.

    Names of the form ``{instrument}_{visit}_{ccd}_{snap}.fits`` (``rawio.raw_name``)
    are checked before waiting for the image, so a wrong name fails at once instead of
    after the timeout.  Other names are accepted; the raw header's DETNAME is checked
    after the fetch in any case.

    Parameters
    ----------
    name : str
        Image name given to ``--image``.
    camera : apdask.camera.Camera
    detector : apdask.camera.Detector
        The CCD being processed.

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    HeaderMismatchError
        If the name names another CCD of the camera, or another instrument.
    ValueError
        If the name is not a safe image name.
    """
    check_image_name(name)
    m = _RAW_NAME.match(name)
    if m is None:
        return name
    ccd = m["ccd"]
    known = ccd in camera.names
    if known and ccd != detector.name:
        msg = (
            f"image name {name} is for CCD {ccd} but --ccd {detector.name} was given; pass "
            f"the image of {detector.name} (e.g. {m['instrument']}_{m['visit']}_"
            f"{detector.name}_{m['snap']}.fits)"
        )
        raise HeaderMismatchError(msg)
    if known and m["instrument"] != camera.name:
        msg = (
            f"image name {name} is for instrument {m['instrument']} but the repository's "
            f"camera is {camera.name}; pass an image of {camera.name}"
        )
        raise HeaderMismatchError(msg)
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

    def retrieve(self, name, timeout=None, poll_interval=None):
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
        return {"path": path, "name": name, "size": st.st_size, "sha256": None,
                "registered": st.st_mtime}  # fmt: skip

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


#: Longest single long-poll the client asks for; longer waits are several polls.
_MAX_POLL_S = 60.0
_CHUNK = 1 << 20


class _RetryError(Exception):
    """A transient failure (connection refused/reset, 503, broken download)."""


def _default_cache_dir(host, port):
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    base = os.path.join(tempfile.gettempdir(), f"apdask-{uid}-distributor-cache")
    return os.path.join(base, f"{host}_{port}")


class HttpDistributor:
    """Client of an HTTP distributor (``apdask distributor serve``).

    Parameters
    ----------
    url : str
        ``http://host:port`` (or ``https://``), optionally with a path prefix.
    cache_dir : str, optional
        Where downloaded images are kept; default ``apdask.distributor.cache_dir`` or a
        per-user directory under the system temporary directory.
    read_timeout : float
        Socket timeout while downloading a registered image, seconds.

    Notes
    -----
    ``get`` blocks with a long-poll (``GET /images/{name}?wait=S``), so no request is
    made more often than once per ``S`` seconds while the server is up.  When the
    server cannot be reached (refused, reset, restarting), the client retries with
    exponential backoff (0.1 s doubling to 2 s) until the overall timeout: a
    restarted distributor is picked up again without the caller noticing.
    """

    def __init__(self, url, cache_dir=None, read_timeout=30.0):
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            msg = f"HTTP distributor URL {url!r} is malformed; use http://HOST:PORT"
            raise ValueError(msg)
        self.url = url.rstrip("/")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._prefix = parsed.path.rstrip("/")
        cache_dir = config.get("distributor.cache_dir", cache_dir)
        self.cache_dir = os.path.abspath(cache_dir or _default_cache_dir(self.host, self.port))
        self.read_timeout = float(read_timeout)

    def __repr__(self):
        return f"HttpDistributor({self.url!r})"

    # ----------------------------------------------------------------------------------

    def _connect(self, timeout):
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _path(self, name=None, **query):
        path = f"{self._prefix}/images" + ("" if name is None else "/" + quote(name, safe=""))
        if query:
            path += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        return path

    def _request(self, method, path, timeout, headers=None, body=None):
        """One request; returns ``(connection, response)``; the caller closes the connection.

        Raises DistributorUnavailableError for a host name that does not resolve and
        _RetryError for a connection that is refused, reset or times out.
        """
        conn = self._connect(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return conn, conn.getresponse()
        except socket.gaierror as e:
            conn.close()
            msg = (
                f"distributor {self.url} is unreachable: host {self.host!r} does not "
                f"resolve ({e}); check --distributor"
            )
            raise DistributorUnavailableError(msg) from None
        except (OSError, http.client.HTTPException) as e:
            connected = conn.sock is not None
            conn.close()
            err = _RetryError(f"{type(e).__name__}: {e}")
            # Connected but no answer in time: the server is up, just slow (e.g. loaded).
            err.reachable = connected and isinstance(e, TimeoutError)
            raise err from None

    def _cache_paths(self, name):
        return os.path.join(self.cache_dir, name), os.path.join(self.cache_dir, f".{name}.json")

    def _cached(self, name):
        path, side = self._cache_paths(name)
        try:
            with open(side) as fh:
                info = json.load(fh)
            if os.path.getsize(path) == info["size"]:
                return info
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return None

    @staticmethod
    def _registered(resp):
        with contextlib.suppress(TypeError, ValueError):
            return float(resp.getheader("X-Registered"))
        return None

    def _download(self, name, conn, resp):
        """Stream a 200 response into the cache atomically; verify size and SHA-256."""
        expected = (resp.getheader("X-Checksum-SHA256") or "").lower()
        length = resp.getheader("Content-Length")
        os.makedirs(self.cache_dir, exist_ok=True)
        path, side = self._cache_paths(name)
        if conn.sock is not None:
            conn.sock.settimeout(self.read_timeout)
        fd, tmp = tempfile.mkstemp(prefix=".dl-", suffix=".part", dir=self.cache_dir)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as fh:
                while chunk := resp.read(_CHUNK):
                    digest.update(chunk)
                    fh.write(chunk)
                    size += len(chunk)
            if length is not None and size != int(length):
                raise _RetryError(f"download of {name} broke off after {size} of {length} bytes")
            if expected and digest.hexdigest() != expected:
                got = digest.hexdigest()
                raise _RetryError(f"download of {name} has SHA-256 {got}, not {expected}")
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except (OSError, http.client.HTTPException) as e:
            raise _RetryError(f"download of {name} failed: {type(e).__name__}: {e}") from None
        finally:
            with contextlib.suppress(OSError):
                os.remove(tmp)
        info = {"name": name, "size": size, "sha256": digest.hexdigest(),
                "registered": self._registered(resp)}  # fmt: skip
        fd, tmp = tempfile.mkstemp(prefix=".dl-", suffix=".json", dir=self.cache_dir)
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        os.replace(tmp, side)
        return {"path": path, **info}

    def _unavailable(self, name, waited, why):
        msg = (
            f"distributor {self.url} is unreachable ({why}) while waiting {waited:.1f} s for "
            f"image {name}; start it (apdask distributor serve) or check --distributor"
        )
        return DistributorUnavailableError(msg)

    def retrieve(self, name, timeout=None):
        """Block until image ``name`` is registered, download it and describe it.

        Parameters
        ----------
        name : str
            Image name.
        timeout : float, optional
            Seconds to wait for the image to be registered; default
            ``apdask.distributor.timeout``.  The download of a registered image is not
            counted (it has its own per-read ``read_timeout``).

        Returns
        -------
        dict
            ``path`` (local, complete, checksum-verified), ``name``, ``size``,
            ``sha256`` and ``registered`` (the server's registration time, Unix s).

        Raises
        ------
        ImageTimeoutError
            The distributor answered, but the image was not registered in time.
        DistributorUnavailableError
            The distributor could not be reached at the deadline (or its host name
            does not resolve).
        ValueError
            An unsafe image name.
        """
        check_image_name(name)
        timeout = float(config.get("distributor.timeout", timeout))
        start = time.monotonic()
        deadline = start + timeout
        backoff = 0.1
        failure = None  # why the last attempt failed, None if the server answered
        while True:
            remaining = deadline - time.monotonic()
            wait = min(max(remaining, 0.0), _MAX_POLL_S)
            cached = self._cached(name)
            headers = {"If-None-Match": f'"{cached["sha256"]}"'} if cached else {}
            try:
                conn, resp = self._request(
                    "GET", self._path(name, wait=f"{wait:.3f}"), wait + 0.5, headers
                )
                try:
                    if resp.status == 200:
                        return self._download(name, conn, resp)
                    body = resp.read()
                    if resp.status == 304 and cached:
                        path = self._cache_paths(name)[0]
                        return {"path": path, **cached, "registered": self._registered(resp)}
                    if resp.status == 400:
                        raise ValueError(_message(body, f"distributor {self.url} refused {name}"))
                    if resp.status != 404:
                        raise _RetryError(f"HTTP {resp.status}: {_message(body, resp.reason)}")
                finally:
                    conn.close()
                failure = None
                backoff = 0.1
                if deadline - time.monotonic() < 0.02:
                    break
                continue
            except _RetryError as e:
                failure = None if getattr(e, "reachable", False) else str(e)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(backoff, remaining))
            backoff = min(2 * backoff, 2.0)
        waited = time.monotonic() - start
        if failure is not None:
            raise self._unavailable(name, waited, failure)
        msg = (
            f"image {name} was not registered at distributor {self.url} within "
            f"{timeout:g} s; check the camera/distributor or raise --timeout"
        )
        raise ImageTimeoutError(msg)

    def get(self, name, timeout=None):
        """Block until image ``name`` is registered; return the path of a local copy.

        See :meth:`retrieve` for parameters and errors.
        """
        return self.retrieve(name, timeout)["path"]

    def exists(self, name):
        """Whether image ``name`` is registered (``HEAD``, no waiting)."""
        check_image_name(name)
        try:
            conn, resp = self._request("HEAD", self._path(name), 10.0)
        except _RetryError as e:
            raise self._unavailable(name, 0.0, str(e)) from None
        conn.close()
        return resp.status == 200

    def index(self):
        """The server's index: a list of ``{name, size, sha256, registered}`` dicts."""
        try:
            conn, resp = self._request("GET", self._path(), 30.0)
            body = resp.read()
            conn.close()
        except (_RetryError, OSError, http.client.HTTPException) as e:
            raise self._unavailable("index", 0.0, str(e)) from None
        return json.loads(body)["images"]

    def put(self, name, source, token=None, timeout=300.0):
        """Upload a file as image ``name`` (what a camera's forwarder does).

        Parameters
        ----------
        name : str
            Image name.
        source : str or os.PathLike
            Local file.
        token : str, optional
            Upload token; default ``$APDASK_DISTRIBUTOR_TOKEN``.
        timeout : float
            Socket timeout, seconds.

        Returns
        -------
        dict
            The registration record: ``name``, ``size``, ``sha256``, ``registered``.

        Raises
        ------
        ConfigurationError
            No token, or the server rejected it (401).
        ValueError
            The server refused the upload (bad name, checksum, conflict).
        DistributorUnavailableError
            The server cannot be reached.
        """
        check_image_name(name)
        token = token if token is not None else os.environ.get(TOKEN_ENV, "")
        if not token:
            msg = f"no upload token; set {TOKEN_ENV} to the distributor's token"
            raise ConfigurationError(msg)
        h = hashlib.sha256()
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
        headers = {
            "Authorization": f"Bearer {token}",
            "X-Checksum-SHA256": h.hexdigest(),
            "Content-Length": str(os.path.getsize(source)),
            "Content-Type": "application/fits",
        }
        with open(source, "rb") as fh:
            try:
                conn, resp = self._request("PUT", self._path(name), timeout, headers, fh)
            except _RetryError as e:
                raise self._unavailable(name, 0.0, str(e)) from None
            body = resp.read()
            conn.close()
        if resp.status == 401:
            msg = f"distributor {self.url} rejected the upload token; check {TOKEN_ENV}"
            raise ConfigurationError(msg)
        if resp.status not in (200, 201):
            msg = _message(body, f"upload of {name} failed with HTTP {resp.status}")
            raise ValueError(msg)
        return json.loads(body)


def _message(body, default):
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return default


def open_distributor(url):
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
