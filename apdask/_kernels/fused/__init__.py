"""Fused full-frame passes of subtraction, detection and cosmic-ray repair (numba).

A 4k × 4k CCD is 16 M pixels: every NumPy expression over it reads and writes
64 MB arrays and allocates a temporary, and a chain of them costs more than the
FFTs themselves.  Each function here does in one pass over the pixels (rows in
parallel) what took a chain of NumPy expressions, and writes into arrays it is
given, so the subtraction allocates few full frames.  Each is equal to the NumPy
expression in its docstring to float32 rounding (``tests/_kernels/test_fused.py``).

The passes live in private modules by stage (``_amp``, ``_difference``, ``_detection``,
``_isr``; the thread settings in ``_threads``) and are re-exported here.
"""

import os
import sys
from types import ModuleType

from apdask._kernels.fused._amp import amp_pass, place_block
from apdask._kernels.fused._detection import (
    above,
    above_both,
    boxes_clear,
    dilate,
    local_peaks,
    matched_inputs,
    segments,
    snr_map,
    thinned_values,
)
from apdask._kernels.fused._difference import (
    combine_inputs,
    difference_variance,
    fill_nodata,
    finish_difference,
    tile_add,
    tile_add_rows,
    tile_product,
    weighted_stamp_rows,
)
from apdask._kernels.fused._isr import (
    SearchPlanes,
    boxes_clear_of,
    cr_candidates,
    grow_pixels,
    interpolate_pixels,
    search_planes,
    smoothed_residual,
    stamps_less_background,
)
from apdask._kernels.fused._threads import allocated_cpus, in_thread, inner_threads, one_blas_thread

__all__ = [
    "amp_pass",
    "compiled_on_disk",
    "allocated_cpus",
    "in_thread",
    "inner_threads",
    "one_blas_thread",
    "fill_nodata",
    "above",
    "above_both",
    "boxes_clear",
    "boxes_clear_of",
    "combine_inputs",
    "cr_candidates",
    "finish_difference",
    "grow_pixels",
    "interpolate_pixels",
    "local_peaks",
    "place_block",
    "difference_variance",
    "dilate",
    "matched_inputs",
    "segments",
    "SearchPlanes",
    "search_planes",
    "smoothed_residual",
    "snr_map",
    "stamps_less_background",
    "thinned_values",
    "tile_add",
    "tile_add_rows",
    "tile_product",
    "weighted_stamp_rows",
]


def _kernel_modules() -> list[ModuleType]:
    """This package's kernel modules (imported above)."""
    return [sys.modules[f"{__name__}.{m}"] for m in ("_amp", "_detection", "_difference", "_isr")]


def _dispatchers(module: ModuleType) -> list[object]:
    return [v for v in vars(module).values() if hasattr(v, "py_func") and hasattr(v, "_cache")]


def compiled_on_disk() -> bool:
    """Whether every cached numba kernel has an index in numba's on-disk cache.

    False before the first run in an environment (the kernels then compile, about a
    minute on two cores) and when the cache cannot be located.  Reads numba's cache
    locator (a private attribute, hence the broad fallback).
    """
    try:
        paths = [
            d._cache._cache_file._index_path  # type: ignore[attr-defined]
            for m in _kernel_modules()
            for d in _dispatchers(m)
        ]
    except AttributeError:  # another numba: say nothing rather than guess
        return True
    return bool(paths) and all(os.path.exists(p) for p in paths)
