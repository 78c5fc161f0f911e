"""Figures of what a visit produced, built on matplotlib and astropy.visualization.

Every function takes plain inputs (numpy arrays, astropy ``CCDData``/``NDData``,
astropy Tables, dicts of a visit report or of a decoded alert packet) and returns a
:class:`matplotlib.figure.Figure`:

* :func:`image_triplet`: science, template and difference with DIASources overlaid;
* :func:`alert_cutouts`: the three FITS cutouts of one alert packet;
* :func:`light_curve`: a DIAObject's DIASource fluxes with errors, in nJy and AB mag;
* :func:`focal_plane`: the camera's detectors coloured by one figure per CCD;
* :func:`stage_timings`: per-stage seconds of a CCD or of every CCD of a visit;
* :func:`task_stream`: the Dask task stream of a run, one row per worker thread.

matplotlib is optional (``pip install 'apdask[notebook]'``) and imported when a
function is first called.  This module never selects a backend (it never calls
``matplotlib.use``): pass ``ax=`` or ``fig=`` to draw into your own figure, otherwise
a new one comes from :func:`matplotlib.pyplot.figure`, so that it shows inline in a
notebook and with ``plt.show()`` in a script.  To stay clear of pyplot's figure
manager, pass ``fig=matplotlib.figure.Figure()``.

The figures live in private modules of ``apdask/tools/``: ``_plot_images.py``
(triplet, cutouts), ``_plot_lightcurve.py`` (light curve, magnitudes),
``_plot_visit.py`` (focal plane, stage timings, task stream) and ``_plot_base.py`` (shared
parts); every name is importable from here.
"""

from __future__ import annotations

from apdask.tools._plot_images import CUTOUT_FIELDS as CUTOUT_FIELDS
from apdask.tools._plot_images import SOURCE_STYLES as SOURCE_STYLES
from apdask.tools._plot_images import alert_cutouts, classify_sources, image_triplet
from apdask.tools._plot_lightcurve import AB_ZEROPOINT_NJY as _AB_ZEROPOINT_NJY
from apdask.tools._plot_lightcurve import BAND_COLORS as BAND_COLORS
from apdask.tools._plot_lightcurve import light_curve, mag_to_njy, njy_to_mag
from apdask.tools._plot_visit import focal_plane, stage_timings, task_stream

__all__ = [
    "AB_ZEROPOINT_NJY",
    "classify_sources",
    "njy_to_mag",
    "mag_to_njy",
    "image_triplet",
    "alert_cutouts",
    "light_curve",
    "focal_plane",
    "stage_timings",
    "task_stream",
]

# assigned here, not only imported, so that the API page documents it
#: AB magnitude of 1 nJy: ``m = 31.4 - 2.5 log10(flux / nJy)``.
AB_ZEROPOINT_NJY = _AB_ZEROPOINT_NJY
