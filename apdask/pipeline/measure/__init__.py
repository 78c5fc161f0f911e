"""Detection and measurement of DIASources on a difference image."""

from apdask.pipeline.measure.cutouts import cutout_size
from apdask.pipeline.measure.detection import detect_sources, matched_filter
from apdask.pipeline.measure.photometry import aperture_correction, forced_photometry
from apdask.pipeline.measure.sources import DIASOURCE_COLUMNS, measure_sources

__all__ = [
    "DIASOURCE_COLUMNS",
    "aperture_correction",
    "cutout_size",
    "detect_sources",
    "forced_photometry",
    "matched_filter",
    "measure_sources",
]
