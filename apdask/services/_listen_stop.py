"""The listener's stop: SIGTERM/SIGINT or a ``threading.Event``, then a bounded grace.

See :func:`apdask.services.listen.listen` and docs/operations.md ("Stopping").
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

__all__ = ["StopRequest", "install_signals"]

log = logging.getLogger("apdask.services.listen")


class StopRequest:
    """A stop request (signal or ``stop_event``) and the grace that follows it."""

    def __init__(self, event: threading.Event, grace: float):
        self.event = event
        self.grace = grace
        self.since: float | None = None
        self.now = False  # a second signal: abandon at once

    def request(self, signum: int) -> None:
        """From the signal handler: the first signal starts the grace, a second ends it."""
        if self.event.is_set():
            self.now = True
            log.warning("signal %d again: abandoning the visits in flight now", signum)
        else:
            log.warning(
                "signal %d: finishing the visits in flight (at most %g s), then exiting",
                signum,
                self.grace,
            )
        self.since = self.since or time.monotonic()
        self.event.set()

    @property
    def requested(self) -> bool:
        return self.event.is_set()

    def expired(self) -> bool:
        """True once a stop was requested and its grace has run out."""
        if not self.event.is_set():
            return False
        if self.since is None:  # set by the caller's thread: noticed now
            self.since = time.monotonic()
        return self.now or time.monotonic() - self.since >= self.grace


def install_signals(stop: StopRequest) -> Callable[[], None]:
    """SIGTERM and SIGINT call ``stop.request``; returns the function that restores the
    previous handlers (a no-op outside the main thread, where signals cannot be caught)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def handler(signum, _frame):
        stop.request(signum)

    for s in old:
        signal.signal(s, handler)

    def restore():
        for s, h in old.items():
            signal.signal(s, h)

    return restore
