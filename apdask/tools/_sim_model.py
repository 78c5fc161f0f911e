"""The simulator's model: constants, seeded streams, rendering, geometry and catalogues.

Shared by :mod:`apdask.tools.simulate` (repositories) and its calibration frames;
the public constants are re-exported by :mod:`apdask.tools.simulate`.  Every random
draw comes from :func:`_rng` seeded by ``(seed, stream, ...)``, so the same seed
gives the same pixels.
"""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS
from scipy.special import erf

from apdask.core.camera import PIXEL_SCALE_ARCSEC, njy_per_electron

__all__ = [
    "BIAS_LEVEL_ADU",
    "DARKTIME",
    "ENGINES",
    "EXPTIME",
    "FIELD_DEC",
    "FIELD_RA",
    "SKY_ELECTRONS",
    "visit_mjd",
]

FIELD_RA, FIELD_DEC = 150.0, -30.0
EXPTIME = 30.0
DARKTIME = 31.0
BIAS_LEVEL_ADU = 15000.0
#: Sky level in electrons per pixel in 30 s.
SKY_ELECTRONS = {"u": 150.0, "g": 450.0, "r": 900.0, "i": 1300.0, "z": 1900.0, "y": 2300.0}
_TEMPLATE_FWHM = 0.7  # arcsec
_FWHM_RANGE = (0.9, 1.1)  # arcsec across a CCD
_STARS_PER_PX = 3000.0 / (4072 * 4000)
_GALAXIES_PER_PX = 1000.0 / (4072 * 4000)
_VARIABLE_FRACTION = 0.03
_EDGE = 30  # px, minimum transient distance from the CCD edge
_STAR_HALF = 14
_GAL_HALF = 20
_TILE_OVERLAP = 64  # px shared by neighbouring template tiles
#: Pixel renderers: our own Gaussian code and GalSim (``apdask.tools.simulate_galsim``).
ENGINES = ("apdask", "galsim")
_GALSIM_REACH = 128  # px: GalSim stamps of sources this far outside an image reach into it

# Stream tags of the seeded generators.
_SKY, _TRANSIENT, _VISIT, _RAW, _TILE, _CALIB = 1, 2, 3, 4, 5, 6
_ASTEROID = 8  # 7 is the calibration frames' (apdask.tools._sim_calibframe)


def visit_mjd(k: int) -> float:
    """MJD (TAI) at the start of the ``k``-th simulated visit."""
    return 61000.1 + 0.02 * k


def _rng(*key):
    return np.random.default_rng([int(v) for v in key])


def _sigma_px(fwhm_arcsec):
    return np.asarray(fwhm_arcsec) / 2.3548 / PIXEL_SCALE_ARCSEC


def _is_small(camera):
    return all(d.nx * d.ny <= 1024 * 1024 for d in camera)


# ------------------------------------------------------------------ rendering
def _add_stamps(img, x, y, values_fn, half):
    """Add stamps ``values_fn(dx, dy) -> (N, S, S)`` centred at ``(x, y)`` into ``img``."""
    if len(x) == 0:
        return
    ny, nx = img.shape
    ix = np.rint(x).astype(np.int64)
    iy = np.rint(y).astype(np.int64)
    offs = np.arange(-half, half + 1)
    px = ix[:, None] + offs  # (N, S)
    py = iy[:, None] + offs
    vals = values_fn(px - x[:, None], py - y[:, None]).astype(np.float32)
    ok = ((py >= 0) & (py < ny))[:, :, None] & ((px >= 0) & (px < nx))[:, None, :]
    flat = (py[:, :, None] * nx + px[:, None, :])[ok]
    np.add.at(img.reshape(-1), flat, vals[ok])


def _render_stars(img, x, y, flux, sigma):
    """Pixel-integrated circular Gaussians of total ``flux``."""
    s2 = (np.sqrt(2.0) * sigma)[:, None]

    def fn(dx, dy):
        gx = 0.5 * (erf((dx + 0.5) / s2) - erf((dx - 0.5) / s2))
        gy = 0.5 * (erf((dy + 0.5) / s2) - erf((dy - 0.5) / s2))
        return flux[:, None, None] * gy[:, :, None] * gx[:, None, :]

    _add_stamps(img, x, y, fn, _STAR_HALF)


