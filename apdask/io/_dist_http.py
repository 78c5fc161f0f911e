"""The HTTP distributor client (``apdask distributor serve`` is the server).

Re-exported by :mod:`apdask.io.distributor`; see its docstring for the errors.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
from typing import Any
from urllib.parse import quote, urlparse

from apdask import config
from apdask.exceptions import (
    ChecksumMismatchError,
    ConfigurationError,
    DistributorFullError,
    DistributorUnavailableError,
    ImageTimeoutError,
)
from apdask.io._dist_cache import (
    _CHUNK,
    _CacheMixin,
    _RetryError,
    default_cache_base,
)
from apdask.io._dist_names import TOKEN_ENV, check_image_name

__all__ = ["HttpDistributor"]

#: The distributor clients' logger, whichever of their modules logs.
log = logging.getLogger("apdask.io.distributor")

#: Longest single long-poll the client asks for; longer waits are several polls.
_MAX_POLL_S = 60.0
#: Consecutive downloads with the wrong SHA-256 before ChecksumMismatchError.
_MAX_MISMATCHES = 2


class HttpDistributor(_CacheMixin):
    """Client of an HTTP distributor (``apdask distributor serve``).

    Parameters
    ----------
    url : str
        ``http://host:port`` (or ``https://``), optionally with a path prefix.
    cache_dir : str, optional
        Where downloaded images are kept; default ``apdask.distributor.cache_dir`` or
        ``$XDG_CACHE_HOME/apdask/distributor/HOST_PORT`` (``~/.cache/...``).  It is
        created with mode 0700 and must belong to the current user (see
        :func:`open_private_dir`).
    read_timeout : float
        Socket timeout while downloading a registered image, seconds.

    Notes
    -----
    ``get`` blocks with a long-poll (``GET /images/{name}?wait=S``), so no request is
    made more often than once per ``S`` seconds while the server is up.  When the
    server cannot be reached (refused, reset, restarting), the client retries with
    exponential backoff (0.1 s doubling to 2 s) until the overall timeout: a
    restarted distributor is picked up again without the caller noticing.

    A cached copy is re-hashed on every use and only used when its SHA-256 equals the
    one the distributor confirms (``304`` to ``If-None-Match``); a copy changed
    on disk is discarded and downloaded again.
    """

    def __init__(self, url: str, cache_dir: str | None = None, read_timeout: float = 30.0) -> None:
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
        if cache_dir:
            self.cache_dir = os.path.abspath(os.fspath(cache_dir))
            self._private_from = self.cache_dir
        else:
            base = default_cache_base()
            host = re.sub(r"[^A-Za-z0-9.-]", "_", self.host)
            self.cache_dir = os.path.join(base, f"{host}_{self.port}")
            self._private_from = os.path.dirname(base)  # .../apdask
        self.read_timeout = float(read_timeout)

    def __repr__(self) -> str:
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
        _RetryError for a connection that is refused, reset or times out.  When the
        server answers before it has read the whole body (e.g. 507 or 413) and then
        closes, that answer is returned.
        """
        conn = self._connect(timeout)
        try:
            try:
                conn.request(method, path, body=body, headers=headers or {})
            except (BrokenPipeError, ConnectionResetError):
                if conn.sock is None:
                    raise
                # The server may have answered early and closed: read its answer.
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

    def _unavailable(self, name, waited, why):
        msg = (
            f"distributor {self.url} is unreachable ({why}) while waiting {waited:.1f} s for "
            f"image {name}; start it (apdask distributor serve) or check --distributor"
        )
        return DistributorUnavailableError(msg)

    def retrieve(self, name: str, timeout: float | None = None) -> dict[str, Any]:
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
        ChecksumMismatchError
            The distributor served bytes whose SHA-256 differs from the one it
            registered, twice in a row (or sent no checksum).
        CacheSecurityError
            The cache directory is a symbolic link, another user's, or not private.
        ConfigurationError
            The image cannot be written into the cache directory (full, read-only).
        ValueError
            An unsafe image name.
        """
        check_image_name(name)
        timeout = float(config.get("distributor.timeout", timeout))
        dfd = self._open_cache()
        try:
            return self._retrieve(dfd, name, timeout)
        finally:
            os.close(dfd)

    def _retrieve(self, dfd, name, timeout):
        start = time.monotonic()
        deadline = start + timeout
        backoff = 0.1
        failure = None  # why the last attempt failed, None if the server answered
        mismatch = None  # the last ChecksumMismatchError
        n_mismatch = 0
        while True:
            remaining = deadline - time.monotonic()
            wait = min(max(remaining, 0.0), _MAX_POLL_S)
            cached = self._cached(dfd, name)  # re-hashed on every attempt
            headers = {"If-None-Match": f'"{cached["sha256"]}"'} if cached else {}
            try:
                conn, resp = self._request(
                    "GET", self._path(name, wait=f"{wait:.3f}"), wait + 0.5, headers
                )
                try:
                    if resp.status == 200:
                        try:
                            return self._download(dfd, name, conn, resp)
                        except ChecksumMismatchError as e:
                            n_mismatch += 1
                            retryable = getattr(e, "retryable", False)
                            if n_mismatch >= _MAX_MISMATCHES or not retryable:
                                raise
                            mismatch = e
                            log.warning("%s; retrying once", e)
                            raise _RetryError(str(e)) from None
                    body = resp.read()
                    if resp.status == 304 and cached:
                        confirmed = (resp.getheader("X-Checksum-SHA256") or "").lower()
                        if confirmed == cached["sha256"]:
                            path = os.path.join(self.cache_dir, name)
                            return {"path": path, **cached, "registered": self._registered(resp)}
                        self._drop(dfd, name)  # the server's checksum differs: re-download
                        raise _RetryError(f"cached {name} is not the registered image")
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
        if mismatch is not None and failure == str(mismatch):
            raise mismatch
        if failure is not None:
            raise self._unavailable(name, waited, failure)
        msg = (
            f"image {name} was not registered at distributor {self.url} within "
            f"{timeout:g} s; check the camera/distributor or raise --timeout"
        )
        raise ImageTimeoutError(msg)

    def get(self, name: str, timeout: float | None = None) -> str:
        """Block until image ``name`` is registered; return the path of a local copy.

        See :meth:`retrieve` for parameters and errors.
        """
        return self.retrieve(name, timeout)["path"]

    def exists(self, name: str) -> bool:
        """Whether image ``name`` is registered (``HEAD``, no waiting)."""
        check_image_name(name)
        try:
            conn, resp = self._request("HEAD", self._path(name), 10.0)
        except _RetryError as e:
            raise self._unavailable(name, 0.0, str(e)) from None
        conn.close()
        return resp.status == 200

    def index(self) -> list[dict[str, Any]]:
        """The server's index: a list of ``{name, size, sha256, registered}`` dicts."""
        try:
            conn, resp = self._request("GET", self._path(), 30.0)
            body = resp.read()
            conn.close()
        except (_RetryError, OSError, http.client.HTTPException) as e:
            raise self._unavailable("index", 0.0, str(e)) from None
        return json.loads(body)["images"]

    def put(
        self,
        name: str,
        source: str | os.PathLike[str],
        token: str | None = None,
        timeout: float = 300.0,
    ) -> dict[str, Any]:
        """Upload a file as image ``name`` (what a camera's forwarder does).

        A refused or reset connection and a ``503`` (the server busy or at its
        connection limit) are retried with backoff (0.1 s doubling to 2 s) until
        ``timeout``; an upload is idempotent (the same bytes again answer ``200``).

        Parameters
        ----------
        name : str
            Image name.
        source : str or os.PathLike
            Local file.
        token : str, optional
            Upload token; default ``$APDASK_DISTRIBUTOR_TOKEN``.
        timeout : float
            Socket timeout, and the time within which transient failures are retried,
            seconds.

        Returns
        -------
        dict
            The registration record: ``name``, ``size``, ``sha256``, ``registered``.

        Raises
        ------
        ConfigurationError
            No token, or the server rejected it (401).
        DistributorFullError
            The distributor's disk is full (507); the message carries its reason.
        ValueError
            The server refused the upload (bad name, checksum, conflict, too large).
        DistributorUnavailableError
            The server cannot be reached, or failed (5xx) with the reason it gave.
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
        status, reason, body = self._send_upload(name, source, headers, timeout)
        return self._upload_result(name, status, reason, body)

    def _send_upload(
        self, name: str, source: str | os.PathLike[str], headers: dict[str, str], timeout: float
    ) -> tuple[int, str, bytes]:
        """PUT the file, retrying refused/reset connections and 503 with backoff."""
        start = time.monotonic()
        backoff = 0.1
        while True:
            with open(source, "rb") as fh:
                try:
                    conn, resp = self._request("PUT", self._path(name), timeout, headers, fh)
                    try:
                        body = resp.read()
                    except (OSError, http.client.HTTPException) as e:
                        raise _RetryError(f"{type(e).__name__}: {e}") from None
                    finally:
                        conn.close()
                    if resp.status != 503:
                        return resp.status, resp.reason, body
                    why = f"HTTP 503: {_message(body, resp.reason)}"
                except _RetryError as e:
                    why = str(e)
            if time.monotonic() - start + backoff > timeout:
                raise self._unavailable(name, time.monotonic() - start, why)
            time.sleep(backoff)
            backoff = min(2 * backoff, 2.0)

    def _upload_result(
        self, name: str, status: int, http_reason: str, body: bytes
    ) -> dict[str, Any]:
        """The registration record of an accepted upload; the matching error otherwise."""
        if status == 401:
            msg = f"distributor {self.url} rejected the upload token; check {TOKEN_ENV}"
            raise ConfigurationError(msg)
        reason = _message(body, http_reason)
        if status == 507:
            msg = (
                f"distributor {self.url} could not store {name}: {reason} (HTTP 507); "
                "free space on the distributor's disk, then upload again"
            )
            raise DistributorFullError(msg)
        if status >= 500:
            msg = f"distributor {self.url} failed to store {name} (HTTP {status}): {reason}"
            raise DistributorUnavailableError(msg)
        if status not in (200, 201):
            msg = f"upload of {name} to {self.url} refused (HTTP {status}): {reason}"
            raise ValueError(msg)
        return json.loads(body)


def _message(body, default):
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return default
