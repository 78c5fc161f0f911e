"""A small Butler over a Zarr v3 repository: templates, master calibs, DRP objects.

Repository layout (``docs/formats.md`` has the details)::

    <root>/butler.zarr/                       zarr v3 group
        templates/<band>/<tile_id>/image       float32, chunks (1024, 1024), nJy
        templates/<band>/<tile_id>/variance    float32, nJy^2
        calibs/<kind>/<detector_id>/<band|none>/<n>/image
        drp_objects/<column>                   1-D arrays
    <root>/raw/       science raws (the file distributor directory)
    <root>/truth/     simulator truth tables
    <root>/visits/    nextVisit messages
    <root>/products/  per-CCD science, template and difference images (FITS,
                      ``apdask.io.products``), read back by :meth:`Butler.get`

All zarr access goes through a store object, so an fsspec URL may replace the
local directory later without touching the accessors.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import dask.array as da
import numpy as np
import zarr
from astropy import units as u
from astropy.io import fits
from astropy.nddata import CCDData
from astropy.table import Table
from astropy.wcs import WCS
from numpy.typing import ArrayLike
from zarr.codecs import BloscCodec

from apdask import config
from apdask.core.camera import Camera, check_band, get_camera
from apdask.core.exposure import TemplateTile
from apdask.core.stats import robust_sigma
from apdask.exceptions import ConfigurationError, RawFormatError
from apdask.io._footprint import (
    _points_in_polygon,
    _tile_corners,
    polygons_overlap,
    wcs_from_attrs,
    wcs_to_attrs,
)
from apdask.io.products import read_product

__all__ = ["Butler", "CALIB_KINDS", "wcs_to_attrs", "wcs_from_attrs", "polygons_overlap"]

CALIB_KINDS = ("bias", "dark", "flat")
_TEMPLATE_CHUNK = 1024
# float32 noise hardly compresses (zstd: 93 % of the raw size on a simulated tile) and
# zstd decoding cost 0.03 CPU-s per 2048² plane; blosc's lz4 with byte shuffle keeps
# 94 % and decodes in half that (a constant variance plane: 0.4 %).  Tiles written
# with another codec (zstd, before) are read as they are.  Master calibrations too:
# a flat decodes in 0.08 CPU-s instead of zstd's 0.12 (88 % of the raw size, zstd 73 %).
_PIXEL_CODEC = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4)
_DRP_COLUMNS = ("objectId", "ra", "dec", "r_flux", "extendedness")


def _open_store(path, read_only=False):
    if "://" in path and not path.startswith("file://"):
        return zarr.storage.FsspecStore.from_url(path, read_only=read_only)
    if path.startswith("file://"):
        path = path[len("file://") :]
    return zarr.storage.LocalStore(path, read_only=read_only)


def _open_fits(path):
    """Open a FITS file for ingest, turning unreadable input into a clear error."""
    if not os.path.isfile(path):
        msg = f"{path}: no such file; give the path of a FITS image to ingest"
        raise RawFormatError(msg)
    try:
        return fits.open(path)
    except OSError as e:
        msg = f"{path} is not a readable FITS file ({e}); give a FITS image to ingest"
        raise RawFormatError(msg) from None


def _first_image_hdu(hdul):
    """The first HDU holding a 2-D image, or None."""
    return next((h for h in hdul if h.data is not None and getattr(h.data, "ndim", 0) == 2), None)


class Butler:
    """Read and write templates, master calibrations and DRP objects.

    Parameters
    ----------
    root : str or os.PathLike
        Repository directory; the zarr group is ``<root>/butler.zarr`` (created if
        missing).
    camera : str, optional
        Camera name recorded in the repository; used to chunk calibs by amplifier
        and to validate their shape.
    """

    def __init__(self, root: str | os.PathLike[str], camera: str | None = None) -> None:
        self.root = os.fspath(root)
        if "://" not in self.root:
            self.root = os.path.abspath(self.root)
            os.makedirs(self.root, exist_ok=True)
        self.store = _open_store(self.root.rstrip("/") + "/butler.zarr")
        self._group = zarr.open_group(store=self.store, mode="a")
        if camera is not None:
            self._group.attrs["camera"] = get_camera(camera).name
        self._camera_cache = None

    def __repr__(self) -> str:
        return f"Butler({self.root!r})"

    # ----------------------------------------------------------------- helpers
    @property
    def camera(self) -> Camera | None:
        """Camera recorded in the repository, or None."""
        name = self._group.attrs.get("camera")
        return None if name is None else get_camera(name)

    def _get(self, path):
        try:
            return self._group[path]
        except KeyError:
            return None

    def prepare_groups(self, band: str, detector_ids: Iterable[int]) -> None:
        """Create the template and calib groups up front (before threaded writes)."""
        self._group.require_group(f"templates/{check_band(band)}")
        for kind in CALIB_KINDS:
            bkey = band if kind == "flat" else "none"
            for det_id in detector_ids:
                self._group.require_group(f"calibs/{kind}/{int(det_id)}/{bkey}")

    # --------------------------------------------------------------- templates
    def put_template(
        self,
        band: str,
        tile_id: str,
        image: np.ndarray,
        variance: np.ndarray,
        wcs: WCS,
        psf: np.ndarray | None = None,
    ) -> None:
        """Store one template tile.

        Parameters
        ----------
        band : str
        tile_id : str
        image, variance : array_like
            ``(ny, nx)``, nJy and nJy².
        wcs : astropy.wcs.WCS
            Celestial WCS of the tile.
        psf : array_like, optional
            PSF stamp (sum 1).
        """
        check_band(band)
        tile_id = str(tile_id)
        if "/" in tile_id or not tile_id:
            raise ValueError(f"tile id {tile_id!r} must be non-empty without '/'")
        image = np.asarray(image, dtype=np.float32)
        variance = np.asarray(variance, dtype=np.float32)
        if image.ndim != 2 or image.shape != variance.shape:
            msg = f"template image {image.shape} and variance {variance.shape} must be equal 2-D"
            raise ValueError(msg)
        grp = self._group.require_group(f"templates/{band}/{tile_id}")
        chunks = (min(_TEMPLATE_CHUNK, image.shape[0]), min(_TEMPLATE_CHUNK, image.shape[1]))
        attrs = {
            "wcs": wcs_to_attrs(wcs),
            "corners": _tile_corners(wcs, image.shape).tolist(),
            "band": band,
            "tile_id": tile_id,
        }
        if psf is not None:
            attrs["psf"] = np.asarray(psf, dtype=float).tolist()
        for name, data in (("image", image), ("variance", variance)):
            arr = grp.create_array(
                name,
                shape=data.shape,
                chunks=chunks,
                dtype="float32",
                compressors=_PIXEL_CODEC,
                overwrite=True,
            )
            arr[...] = data
            arr.attrs.update(attrs)
        grp.attrs.update(attrs)

    def template_ids(self, band: str) -> list[str]:
        """Tile ids stored for ``band``."""
        grp = self._get(f"templates/{band}")
        return [] if grp is None else sorted(grp.group_keys())

    def get_templates(self, band: str, corners: ArrayLike) -> list[TemplateTile]:
        """All template tiles of ``band`` whose footprint overlaps a sky polygon.

        Parameters
        ----------
        band : str
        corners : array_like
            ``(N, 2)`` polygon vertices (ra, dec) in degrees, e.g.
            ``detector.footprint(...)``.

        Returns
        -------
        list of TemplateTile
            Possibly empty.
        """
        check_band(band)
        out = []
        for tile_id in self.template_ids(band):
            grp: Any = self._group[f"templates/{band}/{tile_id}"]
            attrs = dict(grp.attrs)
            if not polygons_overlap(attrs["corners"], corners):
                continue
            image = grp["image"][...]
            variance = grp["variance"][...]
            psf = attrs.get("psf")
            out.append(
                TemplateTile(
                    image=image,
                    variance=variance,
                    wcs=wcs_from_attrs(attrs["wcs"], image.shape),
                    band=band,
                    tile_id=tile_id,
                    psf=None if psf is None else np.asarray(psf, dtype=np.float32),
                )
            )
        return out

    def ingest_template(
        self, path: str | os.PathLike[str], band: str, tile_id: str | None = None
    ) -> str:
        """Ingest any FITS image with a celestial WCS as a template tile.

        The image is the primary HDU if it has 2-D data, else the first image
        extension.  A ``VARIANCE`` extension is used when present; otherwise the
        variance is the square of the robust (MAD) standard deviation of the image,
        constant over the tile.  Pixel units are nJy unless ``BUNIT`` names another
        flux density (Jy, uJy, ...), or the header carries an AB zero point
        ``MAGZERO``/``ZP`` for counts.

        Parameters
        ----------
        path : str
            FITS file.
        band : str
        tile_id : str, optional
            Default: the file name without extension.

        Returns
        -------
        str
            The tile id.

        Raises
        ------
        ConfigurationError
            If the file has no 2-D image with a celestial WCS or unknown units.
        """
        check_band(band)
        path = os.fspath(path)
        if tile_id is None:
            tile_id = os.path.basename(path).split(".")[0]
        with _open_fits(path) as hdul:
            hdu = _first_image_hdu(hdul)
            if hdu is None:
                msg = f"template {path}: no 2-D image HDU; give a FITS image with a celestial WCS"
                raise ConfigurationError(msg)
            wcs = WCS(hdu.header, naxis=2)
            if not wcs.has_celestial or wcs.celestial.naxis != 2:
                msg = (
                    f"template {path}: image HDU has no celestial WCS; add CTYPE1/2, "
                    "CRVAL, CRPIX and CD (or CDELT) keywords before ingesting"
                )
                raise ConfigurationError(msg)
            wcs = wcs.celestial
            image = np.asarray(hdu.data, dtype=np.float64)
            factor = _flux_factor(path, hdu.header)
            var_hdu = next((h for h in hdul if h.name == "VARIANCE"), None)
            if var_hdu is not None:
                variance = np.asarray(var_hdu.data, dtype=np.float64)
                if variance.shape != image.shape:
                    msg = f"template {path}: VARIANCE shape {variance.shape} != {image.shape}"
                    raise ConfigurationError(msg)
            else:
                finite = image[np.isfinite(image)]
                if finite.size == 0:
                    raise ConfigurationError(f"template {path}: image has no finite pixels")
                variance = np.full(image.shape, robust_sigma(finite) ** 2)
        self.put_template(band, tile_id, image * factor, variance * factor**2, wcs)
        return tile_id

    # ----------------------------------------------------------- calibrations
    def put_calib(
        self,
        kind: str,
        detector_id: int,
        image: np.ndarray,
        band: str | None = None,
        valid_from: float = 0.0,
        valid_to: float = 1e6,
    ) -> str:
        """Store a master calibration.

        Parameters
        ----------
        kind : {"bias", "dark", "flat"}
            Bias in electrons, dark in electrons/second, flat normalised to mean 1.
        detector_id : int
        image : array_like
            Assembled detector-shaped image.
        band : str, optional
            Required for flats, ignored otherwise.
        valid_from, valid_to : float
            Validity range, MJD (``valid_from <= mjd < valid_to``).

        Returns
        -------
        str
            The zarr path of the stored array.
        """
        kind, bkey = self._calib_key(kind, band)
        image = np.asarray(image, dtype=np.float32)
        chunks = image.shape
        cam = self.camera
        if cam is not None:
            det = cam[int(detector_id)]
            if image.shape != det.shape:
                msg = (
                    f"{kind} for detector {detector_id} has shape {image.shape}, the "
                    f"{cam.name} detector is {det.shape}; give an assembled image"
                )
                raise ConfigurationError(msg)
            cy, cx = det.amp_chunks
            chunks = (cy[0], cx[0])
        grp = self._group.require_group(f"calibs/{kind}/{int(detector_id)}/{bkey}")
        n = len(list(grp.group_keys()))
        sub = grp.require_group(str(n))
        arr = sub.create_array(
            "image", shape=image.shape, chunks=chunks, dtype="float32", compressors=_PIXEL_CODEC
        )
        arr[...] = image
        arr.attrs.update(
            {"valid_from": float(valid_from), "valid_to": float(valid_to), "kind": kind}
        )
        return arr.path

    @staticmethod
    def _calib_key(kind, band):
        if kind not in CALIB_KINDS:
            msg = f"unknown calibration kind {kind!r}; use one of {', '.join(CALIB_KINDS)}"
            raise ConfigurationError(msg)
        if kind == "flat":
            if band is None:
                raise ConfigurationError("a flat needs a band; pass band='r' (or --band r)")
            return kind, check_band(band)
        return kind, "none"

    def _find_calib(self, kind, detector_id, band, mjd):
        kind, bkey = self._calib_key(kind, band)
        grp = self._get(f"calibs/{kind}/{int(detector_id)}/{bkey}")
        best = None
        if grp is not None:
            for key in grp.group_keys():
                arr = grp[f"{key}/image"]
                a = arr.attrs
                if a["valid_from"] <= mjd < a["valid_to"] and (
                    best is None or a["valid_from"] >= best.attrs["valid_from"]
                ):
                    best = arr
        if best is None:
            bandtxt = f" band {band}" if kind == "flat" else ""
            msg = (
                f"no {kind} for detector {detector_id}{bandtxt} valid at MJD {mjd} in "
                f"{self.root}; ingest one with `apdask butler ingest-calib --kind {kind} "
                f"--detector {detector_id}{' --band ' + str(band) if kind == 'flat' else ''}`"
            )
            raise ConfigurationError(msg)
        return best

    def get_calib(self, kind: str, detector_id: int, band: str | None, mjd: float) -> np.ndarray:
        """The master calibration of ``kind`` valid at ``mjd``, as a numpy array.

        When several entries are valid, the one with the latest ``valid_from`` wins.

        Raises
        ------
        ConfigurationError
            If none is valid.
        """
        return self._find_calib(kind, detector_id, band, mjd)[...]

    def get_calib_lazy(self, kind: str, detector_id: int, band: str | None, mjd: float) -> da.Array:
        """Like :meth:`get_calib` but a dask array chunked as stored (per amplifier)."""
        return da.from_zarr(self._find_calib(kind, detector_id, band, mjd))

    def ingest_calib(
        self,
        path: str | os.PathLike[str],
        kind: str,
        detector_id: int,
        band: str | None = None,
        valid_from: float = 0.0,
        valid_to: float = 1e6,
    ) -> str:
        """Ingest a master calibration from the first 2-D image HDU of a FITS file.

        The image must already be in the stored units (see :meth:`put_calib`).
        """
        path = os.fspath(path)
        with _open_fits(path) as hdul:
            hdu = _first_image_hdu(hdul)
            if hdu is None:
                msg = f"calibration {path}: no 2-D image HDU; give an assembled master {kind}"
                raise ConfigurationError(msg)
            image = np.asarray(hdu.data, dtype=np.float32)
        return self.put_calib(kind, detector_id, image, band, valid_from, valid_to)

    # ------------------------------------------------------------- DRP objects
    def put_drp_objects(self, table: Table) -> None:
        """Store the DRP Object catalog (replaces any previous one).

        Parameters
        ----------
        table : astropy.table.Table
            Columns objectId (int64), ra, dec (deg), r_flux (nJy), extendedness.
        """
        missing = [c for c in _DRP_COLUMNS if c not in table.colnames]
        if missing:
            msg = f"DRP object table lacks column(s) {', '.join(missing)}; need {_DRP_COLUMNS}"
            raise ConfigurationError(msg)
        grp = self._group.require_group("drp_objects")
        n = len(table)
        for col in _DRP_COLUMNS:
            dtype = _drp_dtype(col)
            data = np.asarray(table[col], dtype=dtype)
            arr = grp.create_array(
                col, shape=(n,), chunks=(max(n, 1),), dtype=dtype, overwrite=True
            )
            if n:
                arr[...] = data

    def get_drp_objects(self, corners: ArrayLike | None = None) -> Table:
        """The DRP Object catalog, optionally only objects inside a sky polygon."""
        grp = self._get("drp_objects")
        if grp is None:
            return Table(
                {c: np.zeros(0, "int64" if c == "objectId" else "f8") for c in _DRP_COLUMNS}
            )
        t = Table({c: grp[c][...] for c in _DRP_COLUMNS})
        if corners is not None and len(t):
            t = t[_points_in_polygon(np.asarray(t["ra"]), np.asarray(t["dec"]), corners)]
        return t

    # ----------------------------------------------------------- image products
    def get(
        self,
        kind: str,
        *,
        visit: int,
        detector: str | int,
        products_dir: str | os.PathLike[str] | None = None,
    ) -> CCDData:
        """One CCD's image product (``"science"``, ``"template"`` or ``"difference"``).

        Parameters
        ----------
        kind : str
        visit : int
        detector : str or int
            Detector name (``"R22_S11"``) or id.
        products_dir : str or os.PathLike, optional
            Default ``apdask.products.dir``, else ``<root>/products``.

        Returns
        -------
        astropy.nddata.CCDData
            nJy with its WCS, variance, PSF and mask (see
            :func:`apdask.io.products.read_product`).

        Raises
        ------
        apdask.exceptions.ProductNotFoundError
            The product was not kept (``apdask.products.kinds``, ``keep_visits``).
        """
        name = detector
        if not isinstance(name, str):
            camera = self.camera
            if camera is None:
                msg = f"{self} records no camera: give the detector by name, not id {detector}"
                raise ConfigurationError(msg)
            name = camera[int(name)].name
        root = config.get("products.dir", products_dir) or f"{self.root}/products"
        return read_product(root, kind, int(visit), name)


def _drp_dtype(col):
    return "int64" if col == "objectId" else "float64"


def _flux_factor(path, header):
    """Factor converting the image's pixel values to nJy."""
    zp = header.get("MAGZERO", header.get("ZP"))
    bunit = str(header.get("BUNIT", "")).strip()
    if not bunit or bunit.lower() == "njy":
        return 1.0
    try:
        unit = u.Unit(bunit)
        return float((1.0 * unit).to(u.nJy).value)
    except (ValueError, u.UnitConversionError):
        if zp is not None:
            return 10.0 ** (-0.4 * (float(zp) - 31.4))
        msg = (
            f"template {path}: BUNIT={bunit!r} is not a flux density; give nJy/Jy pixels or "
            "add an AB zero point MAGZERO to the header"
        )
        raise ConfigurationError(msg) from None
