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

Hostile or broken clients are bounded by :class:`ServerLimits` (``apdask.distributor.*``
in ``apdask.yaml``): a connection must send its request head within
``header_timeout`` (a half-open or idle connection is closed), an upload body may not
stall for ``body_timeout`` (408), connections per remote address and in all are
capped (the oldest connection still waiting for its head is dropped first, else the
new one gets 503), request heads and bodies have size limits, and repeated log
messages are counted and summarised (:class:`LogAggregator`).  A full disk answers
507 with the reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import errno
import hashlib
import hmac
import inspect
import json
import logging
import os
import tempfile
import threading
import time

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from apdask import config
from apdask.exceptions import ConfigurationError
from apdask.io.distributor import NAME_PATTERN, TOKEN_ENV, check_image_name

__all__ = [
    "DistributorService",
    "serve",
    "run_server",
    "BackgroundServer",
    "ServerLimits",
    "LogAggregator",
    "raise_open_files_limit",
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


#: A connection waiting for its request head this long (s) may be dropped for a new one.
_EVICT_MIN_AGE = 1.0
#: Free space (bytes) an upload must leave on the root's file system.
_HEADROOM = 1 << 20


def _free_bytes(path):
    """Bytes available to this user on ``path``'s file system (None if unknown)."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def _open_files_limit():
    """The soft RLIMIT_NOFILE, or None if unlimited or unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit():
    """Raise the soft RLIMIT_NOFILE to the hard one (what a server process should do)."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, 65536)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_FLOAT_LIMITS = ("header_timeout", "body_timeout", "upload_timeout", "log_window")


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one client, or all of them together, may cost the distributor.

    Defaults come from ``apdask.distributor.<field>`` (``apdask.yaml``; e.g.
    ``DASK_APDASK__DISTRIBUTOR__HEADER_TIMEOUT=5``).

    Attributes
    ----------
    header_timeout : float
        Seconds a connection may take to send its complete request head; a half-open
        or idle connection is then closed.  Also the idle limit of a kept-alive one.
    body_timeout : float
        Seconds an upload may go without a body byte; then 408 and nothing stored.
    upload_timeout : float
        Seconds for a whole upload body.
    max_connections : int
        Open connections in all; capped at half the open-file limit less a reserve
        (a connection may hold its socket and an image file).
    max_connections_per_ip : int
        Open connections from one remote address.
    max_upload_bytes : int
        Largest upload (413).
    max_header_bytes : int
        Longest request line or header field (400).
    max_headers : int
        Most header fields in one request (400).
    log_window : float
        Seconds over which repeated log messages are counted.
    log_burst : int
        Messages of one kind logged per window before the rest are only counted.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    upload_timeout: float = 900.0
    max_connections: int = 4096
    max_connections_per_ip: int = 1024
    max_upload_bytes: int = 4 << 30
    max_header_bytes: int = 8190
    max_headers: int = 64
    log_window: float = 10.0
    log_burst: int = 5

    @classmethod
    def from_config(cls, **overrides):
        """Limits from ``apdask.distributor.*``, with explicit ``overrides`` first.

        Raises
        ------
        ConfigurationError
            A value that is not a positive number.
        """
        values = {}
        for field in dataclasses.fields(cls):
            value = config.get(f"distributor.{field.name}", overrides.get(field.name))
            kind = float if field.name in _FLOAT_LIMITS else int
            try:
                ok = not isinstance(value, bool) and kind(value) > 0 and kind(value) < float("inf")
            except (TypeError, ValueError, OverflowError):
                ok = False
            if not ok:
                env = f"DASK_APDASK__DISTRIBUTOR__{field.name.upper()}"
                msg = (
                    f"apdask.distributor.{field.name} must be a finite number > 0, got "
                    f"{value!r}; e.g. {env}={getattr(cls, field.name)}"
                )
                raise ConfigurationError(msg)
            values[field.name] = kind(value)
        return cls(**values)


class LogAggregator(logging.Filter):
    """Logs at most ``burst`` records of one kind per ``window`` seconds, then counts.

    A kind is (logger, level, message template, exception type), so a flood of bad
    requests costs a few lines per window, not one (with a traceback) per request.
    The count of what was suppressed is logged once the window has passed, as
    "N more log messages like ... were suppressed".  Records below WARNING of the
    distributor's own logger (one per registered image) are not limited.

    Parameters
    ----------
    window : float
        Seconds.
    burst : int
        Records of a kind logged per window.
    max_kinds : int
        Kinds tracked at once; more share one "(other)" kind.
    """

    LOGGERS = ("aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal", "asyncio")

    def __init__(self, window=10.0, burst=5, max_kinds=256, clock=time.monotonic):
        super().__init__()
        self.window, self.burst, self.max_kinds = float(window), int(burst), int(max_kinds)
        self._clock = clock
        self._kinds = {}  # key -> [window start, logged, suppressed]
        self._lock = threading.Lock()
        self.suppressed = 0

    def install(self):
        """Attach to the distributor's and aiohttp's/asyncio's loggers."""
        for name in (*self.LOGGERS, log.name):
            logging.getLogger(name).addFilter(self)
        return self

    def remove(self):
        """Detach (and log what is still only counted)."""
        for name in (*self.LOGGERS, log.name):
            logging.getLogger(name).removeFilter(self)
        self.flush(force=True)

    @staticmethod
    def _key(record):
        template = record.msg if isinstance(record.msg, str) and record.args else "(message)"
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        return (record.name, record.levelno, str(template)[:200], exc)

    def filter(self, record):
        if getattr(record, "apdask_summary", False):
            return True
        if record.name == log.name and record.levelno < logging.WARNING:
            return True
        key = self._key(record)
        now = self._clock()
        summary = None
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None and len(self._kinds) >= self.max_kinds:
                key = ("(other)", record.levelno, "(message)", "")
                kind = self._kinds.get(key)
            if kind is None:
                kind = self._kinds[key] = [now, 0, 0]
            elif now - kind[0] >= self.window:
                summary = (key, kind[2], now - kind[0]) if kind[2] else None
                kind[:] = [now, 0, 0]
            if kind[1] < self.burst:
                kind[1] += 1
                passed = True
            else:
                kind[2] += 1
                self.suppressed += 1
                passed = False
        if summary is not None:
            self._summarise(*summary)
        return passed

    def flush(self, force=False):
        """Log the counts of windows that have ended (all of them if ``force``)."""
        now = self._clock()
        summaries = []
        with self._lock:
            for key, kind in list(self._kinds.items()):
                if force or now - kind[0] >= self.window:
                    if kind[2]:
                        summaries.append((key, kind[2], now - kind[0]))
                    del self._kinds[key]
        for summary in summaries:
            self._summarise(*summary)

    @staticmethod
    def _summarise(key, n, elapsed):
        name, level, template, exc = key
        like = f"{template!r}" + (f" ({exc})" if exc else "")
        log.log(
            level,
            "%d more log messages like %s from %s were suppressed in the last %.0f s",
            n, like, name, elapsed, extra={"apdask_summary": True},
        )  # fmt: skip


_BUSY = (
    "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    "Retry-After: 1\r\nConnection: close\r\nContent-Length: {n}\r\n\r\n{body}"
)


def _busy_response(why):
    body = json.dumps({"error": "too_many_connections", "message": why})
    return _BUSY.format(n=len(body), body=body).encode()


class _ConnectionGuard:
    """Admission and header deadlines of all connections of one server."""

    def __init__(self, limits, loop):
        self.limits = limits
        self.loop = loop
        budget = _open_files_limit()
        self.max_total = limits.max_connections
        #: Connections accepted per wake-up (asyncio's accept loop); they hold descriptors
        #: before admission sees them, as do refused ones until they are closed.
        self.backlog = 128
        if budget is not None:
            self.backlog = max(8, min(128, budget // 16))
            reserve = 2 * self.backlog + 64  # accepted-not-yet-admitted, the log, ...
            # A connection may hold two descriptors: its socket and an image file.
            self.max_total = max(8, min(self.max_total, (budget - reserve) // 2))
        self.max_per_ip = min(limits.max_connections_per_ip, self.max_total)
        self.open = 0
        self.per_ip = collections.Counter()
        self.pending = collections.OrderedDict()  # protocols still waiting for a head
        self.pending_ip = {}  # address -> OrderedDict of its protocols awaiting a head
        self.by_handler = {}
        self.counts = collections.Counter()

    def stats(self):
        return {
            "connections": self.open,
            "awaiting_head": len(self.pending),
            "max_connections": self.max_total,
            "max_connections_per_ip": self.max_per_ip,
            "refused": self.counts["refused"],
            "dropped_for_newer": self.counts["evicted"],
            "header_timeouts": self.counts["header_timeouts"],
        }

    def _evict_oldest(self, pending):
        for proto in pending:
            if self.loop.time() - proto.since < _EVICT_MIN_AGE:
                return False
            self.counts["evicted"] += 1
            log.warning("dropped a head-less connection from %s for a newer one", proto.ip)
            proto.drop()
            return True
        return False

    def admit(self, proto):
        """Count ``proto`` in, evicting an old head-less connection if needed; else why not."""
        ip = proto.ip
        if self.per_ip[ip] >= self.max_per_ip and not self._evict_oldest(
            self.pending_ip.get(ip, ())
        ):
            why = f"{self.per_ip[ip]} connections open from {ip} (limit {self.max_per_ip})"
        elif self.open >= self.max_total and not self._evict_oldest(self.pending):
            why = f"{self.open} connections open (limit {self.max_total})"
        else:
            self.open += 1
            self.per_ip[ip] += 1
            self.pending[proto] = None
            self.pending_ip.setdefault(ip, collections.OrderedDict())[proto] = None
            return None
        self.counts["refused"] += 1
        log.warning("refused a connection: %s; retry later", why)
        return why + "; retry later"

    def head_received(self, proto):
        if proto in self.pending:
            del self.pending[proto]
            by_ip = self.pending_ip[proto.ip]
            by_ip.pop(proto, None)
            if not by_ip:
                del self.pending_ip[proto.ip]

    def release(self, proto):
        self.head_received(proto)
        self.open -= 1
        self.per_ip[proto.ip] -= 1
        if self.per_ip[proto.ip] <= 0:
            del self.per_ip[proto.ip]

    def close_all(self):
        for proto in list(self.pending):
            proto.drop()


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's request handler behind admission control and a request-head deadline."""

    def __init__(self, guard, factory):
        self._guard = guard
        self._factory = factory
        self.inner = None
        self.transport = None
        self.ip = "unknown"
        self.since = guard.loop.time()
        self._timer = None
        self._counted = False

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.ip = peer[0]
        why = self._guard.admit(self)
        if why is not None:
            transport.write(_busy_response(why))
            transport.close()
            return
        self._counted = True
        self.inner = self._factory()
        self._guard.by_handler[self.inner] = self
        self.inner.connection_made(transport)
        self._timer = self._guard.loop.call_later(
            self._guard.limits.header_timeout, self._head_timeout
        )

    def _head_timeout(self):
        self._timer = None
        if self in self._guard.pending:
            self._guard.counts["header_timeouts"] += 1
            log.warning("closed a connection from %s that sent no complete request head "
                        "within %g s", self.ip, self._guard.limits.header_timeout)  # fmt: skip
            self.drop()

    def head_received(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard.head_received(self)

    def drop(self):
        """Close now (no lingering) and stop counting this connection."""
        self._release()
        if self.transport is not None:
            self.transport.abort()

    def _release(self):
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._counted:
            self._counted = False
            self._guard.release(self)

    def data_received(self, data):
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self):
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self):
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc):
        self._release()
        if self.inner is not None:
            self._guard.by_handler.pop(self.inner, None)
            self.inner.connection_lost(exc)
            self.inner = None


def _handler_kwargs(limits):
    """aiohttp request-handler settings of ``limits`` (those this aiohttp supports)."""
    wanted = {
        # An idle kept-alive connection; a new one is the guard's (this fires just after).
        "keepalive_timeout": limits.header_timeout + 0.25,
        "max_line_size": limits.max_header_bytes,
        "max_field_size": limits.max_header_bytes,
        "max_headers": limits.max_headers,
    }
    accepted = inspect.signature(RequestHandler.__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


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
        Largest accepted upload (default ``limits.max_upload_bytes``).
    limits : ServerLimits, optional
        Default ``ServerLimits.from_config()``.
    """

    def __init__(self, root, token, max_bytes=None, limits=None):
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
        self.guard = None  # the _ConnectionGuard, set by serve()
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
            if not entry.is_file() or not NAME_PATTERN.fullmatch(entry.name) or ".." in entry.name:
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
        """Append ``rec`` (fsync'ed); on failure (e.g. ENOSPC) cut the partial line off."""
        with open(os.path.join(self.root, REGISTRY_FILE), "a") as fh:
            end = fh.seek(0, os.SEEK_END)
            try:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    os.truncate(fh.fileno(), end)
                raise

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

    def app(self, guard=None):
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
        full = self._no_room(request.content_length)
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

    async def health(self, request):
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

    def _no_room(self, length):
        """A 507 response if an upload of ``length`` bytes cannot fit on the disk."""
        if length is None:
            return None
        free = _free_bytes(self.root)
        if free is None or length + _HEADROOM <= free:
            return None
        log.warning("refused an upload of %d bytes: %d bytes free in %s", length, free, self.root)
        return _json_error(
            507,
            "insufficient_storage",
            f"the distributor's disk is full: the upload needs {length} bytes and "
            f"{free} bytes are free under its root; nothing was stored",
            free_bytes=free,
        )

    def _storage_error(self, name, size, length, e):
        """507 (disk full), 503 (out of descriptors) or 500 for an upload that failed to store."""
        of = f" of {length}" if length is not None else ""
        if e.errno in (errno.EMFILE, errno.ENFILE):
            log.warning("out of file descriptors storing %r: %s", name, e)
            resp = _json_error(
                503, "busy", f"the distributor is out of file descriptors ({e.strerror}); retry"
            )
            resp.headers["Retry-After"] = "1"
            return resp
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            free = _free_bytes(self.root)
            log.warning("disk full storing %r after %d bytes: %s", name, size, e)
            return _json_error(
                507,
                "insufficient_storage",
                f"the distributor's disk is full ({e.strerror}; {free} bytes free) while "
                f"storing {name} ({size}{of} bytes received); nothing was stored",
                free_bytes=free,
            )
        log.error("could not store %r: %s", name, e)
        return _json_error(
            500,
            "storage_error",
            f"the distributor could not store {name} ({type(e).__name__}: "
            f"{e.strerror or e}); nothing was stored",
        )

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
                log.warning("upload from %s stalled after %d bytes; abandoned", request.remote,
                            size)  # fmt: skip
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
        full = self._no_room(length)
        if full is not None:
            return full
        existing = self.images.get(name)
        if existing is not None and existing["sha256"] != expected:
            return _json_error(
                409,
                "conflict",
                f"image {name} is already registered with another checksum; raw images "
                "are immutable, upload under a new name",
            )
        loop = asyncio.get_running_loop()
        tmp = None
        final = os.path.join(self.root, name)
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
            lock = self._locks.setdefault(name, asyncio.Lock())
            async with lock:
                existing = self.images.get(name)
                if existing is not None:
                    if existing["sha256"] != expected:
                        msg = f"image {name} was registered meanwhile with another checksum"
                        return _json_error(409, "conflict", msg)
                    return web.json_response(existing, status=200)
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)
                renamed = True
                rec = {"name": name, "size": size, "sha256": expected, "registered": time.time()}
                try:
                    await loop.run_in_executor(None, _fsync_dir, self.root)
                    self._append_log(rec)
                except OSError:
                    renamed = False  # not registered: the file must go
                    with contextlib.suppress(OSError):
                        os.remove(final)
                    raise
                self._register(rec)
            log.info("registered %r (%d bytes)", name, size)
            return web.json_response(rec, status=201)
        except OSError as e:
            return self._storage_error(name, size, length, e)
        finally:
            if not renamed and tmp is not None:
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


async def serve(root, host="127.0.0.1", port=8765, token=None, ready=None, stop=None, limits=None):
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
    limits : ServerLimits, optional
        Default ``ServerLimits.from_config()``.

    Raises
    ------
    ConfigurationError
        If no token is configured, or a limit is invalid.
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    limits = limits if limits is not None else ServerLimits.from_config()
    service = DistributorService(root, token, limits=limits)
    loop = asyncio.get_running_loop()
    guard = _ConnectionGuard(limits, loop)
    service.guard = guard
    logs = LogAggregator(limits.log_window, limits.log_burst).install()
    runner = web.AppRunner(
        service.app(guard), handler_cancellation=True, shutdown_timeout=1.0,
        **_handler_kwargs(limits),
    )  # fmt: skip
    server = None
    flusher = None
    try:
        await runner.setup()
        server = await loop.create_server(
            lambda: _GuardedProtocol(guard, runner.server), host, port,
            reuse_address=True, backlog=guard.backlog,
        )  # fmt: skip
        bound = server.sockets[0].getsockname()
        url = f"http://{host}:{bound[1]}"

        async def flush_logs():
            while True:
                await asyncio.sleep(limits.log_window)
                logs.flush()

        flusher = asyncio.ensure_future(flush_logs())
        log.info(
            "serving %s at %s: header timeout %g s, body timeout %g s, %d connections "
            "(%d per address)", service.root, url, limits.header_timeout,
            limits.body_timeout, guard.max_total, guard.max_per_ip,
        )  # fmt: skip
        if ready is not None:
            ready(url)
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        if flusher is not None:
            flusher.cancel()
        service.wake_all()
        if server is not None:
            server.close()
        guard.close_all()
        await runner.cleanup()
        logs.remove()


def run_server(root, host="127.0.0.1", port=8765, token=None, limits=None):
    """Blocking entry point of ``apdask distributor serve``; prints the URL when ready.

    Raises the soft open-files limit to the hard one first, so that the connection
    limits, not the file descriptors, bound what clients can hold.
    """
    token = token if token is not None else os.environ.get(TOKEN_ENV, "")
    if not token:
        DistributorService(root, token)  # raises the ConfigurationError
    limits = limits if limits is not None else ServerLimits.from_config()
    raise_open_files_limit()

    def ready(url):
        print(f"apdask distributor serving {os.path.abspath(root)} at {url}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(root, host, port, token, ready=ready, limits=limits))


class BackgroundServer:
    """A distributor running on its own event loop in a daemon thread (tests, demos).

    Parameters
    ----------
    root : str or os.PathLike
    token : str
    host : str
    port : int
        0 picks a free port; pass the old port to "restart" on the same address.
    limits : ServerLimits, optional
        Default ``ServerLimits.from_config()``.

    Examples
    --------
    >>> with BackgroundServer(tmp, token="t") as srv:  # doctest: +SKIP
    ...     HttpDistributor(srv.url).get("a.fits", timeout=5)
    """

    def __init__(self, root, token, host="127.0.0.1", port=0, limits=None):
        self.root, self.token, self.host, self.port = root, token, host, port
        self.limits = limits
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
            await serve(self.root, self.host, self.port, self.token, ready=ready,
                        stop=self._stop, limits=self.limits)  # fmt: skip

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
