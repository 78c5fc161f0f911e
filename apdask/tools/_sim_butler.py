"""The simulator's Butler content: template tiles, master calibrations, DRP Objects.

Used by :func:`apdask.tools.simulate.simulate_repo`.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from apdask.tools._sim_model import (
    _CALIB,
    _GAL_HALF,
    _GALSIM_REACH,
    _TEMPLATE_FWHM,
    _TILE,
    _TILE_OVERLAP,
    _gaussian_psf,
    _render,
    _rng,
    _sigma_px,
    visit_mjd,
)

__all__: list[str] = []


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
        # optional: galsim comes with the 'sim' extra
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
