"""Deterministic identifiers (bit layout documented in ``docs/formats.md``).

A 64-bit signed id packs ``(visit, detector, index)``::

    bit 63      sign, always 0
    bits 28-62  visit        (35 bits, visit < 2**35)
    bits 20-27  detector     (8 bits, detector < 256)
    bits 0-19   index        (20 bits)

DIASources use index ``0 .. 2**19 - 1`` (the row in the CCD's measurement table);
DiaForcedSources use ``2**19 + k`` for the k-th forced measurement, so the two never
collide.  A new DIAObject takes the id of the DIASource that created it, as in
Rubin's pipeline.  Re-processing a CCD therefore reproduces the same ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["MAX_VISIT", "pack_id", "unpack_id", "dia_source_ids", "dia_forced_source_ids"]

_VISIT_BITS, _DET_BITS, _INDEX_BITS = 35, 8, 20

#: Visits are ``0 <= visit < MAX_VISIT`` (2**35): the id's visit field.
MAX_VISIT = 1 << _VISIT_BITS
_FORCED_OFFSET = 1 << (_INDEX_BITS - 1)


def pack_id(visit: npt.ArrayLike, detector: npt.ArrayLike, index: npt.ArrayLike) -> Any:
    """Pack ``(visit, detector, index)`` into one int64 (scalars or arrays)."""
    visit = np.asarray(visit, dtype=np.int64)
    detector = np.asarray(detector, dtype=np.int64)
    index = np.asarray(index, dtype=np.int64)
    if np.any(visit < 0) or np.any(visit >= 1 << _VISIT_BITS):
        msg = f"visit must be in [0, 2**{_VISIT_BITS}), got {visit!r}"
        raise ValueError(msg)
    if np.any(detector < 0) or np.any(detector >= 1 << _DET_BITS):
        msg = f"detector must be in [0, 2**{_DET_BITS}), got {detector!r}"
        raise ValueError(msg)
    if np.any(index < 0) or np.any(index >= 1 << _INDEX_BITS):
        msg = f"index must be in [0, 2**{_INDEX_BITS}), got more rows than a CCD may hold"
        raise ValueError(msg)
    out = (visit << (_DET_BITS + _INDEX_BITS)) | (detector << _INDEX_BITS) | index
    return out if out.ndim else int(out)


def unpack_id(packed: npt.ArrayLike) -> tuple[Any, Any, Any]:
    """Inverse of :func:`pack_id`: return ``(visit, detector, index)``."""
    p = np.asarray(packed, dtype=np.int64)
    index = p & ((1 << _INDEX_BITS) - 1)
    detector = (p >> _INDEX_BITS) & ((1 << _DET_BITS) - 1)
    visit = p >> (_DET_BITS + _INDEX_BITS)
    if p.ndim == 0:
        return int(visit), int(detector), int(index)
    return visit, detector, index


def dia_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Ids of the ``n`` DIASources measured on one CCD of one visit."""
    if n >= _FORCED_OFFSET:
        msg = f"at most {_FORCED_OFFSET - 1} DIASources per CCD, got {n}"
        raise ValueError(msg)
    return pack_id(visit, detector, np.arange(n, dtype=np.int64))


def dia_forced_source_ids(visit: int, detector: int, n: int) -> np.ndarray:
    """Ids of the ``n`` forced measurements on one CCD of one visit."""
    if n >= _FORCED_OFFSET:
        msg = f"at most {_FORCED_OFFSET - 1} forced sources per CCD, got {n}"
        raise ValueError(msg)
    return pack_id(visit, detector, _FORCED_OFFSET + np.arange(n, dtype=np.int64))
