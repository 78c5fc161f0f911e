"""Cutout sizes and FITS postage stamps of one source."""

from __future__ import annotations

from apdask import config

__all__ = ["cutout_size"]


def cutout_size(bbox_size: int, *, min_size: int | None = None, max_size: int | None = None) -> int:
    """Side of an alert cutout: ``bboxSize`` clamped to the configured 30..102, made odd.

    Parameters
    ----------
    bbox_size : int
    min_size, max_size : int, optional
        The clamp; default ``apdask.cutouts.min_size`` and ``max_size``.

    Returns
    -------
    int
        Odd side length within ``[cutouts.min_size, cutouts.max_size]``.
    """
    lo = int(config.get("cutouts.min_size", min_size))
    hi = int(config.get("cutouts.max_size", max_size))
    s = int(min(max(int(bbox_size), lo), hi))
    if s % 2 == 0:
        s = s + 1 if s + 1 <= hi else s - 1
    return s
