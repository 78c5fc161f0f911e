"""Configuration: one mechanism, ``dask.config``, with defaults from ``apdask.yaml``.

Keyword arguments across apdask default to ``None`` and fall back to
``dask.config.get("apdask.<key>")``.  Users override through
``dask.config.set``, a YAML file in ``~/.config/dask/`` or environment variables
such as ``DASK_APDASK__DISTRIBUTOR__TIMEOUT=30``.  Secrets never live here: they
come only from the environment (see ``docs/operations.md``).
"""

from __future__ import annotations

import os

import dask.config
import yaml

__all__ = ["get", "DEFAULTS"]

_fn = os.path.join(os.path.dirname(__file__), "apdask.yaml")
with open(_fn) as _f:
    DEFAULTS = yaml.safe_load(_f)

dask.config.update_defaults(DEFAULTS)


def get(key, value=None):
    """Return ``value`` if it is not None, else the configured ``apdask.<key>``.

    Parameters
    ----------
    key : str
        Dotted key below ``apdask``, e.g. ``"distributor.timeout"``.
    value : object, optional
        An explicit value that takes precedence over configuration.

    Returns
    -------
    object
        The explicit value or the configured default.
    """
    if value is not None:
        return value
    return dask.config.get(f"apdask.{key}")
