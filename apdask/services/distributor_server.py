"""The HTTP distributor service: receives raw images and hands them to waiting pipelines.

``apdask distributor serve --root DIR --host 127.0.0.1 --port P`` runs it.  It is an
aiohttp application on one asyncio event loop; see ``docs/distributor.md`` for the
protocol.  In short:

``PUT /images/{name}``
    Upload, authenticated by ``Authorization: Bearer <token>`` where the token is the
    server's ``APDASK_DISTRIBUTOR_TOKEN``.  The body is streamed to a hidden temporary
    file in the root, its SHA-256 is checked against the ``X-Checksum-SHA256`` (hex) or
    ``Digest: sha-256=<base64>`` header, the file is fsync'ed and renamed into place,
    and only then is the image registered and visible.  An upload that is cut off or
    fails its checksum leaves nothing behind.
``GET /images/{name}?wait=S``
    The image, or -- after waiting up to ``S`` seconds for it to be registered -- a 404
    with a JSON error.  Waiters are ``asyncio.Event`` objects, not threads.
``HEAD /images/{name}``
    Headers only (size, checksum, registration time).
``GET /images``
    JSON index: name, size, sha256 and registration time of every image.
``GET /health``
    Liveness plus the number of images, waiters and threads.

Registrations are appended to ``<root>/.registry.jsonl`` (fsync'ed), so a restarted
server knows when each image was registered; files placed in the root by other means
(the file distributor's atomic rename) are registered at startup with their mtime.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import tempfile
import threading
import time

from aiohttp import web

from apdask.exceptions import ConfigurationError
from apdask.io.distributor import NAME_PATTERN, TOKEN_ENV, check_image_name

__all__ = [
    "DistributorService",
    "serve",
    "run_server",
    "BackgroundServer",
    "MAX_WAIT_S",
    "REGISTRY_FILE",
]

log = logging.getLogger(__name__)

#: Longest long-poll a single request may ask for; clients re-poll for longer waits.
MAX_WAIT_S = 300.0
#: Append-only registration log inside the root (a hidden name no image can have).
REGISTRY_FILE = ".registry.jsonl"
_UPLOAD_PREFIX = ".upload-"
_CHUNK = 1 << 20


def _json_error(status, error, message, **extra):
    body = {"error": error, "message": message, **extra}
    return web.json_response(body, status=status)


def _parse_checksum(headers):
    """SHA-256 hex digest from ``X-Checksum-SHA256`` or ``Digest: sha-256=``; None if absent."""
    value = headers.get("X-Checksum-SHA256")
    if value:
        value = value.strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            msg = "X-Checksum-SHA256 must be 64 hex digits"
            raise ValueError(msg)
        return value
    digest = headers.get("Digest")
    if digest:
        for part in digest.split(","):
            algo, _, b64 = part.strip().partition("=")
            if algo.strip().lower() == "sha-256":
                try:
                    raw = base64.b64decode(b64.strip(), validate=True)
                except (binascii.Error, ValueError):
                    raw = b""
                if len(raw) != 32:
                    msg = "Digest sha-256 must be the base64 of a 32-byte SHA-256"
                    raise ValueError(msg)
                return raw.hex()
    return None


class DistributorService:
    """State and request handlers of one distributor root.

    Parameters
    ----------
    root : str or os.PathLike
        Directory where registered images live (created if missing).
    token : str
        Bearer token that uploads must present.
    max_bytes : int, optional
        Largest accepted upload (default 4 GiB).
    """

    def __init__(self, root, token, max_bytes=4 << 30):
        if not token:
            msg = (
                f"the distributor needs an upload token; set {TOKEN_ENV} in the "
                "environment (e.g. export APDASK_DISTRIBUTOR_TOKEN=$(openssl rand -hex 16))"
            )
            raise ConfigurationError(msg)
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self._token = token.encode()
        self.max_bytes = int(max_bytes)
        self.images = {}  # name -> {"name", "size", "sha256", "registered"}
        self._waiters = {}  # name -> [asyncio.Event, number of waiters]
        self.n_waiting = 0
        self._locks = {}
        self._closing = False
        self._load()

    # ----------------------------------------------------------------------------------
    # Registry

    def _load(self):
        """Rebuild the registry from the log and the files present; drop stale temp files."""
        logged = {}
        path = os.path.join(self.root, REGISTRY_FILE)
        if os.path.exists(path):
            with open(path) as fh:
                for line in fh:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        rec = json.loads(line)
                        logged[rec["name"]] = rec
        for entry in os.scandir(self.root):
            if entry.name.startswith(_UPLOAD_PREFIX):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)  # left over from an upload cut off by a crash
                continue
            if not entry.is_file() or not NAME_PATTERN.match(entry.name) or ".." in entry.name:
                continue
            st = entry.stat()
            rec = logged.get(entry.name)
            if rec is None or rec.get("size") != st.st_size:
                rec = {
                    "name": entry.name,
                    "size": st.st_size,
                    "sha256": _sha256_file(entry.path),
                    "registered": st.st_mtime,
                }
            self.images[entry.name] = rec

    def _append_log(self, rec):
        with open(os.path.join(self.root, REGISTRY_FILE), "a") as fh:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _register(self, rec):
        self.images[rec["name"]] = rec
        slot = self._waiters.pop(rec["name"], None)
        if slot is not None:
            slot[0].set()

    def wake_all(self):
        """Wake every waiter (they answer 503 so clients retry); used at shutdown."""
        self._closing = True
        for event, _ in self._waiters.values():
            event.set()
        self._waiters.clear()

    # ----------------------------------------------------------------------------------
    # Handlers

    def app(self):
        """The aiohttp application serving this root."""
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/images", self.index)
        app.router.add_get("/images/", self.index)
        app.router.add_get("/images/{name}", self.get)
        app.router.add_put("/images/{name}", self.put, expect_handler=self._expect)
        return app

    def _authorized(self, request):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._token)

    def _unauthorized(self):
        resp = _json_error(
            401,
            "unauthorized",
            "upload needs 'Authorization: Bearer <token>' with the distributor's "
            f"{TOKEN_ENV}; nothing was stored",
        )
        resp.headers["WWW-Authenticate"] = 'Bearer realm="apdask-distributor"'
        return resp

    async def _expect(self, request):
        """Refuse ``Expect: 100-continue`` uploads without a valid token before the body."""
        if not self._authorized(request):
            return self._unauthorized()
        expect = request.headers.get("Expect", "").lower()
        if request.version >= (1, 1) and expect == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
        return None

    def _name(self, request):
        name = request.match_info["name"]
        check_image_name(name)
        return name

    @staticmethod
    def _headers(rec):
        return {
            "X-Checksum-SHA256": rec["sha256"],
            "X-Registered": repr(rec["registered"]),
            "ETag": f'"{rec["sha256"]}"',
        }

    async def health(self, request):
        """``GET /health``."""
        return web.json_response(
            {
                "status": "ok",
                "root": self.root,
                "images": len(self.images),
                "waiting": self.n_waiting,
                "threads": threading.active_count(),
            }
        )

    async def index(self, request):
        """``GET /images``: every registered image, oldest registration first."""
        recs = sorted(self.images.values(), key=lambda r: (r["registered"], r["name"]))
        return web.json_response({"count": len(recs), "images": recs})

    async def get(self, request):
        """``GET|HEAD /images/{name}?wait=S``: the image, long-polling up to S seconds."""
        try:
            name = self._name(request)
            wait = float(request.query.get("wait", "0"))
            if not 0.0 <= wait <= MAX_WAIT_S:
                msg = f"wait={wait:g} is out of range; use 0 <= wait <= {MAX_WAIT_S:g} seconds"
                raise ValueError(msg)
        except ValueError as e:
            return _json_error(400, "bad_request", str(e))
        rec = self.images.get(name)
        if rec is None and wait > 0 and not self._closing:
            slot = self._waiters.get(name)
            if slot is None:
                slot = self._waiters[name] = [asyncio.Event(), 0]
            slot[1] += 1
            self.n_waiting += 1
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot[0].wait(), wait)
            finally:
                self.n_waiting -= 1
                slot[1] -= 1
                if slot[1] == 0 and self._waiters.get(name) is slot:
                    del self._waiters[name]  # nobody waits for it any more
            rec = self.images.get(name)
        if rec is None:
            if self._closing:
                resp = _json_error(503, "shutting_down", "distributor is restarting; retry")
                resp.headers["Retry-After"] = "1"
                return resp
            return _json_error(
                404,
                "not_registered",
                f"image {name} is not registered at this distributor (waited {wait:g} s)",
                name=name,
                waited=wait,
            )
        if request.headers.get("If-None-Match") == f'"{rec["sha256"]}"':
            return web.Response(status=304, headers=self._headers(rec))
        path = os.path.join(self.root, name)
        headers = self._headers(rec)
        headers["Content-Type"] = "application/fits"
        return web.FileResponse(path, chunk_size=_CHUNK, headers=headers)

    async def put(self, request):
        """``PUT /images/{name}``: authenticated, checksummed, atomic upload."""
        if not self._authorized(request):
            return self._unauthorized()
        try:
            name = self._name(request)
            expected = _parse_checksum(request.headers)
        except ValueError as e:
            return _json_error(400, "bad_request", str(e))
        if expected is None:
            return _json_error(
                400,
                "checksum_required",
                "send the body's SHA-256 as 'X-Checksum-SHA256: <hex>' or "
                "'Digest: sha-256=<base64>'; nothing was stored",
            )
        length = request.content_length
        if length is not None and length > self.max_bytes:
            return _json_error(413, "too_large", f"upload exceeds {self.max_bytes} bytes")
        existing = self.images.get(name)
        if existing is not None and existing["sha256"] != expected:
            return _json_error(
                409,
                "conflict",
                f"image {name} is already registered with another checksum; raw images "
                "are immutable, upload under a new name",
            )
        fd, tmp = tempfile.mkstemp(prefix=_UPLOAD_PREFIX, suffix=".part", dir=self.root)
        renamed = False
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as fh:
                async for chunk in request.content.iter_chunked(_CHUNK):
                    size += len(chunk)
                    if size > self.max_bytes:
                        return _json_error(413, "too_large", f"upload exceeds {self.max_bytes} B")
                    digest.update(chunk)
                    fh.write(chunk)
                if length is not None and size != length:
                    return _json_error(
                        400, "incomplete", f"received {size} of {length} bytes; nothing stored"
                    )
                if digest.hexdigest() != expected:
                    return _json_error(
                        400,
                        "checksum_mismatch",
                        f"SHA-256 of the {size} bytes received is {digest.hexdigest()}, the "
                        f"header says {expected}; re-send the file; nothing was stored",
                    )
                fh.flush()
                await asyncio.get_running_loop().run_in_executor(None, os.fsync, fh.fileno())
            lock = self._locks.setdefault(name, asyncio.Lock())
            async with lock:
                existing = self.images.get(name)
                if existing is not None:
                    if existing["sha256"] != expected:
                        msg = f"image {name} was registered meanwhile with another checksum"
                        return _json_error(409, "conflict", msg)
                    return web.json_response(existing, status=200)
                os.chmod(tmp, 0o644)
                os.replace(tmp, os.path.join(self.root, name))
                renamed = True
                await asyncio.get_running_loop().run_in_executor(None, _fsync_dir, self.root)
                rec = {"name": name, "size": size, "sha256": expected, "registered": time.time()}
                self._append_log(rec)
                self._register(rec)
            log.info("registered %s (%d bytes)", name, size)
            return web.json_response(rec, status=201)
        finally:
            if not renamed:
                with contextlib.suppress(OSError):
                    os.remove(tmp)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


async def serve(root, host="127.0.0.1", port=8765, token=None, ready=None, stop=None):
    """Run the distributor until ``stop`` is set (or forever).

    Parameters
    ----------
    root : str or os.PathLike
        Image directory.
    host : str
        Interface to bind; loopback by default.
    port : int
        TCP port; 0 picks a free one.
    token : str, optional
        Upload token; default ``$APDASK_DISTRIBUTOR_TOKEN``.
    ready : callable, optional
        Called with the ``http://host:port`` URL once listening.
    stop : asyncio.Event, optional
        Set it to shut the server down.

    Raises
    ------
    ConfigurationError
        If no token is configured.
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    service = DistributorService(root, token)
    runner = web.AppRunner(service.app(), handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    url = f"http://{host}:{bound[1]}"
    if ready is not None:
        ready(url)
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        service.wake_all()
        await runner.cleanup()


def run_server(root, host="127.0.0.1", port=8765, token=None):
    """Blocking entry point of ``apdask distributor serve``; prints the URL when ready."""
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        DistributorService(root, token)  # raises the ConfigurationError

    def ready(url):
        print(f"apdask distributor serving {os.path.abspath(root)} at {url}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(root, host, port, token, ready=ready))


class BackgroundServer:
    """A distributor running on its own event loop in a daemon thread (tests, demos).

    Parameters
    ----------
    root : str or os.PathLike
    token : str
    host : str
    port : int
        0 picks a free port; pass the old port to "restart" on the same address.

    Examples
    --------
    >>> with BackgroundServer(tmp, token="t") as srv:  # doctest: +SKIP
    ...     HttpDistributor(srv.url).get("a.fits", timeout=5)
    """

    def __init__(self, root, token, host="127.0.0.1", port=0):
        self.root, self.token, self.host, self.port = root, token, host, port
        self.url = None
        self._thread = None
        self._loop = None
        self._stop = None

    def start(self, timeout=10.0):
        """Start serving; returns once the port is bound."""
        started = threading.Event()
        errors = []

        def ready(url):
            self.url = url
            self.port = int(url.rsplit(":", 1)[1])
            started.set()

        async def main():
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.root, self.host, self.port, self.token, ready=ready, stop=self._stop)

        def target():
            try:
                asyncio.run(main())
            except BaseException as e:  # report startup failures to start()
                errors.append(e)
                started.set()

        self._thread = threading.Thread(target=target, name="apdask-distributor", daemon=True)
        self._thread.start()
        started.wait(timeout)
        if errors:
            raise errors[0]
        if self.url is None:
            msg = f"distributor did not start within {timeout} s"
            raise RuntimeError(msg)
        return self

    def stop(self):
        """Shut the server down (waiters get 503, connections close)."""
        if self._thread is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._thread = None

    def __enter__(self):
        return self.start() if self._thread is None else self

    def __exit__(self, *exc):
        self.stop()
