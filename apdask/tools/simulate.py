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
from collections.abc import Sequence
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
from apdask.io.raw import RawMetadata, raw_name, write_raw
from apdask.tools._sim_calibframe import CALIB_DEFECTS, simulate_calib_frame
from apdask.tools._sim_model import (
    _CALIB,
    _EDGE,
    _FWHM_RANGE,
    _GAL_HALF,
    _GALSIM_REACH,
    _RAW,
    _TEMPLATE_FWHM,
    _TILE,
    _TILE_OVERLAP,
    _TRANSIENT,
    _VISIT,
    BIAS_LEVEL_ADU,
    DARKTIME,
    ENGINES,
    EXPTIME,
    FIELD_DEC,
    FIELD_RA,
    SKY_ELECTRONS,
    _add_cosmic_rays,
    _amp_segments,
    _gaussian_psf,
    _is_small,
    _mosaic_wcs,
    _offset,
    _render,
    _rng,
    _sigma_px,
    _snr_to_flux,
    _static_sky,
    _true_wcs,
    _visit_flux,
    visit_mjd,
)

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
        code (default) or GalSim (:mod:`apdask.simulate_galsim`: Kolmogorov PSF,
        Sersic galaxies, GalSim's Poisson noise; needs the ``sim`` extra).

    Returns
    -------
    list of dict
        The nextVisit messages, also written to ``<repo>/visits/visit_<visit>.json``.
    """
    check_band(band)
    if engine not in ENGINES:
        msg = f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}"
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
    butler = Butler(repo, camera=camera.name)
    small = _is_small(camera)
    dither = 5.0 if small else 30.0  # arcsec, max per axis
    pointings = _pointings(seed, n_visits, first_visit, dither)
    mosaic, mshape = _mosaic_wcs(dets, pointings, margin=100 + _GAL_HALF)
    sky = _static_sky(seed, mosaic, mshape)
    sky["gal_b"] = sky["gal_a"] * sky["gal_q"]
    if galsim_engine is not None:
        sky.update(galsim_engine.galaxy_columns(seed, sky))
    if not artifacts:
        sky["flux"] = np.minimum(sky["flux"], _unsaturated_flux(dets, band, fwhm_range))
    _write_drp(butler, sky)
    sim = _Simulation(
        repo, butler, seed, camera, dets, band, sky, artifacts, fwhm_range, template_fwhm, engine
    )
    transients = _make_transients(
        seed, dets, pointings, sky, 12 if small else 40, band, sim.sky_e, dither, fwhm_range
    )
    truth_rows = _render_all(sim, pointings, mosaic, mshape, transients, 1024 if small else 2048)
    messages = [_write_visit(sim, p, truth_rows) for p in pointings]
    settings = {
        "camera": camera.name,
        "seed": int(seed),
        "band": band,
        "detectors": [d.name for d in dets],
        "artifacts": bool(artifacts),
        "fwhm_range": list(fwhm_range),
        "template_fwhm": template_fwhm,
        "template_depth": 10.0,
        "engine": engine,
        "psf": galsim_engine.PSF_PROFILE if galsim_engine is not None else "gaussian",
    }
    _atomic_text(os.path.join(repo, "truth", "simulation.json"), json.dumps(settings, indent=1))
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

    @property
    def sky_e(self) -> float:
        """Sky level (electrons per pixel) in one exposure."""
        return SKY_ELECTRONS[self.band] * EXPTIME / 30.0


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
            )

        raw_jobs = [pool.submit(raw, det, p) for p in pointings for det in dets]
        return [f.result() for f in raw_jobs]


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


def _write_drp(butler, sky):
    t = Table(
        {
            "objectId": sky["id"],
            "ra": sky["ra"],
            "dec": sky["dec"],
            "r_flux": sky["flux"],
            "extendedness": sky["extended"].astype(float),
        }
    )
    butler.put_drp_objects(t)


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
                if all(np.hypot(*(pts[i] - pts[j])) > 12 for j in keep):
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


def _transient_flux(tr, k):
    flux = tr["flux"] * tr["ratio"] ** (k - tr["k0"])
    return np.where(k >= tr["k0"], flux, 0.0)


def _n_tiles(n, tile):
    step = tile - _TILE_OVERLAP
    return max(1, int(np.ceil((n - _TILE_OVERLAP) / step)))


def _make_tiles_row(
    butler,
    seed,
    band,
    mosaic,
    mshape,
    tile,
    j,
    sky,
    sci_var_njy,
    template_fwhm=_TEMPLATE_FWHM,
    engine="apdask",
):
    """Render and store the template tiles of row ``j``."""
    step = tile - _TILE_OVERLAP
    mx, my = mosaic.world_to_pixel_values(sky["ra"], sky["dec"])
    flux = sky["flux"]  # variables at their mean flux
    sigma_t = np.full(len(flux), float(_sigma_px(template_fwhm)))
    noise = np.sqrt(sci_var_njy / 10.0)
    psf = _gaussian_psf(template_fwhm)
    if engine == "galsim":
        from apdask.tools.simulate_galsim import render_template, template_psf_image

        psf = template_psf_image(template_fwhm)
    for i in range(_n_tiles(mshape[1], tile)):
        x0, y0 = i * step, j * step
        rng = _rng(seed, _TILE, i, j)
        img = (noise * rng.standard_normal((tile, tile), dtype=np.float32)).astype(np.float32)
        x, y = mx - x0, my - y0
        h = _GAL_HALF if engine != "galsim" else _GALSIM_REACH
        sel = (x > -h) & (x < tile + h) & (y > -h) & (y < tile + h)
        cat = {k: v[sel] for k, v in sky.items()}
        if engine == "galsim":
            img = render_template(
                cat,
                x[sel],
                y[sel],
                flux[sel],
                (tile, tile),
                template_fwhm,
                noise,
                (seed, _TILE, i, j),
            )
        else:
            _render(img, cat, x[sel], y[sel], flux[sel], sigma_t[sel])
        w = mosaic.deepcopy()
        w.wcs.crpix = [mosaic.wcs.crpix[0] - x0, mosaic.wcs.crpix[1] - y0]
        w.wcs.set()
        w.pixel_shape = (tile, tile)
        var = np.full((tile, tile), noise**2, dtype=np.float32)
        butler.put_template(band, f"{i}_{j}", img, var, w, psf=psf)


def _hot_column(seed, det):
    return int(_rng(seed, _CALIB, det.id, 99).integers(40, det.nx - 40))


def _make_calibs(butler, seed, camera, det, band, artifacts=True):
    """Master bias (e-), dark (e-/s) and flat (mean 1) of one detector."""
    rng = _rng(seed, _CALIB, det.id)
    ny, nx = det.shape
    bias = np.empty((ny, nx), np.float32)
    yy = np.arange(ny, dtype=np.float32)[:, None]
    for amp in det.amplifiers:
        off = rng.uniform(-3.0, 3.0)
        slope = rng.uniform(0.0, 2.0)
        ramp = off + slope * (yy[amp.y0 : amp.y1] - amp.y0) / max(amp.ny - 1, 1)
        bias[amp.y0 : amp.y1, amp.x0 : amp.x1] = ramp
    dark = np.full((ny, nx), 0.002, np.float32)
    if artifacts:
        dark[:, _hot_column(seed, det)] = 50.0
    # Vignetting-like gradient over the focal plane, +-3 %, plus 0.5 % pixel response.
    fx, fy = det.pixel_to_focal_plane(np.arange(nx)[None, :], np.arange(ny)[:, None])
    rmax = max(
        np.hypot(d.fp_x, d.fp_y) + 0.5e-3 * d.pixel_size * np.hypot(d.nx, d.ny) for d in camera
    )
    r2 = (fx**2 + fy**2) / rmax**2
    frng = _rng(seed, _CALIB, det.id, "ugrizy".index(band) + 1)
    flat = (1.03 - 0.06 * np.clip(r2, 0, 1)).astype(np.float32)
    flat *= 1.0 + 0.005 * frng.standard_normal((ny, nx), dtype=np.float32)
    flat /= flat.mean(dtype=np.float64)
    butler.put_calib("bias", det.id, bias)
    butler.put_calib("dark", det.id, dark)
    butler.put_calib("flat", det.id, flat, band=band)


def _calib_arrays(butler, det_id, band):
    mjd = visit_mjd(0)
    return {k: butler.get_calib(k, det_id, band, mjd) for k in ("bias", "dark", "flat")}


def _make_raw(
    repo,
    seed,
    camera,
    det,
    p,
    band,
    sky,
    tr,
    calib,
    sky_e,
    k_njy,
    artifacts=True,
    fwhm_range=_FWHM_RANGE,
    engine="apdask",
):
    """Render, write one raw and return its truth rows."""
    rng = _rng(seed, _RAW, p["visit"], det.id)
    w = _true_wcs(det, p)
    ny, nx = det.shape
    k = p["k"]

    # Static sky and transients in this CCD.
    sx, sy = w.world_to_pixel_values(sky["ra"], sky["dec"])
    h = _GAL_HALF if engine != "galsim" else _GALSIM_REACH  # wings of off-CCD stars
    on = (sx > -h) & (sx < nx + h) & (sy > -h) & (sy < ny + h)
    cat = {key: v[on] for key, v in sky.items()}
    s_flux = _visit_flux(cat, p["mjd"])
    tx, ty = w.world_to_pixel_values(tr["ra"], tr["dec"])
    t_flux_all = _transient_flux(tr, k)
    t_on = (tx >= 0) & (tx < nx) & (ty >= 0) & (ty < ny) & (t_flux_all > 0)
    x = np.concatenate([sx[on], tx[t_on]])
    y = np.concatenate([sy[on], ty[t_on]])
    flux = np.concatenate([s_flux, t_flux_all[t_on]])
    ext = np.concatenate([cat["extended"], np.zeros(t_on.sum(), bool)])
    rcat = {
        "extended": ext,
        "gal_a": np.concatenate([cat["gal_a"], np.zeros(t_on.sum())]),
        "gal_b": np.concatenate([cat["gal_b"], np.zeros(t_on.sum())]),
        "gal_theta": np.concatenate([cat["gal_theta"], np.zeros(t_on.sum())]),
    }
    if engine == "galsim":  # GalSim draws sources and Poisson noise; truth = what it drew
        from apdask.tools.simulate_galsim import render_science

        key = (seed, _RAW, p["visit"], det.id)
        img, drawn_e = render_science(
            cat, x, y, flux / k_njy, (ny, nx), fwhm_range, sky_e, calib, DARKTIME, key
        )
        flux[len(s_flux) :] = drawn_e[len(s_flux) :] * k_njy
    else:
        lo, hi = fwhm_range
        fwhm = lo + (hi - lo) * 0.5 * (np.clip(x / nx, 0, 1) + np.clip(y / ny, 0, 1))
        img = np.full((ny, nx), sky_e, np.float32)
        _render(img, rcat, x, y, flux / k_njy, _sigma_px(fwhm))
        # Electrons: flat, dark current, Poisson noise (Gaussian approximation).
        img *= calib["flat"]
        img += calib["dark"] * DARKTIME
        np.maximum(img, 0.0, out=img)
        img += np.sqrt(img) * rng.standard_normal((ny, nx), dtype=np.float32)
    # Cosmic rays, bias.
    if artifacts:
        _add_cosmic_rays(rng, img, 4 if nx * ny < 1e6 else 20)
    img += calib["bias"]

    segments = _amp_segments(img, det, rng)

    mjd = p["mjd"]
    meta = RawMetadata(
        instrument=camera.name,
        detector_name=det.name,
        detector_id=det.id,
        visit=p["visit"],
        exposure_id=p["visit"],
        snap=0,
        mjd_begin=mjd,
        mjd_end=mjd + DARKTIME / 86400.0,
        exptime=EXPTIME,
        darktime=DARKTIME,
        band=band,
        ra=p["ra"],
        dec=p["dec"],
        rotpa=0.0,
        imgtype="SCIENCE",
        shutter={
            "open_begin": 0.0,
            "open_end": 1.0,
            "close_begin": EXPTIME,
            "close_end": EXPTIME + 1.0,
        },
    )
    write_raw(
        os.path.join(repo, "raw", raw_name(camera.name, p["visit"], det.name)), det, segments, meta
    )

    # Truth: sources whose true position is on this CCD.
    inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    n_s = int(on.sum())
    kind = np.where(cat["extended"], "galaxy", np.where(cat["variable"], "variable", "star"))
    return {
        "visit": p["visit"],
        "source_id": np.concatenate([cat["id"], tr["id"][t_on]]).astype(np.int64)[inside],
        "kind": np.concatenate([kind, np.full(t_on.sum(), "transient")])[inside],
        "detector": np.full(inside.sum(), det.name),
        "ra": np.concatenate([cat["ra"], tr["ra"][t_on]])[inside],
        "dec": np.concatenate([cat["dec"], tr["dec"][t_on]])[inside],
        "x": x[inside],
        "y": y[inside],
        "flux": flux[inside],
        "template_flux": np.concatenate([cat["flux"], np.zeros(len(x) - n_s)])[inside],
    }


def _write_truth(repo, p, rows, band, seed):
    cols = ("source_id", "kind", "detector", "ra", "dec", "x", "y", "flux", "template_flux")
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
