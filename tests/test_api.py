"""The notebook API: ``import apdask`` gives the names a notebook user needs."""

from __future__ import annotations

import importlib.metadata

import apdask


def test_public_names_are_explicit_and_resolve():
    expected = {
        "NextVisit", "build_visit_graph", "run_visit", "local_cluster", "ensure_ppdb",
        "Butler", "Ppdb", "read_alerts", "validate_alerts", "get_camera", "Exposure",
        "PipelineConfig", "Locations", "ApdaskError", "__version__",
        "Fetched", "RawHeader", "Prefetch", "PpdbHistory", "Subtraction", "Measurement",
        "Association", "CcdReport", "VisitReport",
    }  # fmt: skip
    assert set(apdask.__all__) == expected
    for name in apdask.__all__:
        assert getattr(apdask, name) is not None, name


def test_version_comes_from_the_package_metadata():
    assert apdask.__version__ == importlib.metadata.version("apdask")
