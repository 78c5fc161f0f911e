"""Named fault-injection points: test-only crashes at the steps that must survive them.

A few steps of a CCD's output path call :func:`fault_point` with a name.  When the
environment variable ``APDASK_FAULT`` holds that name, the process kills itself with
``SIGKILL`` there, as a power cut or the OOM killer would: no ``finally`` block, no
flush, no exit handler runs.  The fault-injection suite (``tests/faults/``) sets it
for a ``process-ccd`` subprocess, re-runs the CCD without it and checks that nothing
was lost or duplicated.

It is for tests only: never set ``APDASK_FAULT`` in production.  Unset (the normal
case) a fault point costs one environment look-up.

The points (see ``docs/alerts.md``, "Zero loss across a crash"):

``ppdb-committed``
    After the CCD's PPDB transaction committed, before any alert is sent.
``kafka-partial``
    The Kafka sink has produced half of the CCD's alerts and had them acknowledged.
``spool-partial``
    The spool file's header and first alert are written to its temporary file,
    which is not yet renamed.
``sink-written``
    The sink returned (alerts acknowledged, spooled or written to the file), before
    the CCD's done record.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

__all__ = ["FAULT_ENV", "FAULT_POINTS", "fault_point"]

FAULT_ENV = "APDASK_FAULT"
FAULT_POINTS = ("ppdb-committed", "kafka-partial", "spool-partial", "sink-written")


def fault_point(name: str, prepare: Callable[[], object] | None = None) -> None:
    """Kill this process with ``SIGKILL`` if ``$APDASK_FAULT`` is ``name`` (tests only).

    Parameters
    ----------
    name : str
        One of :data:`FAULT_POINTS`.
    prepare : callable, optional
        Called just before the kill, e.g. to flush a partial file to the OS so the
        crash leaves it behind as a real one would.
    """
    if os.environ.get(FAULT_ENV) != name:
        return
    if prepare is not None:
        prepare()
    sys.stderr.write(f"apdask: fault injected: {name} (SIGKILL)\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
