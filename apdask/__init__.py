"""apdask: Rubin-style Alert Production (DMTN-092) on Dask.

The public entry points are :class:`NextVisit` and :func:`build_visit_graph`; the
stage modules (``isr``, ``templates``, ``subtract``, ``detect``, ``associate``,
``ppdb``, ``alerts``) can be used on their own.
"""

from __future__ import annotations

from apdask import config  # noqa: F401  (registers the apdask.yaml defaults with dask.config)
from apdask.core.camera import get_camera
from apdask.exceptions import ApdaskError
from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.nextvisit import NextVisit

__all__ = ["ApdaskError", "NextVisit", "build_visit_graph", "get_camera", "__version__"]

__version__ = "0.1.0"
