"""What a person sees while a visit runs and when it ends.

* :class:`VisitProgress`: per-CCD progress on stderr, a bar on a terminal and one
  plain line per CCD otherwise (logs, CI, pipes);
* :func:`visit_table`: the short end-of-visit table;
* :func:`compile_note`: the note that first-use compilation is under way.

The full report is JSON in a file (:func:`write_report`); the table is for reading.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from apdask._kernels.fused import compiled_on_disk
from apdask.core import jsonsafe
from apdask.core.files import atomic_write

__all__ = ["VisitProgress", "compile_note", "visit_table", "write_report"]


class VisitProgress:
    """Callback for :func:`apdask.pipeline.run.run_visit` (``on_ccd``): one CCD done.

    Parameters
    ----------
    visit : int
    total : int
        CCDs to process.
    stream : file, optional
        Default ``sys.stderr``.
    bar : bool, optional
        Draw a bar (default: when ``stream`` is a terminal); else one line per CCD.
    """

    def __init__(
        self, visit: int, total: int, stream: TextIO | None = None, bar: bool | None = None
    ) -> None:
        self.visit, self.total = visit, total
        self.stream = sys.stderr if stream is None else stream
        self.bar = bool(getattr(self.stream, "isatty", lambda: False)()) if bar is None else bar
        self.done = self.alerts = self.failed = 0
        self.t0 = time.monotonic()

    def __call__(self, ccd: Mapping[str, Any]) -> None:
        """Record one CCD's report entry and show it."""
        self.done += 1
        self.alerts += int(ccd.get("n_alerts", 0))
        self.failed += bool(ccd.get("error"))
        elapsed = time.monotonic() - self.t0
        if self.bar:
            width = 30
            fill = int(width * self.done / max(self.total, 1))
            line = (
                f"\rvisit {self.visit} [{'#' * fill}{'.' * (width - fill)}] "
                f"{self.done}/{self.total} CCDs, {self.alerts} alerts, {self.failed} failed, "
                f"{elapsed:.0f} s"
            )
            self.stream.write(line + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(f"visit {self.visit} {self.done}/{self.total} {_ccd_line(ccd)}\n")
        self.stream.flush()


def _ccd_line(ccd: Mapping[str, Any]) -> str:
    name = ccd.get("detector", "?")
    if ccd.get("error"):
        return (
            f"CCD {name}: failed, {ccd.get('error_type', 'error')} "
            f"(exit {ccd.get('exit_code', '?')})"
        )
    lat = ccd.get("latency_s")
    when = f", alerts {lat:.1f} s after the image arrived" if isinstance(lat, int | float) else ""
    return f"CCD {name}: {ccd.get('n_alerts', 0)} alerts{when}"


def _fmt(v: Any, spec: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec or ".1f")
    return str(v)


def visit_table(report: Mapping[str, Any], *, report_path: str | None = None) -> str:
    """The end-of-visit table: one line per CCD and the totals, as plain text."""
    ccds: Sequence[Mapping[str, Any]] = report.get("ccds", [])
    head = (
        f"visit {report.get('visit')}  {len(ccds)} CCDs processed, "
        f"{len(report.get('skipped', []))} already done, {report.get('n_alerts', 0)} alerts, "
        f"{len(report.get('failed', []))} failed, wall {_fmt(report.get('wall_s'))} s"
    )
    rows = [("CCD", "sources", "alerts", "stored", "latency_s", "QA", "error")]
    for c in ccds:
        qa = (c.get("qa") or {}).get("status", "-")
        err = f"{c.get('error_type', 'error')} (exit {c.get('exit_code', '?')})" if c.get(
            "error") else ""  # fmt: skip
        rows.append((str(c.get("detector", "?")), _fmt(c.get("n_sources")),
                     _fmt(c.get("n_alerts")), "yes" if c.get("stored") else "no",
                     _fmt(c.get("latency_s")), str(qa), err))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head]
    lines += ["  " + "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]  # fmt: skip
    if report.get("dashboard"):
        lines.append(f"dashboard: {report['dashboard']}")
    if report_path:
        lines.append(f"full report (JSON): {report_path}")
    return "\n".join(lines)


def write_report(report: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    """Write ``report`` as strict JSON (``null`` for NaN), atomically; the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(p, jsonsafe.dumps(report) + "\n")
    return str(p)


def compile_note() -> str | None:
    """A line to show before a run when the numba kernels are not compiled on disk yet."""
    if compiled_on_disk():
        return None
    return (
        "apdask: first use: compiling the numba kernels (about a minute; cached on disk, "
        "so later runs start at once)"
    )
