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

from importlib.metadata import PackageNotFoundError, version

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

try:
    __version__ = version("apdask")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

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
