"""The in-memory image type shared by the pixel stages.

An :class:`Exposure` bundles an image, its variance and mask planes, a WCS, a
PSF stamp and metadata.  Stages take and return Exposures of numpy arrays; the
visit graph wraps them in ``dask.delayed`` calls, so an Exposure never holds a
dask array once a stage runs.

Units: calibrated images (science after ISR, warped template, difference) are in
nJy per pixel and their variance in nJy².  Raw and ISR-intermediate images are in
ADU or electrons, as each function documents.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

__all__ = ["MASK", "MASK_STAMP_DTYPE", "Exposure", "TemplateTile", "mask_bits", "mask_plane_cards"]

#: Mask plane bits.
MASK = {
    "BAD": 1 << 0,  # known bad pixel (bad column, dead amplifier)
    "SAT": 1 << 1,  # saturated
    "CR": 1 << 2,  # cosmic ray
    "EDGE": 1 << 3,  # too close to the image edge for a full PSF / kernel
    "NO_DATA": 1 << 4,  # no template coverage or non-finite input
    "DETECTED": 1 << 5,  # part of a positive footprint
    "DETECTED_NEGATIVE": 1 << 6,  # part of a negative footprint
    "SUSPECT": 1 << 7,  # near saturation or otherwise suspect
}


#: dtype of the mask in FITS cutouts: every plane fits in 8 bits, and FITS stores
#: uint8 natively (BITPIX = 8), a quarter of the bytes of a uint32 mask.
MASK_STAMP_DTYPE = np.uint8
if max(MASK.values()) > np.iinfo(MASK_STAMP_DTYPE).max:  # pragma: no cover - a code change
    raise RuntimeError("a mask plane does not fit MASK_STAMP_DTYPE; widen it")


def mask_plane_cards() -> list[tuple[str, str, str]]:
    """FITS cards naming the planes of a stamp's mask: ``MASKBITn = 'NAME'`` for bit ``n``."""
    return [(f"MASKBIT{v.bit_length() - 1}", name, "mask plane") for name, v in MASK.items()]


def mask_bits(*names: str) -> int:
    """OR of the named mask planes, e.g. ``mask_bits("BAD", "SAT")``."""
    out = 0
    for n in names:
        out |= MASK[n]
    return out


@dataclass
class Exposure:
    """Image, variance, mask, WCS, PSF and metadata of one CCD.

    Attributes
    ----------
    image : numpy.ndarray
        float32, shape ``(ny, nx)``.
    variance : numpy.ndarray
        float32, same shape, in the image's units squared.
    mask : numpy.ndarray
        uint32 bit planes, see :data:`MASK`.
    wcs : astropy.wcs.WCS or None
    psf : numpy.ndarray or None
        Odd-sized PSF stamp normalised to sum 1, centred on its middle pixel, for the
        CCD centre.
    meta : dict
        Descriptive header-like values: at least ``visit``, ``detector``, ``band``,
        ``mjd`` (midpoint, TAI), ``exptime`` where known.
    psf_model : apdask.pipeline.psf.PsfGrid or None
        Spatially varying PSF model (:func:`apdask.pipeline.psf.estimate_psf_model`);
        ``psf`` is its mean.  ``None``: the PSF is the constant ``psf``.
    ap_corr : float
        Aperture correction of PSF fluxes measured on this image (1: none measured).
    ap_corr_science : float or None
        On a difference image: the science image's aperture correction, for forced
        photometry on the science image (``None``: the same as ``ap_corr``).
    bright_sources : dict or None
        On a difference image: the template's bright sources, whose residual rings
        raise the local variance (:func:`apdask.pipeline.measure.bright.bright_sources`).
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray
    wcs: Any = None
    psf: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    psf_model: Any = None
    ap_corr: float = 1.0
    ap_corr_science: float | None = None
    bright_sources: dict[str, np.ndarray] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Image shape ``(ny, nx)``."""
        return self.image.shape

    def copy_with(self, **changes: Any) -> Exposure:
        """A shallow copy with some attributes replaced."""
        return replace(self, **changes)


@dataclass
class TemplateTile:
    """One template sky tile as the Butler returns it.

    Attributes
    ----------
    image, variance : numpy.ndarray
        float32 ``(ny, nx)``; nJy per pixel and nJy².  Non-finite pixels have no data.
    wcs : astropy.wcs.WCS
        Celestial WCS of the tile.
    band : str
    tile_id : str
    psf : numpy.ndarray or None
        PSF stamp (sum 1) of the template, when known.
    """

    image: np.ndarray
    variance: np.ndarray
    wcs: object
    band: str
    tile_id: str = ""
    psf: np.ndarray | None = None


#: Mask planes that exclude a pixel from detection and fitting.
IGNORE_BITS = mask_bits("EDGE", "NO_DATA", "BAD", "SAT", "CR")
