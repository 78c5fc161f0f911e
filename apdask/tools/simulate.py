"""Deterministic simulator of a small Alert Production repository.

:func:`simulate_repo` writes, for one camera and a few visits of one field:

* a Butler (``<repo>/butler.zarr``) with template tiles, master calibs (bias, dark,
  flat for the simulated band) and the DRP Object catalog of the static sky;
* raw MEF files ``<repo>/raw/<raw_name>`` for every CCD and visit;
* truth tables ``<repo>/truth/visit_<visit>.ecsv``;
* nextVisit messages ``<repo>/visits/visit_<visit>.json``.

The same ``seed`` gives byte-identical files: every random draw comes from
``numpy.random.default_rng`` seeded by ``(seed, stream, visit, detector...)`` and
nothing depends on the clock.  The model (``docs/formats.md``):

* sky: stars with a power-law flux distribution (1e3..1e7 nJy), elliptical Gaussian
  galaxies, ~3 % variable stars (sinusoidal light curves) and transients that are
  absent from the template, persist with a per-visit flux ratio, and keep appearing;
* PSF: Gaussian, FWHM 0.9″ to 1.1″ across each CCD; template FWHM 0.7″;
* science pixels (electrons): ``(sky + sources) * flat + dark * DARKTIME + bias``
  with Gaussian-approximated Poisson noise, cosmic rays and one hot column; per
  amplifier ``ADU = e / gain + bias level (~15000) + read noise``, capped at the
  amplifier's saturation;
* the photometric calibration is ``camera.njy_per_electron(band, 30 s)``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.table import Table
from astropy.time import Time
from astropy.wcs import WCS
from scipy.spatial import cKDTree
from scipy.special import erf

from apdask.core.camera import (
    PIXEL_SCALE_ARCSEC,
    Camera,
    Detector,
    check_band,
    get_camera,
    njy_per_electron,
)
from apdask.core.files import atomic_write
from apdask.io.butler import Butler
from apdask.tools._sim_butler import (
    _calib_arrays,
    _hot_column,
    _make_calibs,
    _make_tiles_row,
    _n_tiles,
    _write_drp,
)
from apdask.tools._sim_calibframe import CALIB_DEFECTS, simulate_calib_frame
from apdask.tools._sim_model import (
    _EDGE,
    _FWHM_RANGE,
    _GAL_HALF,
    _TEMPLATE_FWHM,
    _TRANSIENT,
    _VISIT,
    BIAS_LEVEL_ADU,
    DARKTIME,
    ENGINES,
    EXPTIME,
    FIELD_DEC,
    FIELD_RA,
    SKY_ELECTRONS,
    _is_small,
    _mosaic_wcs,
    _offset,
    _rng,
    _sigma_px,
    _snr_to_flux,
    _static_sky,
    _true_wcs,
    visit_mjd,
)
from apdask.tools._sim_raw import _make_raw

__all__ = [
    "simulate_repo",
    "FIELD_RA",
    "FIELD_DEC",
    "EXPTIME",
    "DARKTIME",
    "SKY_ELECTRONS",
    "visit_mjd",
    "simulate_calib_frame",
    "CALIB_DEFECTS",
    "ENGINES",
]


# ------------------------------------------------------------------ simulator
def simulate_repo(
    camera_name: str,
    repo: str | os.PathLike[str],
    n_visits: int = 3,
    seed: int = 0,
    band: str = "r",
    first_visit: int = 1000,
    *,
    detectors: Sequence[str] | None = None,
    artifacts: bool = True,
    fwhm_range: Sequence[float] | None = None,
    template_fwhm: float | None = None,
    engine: str = "apdask",
    transients_per_ccd: int | None = None,
    variable_fraction: float | None = None,
    progress: Callable[[str], object] | None = None,
    asteroids: int = 0,
) -> list[dict[str, Any]]:
    """Simulate a complete repository (templates, calibs, raws, truth, nextVisits).

    Parameters
    ----------
    camera_name : str
        ``"testcam"``, ``"comcam"`` or ``"lsstcam"``.
    repo : str or os.PathLike
        Repository directory (created).
    n_visits : int, optional
    seed : int, optional
        Same seed, same bytes.
    band : str, optional
    first_visit : int, optional
        Visit id of the first visit; later visits count up by one.
    detectors : sequence of str, optional
        Simulate only these CCDs (names); default all CCDs of the camera.  The
        template covers only the selected CCDs and the nextVisit messages list them.
    artifacts : bool, optional
        ``False`` gives artifact-free data: no cosmic rays, no hot column and static
        sources capped at half the saturation level (for false-positive tests).
    fwhm_range : tuple of float, optional
        Science PSF FWHM range (arcsec) across a CCD; default ``(0.9, 1.1)``.
    template_fwhm : float, optional
        Template PSF FWHM (arcsec); default 0.7.  Larger than the science FWHM
        gives the "science sharper" case.
    engine : {"apdask", "galsim"}, optional
        Renderer of the science images, templates and transients: our own Gaussian
        code (default) or GalSim (:mod:`apdask.tools.simulate_galsim`: Kolmogorov PSF,
        Sersic galaxies, GalSim's Poisson noise; needs the ``sim`` extra).
    transients_per_ccd : int, optional
        Transients per CCD in the first visit (later visits add a third as many new
        ones); default 12 on the test camera, 40 on ComCam and LSSTCam.  Fewer are
        placed where the CCD has no room for them 12 px apart and clear of stars.
    variable_fraction : float, optional
        Fraction of the static stars that vary (sinusoidal light curves); default
        0.03.  With the defaults of both options, the same seed gives the same bytes
        as before these options existed.
    progress : callable, optional
        Called with a line of text as each step ends (``print`` for a terminal).
    asteroids : int, optional
        Fast asteroids (trailed sources, PSF ⊗ a 5-30 px segment) per CCD and visit,
        in the science images only, with their truth (``kind`` "asteroid",
        ``trail_length``, ``trail_angle``); :mod:`apdask.tools._sim_asteroids`.
        Default 0 (and then the truth tables have no trail columns).  Needs the
        ``apdask`` engine.

    Returns
    -------
    list of dict
        The nextVisit messages, also written to ``<repo>/visits/visit_<visit>.json``.
    """
    check_band(band)
    if transients_per_ccd is not None and transients_per_ccd < 0:
        msg = f"transients_per_ccd must be >= 0, got {transients_per_ccd}"
        raise ValueError(msg)
    if variable_fraction is not None and not 0.0 <= variable_fraction <= 1.0:
        msg = f"variable_fraction must be in [0, 1], got {variable_fraction}"
        raise ValueError(msg)
    if engine not in ENGINES:
        msg = f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}"
        raise ValueError(msg)
    if asteroids < 0 or (asteroids and engine != "apdask"):
        msg = f"asteroids={asteroids}: a count >= 0, rendered by the apdask engine only"
        raise ValueError(msg)
    galsim_engine = None
    if engine == "galsim":
        from apdask.tools import simulate_galsim  # fails early, with the install hint, if missing

        galsim_engine = simulate_galsim
    camera = get_camera(camera_name)
    dets = list(camera) if detectors is None else [camera[d] for d in detectors]
    fwhm_range = tuple(float(v) for v in (fwhm_range or _FWHM_RANGE))
    template_fwhm = float(_TEMPLATE_FWHM if template_fwhm is None else template_fwhm)
    repo = os.path.abspath(os.fspath(repo))
    for sub in ("raw", "truth", "visits"):
        os.makedirs(os.path.join(repo, sub), exist_ok=True)
    butler = Butler(repo, camera=camera.name)  # records the camera before any content
    small = _is_small(camera)
    dither = 5.0 if small else 30.0  # arcsec, max per axis
    pointings = _pointings(seed, n_visits, first_visit, dither)
    mosaic, mshape = _mosaic_wcs(dets, pointings, margin=100 + _GAL_HALF)
    sky = _static_sky(seed, mosaic, mshape, variable_fraction)
    _finish_sky(sky, seed, galsim_engine, None if artifacts else (dets, band, fwhm_range))
    _write_drp(butler, sky)
    sim = _Simulation(
        repo, butler, seed, camera, dets, band, sky, artifacts, fwhm_range, template_fwhm, engine,
        progress or (lambda line: None), int(asteroids),
    )  # fmt: skip
    n_transients = (12 if small else 40) if transients_per_ccd is None else transients_per_ccd
    transients = _make_transients(
        seed, dets, pointings, sky, n_transients, band, sim.sky_e, dither, fwhm_range
    )
    truth_rows = _render_all(sim, pointings, mosaic, mshape, transients, 1024 if small else 2048)
    messages = [_write_visit(sim, p, truth_rows) for p in pointings]
    psf = galsim_engine.PSF_PROFILE if galsim_engine is not None else "gaussian"
    _write_settings(sim, psf)
    return messages


@dataclass(frozen=True)
class _Simulation:
    """What every rendering job of one :func:`simulate_repo` call shares."""

    repo: str
    butler: Butler
    seed: int
    camera: Camera
    dets: list[Detector]
    band: str
    sky: dict[str, Any]
    artifacts: bool
    fwhm_range: tuple[float, ...]
    template_fwhm: float
    engine: str
    progress: Callable[[str], object]
    asteroids: int = 0

    @property
    def sky_e(self) -> float:
        """Sky level (electrons per pixel) in one exposure."""
        return SKY_ELECTRONS[self.band] * EXPTIME / 30.0


def _finish_sky(
    sky: dict[str, Any],
    seed: int,
    galsim_engine: Any,
    cap: tuple[list[Detector], str, tuple[float, ...]] | None,
) -> None:
    """Galaxy minor axes, GalSim's Sersic indices, and (``cap``) the saturation cap."""
    sky["gal_b"] = sky["gal_a"] * sky["gal_q"]
    if galsim_engine is not None:
        sky.update(galsim_engine.galaxy_columns(seed, sky))
    if cap is not None:  # artifact-free data: static sources below half saturation
        sky["flux"] = np.minimum(sky["flux"], _unsaturated_flux(*cap))


def _write_settings(sim: _Simulation, psf: str) -> None:
    """``truth/simulation.json``: what :mod:`apdask.tools.evaluate` needs of the model."""
    settings = {
        "camera": sim.camera.name,
        "seed": int(sim.seed),
        "band": sim.band,
        "detectors": [d.name for d in sim.dets],
        "artifacts": bool(sim.artifacts),
        "fwhm_range": list(sim.fwhm_range),
        "template_fwhm": sim.template_fwhm,
        "template_depth": 10.0,
        "engine": sim.engine,
        "psf": psf,
    }
    path = os.path.join(sim.repo, "truth", "simulation.json")
    _atomic_text(path, json.dumps(settings, indent=1))


def _pointings(seed: int, n_visits: int, first_visit: int, dither: float) -> list[dict[str, Any]]:
    """Commanded (dithered) boresight of each visit plus a true pointing error."""
    pointings = []
    for k in range(n_visits):
        rng = _rng(seed, _VISIT, k)
        ra, dec = _offset(FIELD_RA, FIELD_DEC, *rng.uniform(-dither, dither, 2))
        err = tuple(float(v) for v in rng.uniform(-1.0, 1.0, 2))
        pointings.append(
            {
                "k": k,
                "visit": first_visit + k,
                "ra": float(ra),
                "dec": float(dec),
                "error": err,
                "mjd": visit_mjd(k),
            }
        )
    return pointings


def _render_all(
    sim: _Simulation,
    pointings: list[dict[str, Any]],
    mosaic: WCS,
    mshape: tuple[int, int],
    transients: dict[str, Any],
    tile: int,
) -> list[dict[str, Any]]:
    """Template tiles and master calibs, then every raw; the truth rows of the raws."""
    dets, band, seed, butler = sim.dets, sim.band, sim.seed, sim.butler
    k_njy = njy_per_electron(band, EXPTIME)
    # Typical science variance (e^2) for the template depth.
    rn = np.mean([a.read_noise for d in dets for a in d.amplifiers])
    sci_var_njy = (sim.sky_e + rn**2) * k_njy**2
    butler.prepare_groups(band, [det.id for det in dets])
    jobs = []
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        jobs += [
            pool.submit(
                _make_tiles_row,
                butler,
                seed,
                band,
                mosaic,
                mshape,
                tile,
                j,
                sim.sky,
                sci_var_njy,
                sim.template_fwhm,
                sim.engine,
            )
            for j in range(_n_tiles(mshape[0], tile))
        ]
        jobs += [
            pool.submit(_make_calibs, butler, seed, sim.camera, det, band, sim.artifacts)
            for det in dets
        ]
        for f in jobs:
            f.result()
        sim.progress(f"simulate: templates ({len(jobs) - len(dets)} tile rows) and master "
                     f"calibrations of {len(dets)} CCDs written")  # fmt: skip

        def raw(det, p):  # a CCD's calibrations are read by its own job: for 189 CCDs
            calib = _calib_arrays(butler, det.id, band)  # they would not fit in memory
            return _make_raw(
                sim.repo,
                seed,
                sim.camera,
                det,
                p,
                band,
                sim.sky,
                transients,
                calib,
                sim.sky_e,
                k_njy,
                sim.artifacts,
                sim.fwhm_range,
                sim.engine,
                sim.asteroids,
            )

        raw_jobs = [pool.submit(raw, det, p) for p in pointings for det in dets]
        out = []
        step = max(1, len(raw_jobs) // 10)
        for k, f in enumerate(raw_jobs, 1):
            out.append(f.result())
            if k % step == 0 or k == len(raw_jobs):
                sim.progress(f"simulate: raws {k}/{len(raw_jobs)} (CCD-visits)")
        return out


def _write_visit(
    sim: _Simulation, p: dict[str, Any], truth_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """Write the truth table and the nextVisit message of one visit; the message."""
    rows = [r for r in truth_rows if r["visit"] == p["visit"]]
    _write_truth(sim.repo, p, rows, sim.band, sim.seed)
    msg = {
        "instrument": sim.camera.name,
        "groupId": str(p["visit"]),
        "visit": p["visit"],
        "position": [p["ra"], p["dec"]],
        "coordinateSystem": "ICRS",
        "rotationAngle": 0.0,
        "filters": sim.band,
        "duration": EXPTIME,
        "nimages": 1,
        "detectors": [d.name for d in sim.dets],
        "timestamp": round(float(Time(p["mjd"], format="mjd", scale="tai").unix), 6),
        "mjd": p["mjd"],
    }
    path = os.path.join(sim.repo, "visits", f"visit_{p['visit']}.json")
    _atomic_text(path, json.dumps(msg, indent=2) + "\n")
    return msg


def _unsaturated_flux(dets, band, fwhm_range):
    """Largest static flux (nJy) whose peak stays below half the saturation level."""
    sig = float(_sigma_px(min(fwhm_range)))
    peak = float(erf(0.5 / (np.sqrt(2.0) * sig)) ** 2)  # central-pixel fraction
    full_e = min(
        (a.saturation - BIAS_LEVEL_ADU - 100.0) * a.gain for d in dets for a in d.amplifiers
    )
    return 0.5 * full_e / 1.05 / peak * njy_per_electron(band, EXPTIME)


def _atomic_text(path, text):
    atomic_write(path, text)


def _make_transients(
    seed, camera, pointings, sky, n_per_ccd, band, sky_e, dither, fwhm_range=_FWHM_RANGE
):
    """Transients: ``n_per_ccd`` per CCD in the first visit, a third as many new later."""
    margin = _EDGE + 2 * dither / PIXEL_SCALE_ARCSEC + 10
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("id", "ra", "dec", "flux", "k0", "ratio")}
    next_id = 10_000_001
    for p in pointings:
        n_new = n_per_ccd if p["k"] == 0 else int(np.ceil(n_per_ccd / 3))
        for det in camera:
            rng = _rng(seed, _TRANSIENT, p["k"], det.id)
            w = _true_wcs(det, p)
            sx, sy = w.world_to_pixel_values(sky["ra"], sky["dec"])
            on = (sx > -30) & (sx < det.nx + 30) & (sy > -30) & (sy < det.ny + 30)
            bright = on & (sky["flux"] > 1e5)
            tree_all = cKDTree(np.column_stack([sx[on], sy[on]])) if on.any() else None
            tree_b = cKDTree(np.column_stack([sx[bright], sy[bright]])) if bright.any() else None
            hot = _hot_column(seed, det)
            cx = rng.uniform(margin, det.nx - 1 - margin, 20 * n_new)
            cy = rng.uniform(margin, det.ny - 1 - margin, 20 * n_new)
            pts = np.column_stack([cx, cy])
            ok = np.abs(cx - hot) > 6
            if tree_all is not None:
                ok &= tree_all.query(pts)[0] > 8
            if tree_b is not None:
                ok &= tree_b.query(pts)[0] > 25
            idx = np.flatnonzero(ok)
            keep: list[np.intp] = []
            for i in idx:  # transients not on top of each other
                if n_new == 0:
                    break
                if not keep or np.all(np.hypot(*(pts[keep] - pts[i]).T) > 12):
                    keep.append(i)
                if len(keep) == n_new:
                    break
            kept = np.array(keep, dtype=int)
            ra, dec = w.pixel_to_world_values(cx[kept], cy[kept])
            snr = np.exp(rng.uniform(np.log(5.0), np.log(200.0), len(keep)))
            out["id"].append(np.arange(next_id, next_id + len(keep)))
            next_id += len(keep)
            out["ra"].append(np.mod(ra, 360.0))
            out["dec"].append(dec)
            out["flux"].append(_snr_to_flux(band, sky_e, snr, fwhm_range))
            out["k0"].append(np.full(len(keep), p["k"]))
            out["ratio"].append(rng.uniform(0.7, 1.3, len(keep)))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def _write_truth(repo, p, rows, band, seed):
    cols: tuple[str, ...] = (
        "source_id", "kind", "detector", "ra", "dec", "x", "y", "flux", "template_flux",
    )  # fmt: skip
    if rows and all("trail_length" in r for r in rows):  # simulated with asteroids
        cols = (*cols, "trail_length", "trail_angle")
    t = Table({c: np.concatenate([r[c] for r in rows]) for c in cols})
    t["kind"] = t["kind"].astype("U9")
    t["detector"] = t["detector"].astype("U16")
    t.meta.update(
        {
            "visit": p["visit"],
            "mjd": p["mjd"],
            "band": band,
            "seed": int(seed),
            "boresight_ra": p["ra"],
            "boresight_dec": p["dec"],
            "pointing_error_arcsec": list(p["error"]),
            "pointing_error_note": "true WCS = predicted WCS with CRVAL offset east, north",
        }
    )
    path = os.path.join(repo, "truth", f"visit_{p['visit']}.ecsv")
    buf = io.StringIO()
    t.write(buf, format="ascii.ecsv")
    atomic_write(path, buf.getvalue())
