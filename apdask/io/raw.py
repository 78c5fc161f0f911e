"""Raw multi-extension FITS files: one file per CCD per exposure (snap).

The format is documented in ``docs/formats.md``.  In short: a primary HDU without
data carries the exposure metadata; one int32 image extension per amplifier, in
``detector.amplifiers`` order and named after the amplifier, holds the raw segment
in readout order (prescan, data, serial overscan).

:func:`read_raw` reads and validates the headers eagerly and wraps each amplifier
in a lazy dask array whose task opens the file and reads that one extension, so
building the graph never touches the pixels.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import dask
import dask.array as da
import numpy as np
from astropy.io import fits
from astropy.time import Time
from numpy.typing import ArrayLike

from apdask.core.camera import Amplifier, Camera, Detector, check_band, get_camera
from apdask.core.files import atomic_write
from apdask.exceptions import RawFormatError, UnknownDetectorError

__all__ = [
    "RawMetadata",
    "RawExposure",
    "REQUIRED_KEYWORDS",
    "IMGTYPES",
    "read_raw",
    "write_raw",
    "raw_name",
    "effective_exptime",
    "assembled_amp",
    "overscan",
    "amp_header",
    "Segment",
    "read_segment",
]

IMGTYPES = ("SCIENCE", "BIAS", "DARK", "FLAT", "CBP")

#: Primary-header keywords read_raw requires.
REQUIRED_KEYWORDS = (
    "INSTRUME", "DETNAME", "DETECTOR", "EXPID", "VISIT", "SNAP", "MJD-BEG", "MJD-END",
    "EXPTIME", "DARKTIME", "FILTBAND", "RA", "DEC", "ROTPA", "IMGTYPE",
    "SHOPNBEG", "SHOPNEND", "SHCLSBEG", "SHCLSEND",
)  # fmt: skip

_SHUTTER_KEYS = {
    "open_begin": "SHOPNBEG",
    "open_end": "SHOPNEND",
    "close_begin": "SHCLSBEG",
    "close_end": "SHCLSEND",
}


@dataclass
class RawMetadata:
    """Metadata of one raw exposure, from the primary header.

    Attributes
    ----------
    instrument : str
        Camera name as in INSTRUME, e.g. ``"LSSTComCam"``.
    detector_name : str
    detector_id : int
    visit, exposure_id, snap : int
    mjd_begin, mjd_end : float
        Shutter-open command and readout start, MJD TAI.
    exptime : float
        Requested exposure time, s.
    darktime : float
        Time since the last clear of the CCD, s.
    band : str
    ra, dec, rotpa : float
        Boresight and rotation angle, degrees.
    imgtype : str
        One of :data:`IMGTYPES`.
    shutter : dict
        ``open_begin``, ``open_end``, ``close_begin``, ``close_end``: seconds after
        ``mjd_begin`` at which the opening / closing blade starts / ends its motion.
    header : astropy.io.fits.Header
        The full primary header.
    """

    instrument: str
    detector_name: str
    detector_id: int
    visit: int
    exposure_id: int
    snap: int
    mjd_begin: float
    mjd_end: float
    exptime: float
    darktime: float
    band: str
    ra: float
    dec: float
    rotpa: float
    imgtype: str = "SCIENCE"
    shutter: dict = field(default_factory=dict)
    header: fits.Header = field(default_factory=fits.Header, repr=False)

    @property
    def mjd_mid(self) -> float:
        """Midpoint of the effective exposure, MJD TAI."""
        sh = self.shutter or _default_shutter(self.exptime)
        t_open = 0.5 * (sh["open_begin"] + sh["open_end"])
        t_close = 0.5 * (sh["close_begin"] + sh["close_end"])
        return self.mjd_begin + 0.5 * (t_open + t_close) / 86400.0


def _default_shutter(exptime):
    """Instantaneous-shutter timings for an exposure of ``exptime`` seconds."""
    return {"open_begin": 0.0, "open_end": 0.0, "close_begin": exptime, "close_end": exptime}


def effective_exptime(meta: RawMetadata) -> float:
    """Effective exposure time in seconds from the shutter motion.

    Both blades sweep the focal plane at constant speed, so the time a point is
    exposed is the closing blade's pass time minus the opening blade's; averaged
    over the focal plane that is
    ``(SHCLSBEG + SHCLSEND) / 2 - (SHOPNBEG + SHOPNEND) / 2``.

    Parameters
    ----------
    meta : RawMetadata

    Returns
    -------
    float
        Seconds; ``meta.exptime`` when no shutter timings are known.
    """
    sh = meta.shutter
    if not sh:
        return float(meta.exptime)
    return 0.5 * (sh["close_begin"] + sh["close_end"]) - 0.5 * (sh["open_begin"] + sh["open_end"])


@dataclass
class RawExposure:
    """A raw CCD exposure with lazily loaded amplifier segments.

    Attributes
    ----------
    amps : tuple of dask.array.Array
        float32 raw segments in readout order, one per amplifier in
        ``detector.amplifiers`` order, shape ``amp.raw_shape``.
    meta : RawMetadata
    detector : Detector
    path : str
    """

    amps: tuple
    meta: RawMetadata
    detector: Detector
    path: str = ""
    segments: tuple = ()  #: :class:`Segment` per amplifier (None: read through astropy)


#: numpy dtype of each FITS BITPIX (big-endian, as stored)
_BITPIX_DTYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


@dataclass(frozen=True)
class Segment:
    """Where an amplifier extension's pixels lie in a raw file, read from its header.

    Attributes
    ----------
    index : int
        Extension number (1 for the first amplifier).
    offset : int
        Byte offset of the data in the file.
    shape : tuple of int
        ``(NAXIS2, NAXIS1)``.
    dtype : str
        Stored numpy dtype (big-endian), from BITPIX.
    """

    index: int
    offset: int
    shape: tuple[int, int]
    dtype: str


def _segment(index: int, header: fits.Header, offset: int) -> Segment | None:
    """The extension's :class:`Segment`, or None when its pixels need astropy (scaled,
    BLANK, not a plain 2-D image)."""
    dtype = _BITPIX_DTYPES.get(header.get("BITPIX"))
    if (
        dtype is None
        or header.get("NAXIS") != 2
        or any(k in header for k in ("BZERO", "BSCALE", "BLANK"))
        or header.get("PCOUNT", 0) != 0
        or header.get("GCOUNT", 1) != 1
    ):
        return None
    return Segment(index, int(offset), (int(header["NAXIS2"]), int(header["NAXIS1"])), dtype)


def read_segment(path: str | os.PathLike[str], segment: Segment) -> np.ndarray:
    """The pixels of one amplifier extension as float32, read at its offset.

    Equal to ``fits.open(path)[segment.index].data.astype(np.float32)`` for an
    unscaled image extension, without parsing the file's headers again.

    Raises
    ------
    RawFormatError
        The file ends before the segment's last pixel.
    """
    data = np.empty(segment.shape, segment.dtype)
    with open(path, "rb", buffering=0) as f:
        f.seek(segment.offset)
        got = f.readinto(data.data.cast("B"))
    if got != data.nbytes:
        _fail(
            os.fspath(path),
            f"is truncated (extension {segment.index} has {got} of its {data.nbytes} bytes)",
            "wait for the transfer to finish or re-transfer it",
        )
    return data.astype(np.float32)


def raw_name(instrument: str, visit: int, detector_name: str, snap: int = 0) -> str:
    """File name of a raw: ``f"{instrument}_{visit}_{detector_name}_{snap}.fits"``."""
    return f"{instrument}_{int(visit)}_{detector_name}_{int(snap)}.fits"


def _sec(x0, x1, y0, y1, flip_x=False, flip_y=False):
    """IRAF section string, 1-based inclusive, from half-open 0-based ranges."""
    xa, xb = x0 + 1, x1
    ya, yb = y0 + 1, y1
    if flip_x:
        xa, xb = xb, xa
    if flip_y:
        ya, yb = yb, ya
    return f"[{xa}:{xb},{ya}:{yb}]"


def amp_header(amp: Amplifier) -> fits.Header:
    """Extension-header cards (DATASEC, BIASSEC, DETSEC, GAIN...) of an amplifier."""
    ny, _ = amp.raw_shape
    h = fits.Header()
    h["EXTNAME"] = amp.name
    h["DATASEC"] = (_sec(amp.prescan, amp.prescan + amp.nx, 0, ny), "data section of segment")
    h["BIASSEC"] = (
        _sec(amp.prescan + amp.nx, amp.raw_shape[1], 0, ny),
        "serial overscan section",
    )
    h["DETSEC"] = (
        _sec(amp.x0, amp.x1, amp.y0, amp.y1, amp.flip_x, amp.flip_y),
        "assembled position; reversed = flipped",
    )
    h["GAIN"] = (amp.gain, "e-/ADU")
    h["RDNOISE"] = (amp.read_noise, "read noise, e-")
    h["SATURATE"] = (amp.saturation, "saturation level, ADU")
    return h


def assembled_amp(segment: ArrayLike, amp: Amplifier) -> np.ndarray:
    """Data section of a raw segment flipped to assembled orientation.

    Parameters
    ----------
    segment : array_like
        Raw segment in readout order, shape ``amp.raw_shape``.
    amp : Amplifier

    Returns
    -------
    numpy.ndarray
        Shape ``(amp.ny, amp.nx)``, equal to ``assembled[amp.y0:amp.y1, amp.x0:amp.x1]``.
    """
    data = np.asarray(segment)[amp.data_slice]
    if amp.flip_y:
        data = data[::-1, :]
    if amp.flip_x:
        data = data[:, ::-1]
    return data


def overscan(segment: ArrayLike, amp: Amplifier) -> np.ndarray:
    """Serial overscan columns of a raw segment (readout order, numpy)."""
    return np.asarray(segment)[amp.overscan_slice]


def _primary_header(meta, detector):
    h = fits.Header()
    sh = meta.shutter or _default_shutter(meta.exptime)
    cards = [
        ("INSTRUME", meta.instrument, "camera"),
        ("DETNAME", detector.name, "detector name"),
        ("DETECTOR", int(detector.id), "detector id"),
        ("EXPID", int(meta.exposure_id), "exposure id"),
        ("VISIT", int(meta.visit), "visit id"),
        ("SNAP", int(meta.snap), "snap index within the visit"),
        ("TIMESYS", "TAI", "time scale of MJD-* and DATE-*"),
        ("MJD-BEG", float(meta.mjd_begin), "start of exposure (shutter command), MJD"),
        ("MJD-END", float(meta.mjd_end), "end of exposure (readout start), MJD"),
        ("DATE-BEG", _iso_tai(meta.mjd_begin), "start of exposure, ISO TAI"),
        ("EXPTIME", float(meta.exptime), "requested exposure time, s"),
        ("DARKTIME", float(meta.darktime), "dark time, s"),
        ("FILTBAND", meta.band, "filter band"),
        ("RA", float(meta.ra), "boresight RA, deg"),
        ("DEC", float(meta.dec), "boresight Dec, deg"),
        ("ROTPA", float(meta.rotpa), "rotation angle, deg"),
        ("IMGTYPE", meta.imgtype, "image type"),
        ("SHOPNBEG", float(sh["open_begin"]), "opening blade starts, s after MJD-BEG"),
        ("SHOPNEND", float(sh["open_end"]), "opening blade ends, s after MJD-BEG"),
        ("SHCLSBEG", float(sh["close_begin"]), "closing blade starts, s after MJD-BEG"),
        ("SHCLSEND", float(sh["close_end"]), "closing blade ends, s after MJD-BEG"),
    ]
    for key, value, comment in cards:
        h[key] = (value, comment)
    for card in meta.header.cards:
        if card.keyword and card.keyword not in h and card.keyword not in _STRUCTURAL:
            h[card.keyword] = (card.value, card.comment)
    return h


_STRUCTURAL = {"SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "COMMENT", "HISTORY"}


def _iso_tai(mjd):
    return Time(mjd, format="mjd", scale="tai").isot


def write_raw(
    path: str | os.PathLike[str],
    detector: Detector,
    amp_segments: Sequence[ArrayLike],
    meta: RawMetadata,
) -> str:
    """Write a raw MEF file atomically (temporary file, then ``os.replace``).

    Parameters
    ----------
    path : str or os.PathLike
        Destination file.
    detector : Detector
    amp_segments : sequence of array_like
        One raw segment per amplifier in ``detector.amplifiers`` order, ADU in readout
        order with shape ``amp.raw_shape``; rounded to int32.
    meta : RawMetadata
        Exposure metadata; ``detector_name``/``detector_id`` are taken from
        ``detector``.  Extra cards in ``meta.header`` are copied.

    Returns
    -------
    str
        The path written.
    """
    amps = detector.amplifiers
    if len(amp_segments) != len(amps):
        msg = (
            f"write_raw got {len(amp_segments)} amplifier segments for {detector.name}, "
            f"which has {len(amps)}; pass one segment per detector.amplifiers entry"
        )
        raise ValueError(msg)
    hdus = [fits.PrimaryHDU(header=_primary_header(meta, detector))]
    for amp, seg in zip(amps, amp_segments, strict=True):
        seg = np.asarray(seg)
        if seg.shape != amp.raw_shape:
            msg = (
                f"amplifier {amp.name} segment has shape {seg.shape}, expected "
                f"{amp.raw_shape} (ny, prescan+nx+overscan) in readout order"
            )
            raise ValueError(msg)
        data = np.rint(seg).astype(np.int32) if seg.dtype.kind == "f" else seg.astype(np.int32)
        hdus.append(fits.ImageHDU(data=data, header=amp_header(amp)))
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    atomic_write(path, fits.HDUList(hdus).writeto)
    return path


def _fail(path: str, problem: str, fix: str) -> NoReturn:
    raise RawFormatError(f"raw file {path}: {problem}; {fix}")


def _read_amp(path, index, shape):
    """Task body: read one amplifier extension as float32."""
    with fits.open(path, memmap=False) as hdul:
        data = hdul[index].data
        if data is None or data.shape != shape:
            got = None if data is None else data.shape
            msg = f"raw file {path}: extension {index} has shape {got}, expected {shape}"
            raise RawFormatError(msg)
        return data.astype(np.float32)


def _meta_from_header(path, h):
    missing = [k for k in REQUIRED_KEYWORDS if k not in h]
    if missing:
        _fail(
            path,
            f"primary header lacks required keyword(s) {', '.join(missing)}",
            "regenerate the raw with apdask.io.raw.write_raw or add the keywords "
            "(see docs/formats.md)",
        )
    imgtype = str(h["IMGTYPE"]).upper()
    if imgtype not in IMGTYPES:
        _fail(path, f"IMGTYPE={imgtype!r} is unknown", f"use one of {', '.join(IMGTYPES)}")
    band = str(h["FILTBAND"]).strip()
    try:
        check_band(band)
    except ValueError as exc:
        _fail(path, f"FILTBAND={band!r} is not a band", str(exc))
    try:
        return RawMetadata(
            instrument=str(h["INSTRUME"]),
            detector_name=str(h["DETNAME"]),
            detector_id=int(h["DETECTOR"]),
            visit=int(h["VISIT"]),
            exposure_id=int(h["EXPID"]),
            snap=int(h["SNAP"]),
            mjd_begin=float(h["MJD-BEG"]),
            mjd_end=float(h["MJD-END"]),
            exptime=float(h["EXPTIME"]),
            darktime=float(h["DARKTIME"]),
            band=band,
            ra=float(h["RA"]),
            dec=float(h["DEC"]),
            rotpa=float(h["ROTPA"]),
            imgtype=imgtype,
            shutter={k: float(h[v]) for k, v in _SHUTTER_KEYS.items()},
            header=h,
        )
    except (TypeError, ValueError) as exc:
        _fail(path, f"a header keyword has a value of the wrong type ({exc})", "fix the header")


def read_raw(path: str | os.PathLike[str], camera: Camera | str | None = None) -> RawExposure:
    """Open a raw MEF file: validated metadata now, pixels lazily.

    Parameters
    ----------
    path : str or os.PathLike
    camera : Camera or str, optional
        Camera to check against; by default the one named by INSTRUME.

    Returns
    -------
    RawExposure
        ``amps`` are dask arrays whose tasks read one extension each.

    Raises
    ------
    RawFormatError
        The file is missing, not FITS, truncated, lacks keywords, names an unknown
        camera or detector, or its amplifier extensions do not match the camera.
    """
    path = os.fspath(path)
    primary, ext_headers, ext_kinds, offsets = _read_headers(path)
    meta = _meta_from_header(path, primary)
    detector = _detector_of(path, meta, camera)
    arrays = _lazy_amps(path, meta, detector, ext_headers, ext_kinds)
    segments = tuple(
        _segment(k + 1, h, off) for k, (h, off) in enumerate(zip(ext_headers, offsets, strict=True))
    )
    return RawExposure(
        amps=tuple(arrays), meta=meta, detector=detector, path=path, segments=segments
    )


def _read_headers(path: str) -> tuple[fits.Header, list[fits.Header], list[str], list[int]]:
    """Primary header, extension headers, extension HDU kinds and data offsets of a raw."""
    if not os.path.isfile(path):
        _fail(path, "does not exist", "check the path or the distributor directory")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                primary = hdul[0].header.copy()
                ext_headers = [hdu.header for hdu in hdul[1:]]  # parsed: outlive the file
                ext_kinds = [type(hdu).__name__ for hdu in hdul[1:]]
                # where each extension's data starts (as astropy reads it; fileinfo()
                # re-serialises every header to tell it, 0.5 ms each)
                offsets = [_data_offset(hdul, k) for k in range(1, len(hdul))]
    except (OSError, ValueError, TypeError, IndexError) as exc:
        _fail(path, f"is not a readable FITS file ({exc})", "re-transfer or regenerate it")
    for w in caught:
        if "truncated" in str(w.message).lower():
            _fail(path, "is truncated", "wait for the transfer to finish or re-transfer it")
    return primary, ext_headers, ext_kinds, offsets


def _data_offset(hdul: fits.HDUList, k: int) -> int:
    offset = getattr(hdul[k], "_data_offset", None)
    return int(offset) if offset is not None else int(hdul.fileinfo(k)["datLoc"])


def _detector_of(path: str, meta: RawMetadata, camera: Camera | str | None) -> Detector:
    """The detector the header names, checked against ``camera`` (default: INSTRUME's)."""
    if camera is None or isinstance(camera, str):
        try:
            cam = get_camera(camera or meta.instrument)
        except UnknownDetectorError:
            _fail(
                path,
                f"INSTRUME={meta.instrument!r} is not a known camera",
                "use LSSTCam, LSSTComCam or TestCam",
            )
    else:
        cam = camera
    try:
        detector = cam[meta.detector_name]
    except UnknownDetectorError as exc:
        _fail(path, f"DETNAME={meta.detector_name!r} is unknown", str(exc))
    if detector.id != meta.detector_id:
        _fail(
            path,
            f"DETECTOR={meta.detector_id} does not match DETNAME={meta.detector_name} "
            f"(id {detector.id})",
            "fix the header",
        )
    return detector


def _lazy_amps(
    path: str,
    meta: RawMetadata,
    detector: Detector,
    ext_headers: list[fits.Header],
    ext_kinds: list[str],
) -> list[da.Array]:
    """One dask array per amplifier extension, after checking the extensions' layout."""
    amps = detector.amplifiers
    if len(ext_headers) != len(amps):
        _fail(
            path,
            f"has {len(ext_headers)} image extensions, {detector.name} has {len(amps)} amplifiers",
            "the file is truncated or from another camera; re-transfer it",
        )
    arrays = []
    for k, (amp, eh, kind) in enumerate(zip(amps, ext_headers, ext_kinds, strict=True)):
        shape = (eh.get("NAXIS2"), eh.get("NAXIS1"))
        if kind != "ImageHDU" or eh.get("NAXIS") != 2 or shape != amp.raw_shape:
            _fail(
                path,
                f"extension {k + 1} ({eh.get('EXTNAME')}) has shape {shape}, expected "
                f"{amp.raw_shape} for amplifier {amp.name}",
                "the file does not match the camera geometry; regenerate it",
            )
        if eh.get("EXTNAME", amp.name) != amp.name:
            _fail(
                path,
                f"extension {k + 1} is {eh.get('EXTNAME')!r}, expected {amp.name!r}",
                "write amplifiers in detector.amplifiers order",
            )
        name = f"raw-{meta.visit}-{detector.name}-{meta.snap}-{amp.name}"
        key = f"{name}-{dask.base.tokenize(path, os.path.getmtime(path))}"
        task = dask.delayed(_read_amp, pure=True)(path, k + 1, amp.raw_shape, dask_key_name=key)
        arrays.append(da.from_delayed(task, amp.raw_shape, dtype=np.float32))
    return arrays
