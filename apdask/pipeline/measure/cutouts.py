"""Cutout sizes and FITS postage stamps of one source."""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits

from apdask import config
from apdask.core.exposure import MASK, MASK_STAMP_DTYPE, Exposure, mask_plane_cards
from apdask.pipeline.stars import cutout_at

__all__ = ["make_cutout", "cutout_size"]


def cutout_size(bbox_size: float) -> int:
    """Side of an alert cutout: ``bboxSize`` clamped to the configured 30..102, made odd.

    Parameters
    ----------
    bbox_size : int

    Returns
    -------
    int
        Odd side length within ``[cutouts.min_size, cutouts.max_size]``.
    """
    lo = int(config.get("cutouts.min_size"))
    hi = int(config.get("cutouts.max_size"))
    s = int(min(max(int(bbox_size), lo), hi))
    if s % 2 == 0:
        s = s + 1 if s + 1 <= hi else s - 1
    return s


def make_cutout(exposure: Exposure, x: float, y: float, size: int) -> bytes:
    """FITS bytes of a CCDData-compatible stamp centred on pixel ``(x, y)``.

    Parameters
    ----------
    exposure : apdask.image.Exposure
    x, y : float
        Centre in pixels; the stamp is centred on the nearest pixel.
    size : int
        Side length in pixels; an even size is increased by one.

    Returns
    -------
    bytes
        A FITS file: primary HDU = image (``BUNIT = 'nJy'``, local WCS), ``UNCERT``
        (variance, ``UTYPE = 'VarianceUncertainty'``), ``MASK`` (uint8 mask planes,
        named by ``MASKBITn = 'NAME'`` cards)
        and ``PSF`` (PSF stamp, if known).  Pixels off the exposure are NaN in image
        and variance and NO_DATA in the mask.  Read it back with
        ``CCDData.read(io.BytesIO(b), format="fits")``.
    """
    size = int(size)
    if size % 2 == 0:
        size += 1
    half = size // 2
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    img = cutout_at(np.asarray(exposure.image, np.float32), ix, iy, half, np.float32(np.nan))
    var = cutout_at(np.asarray(exposure.variance, np.float32), ix, iy, half, np.float32(np.nan))
    msk = cutout_at(np.asarray(exposure.mask), ix, iy, half, MASK["NO_DATA"]).astype(
        MASK_STAMP_DTYPE
    )
    hdr = fits.Header()
    if exposure.wcs is not None:
        w = exposure.wcs.deepcopy()
        w.wcs.crpix = w.wcs.crpix - np.array([ix - half, iy - half], dtype=float)
        w.pixel_shape = (size, size)
        hdr.update(w.to_header())
    hdr["BUNIT"] = "nJy"
    hdus = [
        fits.PrimaryHDU(img, header=hdr),
        fits.ImageHDU(var, header=fits.Header([("UTYPE", "VarianceUncertainty")]), name="UNCERT"),
        fits.ImageHDU(msk, header=fits.Header(mask_plane_cards()), name="MASK"),
    ]
    if exposure.psf is not None:
        hdus.append(fits.ImageHDU(np.asarray(exposure.psf, np.float32), name="PSF"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()
