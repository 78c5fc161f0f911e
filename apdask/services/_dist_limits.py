"""Connection limits of the distributor server: what one client, or all, may cost it.

:class:`ServerLimits` holds the limits (from ``apdask.distributor.*``); the private
connection guard admits connections, caps them per address and in all, and drops a
connection that does not send its request head in time.  Re-exported by
:mod:`apdask.services.distributor_server`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import inspect
import json
import logging
from typing import Any

from aiohttp.web_protocol import RequestHandler

from apdask import config
from apdask.exceptions import ConfigurationError

__all__ = ["ServerLimits", "raise_open_files_limit"]

#: The distributor's logger, whichever of its modules logs.
log = logging.getLogger("apdask.services.distributor_server")

#: A connection waiting for its request head this long (s) may be dropped for a new one.
_EVICT_MIN_AGE = 1.0


def _open_files_limit():
    """The soft RLIMIT_NOFILE, or None if unlimited or unknown."""
    try:
        # POSIX only: the resource module does not exist on Windows
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


def raise_open_files_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (what a server process should do)."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        # POSIX only: the resource module does not exist on Windows
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
    def from_config(cls, **overrides: float) -> ServerLimits:
        """Limits from ``apdask.distributor.*``, with explicit ``overrides`` first.

        Raises
        ------
        ConfigurationError
            A value that is not a positive number.
        """
        values: dict[str, Any] = {}
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
        self.per_ip: collections.Counter[str] = collections.Counter()
        self.pending = collections.OrderedDict()  # protocols still waiting for a head
        self.pending_ip = {}  # address -> OrderedDict of its protocols awaiting a head
        self.by_handler = {}
        self.counts: collections.Counter[str] = collections.Counter()

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
            log.warning(
                "closed a connection from %s that sent no complete request head within %g s",
                self.ip,
                self._guard.limits.header_timeout,
            )
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
