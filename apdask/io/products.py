"""Per-CCD image data products: the calibrated science image, the warped template and
the difference image, written as FITS that astropy's ``CCDData.read`` reads back.

Layout, under the products directory (default ``<repo>/products``)::

    visit_<visit>/<kind>_<detector name>.fits     kind: science, template, difference

Each file has the HDUs that :meth:`astropy.nddata.CCDData.write` writes:

* the primary HDU: the image (float32, nJy per pixel, ``BUNIT = 'nJy'``), the
  celestial WCS and the cards ``PRODUCT``, ``VISIT``, ``DETECTOR``, ``DETNAME``,
  ``BAND``, ``MJD-AVG`` (TAI) and ``EXPTIME``;
* ``UNCERT``: the variance (nJy², ``UTYPE = 'VarianceUncertainty'``);
* ``MASK``: the mask bit planes (uint8; ``MASKBITn = NAME`` cards name them);
* ``PSFIMAGE``: the PSF stamp at the CCD centre (sum 1), when known.

``CCDData.read(path)`` therefore gives image, WCS, unit, variance and PSF with no
help; its mask is then *any* plane set, DETECTED included.  :func:`read_product`
gives the mask that a user wants to exclude pixels by (the planes of
:data:`apdask.core.exposure.IGNORE_BITS`) and keeps every plane in ``flags``.

Files are written atomically (:func:`apdask.core.files.atomic_write`); a reader
never sees half a product.  :func:`prune_products` keeps the newest visits only
(configuration ``apdask.products.keep_visits``).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from astropy.io import fits
from astropy.nddata import CCDData, VarianceUncertainty
from astropy.wcs import WCS, FITSFixedWarning

from apdask.core.exposure import (
    IGNORE_BITS,
    MASK_STAMP_DTYPE,
    Exposure,
    mask_plane_cards,
)
from apdask.core.files import atomic_write
from apdask.exceptions import ProductNotFoundError, ProductWriteError, UsageError

__all__ = [
    "PRODUCT_KINDS",
    "describe",
    "product_path",
    "prune_products",
    "read_product",
    "write_product",
]

#: The image products a CCD can keep, in data-flow order.
PRODUCT_KINDS = ("science", "template", "difference")

_VISIT_DIR = re.compile(r"visit_(\d+)")
_FITS_BLOCK = 2880


def _check_kind(kind: str) -> None:
    if kind not in PRODUCT_KINDS:
        msg = f"unknown image product {kind!r}; choose from {', '.join(PRODUCT_KINDS)}"
        raise UsageError(msg)


def product_path(root: str | os.PathLike[str], kind: str, visit: int, detector: str) -> Path:
    """Where the product ``kind`` of one CCD lives under the products directory ``root``."""
    _check_kind(kind)
    return Path(root) / f"visit_{int(visit)}" / f"{kind}_{detector}.fits"


def _primary_header(exposure: Exposure, kind: str, detector: str) -> fits.Header:
    head = fits.Header()
    if exposure.wcs is not None:
        head.update(exposure.wcs.to_header(relax=True))
    meta = exposure.meta
    head["BUNIT"] = (str(meta.get("unit", "nJy")), "image unit")
    head["PRODUCT"] = (kind, "apdask image product")
    head["DETNAME"] = (detector, "detector name")
    cards = (("VISIT", "visit", "visit id"), ("DETECTOR", "detector", "detector id"),
             ("BAND", "band", "filter band"), ("MJD-AVG", "mjd", "mid-exposure MJD (TAI)"),
             ("EXPTIME", "exptime", "effective exposure time (s)"))  # fmt: skip
    for key, name, comment in cards:
        value = meta.get(name)
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, str | int | float) and not (
            isinstance(value, float) and not np.isfinite(value)
        ):
            head[key] = (value, comment)
    return head


def _hdus(exposure: Exposure, kind: str, detector: str) -> fits.HDUList:
    image = np.asarray(exposure.image, np.float32)
    hdus = [fits.PrimaryHDU(image, header=_primary_header(exposure, kind, detector))]
    unit = hdus[0].header["BUNIT"]
    var = fits.ImageHDU(np.asarray(exposure.variance, np.float32), name="UNCERT")
    var.header["UTYPE"] = ("VarianceUncertainty", "astropy uncertainty class")
    var.header["BUNIT"] = (f"({unit})2" if unit != "nJy" else "nJy2", "variance unit")
    hdus.append(var)
    mask = fits.ImageHDU(np.asarray(exposure.mask).astype(MASK_STAMP_DTYPE), name="MASK")
    for key, name, comment in mask_plane_cards():
        mask.header[key] = (name, comment)
    hdus.append(mask)
    if exposure.psf is not None:
        hdus.append(fits.ImageHDU(np.asarray(exposure.psf, np.float32), name="PSFIMAGE"))
    return fits.HDUList(hdus)


#: Bytes of one slab of :func:`write_hdus`: large enough for few system calls, small
#: enough to stay in the CPU's cache.
_SLAB_BYTES = 4 << 20


def write_hdus(fh: BinaryIO, hdus: fits.HDUList) -> None:
    """Write ``hdus`` as a FITS file into the open binary file ``fh``, image by slab.

    The same bytes as ``hdus.writeto(fh)`` (astropy's headers, big-endian data padded
    to 2880-byte blocks), but each array passes through one reused big-endian slab of
    :data:`_SLAB_BYTES`.  Astropy byteswaps each array in place and back, and holding
    the file in memory first costs a new ~200-MB buffer: together 0.8 CPU-s for a
    difference image on a virtual machine, where first-touched pages are expensive,
    against ~0.1 s here.  An ``OSError`` (a full disk) propagates as itself.
    """
    for hdu in hdus:
        hdu.update_header()
        fh.write(hdu.header.tostring().encode("ascii"))
        if hdu.data is None:
            continue
        flat = np.ascontiguousarray(hdu.data).reshape(-1)
        slab = np.empty(min(flat.size, max(1, _SLAB_BYTES // flat.itemsize)),
                        flat.dtype.newbyteorder(">"))  # fmt: skip
        for start in range(0, flat.size, slab.size):
            part = flat[start : start + slab.size]
            slab[: part.size] = part
            fh.write(slab[: part.size].view(np.uint8).data)
        fh.write(bytes(-flat.nbytes % _FITS_BLOCK))


def write_product(
    root: str | os.PathLike[str], kind: str, exposure: Exposure, *, visit: int, detector: str
) -> Path:
    """Write one CCD's image product atomically; its path.

    Raises
    ------
    apdask.exceptions.ProductWriteError
        The file could not be written (disk full, no permission); nothing is left
        behind.
    """
    path = product_path(root, kind, visit, detector)
    hdus = _hdus(exposure, kind, detector)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda fh: write_hdus(fh, hdus))
    except OSError as e:
        msg = (
            f"cannot write the {kind} image of visit {visit} CCD {detector} to {path}: "
            f"{e.strerror or e}; free disk space or fix the permissions of {path.parent}, "
            "or keep fewer products (--set products.kinds=[] or products.keep_visits)"
        )
        raise ProductWriteError(msg) from None
    return path


def read_product(root: str | os.PathLike[str], kind: str, visit: int, detector: str) -> CCDData:
    """One CCD's image product as an astropy :class:`~astropy.nddata.CCDData`.

    ``data`` in nJy with its WCS; ``uncertainty`` a
    :class:`~astropy.nddata.VarianceUncertainty`; ``mask`` True where a pixel is
    not to be trusted (bad, saturated, cosmic ray, edge, no data); ``flags`` every
    mask plane (the bits of :data:`apdask.core.exposure.MASK`); ``psf`` the PSF
    stamp; ``meta`` the primary header.

    Raises
    ------
    apdask.exceptions.ProductNotFoundError
        No such product: the message lists what the visit has.
    """
    path = product_path(root, kind, visit, detector)
    if not path.is_file():
        there = sorted(p.stem for p in path.parent.glob("*.fits")) if path.parent.is_dir() else []
        msg = (
            f"no {kind} image of visit {visit} CCD {detector} under {root}"
            + (f"; this visit has {', '.join(there)}" if there else "; this visit has none")
            + ": products are kept for the kinds in apdask.products.kinds and the newest "
            "apdask.products.keep_visits visits"
        )
        raise ProductNotFoundError(msg)
    with fits.open(path, memmap=False) as hdul:
        head = hdul[0].header
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(head).celestial
        bits = np.asarray(hdul["MASK"].data)
        ccd = CCDData(
            np.asarray(hdul[0].data),
            unit=head.get("BUNIT", "nJy"),
            wcs=wcs if wcs.has_celestial else None,
            uncertainty=VarianceUncertainty(np.asarray(hdul["UNCERT"].data)),
            mask=(bits & IGNORE_BITS) != 0,
            psf=np.asarray(hdul["PSFIMAGE"].data) if "PSFIMAGE" in hdul else None,
            meta=head.copy(),
        )
    ccd.flags = bits
    return ccd


def _visits(root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _VISIT_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_products(
    root: str | os.PathLike[str], keep_visits: int, protect: Iterable[int] = ()
) -> list[int]:
    """Remove the products of all but the newest ``keep_visits`` visits (0 keeps all).

    Visits in ``protect`` (the one being written) are never removed.  Returns the
    visits removed.
    """
    if keep_visits <= 0:
        return []
    visits = _visits(Path(root))
    keep = {v for v, _ in visits[-keep_visits:]} | {int(v) for v in protect}
    removed = []
    for v, path in visits:
        if v not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(v)
    return removed


def describe(root: str | os.PathLike[str]) -> dict[int, list[str]]:
    """``{visit: [product file stems]}`` of what the products directory holds."""
    return {v: sorted(f.stem for f in p.glob("*.fits")) for v, p in _visits(Path(root))}
