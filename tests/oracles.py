"""Test oracles: slow, plain reference implementations the fast paths are checked against.

They live here, not in the package: ``package_alerts`` + ``StampMaker`` must give
bytes identical to ``make_alert`` + ``make_cutout`` (tests/alerts/test_alerts.py), and the
benchmarks time them as the reference path.
"""

from __future__ import annotations

import io

import numpy as np
from astropy.io import fits

from apdask.alerts.schema import _alert_spec, load_schema
from apdask.alerts.stamps import local_wcs_cards
from apdask.core.exposure import MASK, MASK_STAMP_DTYPE, mask_plane_cards
from apdask.pipeline.stars import cutout_at

__all__ = ["make_alert", "make_cutout"]


def make_alert(
    dia_source,
    prv_dia_sources=(),
    prv_forced=(),
    dia_object=None,
    cutouts=(None, None, None),
    schema=None,
):
    """Build one alert packet conforming to the alert schema.

    Parameters
    ----------
    dia_source : dict
        The triggering DiaSource, keyed by schema column name.
    prv_dia_sources, prv_forced : list of dict
        Previous DiaSources and DiaForcedSources of the same DiaObject.
    dia_object : dict or None
        The (updated) DiaObject.
    cutouts : tuple of (bytes or None)
        ``(difference, science, template)`` FITS stamps.
    schema : lsst.alert.packet.Schema, optional
        Defaults to :func:`load_schema`.

    Returns
    -------
    dict
        The packet.  NaN floats are ``None``; missing nullable fields are
        ``None``; ``ssSource``, ``mpc_orbits``, ``observation_reason`` and
        ``target_name`` are ``None``.

    Raises
    ------
    ValueError
        If a non-nullable field is missing or NaN; the message names it.
    """
    schema = load_schema() if schema is None else schema
    spec = _alert_spec(schema)
    src = spec.dia_source.build(dia_source)
    diff, sci, tmpl = (None if c is None else bytes(c) for c in cutouts)
    alert = dict.fromkeys(spec.top)
    alert.update(
        diaSourceId=src["diaSourceId"],
        diaSource=src,
        prvDiaSources=[spec.dia_source.build(r) for r in prv_dia_sources],
        prvDiaForcedSources=[spec.forced.build(r) for r in prv_forced],
        diaObject=None if dia_object is None else spec.dia_object.build(dia_object),
        cutoutDifference=diff,
        cutoutScience=sci,
        cutoutTemplate=tmpl,
    )
    return alert


def make_cutout(exposure, x, y, size):
    """FITS bytes of a CCDData-compatible stamp centred on pixel ``(x, y)``.

    Parameters
    ----------
    exposure : apdask.core.exposure.Exposure
    x, y : float
        Centre in pixels; the stamp is centred on the nearest pixel.
    size : int
        Side length in pixels; an even size is increased by one.

    Returns
    -------
    bytes
        A FITS file: primary HDU = image (``BUNIT = 'nJy'``, a local gnomonic WCS
        whose reference point is the source, ``CUTMINX``/``CUTMINY``; see
        :func:`apdask.stamps.local_wcs_cards`), ``MASK`` (uint8 mask planes, named
        by ``MASKBITn = 'NAME'`` cards), ``UNCERT`` (variance,
        ``UTYPE = 'VarianceUncertainty'``) and ``PSFIMAGE`` (PSF stamp, if known),
        the names and order astropy's ``CCDData.write`` uses.  Pixels off the exposure are NaN in
        image and variance and NO_DATA in the mask.  Read it back with
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
    local = local_wcs_cards(exposure.wcs, x, y, ix - half, iy - half)
    hdr = fits.Header(local[:-2])
    hdr["BUNIT"] = "nJy"
    hdr.extend(local[-2:])
    hdus = [
        fits.PrimaryHDU(img, header=hdr),
        fits.ImageHDU(msk, header=fits.Header(mask_plane_cards()), name="MASK"),
        fits.ImageHDU(var, header=fits.Header([("UTYPE", "VarianceUncertainty")]), name="UNCERT"),
    ]
    if exposure.psf is not None:
        hdus.append(fits.ImageHDU(np.asarray(exposure.psf, np.float32), name="PSFIMAGE"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()