def _render_galaxies(img, x, y, flux, sigma, gal_a, gal_b, gal_theta):
    """Elliptical Gaussians convolved with a Gaussian PSF of width ``sigma``."""
    c, s = np.cos(gal_theta), np.sin(gal_theta)
    cxx = gal_a**2 * c**2 + gal_b**2 * s**2 + sigma**2
    cyy = gal_a**2 * s**2 + gal_b**2 * c**2 + sigma**2
    cxy = (gal_a**2 - gal_b**2) * c * s
    det = cxx * cyy - cxy**2
    ixx, iyy, ixy = (
        (cyy / det)[:, None, None],
        (cxx / det)[:, None, None],
        (-cxy / det)[:, None, None],
    )

    def fn(dx, dy):
        ddx, ddy = dx[:, None, :], dy[:, :, None]
        prof = np.exp(-0.5 * (ixx * ddx**2 + 2 * ixy * ddx * ddy + iyy * ddy**2))
        prof /= prof.sum(axis=(1, 2), keepdims=True)
        return flux[:, None, None] * prof

    _add_stamps(img, x, y, fn, _GAL_HALF)


def _render(img, cat, x, y, flux, sigma):
    """Render the rows of ``cat`` (dict of arrays) at pixel positions x, y."""
    gal = cat["extended"]
    star = ~gal
    _render_stars(img, x[star], y[star], flux[star], sigma[star])
    _render_galaxies(
        img,
        x[gal],
        y[gal],
        flux[gal],
        sigma[gal],
        cat["gal_a"][gal],
        cat["gal_b"][gal],
        cat["gal_theta"][gal],
    )


def _gaussian_psf(fwhm_arcsec, half=10):
    sig = float(_sigma_px(fwhm_arcsec))
    r = np.arange(-half, half + 1)
    g = np.exp(-0.5 * (r[:, None] ** 2 + r[None, :] ** 2) / sig**2)
    return g / g.sum()


# -------------------------------------------------------------------- geometry
def _offset(ra, dec, dx_arcsec, dy_arcsec):
    """Shift a position by small tangent-plane offsets (east, north) in arcsec."""
    return ra + dx_arcsec / 3600.0 / np.cos(np.deg2rad(dec)), dec + dy_arcsec / 3600.0


def _true_wcs(det, pointing):
    w = det.predicted_wcs(pointing["ra"], pointing["dec"], 0.0)
    ra, dec = _offset(pointing["ra"], pointing["dec"], *pointing["error"])
    w.wcs.crval = [ra, dec]
    w.wcs.set()
    return w


def _mosaic_wcs(camera, pointings, margin):
    """Global template TAN grid and its pixel extent covering every CCD of every visit."""
    s = PIXEL_SCALE_ARCSEC / 3600.0
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [FIELD_RA, FIELD_DEC]
    w.wcs.crpix = [1.0, 1.0]
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    w.wcs.cunit = ["deg", "deg"]
    xs, ys = [], []
    for p in pointings:
        for det in camera:
            tw = _true_wcs(det, p)
            cx = np.array([-0.5, det.nx - 0.5, det.nx - 0.5, -0.5])
            cy = np.array([-0.5, -0.5, det.ny - 0.5, det.ny - 0.5])
            r, d = tw.pixel_to_world_values(cx, cy)
            x, y = w.world_to_pixel_values(r, d)
            xs.extend(x)
            ys.extend(y)
    x0 = int(np.floor(min(xs))) - margin
    y0 = int(np.floor(min(ys))) - margin
    x1 = int(np.ceil(max(xs))) + margin
    y1 = int(np.ceil(max(ys))) + margin
    w.wcs.crpix = [1.0 - x0, 1.0 - y0]
    w.wcs.set()
    return w, (y1 - y0, x1 - x0)


