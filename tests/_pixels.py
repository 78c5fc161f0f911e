"""Synthetic pixel data shared by the pixel-stage tests (fixed seeds, analytic stars)."""

from __future__ import annotations

import numpy as np
from astropy.wcs import WCS
from scipy.special import erf

from apdask.core.exposure import Exposure

SCALE = 0.2  # arcsec / px


def make_wcs(shape, ra=150.0, dec=2.0, rot_deg=0.0, crpix=None, scale=SCALE):
    """Simple TAN WCS, north up / east left, rotated by ``rot_deg``."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    if crpix is None:
        crpix = ((nx - 1) / 2 + 1, (ny - 1) / 2 + 1)
    w.wcs.crpix = list(crpix)
    t = np.deg2rad(rot_deg)
    c, s = np.cos(t), np.sin(t)
    w.wcs.cd = scale / 3600.0 * np.array([[-c, s], [s, c]])
    w.wcs.cunit = ["deg", "deg"]
    w.pixel_shape = (nx, ny)
    return w


def gaussian_psf(fwhm, size=25):
    """Pixel-integrated Gaussian PSF stamp (sum 1)."""
    img = np.zeros((size, size))
    add_stars(img, [size // 2], [size // 2], [1.0], fwhm)
    return img / img.sum()


def add_stars(img, xs, ys, fluxes, fwhm, half=None):
    """Add pixel-integrated circular Gaussians in place (flux in image units)."""
    sig = fwhm / 2.3548
    if half is None:
        half = int(np.ceil(6 * sig)) + 1
    ny, nx = img.shape
    for x, y, f in zip(xs, ys, fluxes, strict=True):
        ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
        x0, x1 = max(ix - half, 0), min(ix + half + 1, nx)
        y0, y1 = max(iy - half, 0), min(iy + half + 1, ny)
        if x1 <= x0 or y1 <= y0:
            continue
        ex = np.arange(x0, x1 + 1) - 0.5 - x
        ey = np.arange(y0, y1 + 1) - 0.5 - y
        px = np.diff(0.5 * erf(ex / (np.sqrt(2) * sig)))
        py = np.diff(0.5 * erf(ey / (np.sqrt(2) * sig)))
        img[y0:y1, x0:x1] += f * py[:, None] * px[None, :]
    return img


def star_field(shape, n, seed, fmin=2e3, fmax=2e5, margin=20):
    """Random positions and power-law fluxes."""
    rng = np.random.default_rng(seed)
    xs = rng.uniform(margin, shape[1] - margin, n)
    ys = rng.uniform(margin, shape[0] - margin, n)
    fl = fmin * (fmax / fmin) ** rng.uniform(0, 1, n)
    return xs, ys, fl


def exposure_from(img, var, wcs=None, psf=None, mask=None, meta=None):
    """Wrap arrays into an Exposure."""
    if mask is None:
        mask = np.zeros(img.shape, np.uint32)
    return Exposure(
        image=np.asarray(img, np.float32), variance=np.asarray(var, np.float32),
        mask=mask, wcs=wcs, psf=psf, meta=dict(meta or {}),
    )  # fmt: skip


def sky_exposure(shape, xs, ys, fluxes, fwhm, *, sky=900.0, seed=0, wcs=None, gain_noise=True):
    """Noisy image in e- with sky, Poisson + read noise, variance plane from the truth."""
    rng = np.random.default_rng(seed)
    truth = np.full(shape, sky, float)
    add_stars(truth, xs, ys, fluxes, fwhm)
    var = truth + 25.0
    img = truth + rng.normal(0, 1, shape) * np.sqrt(var)
    return exposure_from(img, var, wcs=wcs, psf=gaussian_psf(fwhm))
