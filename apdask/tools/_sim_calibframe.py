"""Raw calibration frames (bias, dark, flat, CBP) of a simulated repository.

Re-exported by :mod:`apdask.tools.simulate`.
"""

from __future__ import annotations

import os

import numpy as np

from apdask.core.camera import Camera, Detector, check_band
from apdask.io.butler import Butler
from apdask.io.raw import RawMetadata, raw_name, write_raw
from apdask.tools._sim_model import (
    FIELD_DEC,
    FIELD_RA,
    _add_cosmic_rays,
    _amp_segments,
    _rng,
    visit_mjd,
)

__all__ = ["CALIB_DEFECTS", "simulate_calib_frame"]

# ----------------------------------------------------------- calibration frames
#: Defects :func:`simulate_calib_frame` can inject.
CALIB_DEFECTS = ("hot_column", "dead_amp", "wrong_flat")
_CALIB_FRAME = 7  # stream tag of calibration-frame noise
_FLAT_LEVEL_E = 20000.0  # electrons per pixel in a simulated flat / CBP frame


def simulate_calib_frame(
    repo: str | os.PathLike[str],
    detector: str | int,
    intent: str,
    *,
    exposure_id: int,
    band: str = "r",
    exptime: float | None = None,
    mjd: float | None = None,
    defect: str | None = None,
    seed: int = 0,
    outdir: str | os.PathLike[str] | None = None,
) -> str:
    """Write one raw calibration frame (BIAS, DARK, FLAT or CBP) of a simulated repository.

    The frame is rendered from the repository's master calibrations, so a clean
    frame agrees with them within noise: bias = master bias; dark = master bias +
    master dark × DARKTIME; flat and CBP = a uniform illumination of 20 000 e⁻ times
    the master flat, plus dark and bias.  Photon noise, read noise and the
    per-amplifier overscan level are added as for science raws.

    Parameters
    ----------
    repo : str or os.PathLike
        A repository written by :func:`simulate_repo` (it holds the masters).
    detector : str or int
        CCD name or id.
    intent : {"bias", "dark", "flat", "cbp"}
    exposure_id : int
        Exposure id (``VISIT`` and ``EXPID`` headers; also in the file name).
    band : str, optional
        Filter in place.  The flat master of this band is used for flat and CBP frames.
    exptime : float, optional
        Exposure time, s; default 0 for bias, 30 for dark, 10 for flat and CBP.
    mjd : float, optional
        Start of the exposure, MJD TAI; default the first simulated visit's.
    defect : {"hot_column", "dead_amp", "wrong_flat"}, optional
        ``hot_column``: a column (not the master's) with 20 e⁻/s extra dark current
        (200 e⁻ in a bias); ``dead_amp``: amplifier 0 does not respond to light or
        dark current; ``wrong_flat``: the illumination has a ±10 % gradient along x,
        as from the wrong filter or stray light.
    seed : int, optional
    outdir : str, optional
        Where to write; default ``<repo>/raw``.

    Returns
    -------
    str
        Path of the raw written, named ``raw_name(instrument, exposure_id, ccd)``.
    """
    intent = str(intent).lower()
    if intent not in ("bias", "dark", "flat", "cbp"):
        msg = f"unknown intent {intent!r}; use bias, dark, flat or cbp"
        raise ValueError(msg)
    if defect is not None and defect not in CALIB_DEFECTS:
        msg = f"unknown defect {defect!r}; use one of {', '.join(CALIB_DEFECTS)}"
        raise ValueError(msg)
    check_band(band)
    repo = os.path.abspath(os.fspath(repo))
    butler = Butler(repo)
    camera = butler.camera
    if camera is None:
        msg = f"{repo} records no camera; create it with apdask.tools.simulate.simulate_repo first"
        raise ValueError(msg)
    det = camera[detector]
    mjd = visit_mjd(0) if mjd is None else float(mjd)
    if exptime is None:
        exptime = {"bias": 0.0, "dark": 30.0}.get(intent, 10.0)
    exptime = float(exptime)
    darktime = exptime + 1.0 if exptime > 0 else 0.0
    ny, nx = det.shape
    rng = _rng(seed, _CALIB_FRAME, int(exposure_id), det.id)
    bias = butler.get_calib("bias", det.id, None, mjd).astype(np.float32)
    signal = _calib_signal(butler, det, intent, band, mjd, exptime, darktime, defect)
    img = signal + np.sqrt(signal) * rng.standard_normal((ny, nx), dtype=np.float32)
    if darktime > 0:
        _add_cosmic_rays(rng, img, 4 if nx * ny < 1e6 else 20)
    img += bias
    segments = _amp_segments(img, det, rng)
    meta = _calib_meta(camera, det, intent, int(exposure_id), band, mjd, exptime, darktime)
    outdir = os.path.join(repo, "raw") if outdir is None else os.fspath(outdir)
    path = os.path.join(outdir, raw_name(camera.name, int(exposure_id), det.name))
    return write_raw(path, det, segments, meta)


def _calib_signal(
    butler: Butler,
    det: Detector,
    intent: str,
    band: str,
    mjd: float,
    exptime: float,
    darktime: float,
    defect: str | None,
) -> np.ndarray:
    """Electrons that respond (dark current and light) of one frame, defects included."""
    ny, nx = det.shape
    dark = butler.get_calib("dark", det.id, None, mjd).astype(np.float32)
    signal = dark * np.float32(darktime)
    if intent in ("flat", "cbp"):
        light = np.full((ny, nx), _FLAT_LEVEL_E * exptime / 10.0, np.float32)
        light *= butler.get_calib("flat", det.id, band, mjd)
        if defect == "wrong_flat":
            light *= (1.0 + 0.1 * (2.0 * np.arange(nx) / (nx - 1) - 1.0)).astype(np.float32)
        signal += light
    if defect == "hot_column":
        known = set(np.flatnonzero((dark > 1.0).any(axis=0)).tolist())  # the master's
        hot = nx // 3
        while {hot - 1, hot, hot + 1} & known:
            hot += 3
        signal[:, hot] += 20.0 * darktime if darktime > 0 else 200.0
    if defect == "dead_amp":
        a = det.amplifiers[0]
        signal[a.y0 : a.y1, a.x0 : a.x1] = 0.0
    np.maximum(signal, 0.0, out=signal)
    return signal


def _calib_meta(
    camera: Camera,
    det: Detector,
    intent: str,
    exposure_id: int,
    band: str,
    mjd: float,
    exptime: float,
    darktime: float,
) -> RawMetadata:
    """Header metadata of a calibration frame (its shutter motion follows the intent)."""
    open_s = 0.0 if intent in ("bias", "dark") else exptime
    return RawMetadata(
        instrument=camera.name,
        detector_name=det.name,
        detector_id=det.id,
        visit=exposure_id,
        exposure_id=exposure_id,
        snap=0,
        mjd_begin=mjd,
        mjd_end=mjd + darktime / 86400.0,
        exptime=exptime,
        darktime=darktime,
        band=band,
        ra=FIELD_RA,
        dec=FIELD_DEC,
        rotpa=0.0,
        imgtype=intent.upper(),
        # bias and dark: the shutter stays closed; flat and CBP: a 1 s blade motion
        shutter={
            "open_begin": 0.0,
            "open_end": min(open_s, 1.0),
            "close_begin": open_s,
            "close_end": open_s + min(open_s, 1.0),
        },
    )