# ----------------------------------------------------------------- catalogues
def _power_law(rng, n, fmin, fmax, alpha):
    """Fluxes with N(>F) ∝ F**-alpha between fmin and fmax."""
    umin = (fmax / fmin) ** (-alpha)
    u = rng.uniform(umin, 1.0, n)
    return fmin * u ** (-1.0 / alpha)


def _static_sky(seed, mosaic, mshape, variable_fraction=None):
    rng = _rng(seed, _SKY)
    ny, nx = mshape
    n_star = int(round(_STARS_PER_PX * nx * ny))
    n_gal = int(round(_GALAXIES_PER_PX * nx * ny))
    n = n_star + n_gal
    x = rng.uniform(-20, nx + 20, n)
    y = rng.uniform(-20, ny + 20, n)
    ra, dec = mosaic.pixel_to_world_values(x, y)
    flux = np.concatenate(
        [_power_law(rng, n_star, 1e3, 1e7, 0.7), _power_law(rng, n_gal, 1e3, 2e5, 0.9)]
    )
    extended = np.arange(n) >= n_star
    variable = np.zeros(n, bool)
    if variable_fraction is None:  # the default keeps at least one variable star
        n_var = max(1, int(round(_VARIABLE_FRACTION * n_star)))
    else:
        n_var = min(n_star, int(round(variable_fraction * n_star)))
    variable[rng.choice(n_star, n_var, replace=False)] = True
    return {
        "id": np.arange(1, n + 1, dtype=np.int64),
        "ra": np.mod(ra, 360.0),
        "dec": dec,
        "flux": flux,
        "extended": extended,
        "variable": variable,
        "gal_a": np.where(extended, rng.uniform(1.5, 5.0, n), 0.0),
        "gal_b": np.zeros(n),
        "gal_theta": rng.uniform(0, np.pi, n),
        "var_amp": np.where(variable, rng.uniform(0.1, 0.5, n), 0.0),
        "var_period": rng.uniform(0.05, 2.0, n),
        "var_phase": rng.uniform(0, 2 * np.pi, n),
        "gal_q": rng.uniform(0.3, 1.0, n),
    }


def _visit_flux(cat, mjd):
    return cat["flux"] * (
        1.0 + cat["var_amp"] * np.sin(2 * np.pi * mjd / cat["var_period"] + cat["var_phase"])
    )


def _snr_to_flux(band, sky_e, snr, fwhm_range=_FWHM_RANGE):
    """nJy of a point source with difference-image PSF SNR ``snr``."""
    sig = float(_sigma_px(np.mean(fwhm_range)))
    noise_e = np.sqrt(4 * np.pi * sig**2 * (sky_e + 40.0) * 1.1)
    return snr * noise_e * njy_per_electron(band, EXPTIME)


# ------------------------------------------------------------------ pixels
def _amp_segments(img, det, rng):
    """Electrons (assembled) → raw int32 ADU segments in readout order, with overscan."""
    segments = []
    for amp in det.amplifiers:
        level = BIAS_LEVEL_ADU + rng.uniform(-50.0, 50.0)
        seg = rng.standard_normal(amp.raw_shape, dtype=np.float32)
        seg *= amp.read_noise / amp.gain
        seg += level
        data = img[amp.y0 : amp.y1, amp.x0 : amp.x1] / amp.gain
        if amp.flip_y:
            data = data[::-1, :]
        if amp.flip_x:
            data = data[:, ::-1]
        seg[amp.data_slice] += data
        np.minimum(seg, amp.saturation, out=seg)
        np.rint(seg, out=seg)
        segments.append(seg.astype(np.int32))
    return segments


def _add_cosmic_rays(rng, img, n):
    ny, nx = img.shape
    for _ in range(n):
        x, y = int(rng.integers(0, nx)), int(rng.integers(0, ny))
        length = int(rng.integers(1, 4))
        dx, dy = [(1, 0), (0, 1), (1, 1), (1, -1)][int(rng.integers(0, 4))]
        for t in range(length):
            xi, yi = x + t * dx, y + t * dy
            if 0 <= xi < nx and 0 <= yi < ny:
                img[yi, xi] += rng.uniform(2000.0, 6000.0)
