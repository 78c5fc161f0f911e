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
import contextlib
import logging
import os
import threading
from collections.abc import Callable

from aiohttp import web

from apdask.io.distributor import TOKEN_ENV
from apdask.services._dist_limits import (
    ServerLimits,
    _ConnectionGuard,
    _GuardedProtocol,
    _handler_kwargs,
    raise_open_files_limit,
)
from apdask.services._dist_logs import LogAggregator
from apdask.services._dist_service import MAX_WAIT_S, DistributorService
from apdask.services._dist_storage import REGISTRY_FILE

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


async def serve(
    root: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    ready: Callable[[str], object] | None = None,
    stop: asyncio.Event | None = None,
    limits: ServerLimits | None = None,
) -> None:
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
        service.app(guard),
        handler_cancellation=True,
        shutdown_timeout=1.0,
        **_handler_kwargs(limits),
    )
    server = None
    flusher = None
    try:
        await runner.setup()
        server = await loop.create_server(
            lambda: _GuardedProtocol(guard, runner.server),
            host,
            port,
            reuse_address=True,
            backlog=guard.backlog,
        )
        bound = server.sockets[0].getsockname()
        url = f"http://{host}:{bound[1]}"
        flusher = asyncio.ensure_future(_flush_logs(logs, limits.log_window))
        _log_serving(service.root, url, limits, guard)
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


async def _flush_logs(logs: LogAggregator, window: float) -> None:
    """Log the suppressed-message counts every ``window`` seconds (until cancelled)."""
    while True:
        await asyncio.sleep(window)
        logs.flush()


def _log_serving(root: str, url: str, limits: ServerLimits, guard: _ConnectionGuard) -> None:
    log.info(
        "serving %s at %s: header timeout %g s, body timeout %g s, %d connections (%d per address)",
        root,
        url,
        limits.header_timeout,
        limits.body_timeout,
        guard.max_total,
        guard.max_per_ip,
    )


def run_server(
    root: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    limits: ServerLimits | None = None,
) -> None:
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

    def __init__(
        self,
        root: str | os.PathLike[str],
        token: str,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServerLimits | None = None,
    ) -> None:
        self.root, self.token, self.host, self.port = root, token, host, port
        self.limits = limits
        self.url: str | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def start(self, timeout: float = 10.0) -> BackgroundServer:
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
            await serve(
                self.root,
                self.host,
                self.port,
                self.token,
                ready=ready,
                stop=self._stop,
                limits=self.limits,
            )

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

    def stop(self) -> None:
        """Shut the server down (waiters get 503, connections close)."""
        if self._thread is not None and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
        self._thread = None

    def __enter__(self) -> BackgroundServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
