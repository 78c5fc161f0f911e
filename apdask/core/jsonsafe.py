"""Strict JSON for reports: NaN and infinities become ``null``, numpy values plain Python.

``json.dumps`` writes a bare ``NaN`` by default, which strict parsers (JavaScript,
``jq``, Go) reject; every report apdask prints or writes goes through :func:`dumps`.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

__all__ = ["dumps", "json_ready"]


def json_ready(obj: Any) -> Any:
    """A JSON-safe copy: NaN/inf → None, numpy scalars and arrays → Python values."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, *, indent: int | None = 1) -> str:
    """Strict JSON text of ``obj`` (``allow_nan=False``; other objects via ``str``)."""
    return json.dumps(json_ready(obj), indent=indent, default=str, allow_nan=False)
