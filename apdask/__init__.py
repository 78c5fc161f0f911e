"""apdask: Rubin-style Alert Production (DMTN-092) on Dask.

The names below are the notebook API: run a visit, open a repository and the PPDB,
read alerts, get a camera, and the records the pipeline's steps exchange.  Everything
else lives in the subpackages, in data-flow order (see ``docs/architecture.md``)::

    core → _kernels → io → pipeline (stages, graph, run) → ppdb / alerts → services, tools, cli

Example
-------
>>> import apdask
>>> nv = apdask.NextVisit.from_json("repo/visits/visit_1000.json")  # doctest: +SKIP
>>> report = apdask.run_visit(nv, repo="repo")                         # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("apdask")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

#: Where each name of the notebook API lives.  They are imported on first use (PEP 562),
#: so that ``import apdask.cli`` or ``apdask.core`` does not import the whole pipeline:
#: a batch ``process-ccd`` pays for what it uses (issue 18, start-up).
_LAZY = {
    "read_alerts": "apdask.alerts",
    "validate_alerts": "apdask.alerts",
    "Locations": "apdask.config",
    "PipelineConfig": "apdask.config",
    "get_camera": "apdask.core.camera",
    "Exposure": "apdask.core.exposure",
    "Association": "apdask.core.records",
    "CcdReport": "apdask.core.records",
    "Fetched": "apdask.core.records",
    "Measurement": "apdask.core.records",
    "PpdbHistory": "apdask.core.records",
    "Prefetch": "apdask.core.records",
    "RawHeader": "apdask.core.records",
    "Subtraction": "apdask.core.records",
    "VisitReport": "apdask.core.records",
    "ApdaskError": "apdask.exceptions",
    "Butler": "apdask.io.butler",
    "build_visit_graph": "apdask.pipeline.graph",
    "NextVisit": "apdask.pipeline.nextvisit",
    "ensure_ppdb": "apdask.pipeline.run",
    "local_cluster": "apdask.pipeline.run",
    "run_visit": "apdask.pipeline.run",
    "Ppdb": "apdask.ppdb",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'apdask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from apdask.alerts import read_alerts, validate_alerts
    from apdask.config import Locations, PipelineConfig
    from apdask.core.camera import get_camera
    from apdask.core.exposure import Exposure
    from apdask.core.records import (
        Association,
        CcdReport,
        Fetched,
        Measurement,
        PpdbHistory,
        Prefetch,
        RawHeader,
        Subtraction,
        VisitReport,
    )
    from apdask.exceptions import ApdaskError
    from apdask.io.butler import Butler
    from apdask.pipeline.graph import build_visit_graph
    from apdask.pipeline.nextvisit import NextVisit
    from apdask.pipeline.run import ensure_ppdb, local_cluster, run_visit
    from apdask.ppdb import Ppdb

__all__ = [
    "ApdaskError",
    "Association",
    "Butler",
    "CcdReport",
    "Exposure",
    "Fetched",
    "Locations",
    "Measurement",
    "NextVisit",
    "PipelineConfig",
    "Ppdb",
    "PpdbHistory",
    "Prefetch",
    "RawHeader",
    "Subtraction",
    "VisitReport",
    "__version__",
    "build_visit_graph",
    "ensure_ppdb",
    "get_camera",
    "local_cluster",
    "read_alerts",
    "run_visit",
    "validate_alerts",
]
