"""Request handlers of the distributor server (see :mod:`apdask.services.distributor_server`).

Re-exported by :mod:`apdask.services.distributor_server`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import tempfile
import threading
import time
from typing import Any

from aiohttp import web

from apdask.core.files import fsync_dir
from apdask.exceptions import ConfigurationError
from apdask.io.distributor import TOKEN_ENV, check_image_name
from apdask.services._dist_limits import ServerLimits, _ConnectionGuard
from apdask.services._dist_storage import (
    _CHUNK,
    _UPLOAD_PREFIX,
    _json_error,
    _parse_checksum,
    append_registry,
    load_registry,
    no_room,
    storage_error,
)

__all__ = ["MAX_WAIT_S", "DistributorService"]

#: The distributor's logger, whichever of its modules logs.
log = logging.getLogger("apdask.services.distributor_server")

#: Longest long-poll a single request may ask for; clients re-poll for longer waits.
MAX_WAIT_S = 300.0


class DistributorService:
    """State and request handlers of one distributor root.

    Parameters
    ----------
    root : str or os.PathLike
        Directory where registered images live (created if missing).
    token : str
        Bearer token that uploads must present.
    max_bytes : int, optional
        Largest accepted upload (default ``limits.max_upload_bytes``).
    limits : ServerLimits, optional
        Default ``ServerLimits.from_config()``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        token: str,
        max_bytes: int | None = None,
        limits: ServerLimits | None = None,
    ) -> None:
        if not token:
            msg = (
                f"the distributor needs an upload token; set {TOKEN_ENV} in the "
                "environment (e.g. export APDASK_DISTRIBUTOR_TOKEN=$(openssl rand -hex 16))"
            )
            raise ConfigurationError(msg)
        self.root = os.path.abspath(os.fspath(root))
        os.makedirs(self.root, exist_ok=True)
        self._token = token.encode()
        self.limits = limits if limits is not None else ServerLimits.from_config()
        self.max_bytes = int(max_bytes if max_bytes is not None else self.limits.max_upload_bytes)
        self.guard: _ConnectionGuard | None = None  # set by serve()
        # name -> {"name", "size", "sha256", "registered"}
        self.images = load_registry(self.root)
        self._waiters: dict[str, list[Any]] = {}  # name -> [asyncio.Event, n waiters]
        self.n_waiting = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._closing = False

    # ----------------------------------------------------------------------------------
    # Registry

    def _register(self, rec):
        self.images[rec["name"]] = rec
        slot = self._waiters.pop(rec["name"], None)
        if slot is not None:
            slot[0].set()

    def wake_all(self) -> None:
        """Wake every waiter (they answer 503 so clients retry); used at shutdown."""
        self._closing = True
        for event, _ in self._waiters.values():
            event.set()
        self._waiters.clear()

    # ----------------------------------------------------------------------------------
    # Handlers

    def app(self, guard: _ConnectionGuard | None = None) -> web.Application:
        """The aiohttp application serving this root (``guard``: see :func:`serve`)."""
        middlewares = []
        if guard is not None:

            @web.middleware
            async def head_received(request, handler):
                proto = guard.by_handler.get(request.protocol)
                if proto is not None:
                    proto.head_received()
                return await handler(request)

            middlewares.append(head_received)
        app = web.Application(middlewares=middlewares)
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
        full = no_room(self.root, request.content_length)
        if full is not None:
            return full
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

    async def health(self, request: web.Request) -> web.StreamResponse:
        """``GET /health``."""
        return web.json_response(
            {
                "status": "ok",
                "root": self.root,
                "images": len(self.images),
                "waiting": self.n_waiting,
                "threads": threading.active_count(),
                **(self.guard.stats() if self.guard is not None else {}),
            }
        )

    async def index(self, request: web.Request) -> web.StreamResponse:
        """``GET /images``: every registered image, oldest registration first."""
        recs = sorted(self.images.values(), key=lambda r: (r["registered"], r["name"]))
        return web.json_response({"count": len(recs), "images": recs})

    async def get(self, request: web.Request) -> web.StreamResponse:
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

    async def _read_body(self, request, fh, digest):
        """Stream the body into ``fh``; returns ``(size, None)`` or ``(size, error response)``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.upload_timeout
        size = 0
        while True:
            budget = min(self.limits.body_timeout, deadline - loop.time())
            try:
                chunk = await asyncio.wait_for(request.content.readany(), max(budget, 0.0))
            except TimeoutError:
                log.warning(
                    "upload from %s stalled after %d bytes; abandoned", request.remote, size
                )
                resp = _json_error(
                    408,
                    "body_timeout",
                    f"upload stalled after {size} bytes (no data for {self.limits.body_timeout:g}"
                    f" s, or over {self.limits.upload_timeout:g} s in all); nothing was stored",
                )
                resp.force_close()
                return size, resp
            if not chunk:
                return size, None
            size += len(chunk)
            if size > self.max_bytes:
                return size, _json_error(413, "too_large", f"upload exceeds {self.max_bytes} B")
            digest.update(chunk)
            fh.write(chunk)

    async def put(self, request: web.Request) -> web.StreamResponse:
        """``PUT /images/{name}``: authenticated, checksummed, atomic upload."""
        checked = self._check_upload(request)
        if isinstance(checked, web.StreamResponse):
            return checked
        name, expected, length = checked
        existing = self.images.get(name)
        if existing is not None and existing["sha256"] != expected:
            return _json_error(
                409,
                "conflict",
                f"image {name} is already registered with another checksum; raw images "
                "are immutable, upload under a new name",
            )
        return await self._store(request, name, expected, length)

    def _check_upload(
        self, request: web.Request
    ) -> web.StreamResponse | tuple[str, str, int | None]:
        """``(name, sha256, Content-Length)`` of an acceptable upload, else the refusal."""
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
        full = no_room(self.root, length)
        if full is not None:
            return full
        return name, expected, length

    async def _store(
        self, request: web.Request, name: str, expected: str, length: int | None
    ) -> web.StreamResponse:
        """Stream the body to a hidden temporary file, verify it, then register it."""
        loop = asyncio.get_running_loop()
        tmp = None
        renamed = False
        size = 0
        try:
            fd, tmp = tempfile.mkstemp(prefix=_UPLOAD_PREFIX, suffix=".part", dir=self.root)
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as fh:
                size, error = await self._read_body(request, fh, digest)
                if error is not None:
                    return error
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
                await loop.run_in_executor(None, os.fsync, fh.fileno())
            resp, renamed = await self._register_upload(name, tmp, expected, size)
            return resp
        except OSError as e:
            return storage_error(self.root, name, size, length, e)
        finally:
            if not renamed and tmp is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp)

    async def _register_upload(
        self, name: str, tmp: str, expected: str, size: int
    ) -> tuple[web.StreamResponse, bool]:
        """Rename a verified upload into place and log it; ``(response, renamed)``."""
        loop = asyncio.get_running_loop()
        final = os.path.join(self.root, name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            existing = self.images.get(name)
            if existing is not None:
                if existing["sha256"] != expected:
                    msg = f"image {name} was registered meanwhile with another checksum"
                    return _json_error(409, "conflict", msg), False
                return web.json_response(existing, status=200), False
            os.chmod(tmp, 0o644)
            os.replace(tmp, final)
            rec = {"name": name, "size": size, "sha256": expected, "registered": time.time()}
            try:
                sync = functools.partial(fsync_dir, self.root, strict=True)
                await loop.run_in_executor(None, sync)
                append_registry(self.root, rec)
            except OSError:
                with contextlib.suppress(OSError):  # not registered: the file must go
                    os.remove(final)
                raise
            self._register(rec)
        log.info("registered %r (%d bytes)", name, size)
        return web.json_response(rec, status=201), True
