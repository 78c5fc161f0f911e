"""Shared parts of :mod:`apdask.tools.plot`: matplotlib on demand, the figure, table columns.

Re-exported by :mod:`apdask.tools.plot`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__: list[str] = []


def _matplotlib():
    """Import matplotlib (never selecting a backend) or say which extra installs it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        msg = (
            "apdask.tools.plot needs matplotlib, an optional dependency; install it with "
            "pip install 'apdask[notebook]' (or pip install matplotlib)"
        )
        raise ImportError(msg) from exc
    # optional: matplotlib comes with the 'notebook' and 'test' extras
    import matplotlib.figure

    return matplotlib


def _figure(fig, ax, figsize):
    """The figure to draw into: ``ax``'s, ``fig`` (cleared) or a new pyplot figure."""
    mpl = _matplotlib()
    if ax is not None:
        return ax.figure
    if fig is not None:
        if not isinstance(fig, mpl.figure.Figure):
            msg = f"fig must be a matplotlib Figure, got {type(fig).__name__}"
            raise TypeError(msg)
        fig.clear()
        return fig
    import matplotlib.pyplot as plt  # resolves, but never sets, the backend

    return plt.figure(figsize=figsize)


def _column(sources, name):
    if isinstance(sources, Mapping) or hasattr(sources, "colnames"):
        return np.asarray(sources[name]) if name in _names(sources) else None
    return np.asarray([s[name] for s in sources]) if sources and name in sources[0] else None


def _names(sources):
    return list(sources.colnames) if hasattr(sources, "colnames") else list(sources)


def _n_rows(sources):
    if hasattr(sources, "colnames"):
        return len(sources)
    if isinstance(sources, Mapping):
        return len(next(iter(sources.values()))) if sources else 0
    return len(sources)
