"""The simulator's science raws: sources on a CCD, pixels, raw file and truth rows.

Used by :func:`apdask.tools.simulate.simulate_repo`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from astropy.wcs import WCS

from apdask.core.camera import Camera, Detector
from apdask.io.raw import RawMetadata, raw_name, write_raw
from apdask.tools._sim_asteroids import make_asteroids, render_trails
from apdask.tools._sim_model import (
    _FWHM_RANGE,
    _GAL_HALF,
    _GALSIM_REACH,
    _RAW,
    DARKTIME,
    EXPTIME,
    _add_cosmic_rays,
    _amp_segments,
    _render,
    _rng,
    _sigma_px,
    _true_wcs,
    _visit_flux,
)

__all__: list[str] = []


def _transient_flux(tr, k):
    flux = tr["flux"] * tr["ratio"] ** (k - tr["k0"])
    return np.where(k >= tr["k0"], flux, 0.0)


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
    asteroids=0,
):
    """Render, write one raw and return its truth rows (with ``asteroids`` trailed
    sources, :mod:`apdask.tools._sim_asteroids`)."""
    rng = _rng(seed, _RAW, p["visit"], det.id)
    w = _true_wcs(det, p)
    ny, nx = det.shape
    src = _sources_on_ccd(w, det, p, sky, tr, engine)
    x, y, flux = src["x"], src["y"], src["flux"]
    n_s = src["n_static"]
    ast: dict[str, np.ndarray] = {}
    if engine == "galsim":  # GalSim draws sources and Poisson noise; truth = what it drew
        # optional: galsim comes with the 'sim' extra
        from apdask.tools.simulate_galsim import render_science

        key = (seed, _RAW, p["visit"], det.id)
        img, drawn_e = render_science(
            src["cat"], x, y, flux / k_njy, (ny, nx), fwhm_range, sky_e, calib, DARKTIME, key
        )
        flux[n_s:] = drawn_e[n_s:] * k_njy
    else:
        lo, hi = fwhm_range
        fwhm = lo + (hi - lo) * 0.5 * (np.clip(x / nx, 0, 1) + np.clip(y / ny, 0, 1))
        img = np.full((ny, nx), sky_e, np.float32)
        _render(img, src["rcat"], x, y, flux / k_njy, _sigma_px(fwhm))
        if asteroids:
            ast = make_asteroids(seed, p, det, w, asteroids, band, sky_e, fwhm_range)

            def sigma_at(ax, ay):
                return _sigma_px(lo + (hi - lo) * 0.5 * (min(ax / nx, 1) + min(ay / ny, 1)))

            render_trails(img, ast, k_njy, sigma_at)
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
    path = os.path.join(repo, "raw", raw_name(camera.name, p["visit"], det.name))
    write_raw(path, det, segments, _science_meta(camera, det, p, band))
    rows = _truth_rows(src, det, p, tr)
    return _with_asteroids(rows, ast, det) if asteroids else rows


def _sources_on_ccd(
    w: WCS,
    det: Detector,
    p: dict[str, Any],
    sky: dict[str, np.ndarray],
    tr: dict[str, np.ndarray],
    engine: str,
) -> dict[str, Any]:
    """Static sky (with the wings of off-CCD sources) and live transients on one CCD.

    ``x``, ``y``, ``flux`` (nJy) list the ``n_static`` static sources first, then
    the transients; ``cat`` is the static catalogue on the CCD, ``rcat`` the shape
    columns of all rendered sources, ``t_on`` the transients' selection.
    """
    ny, nx = det.shape
    sx, sy = w.world_to_pixel_values(sky["ra"], sky["dec"])
    h = _GAL_HALF if engine != "galsim" else _GALSIM_REACH  # wings of off-CCD stars
    on = (sx > -h) & (sx < nx + h) & (sy > -h) & (sy < ny + h)
    cat = {key: v[on] for key, v in sky.items()}
    s_flux = _visit_flux(cat, p["mjd"])
    tx, ty = w.world_to_pixel_values(tr["ra"], tr["dec"])
    t_flux_all = _transient_flux(tr, p["k"])
    t_on = (tx >= 0) & (tx < nx) & (ty >= 0) & (ty < ny) & (t_flux_all > 0)
    n_t = t_on.sum()
    rcat = {
        "extended": np.concatenate([cat["extended"], np.zeros(n_t, bool)]),
        "gal_a": np.concatenate([cat["gal_a"], np.zeros(n_t)]),
        "gal_b": np.concatenate([cat["gal_b"], np.zeros(n_t)]),
        "gal_theta": np.concatenate([cat["gal_theta"], np.zeros(n_t)]),
    }
    return {
        "x": np.concatenate([sx[on], tx[t_on]]),
        "y": np.concatenate([sy[on], ty[t_on]]),
        "flux": np.concatenate([s_flux, t_flux_all[t_on]]),
        "n_static": len(s_flux),
        "cat": cat,
        "rcat": rcat,
        "t_on": t_on,
    }


def _science_meta(camera: Camera, det: Detector, p: dict[str, Any], band: str) -> RawMetadata:
    """Header metadata of a simulated science raw (1 s shutter blade motion)."""
    mjd = p["mjd"]
    return RawMetadata(
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


def _truth_rows(
    src: dict[str, Any], det: Detector, p: dict[str, Any], tr: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Truth of the sources whose true position is on this CCD."""
    ny, nx = det.shape
    x, y, flux, cat, t_on = src["x"], src["y"], src["flux"], src["cat"], src["t_on"]
    inside = (x >= -0.5) & (x < nx - 0.5) & (y >= -0.5) & (y < ny - 0.5)
    n_s = src["n_static"]
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


def _with_asteroids(
    rows: dict[str, Any], ast: dict[str, np.ndarray], det: Detector
) -> dict[str, Any]:
    """Truth rows with the asteroids appended (``kind`` "asteroid") and the columns
    ``trail_length`` (arcsec) and ``trail_angle`` (deg, bearing of the axis; NaN for
    the other sources)."""
    n, m = len(rows["x"]), len(ast["x"])
    out = dict(rows)
    out["source_id"] = np.concatenate([rows["source_id"], ast["id"]])
    out["kind"] = np.concatenate([rows["kind"], np.full(m, "asteroid")])
    out["detector"] = np.full(n + m, det.name)
    for c in ("ra", "dec", "x", "y", "flux"):
        out[c] = np.concatenate([rows[c], ast[c]])
    out["template_flux"] = np.concatenate([rows["template_flux"], np.zeros(m)])
    out["trail_length"] = np.concatenate([np.zeros(n), ast["trail_length"]])
    out["trail_angle"] = np.concatenate([np.full(n, np.nan), ast["trail_angle"]])
    return out
