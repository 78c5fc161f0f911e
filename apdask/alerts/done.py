"""Done records: which CCDs a sink has fully received, so a re-run knows what is left.

A CCD is *done* for a sink when its PPDB rows are committed **and** its alerts were
delivered (Kafka acknowledged them), durably spooled, or written (file sink).  The
output step writes the CCD's done record after both, atomically
(:func:`apdask.core.files.atomic_write`): a small JSON file

    <done root>/visit_<visit>/<visit>_<detector>.json

whose root is tied to the sink (:attr:`FileSink.done <apdask.alerts.sinks.FileSink>`:
``<alert dir>/done``; the Kafka sink: ``<spool_dir>/<topic>/done``), so it works for
every sink and writes nowhere else.  :func:`apdask.pipeline.run.pending_detectors`
re-runs every CCD without one; a CCD whose rows are committed but whose record is
missing (a crash in between) is re-sent from its stored rows without being stored
again (``docs/alerts.md``, "Zero loss across a crash").
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from apdask.core.files import atomic_write, fsync_dir, remove_stale_temps

__all__ = ["AckJournal", "DoneRecords"]

log = logging.getLogger(__name__)


class DoneRecords:
    """The done records of one sink, below ``root``.

    Parameters
    ----------
    root : str or os.PathLike
        Directory of the records (created on the first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"DoneRecords({str(self.root)!r})"

    def path(self, visit: int, detector: int) -> Path:
        """The record file of one CCD of one visit."""
        v, d = int(visit), int(detector)
        return self.root / f"visit_{v}" / f"{v}_{d}.json"

    def read(self, visit: int, detector: int) -> dict[str, Any] | None:
        """The CCD's record, or None if it has none (an unreadable one counts as none)."""
        path = self.path(visit, detector)
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:  # atomic writes make this a foreign file
            log.warning("ignoring unreadable done record %s (%s); the CCD is re-sent", path, err)
            return None
        return record if isinstance(record, dict) else None

    def write(self, visit: int, detector: int, **fields: Any) -> Path:
        """Record the CCD as done (atomic and durable); returns the record's path.

        Parameters
        ----------
        visit, detector : int
        **fields
            JSON-friendly facts to keep: counts, the spool file, ...
        """
        path = self.path(visit, detector)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"visit": int(visit), "detector": int(detector), "done_at": time.time(), **fields}
        atomic_write(path, json.dumps(record, indent=1, default=str) + "\n")
        remove_stale_temps(path)  # of a write of this record that a crash interrupted
        return path

    def remove(self, visit: int, detector: int) -> bool:
        """Forget the CCD's record (before its rows are replaced); True if there was one."""
        path = self.path(visit, detector)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True


class AckJournal:
    """The ``diaSourceId`` s a broker has acknowledged for each CCD not yet done.

    One line per acknowledged alert in ``<root>/visit_<visit>/<visit>_<detector>.ids``,
    appended as each delivery report arrives (an ``O_APPEND`` write, which a killed
    process does not lose).  A re-run of the CCD reads it and does not send those
    alerts again, so a crash in the middle of a delivery leaves no duplicate on the
    topic, save an alert whose report had not reached the producer yet.  Removed once
    the CCD's done record is written.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, visit: int, detector: int) -> Path:
        """The journal file of one CCD."""
        return self.root / f"visit_{int(visit)}" / f"{int(visit)}_{int(detector)}.ids"

    def read(self, visit: int, detector: int) -> set[int]:
        """The acknowledged ids of one CCD (empty if none)."""
        try:
            text = self.path(visit, detector).read_text()
        except FileNotFoundError:
            return set()
        return {int(line) for line in text.split() if line.isdigit()}

    def open(self, visit: int, detector: int) -> _Appender:
        """An appender for one CCD's acknowledgements (use as a context manager)."""
        return _Appender(self.path(visit, detector))

    def remove(self, visit: int, detector: int) -> None:
        """Forget one CCD's journal (its done record is written, or its rows replaced)."""
        self.path(visit, detector).unlink(missing_ok=True)


class _Appender:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def add(self, dia_source_id: int) -> None:
        if self.fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self.fd, f"{int(dia_source_id)}\n".encode())

    def __enter__(self) -> _Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
