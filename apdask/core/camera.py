"""Camera geometry: LSSTCam, ComCam and a tiny test camera.

Conventions (also in ``docs/formats.md``):

* Images are indexed ``[y, x]``; pixel coordinates are 0-based, as in astropy's
  ``WCS.pixel_to_world_values``.
* A detector's assembled image has shape ``(ny, nx)``.  Amplifiers tile it in
  ``amp_rows`` rows by ``amp_cols`` columns; amplifier ``(row, col)`` covers
  ``y0:y1, x0:x1`` of the assembled image.
* Focal-plane coordinates are in mm, x and y parallel to the detector axes when
  the detector rotation is 0.  The plate scale is the same everywhere (no optical
  distortion in the predicted WCS).
* The predicted WCS is a TAN projection about the boresight.  With rotation
  angle ``rotpa`` = 0, north is +y and east is -x on the sky.

LSSTCam detector ids follow Rubin's order: rafts R01, R02, R03, R10, ..., R43
(corner rafts excluded), nine slots S00, S01, S02, S10, ..., S22 each, so
``id = raft_index * 9 + slot_index`` and ``R22_S11`` is 94.  ComCam uses the
nine slots of raft R22 with ids 0..8.  The test camera has two 512x512 CCDs
``T00`` and ``T01``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from astropy.wcs import WCS

from apdask.exceptions import CoordinateError, UnknownDetectorError, UnknownFilterError

__all__ = [
    "BANDS",
    "Amplifier",
    "Detector",
    "Camera",
    "get_camera",
    "CAMERAS",
    "check_band",
    "check_pointing",
    "ZEROPOINTS",
    "njy_per_electron",
]

BANDS = ("u", "g", "r", "i", "z", "y")

#: Plate scale of the Rubin focal plane, arcsec per 10 µm pixel.
PIXEL_SCALE_ARCSEC = 0.2


def check_band(band: str) -> str:
    """Return ``band`` if it is a Rubin filter band, else raise UnknownFilterError."""
    if band not in BANDS:
        msg = f"unknown filter {band!r}; use one of {', '.join(BANDS)} (e.g. --filter r)"
        raise UnknownFilterError(msg)
    return band


def check_pointing(ra: float, dec: float) -> tuple[float, float]:
    """Validate a boresight position in degrees; raise CoordinateError if out of range."""
    try:
        ra, dec = float(ra), float(dec)
    except (TypeError, ValueError):
        msg = f"RA/Dec must be numbers in degrees, got ra={ra!r} dec={dec!r}"
        raise CoordinateError(msg) from None
    if not (np.isfinite(ra) and 0.0 <= ra < 360.0):
        msg = f"RA must be in [0, 360) degrees, got {ra!r}; e.g. --ra 150.1"
        raise CoordinateError(msg)
    if not (np.isfinite(dec) and -90.0 <= dec <= 90.0):
        msg = f"Dec must be in [-90, 90] degrees, got {dec!r}; e.g. --dec -30.5"
        raise CoordinateError(msg)
    return ra, dec


@dataclass(frozen=True)
class Amplifier:
    """One amplifier segment of a detector.

    Attributes
    ----------
    name : str
        Segment name, e.g. ``"C10"``.
    index : int
        0-based index in the raw file's extension order (extension ``index + 1``).
    x0, x1, y0, y1 : int
        Data section in assembled-image pixels (half-open ranges).
    prescan, overscan : int
        Serial prescan and overscan columns in the raw segment.
    flip_x, flip_y : bool
        Whether the raw segment is stored mirrored relative to the assembled image
        (readout corner).  The raw segment's readout-ordered array, flipped back,
        gives ``assembled[y0:y1, x0:x1]``.
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise in electrons.
    saturation : float
        Saturation level in ADU.
    """

    name: str
    index: int
    x0: int
    x1: int
    y0: int
    y1: int
    prescan: int
    overscan: int
    flip_x: bool = False
    flip_y: bool = False
    gain: float = 1.5
    read_noise: float = 6.0
    saturation: float = 100_000.0

    @property
    def nx(self) -> int:
        """Data columns."""
        return self.x1 - self.x0

    @property
    def ny(self) -> int:
        """Data rows."""
        return self.y1 - self.y0

    @property
    def raw_shape(self) -> tuple[int, int]:
        """Shape ``(ny, prescan + nx + overscan)`` of the raw segment."""
        return (self.ny, self.prescan + self.nx + self.overscan)

    @property
    def data_slice(self) -> tuple[slice, slice]:
        """Slice of the data section within the raw segment (readout order)."""
        return (slice(0, self.ny), slice(self.prescan, self.prescan + self.nx))

    @property
    def overscan_slice(self) -> tuple[slice, slice]:
        """Slice of the serial overscan within the raw segment."""
        return (slice(0, self.ny), slice(self.prescan + self.nx, self.raw_shape[1]))


@dataclass(frozen=True)
class Detector:
    """One CCD: geometry, amplifiers and its place in the focal plane.

    Attributes
    ----------
    name : str
        e.g. ``"R22_S11"``.
    id : int
        Integer detector id (see the module docstring for the order).
    nx, ny : int
        Assembled image size in pixels.
    amplifiers : tuple of Amplifier
    fp_x, fp_y : float
        Focal-plane position of the detector centre, mm.
    rotation : float
        Rotation of the detector in the focal plane, degrees.
    pixel_size : float
        Pixel size in µm.
    sensor : str
        Sensor vendor type, ``"ITL"``, ``"E2V"`` or ``"TEST"``.
    """

    name: str
    id: int
    nx: int
    ny: int
    amplifiers: tuple = field(repr=False)
    fp_x: float = 0.0
    fp_y: float = 0.0
    rotation: float = 0.0
    pixel_size: float = 10.0
    sensor: str = "ITL"

    @property
    def shape(self) -> tuple[int, int]:
        """Assembled image shape ``(ny, nx)``."""
        return (self.ny, self.nx)

    @property
    def pixel_scale(self) -> float:
        """Arcsec per pixel."""
        return PIXEL_SCALE_ARCSEC * self.pixel_size / 10.0

    @property
    def amp_chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask chunks ``(row heights, column widths)`` that put one amplifier per chunk."""
        ys = sorted({(a.y0, a.y1) for a in self.amplifiers})
        xs = sorted({(a.x0, a.x1) for a in self.amplifiers})
        return (tuple(b - a for a, b in ys), tuple(b - a for a, b in xs))

    def amp_grid(self) -> Any:
        """Amplifiers as a nested list ``[row][col]`` in assembled-image order."""
        ys = sorted({a.y0 for a in self.amplifiers})
        xs = sorted({a.x0 for a in self.amplifiers})
        grid = [[None] * len(xs) for _ in ys]
        for a in self.amplifiers:
            grid[ys.index(a.y0)][xs.index(a.x0)] = a
        return grid

    def pixel_to_focal_plane(self, x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[Any, Any]:
        """Map pixel coordinates to focal-plane mm."""
        x = np.asarray(x, dtype=float) - (self.nx - 1) / 2.0
        y = np.asarray(y, dtype=float) - (self.ny - 1) / 2.0
        t = np.deg2rad(self.rotation)
        mm = self.pixel_size * 1e-3
        fx = self.fp_x + mm * (np.cos(t) * x - np.sin(t) * y)
        fy = self.fp_y + mm * (np.sin(t) * x + np.cos(t) * y)
        return fx, fy

    def predicted_wcs(self, ra: float, dec: float, rotpa: float = 0.0) -> WCS:
        """Predicted TAN WCS of this detector for a boresight pointing.

        Parameters
        ----------
        ra, dec : float
            Boresight in degrees.
        rotpa : float, optional
            Camera rotation angle on the sky, degrees.

        Returns
        -------
        astropy.wcs.WCS
            Celestial WCS with 0-based pixel convention through
            ``pixel_to_world_values``.
        """
        ra, dec = check_pointing(ra, dec)
        scale = self.pixel_scale / 3600.0  # deg / px
        theta = np.deg2rad(rotpa + self.rotation)
        # Pixel -> intermediate world (deg): first detector->focal plane, then sky rotation.
        # Focal plane axes: x to the west (-RA), y to the north at rotpa=0.
        c, s = np.cos(theta), np.sin(theta)
        cd = scale * np.array([[-c, s], [s, c]])
        # Boresight (focal plane origin) in pixel coords of this detector.
        t = np.deg2rad(self.rotation)
        mm = self.pixel_size * 1e-3
        dx, dy = -self.fp_x / mm, -self.fp_y / mm
        px = np.cos(t) * dx + np.sin(t) * dy + (self.nx - 1) / 2.0
        py = -np.sin(t) * dx + np.cos(t) * dy + (self.ny - 1) / 2.0
        w = WCS(naxis=2)
        w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
        w.wcs.crval = [ra, dec]
        w.wcs.crpix = [px + 1.0, py + 1.0]  # FITS is 1-based
        w.wcs.cd = cd
        w.wcs.cunit = ["deg", "deg"]
        w.pixel_shape = (self.nx, self.ny)
        return w

    def footprint(
        self, ra: float, dec: float, rotpa: float = 0.0, padding_arcsec: float = 0.0
    ) -> np.ndarray:
        """Sky polygon of the detector: four corners ``(ra, dec)`` in degrees.

        Parameters
        ----------
        ra, dec, rotpa : float
            Boresight and rotation angle in degrees.
        padding_arcsec : float, optional
            Grow the polygon outward by this margin.

        Returns
        -------
        numpy.ndarray
            Shape ``(4, 2)``, counter-clockwise corners on the sky.
        """
        pad = padding_arcsec / self.pixel_scale
        xs = np.array([-0.5 - pad, self.nx - 0.5 + pad, self.nx - 0.5 + pad, -0.5 - pad])
        ys = np.array([-0.5 - pad, -0.5 - pad, self.ny - 0.5 + pad, self.ny - 0.5 + pad])
        r, d = self.predicted_wcs(ra, dec, rotpa).pixel_to_world_values(xs, ys)
        return np.column_stack([np.mod(r, 360.0), d])


@dataclass(frozen=True)
class Camera:
    """A named set of detectors."""

    name: str
    detectors: tuple = field(repr=False)

    def __len__(self):
        return len(self.detectors)

    def __iter__(self):
        return iter(self.detectors)

    @functools.cached_property
    def _by_name(self):
        return {d.name: d for d in self.detectors}

    @functools.cached_property
    def _by_id(self):
        return {d.id: d for d in self.detectors}

    def __getitem__(self, key):
        """Look a detector up by name (``"R22_S11"``) or integer id."""
        table = self._by_id if isinstance(key, int | np.integer) else self._by_name
        try:
            return table[key]
        except KeyError:
            names = [d.name for d in self.detectors]
            hint = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            msg = f"unknown CCD {key!r} for camera {self.name}; valid names are like {hint}"
            raise UnknownDetectorError(msg) from None

    @property
    def names(self) -> list[str]:
        """Detector names in id order."""
        return [d.name for d in self.detectors]


def _amplifiers(amp_nx, amp_ny, prescan, overscan, rows, cols, seed):
    rng = np.random.default_rng(seed)
    amps = []
    index = 0
    # Rubin order: C10..C17 along the top row, C07..C00 along the bottom row.
    for r in range(rows - 1, -1, -1):
        for c in range(cols):
            if rows == 2:
                name = f"C1{c}" if r == 1 else f"C0{cols - 1 - c}"
            else:
                name = f"C{r}{c}"
            amps.append(
                Amplifier(
                    name=name,
                    index=index,
                    x0=c * amp_nx,
                    x1=(c + 1) * amp_nx,
                    y0=r * amp_ny,
                    y1=(r + 1) * amp_ny,
                    prescan=prescan,
                    overscan=overscan,
                    flip_x=bool(r == 1 and rows == 2),
                    flip_y=bool(r == 1 and rows == 2),
                    gain=float(np.round(rng.uniform(1.4, 1.8), 3)),
                    read_noise=float(np.round(rng.uniform(5.0, 7.0), 2)),
                    saturation=100_000.0,
                )
            )
            index += 1
    return tuple(amps)


_SENSORS = {
    # vendor: (amp nx, amp ny, prescan, overscan)
    "ITL": (509, 2000, 3, 32),
    "E2V": (512, 2002, 10, 32),
}

_RAFTS = [
    f"R{r}{c}" for r in range(5) for c in range(5) if (r, c) not in {(0, 0), (0, 4), (4, 0), (4, 4)}
]
_SLOTS = [f"S{r}{c}" for r in range(3) for c in range(3)]
_ITL_RAFTS = {"R01", "R02", "R03", "R10", "R20", "R41", "R42", "R43"}
_RAFT_PITCH_MM = 127.0
_SLOT_PITCH_MM = 42.25


def _detector(name, det_id, sensor, fp_x, fp_y, seed):
    anx, any_, pre, over = _SENSORS[sensor]
    amps = _amplifiers(anx, any_, pre, over, 2, 8, seed)
    return Detector(
        name=name,
        id=det_id,
        nx=8 * anx,
        ny=2 * any_,
        amplifiers=amps,
        fp_x=fp_x,
        fp_y=fp_y,
        rotation=0.0,
        pixel_size=10.0,
        sensor=sensor,
    )


def _raft_detectors(raft, first_id, sensor):
    rr, rc = int(raft[1]), int(raft[2])
    dets = []
    for k, slot in enumerate(_SLOTS):
        sr, sc = int(slot[1]), int(slot[2])
        fx = (rc - 2) * _RAFT_PITCH_MM + (sc - 1) * _SLOT_PITCH_MM
        fy = (rr - 2) * _RAFT_PITCH_MM + (sr - 1) * _SLOT_PITCH_MM
        det_id = first_id + k
        dets.append(_detector(f"{raft}_{slot}", det_id, sensor, fx, fy, seed=1000 + det_id))
    return dets


@functools.cache
def _lsstcam():
    dets = []
    for i, raft in enumerate(_RAFTS):
        sensor = "ITL" if raft in _ITL_RAFTS else "E2V"
        dets.extend(_raft_detectors(raft, 9 * i, sensor))
    return Camera("LSSTCam", tuple(dets))


@functools.cache
def _comcam():
    dets = _raft_detectors("R22", 0, "ITL")
    return Camera("LSSTComCam", tuple(dets))


@functools.cache
def _testcam():
    dets = []
    for k in range(2):
        amps = _amplifiers(256, 256, 3, 16, 2, 2, seed=7 + k)
        fx = (k - 0.5) * (512 + 40) * 10e-3  # 40 px gap between the CCDs
        dets.append(
            Detector(
                name=f"T0{k}",
                id=k,
                nx=512,
                ny=512,
                amplifiers=amps,
                fp_x=fx,
                fp_y=0.0,
                rotation=0.0,
                pixel_size=10.0,
                sensor="TEST",
            )
        )
    return Camera("TestCam", tuple(dets))


CAMERAS = {"lsstcam": _lsstcam, "comcam": _comcam, "testcam": _testcam}
_ALIASES = {"lsstcomcam": "comcam", "lsstcomcamsim": "comcam"}


def get_camera(name: object) -> Camera:
    """Return a camera by name: ``"lsstcam"``, ``"comcam"`` or ``"testcam"``.

    Parameters
    ----------
    name : str
        Case-insensitive camera name; the INSTRUME header values ``LSSTCam``,
        ``LSSTComCam`` and ``TestCam`` are accepted too.

    Returns
    -------
    Camera

    Raises
    ------
    UnknownDetectorError
        If the camera name is unknown.
    """
    key = str(name).lower()
    key = _ALIASES.get(key, key)
    if key not in CAMERAS:
        msg = f"unknown camera {name!r}; use one of {', '.join(CAMERAS)}"
        raise UnknownDetectorError(msg)
    return CAMERAS[key]()


#: Instrumental AB zero points (magnitude giving 1 e-/s), after SMTN-002.
ZEROPOINTS = {"u": 26.52, "g": 28.51, "r": 28.36, "i": 28.17, "z": 27.78, "y": 26.82}


def njy_per_electron(band: str, exptime: float) -> float:
    """Flux in nJy of a source that gives one electron in ``exptime`` seconds.

    The photometric calibration shared by the simulator and ISR:
    ``flux_nJy = electrons * njy_per_electron(band, exptime)``.
    """
    check_band(band)
    if not exptime > 0:
        msg = f"exposure time must be > 0 s, got {exptime!r}; e.g. --exptime 30"
        raise ValueError(msg)
    return 10.0 ** (-0.4 * (ZEROPOINTS[band] - 31.4)) / float(exptime)
