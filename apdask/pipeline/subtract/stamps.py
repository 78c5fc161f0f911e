"""Kernel stamps: bright isolated stars, clean in both images, around which the kernel is fitted."""

from __future__ import annotations

from typing import Any

import numpy as np

from apdask.core.exposure import Exposure
from apdask.exceptions import PsfFitError
from apdask.pipeline.stars import find_stars, usable_stars
from apdask.pipeline.subtract.kernel import _MIN_STAMPS

__all__: list[str] = []


def _pick_stamps(
    science: Exposure,
    sci0: np.ndarray,
    var_s: np.ndarray,
    bad_any: np.ndarray,
    fw_s: float,
    fit_half: int,
    border: int,
    max_stamps: int,
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """The kernel stamps' stars and their integer centres.

    Raises
    ------
    PsfFitError
        If fewer than ``_MIN_STAMPS`` clean bright stars are found.
    """
    stars = _model_stars(science, 1.2 * fit_half, 0.01, border, bad_any)
    if stars is None or len(usable_stars(len(stars["x"]), max_stamps)) < max_stamps:
        # no model, or its candidates do not fill the stamp budget: search for every star
        stars = find_stars(
            sci0,
            var_s,
            science.mask,
            fwhm=fw_s,
            nsigma=20.0,
            isolation=1.2 * fit_half,
            border=border,
            max_stars=None,
            avoid=bad_any,
            contrast=0.01,
        )
    idx = usable_stars(len(stars["x"]), max_stamps)
    if len(idx) < _MIN_STAMPS:
        msg = (
            f"kernel fit failed: only {len(idx)} clean bright stars for stamps (need {_MIN_STAMPS})"
        )
        raise PsfFitError(msg)
    xs = np.floor(stars["x"][idx] + 0.5).astype(int)
    ys = np.floor(stars["y"][idx] + 0.5).astype(int)
    return stars, xs, ys


def _model_stars(science, isolation, contrast, border, bad):
    """Kernel-stamp stars from the science PSF model's candidates, or None.

    The PSF model (:func:`estimate_psf_model`) keeps the bright stars its search
    found; those at least ``isolation`` from any peak brighter than ``contrast`` times
    their own, ``border`` from the edges and with no ``bad`` pixel within ``border``
    are the stars the kernel fit's own search would pick, without a second
    full-frame search.  None when there is no such model or it was searched with a
    smaller isolation radius.  (:func:`subtract` searches anyway when these do not
    fill its stamp budget: on a small or sparse CCD a kernel fitted on few stamps
    needs every star, and the PSF search, made with a fixed FWHM guess, can miss
    one or two.)
    """
    stars = getattr(science.meta.get("psf_model"), "stars", None)
    if stars is None or stars.get("isolation", 0.0) < isolation or "neighbour" not in stars:
        return None
    ny, nx = science.shape
    x, y = np.asarray(stars["x"]), np.asarray(stars["y"])
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    b = int(border)
    keep = (np.asarray(stars["neighbour"]) <= contrast) & (ix >= b) & (ix < nx - b)
    keep &= (iy >= b) & (iy < ny - b)
    for k in np.flatnonzero(keep):
        if bad[iy[k] - b : iy[k] + b + 1, ix[k] - b : ix[k] + b + 1].any():
            keep[k] = False
    return {k: v[keep] if isinstance(v, np.ndarray) else v for k, v in stars.items()}
