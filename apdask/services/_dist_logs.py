"""Log aggregation of the distributor server: a flood of bad requests costs a few lines.

Re-exported by :mod:`apdask.services.distributor_server`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LogAggregator"]

#: The distributor's logger, whichever of its modules logs.
log = logging.getLogger("apdask.services.distributor_server")


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

    def __init__(
        self,
        window: float = 10.0,
        burst: int = 5,
        max_kinds: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window, self.burst, self.max_kinds = float(window), int(burst), int(max_kinds)
        self._clock = clock
        self._kinds: dict[tuple[Any, ...], list[float]] = {}  # key -> [start, logged, suppressed]
        self._lock = threading.Lock()
        self.suppressed = 0

    def install(self) -> LogAggregator:
        """Attach to the distributor's and aiohttp's/asyncio's loggers."""
        for name in (*self.LOGGERS, log.name):
            logging.getLogger(name).addFilter(self)
        return self

    def remove(self) -> None:
        """Detach (and log what is still only counted)."""
        for name in (*self.LOGGERS, log.name):
            logging.getLogger(name).removeFilter(self)
        self.flush(force=True)

    @staticmethod
    def _key(record):
        template = record.msg if isinstance(record.msg, str) and record.args else "(message)"
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        return (record.name, record.levelno, str(template)[:200], exc)

    def filter(self, record: logging.LogRecord) -> bool:
        """Pass the record, or count it once its kind has used up this window's burst."""
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

    def flush(self, force: bool = False) -> None:
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
            n,
            like,
            name,
            elapsed,
            extra={"apdask_summary": True},
        )
