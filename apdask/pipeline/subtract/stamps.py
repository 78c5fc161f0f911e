"""Kernel stamps: bright isolated stars, clean in both images, around which the kernel is fitted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from apdask.core.exposure import Exposure
from apdask.exceptions import PsfFitError
from apdask.pipeline.stars import find_stars, usable_stars
from apdask.pipeline.subtract.kernel import _powers

__all__ = ["KernelModel", "choose_model"]


@dataclass(frozen=True)
class KernelModel:
    """The matching-kernel model a subtraction used, after any fallback."""

    kernel_size: int
    spatial_order: int
    basis_degrees: tuple[int, ...]
    fallback: tuple[str, ...]  #: which of the three fell back from the request
    stars: dict[str, Any]  #: the star finder's candidates
    xs: np.ndarray  #: integer centres of the kernel stamps
    ys: np.ndarray
    fit_half: int

    def as_dict(self) -> dict[str, Any]:
        """The model for the QA record: ``kernel_size``, ``spatial_order``, ``basis_degrees``."""
        return {"kernel_size": self.kernel_size, "spatial_order": self.spatial_order,
                "basis_degrees": list(self.basis_degrees)}  # fmt: skip


def _candidates(
    science: Exposure,
    sci0: np.ndarray,
    var_s: np.ndarray,
    bad_any: np.ndarray,
    fw_s: float,
    fit_half: int,
    border: int,
    max_stamps: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """Stars for kernel stamps of half-size ``fit_half``, and the indices of those used."""
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
    return stars, usable_stars(len(stars["x"]), max_stamps)


def choose_model(
    science: Exposure,
    sci0: np.ndarray,
    var_s: np.ndarray,
    bad_any: np.ndarray,
    fwhms: tuple[float, float],
    sig_m: float,
    request: tuple[int, bool, int],
    max_stamps: int,
    rules: tuple[int, int, int],
) -> KernelModel:
    """The kernel stamps and the model they can constrain, falling back when stars are few.

    A smaller kernel first (smaller stamps, border and isolation radius: more stars;
    only when the size was not given), then a lower spatial order, then fewer basis
    functions (docs/real-data.md).  ``request`` is (kernel size, whether it was chosen
    automatically, spatial order); ``rules`` (minimum stamps, stamps per spatial term,
    stamps for the full basis).

    Raises
    ------
    PsfFitError
        Fewer clean stars than the minimum, even with the smallest kernel.
    """
    kernel_size, auto_size, spatial_order = request
    min_stamps, per_term, full_basis = rules
    fw_s, fw_t = fwhms
    k_min = max(7, 2 * int(np.ceil(2.5 * sig_m)) + 1) if auto_size else kernel_size
    sizes = list(range(kernel_size, min(k_min, kernel_size) - 1, -4)) or [kernel_size]
    best: tuple[int, np.ndarray, dict[str, Any], int] | None = None
    for size in sizes:
        kh = size // 2
        fit_half = kh + int(np.ceil(1.5 * max(fw_s, fw_t)))
        stars, idx = _candidates(
            science, sci0, var_s, bad_any, fw_s, fit_half, fit_half + kh + 1, max_stamps
        )
        if best is None or len(idx) > len(best[1]):
            best = (size, idx, stars, fit_half)
        if len(idx) >= per_term * len(_powers(int(spatial_order))):
            break
    assert best is not None
    size, idx, stars, fit_half = best
    if len(idx) < min_stamps:
        msg = (
            f"kernel fit failed: only {len(idx)} clean bright stars for stamps (need "
            f"{min_stamps}, kernel {size} px); too few stars: give a PSF-matched template or "
            "a larger image"
        )
        raise PsfFitError(msg)
    order = int(spatial_order)
    while order > 0 and len(idx) < per_term * len(_powers(order)):
        order -= 1
    degrees = (4, 3, 2) if len(idx) >= full_basis else (2, 1, 0)
    fallback = tuple(
        name for name, got, asked in (("kernel_size", size, kernel_size),
                                      ("spatial_order", order, int(spatial_order)),
                                      ("basis_degrees", degrees, (4, 3, 2))) if got != asked
    )  # fmt: skip
    xs = np.floor(stars["x"][idx] + 0.5).astype(int)
    ys = np.floor(stars["y"][idx] + 0.5).astype(int)
    return KernelModel(size, order, degrees, fallback, stars, xs, ys, fit_half)


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
    stars = getattr(science.psf_model, "stars", None)
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
