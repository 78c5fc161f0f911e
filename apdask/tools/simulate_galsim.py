"""GalSim rendering engine of the simulator (``simulate_repo(..., engine="galsim")``).

An independent second renderer of the same scene: the static-sky catalogue, the
transients, the pointings, the pixel grids, the calibrations, the raw format and the
truth tables are those of :mod:`apdask.tools.simulate`; only the pixels of the science
images, the template tiles and the injected transients are drawn by GalSim
(``GSObject.drawImage``) instead of our own Gaussian code:

* **PSF**: a Kolmogorov profile (atmospheric turbulence, ``r^-11/3`` wings), with the
  FWHM rising linearly across each CCD over ``fwhm_range`` exactly as in our engine,
  plus a small shear that varies across the CCD (``|g| ≤ PSF_SHEAR``).  Templates
  use a round Kolmogorov of ``template_fwhm``; its pixel image (21×21, sum 1) is
  stored with each tile.
* **Galaxies**: Sersic profiles of the catalogue's size, axis ratio and position
  angle (half-light radius of the circularised Gaussian of our engine), 60 %
  exponential (n = 1) and the rest n ∈ {1.5, 2, 2.5, 3}, convolved with the PSF.
* **Stars, variables, transients**: the PSF scaled to the flux.
* **Noise**: ``galsim.PoissonNoise`` on the expected electrons of the science image
  (sky + sources, times the flat, plus dark); ``galsim.GaussianNoise`` of the
  template's constant variance.  Read noise, bias and overscan are added per
  amplifier by :func:`apdask.tools.simulate._amp_segments` as for our engine.

Every object is drawn (pixel-integrated, ``method="auto"``) into its own stamp,
which is added to the image.  A star's stamp is at least 65×65 px (99.7 % of the
flux of a 1″ PSF) and large enough that the profile at its edge is below 3 % of the
pixel noise, so bright stars have no truncation step; a transient's is at least
129×129 px (99.9 %).  The truth flux of each transient is the sum of the stamp
GalSim drew (in nJy), i.e. what is in the image before noise; static sources keep
their catalogue flux.

Every random draw is seeded from ``(seed, stream, ...)``, so the same seed gives the
same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

try:
    import galsim
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    msg = "engine='galsim' needs GalSim: pip install 'apdask[sim]' (galsim==2.8.5)"
    raise ImportError(msg) from exc

from apdask.core.camera import PIXEL_SCALE_ARCSEC

__all__ = [
    "PSF_SHEAR",
    "PSF_PROFILE",
    "galaxy_columns",
    "science_psf",
    "template_psf",
    "template_psf_image",
    "render_science",
    "render_template",
]

#: Largest PSF shear ``|g|`` at the CCD corners.
PSF_SHEAR = 0.02
#: PSF profile: ``"kolmogorov"`` (default), ``"moffat"`` (β = 3.5) or ``"gaussian"``
#: (a control: the GalSim engine with our engine's PSF shape).
PSF_PROFILE = "kolmogorov"
_MOFFAT_BETA = 3.5
_GALSIM = 11  # stream tag of GalSim's random draws (apdask.simulate uses 1..7)
_STAR_HALVES = np.array([32, 48, 64, 96, 128])  # px; 32 holds 99.7 % of a 1″ PSF
_TRANSIENT_HALF = 64  # px; holds 99.9 % of the flux
_GAL_HALF = (16, 80)  # clip of a galaxy stamp's half size, px
_SERSIC_N = (1.5, 2.0, 2.5, 3.0)
_EDGE_FRACTION = 0.03  # profile value at a stamp edge, relative to the pixel noise
_GSPARAMS = galsim.GSParams(maximum_fft_size=16384)


def _seed(*key):
    """A 31-bit GalSim seed from a numpy seed sequence key."""
    return int(np.random.default_rng([int(v) for v in key]).integers(1, 2**31 - 1))


def galaxy_columns(seed: int, sky: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-object Sersic index (``sersic_n``; 0 for stars) of the static sky catalogue."""
    rng = np.random.default_rng([int(seed), _GALSIM, 0])
    n = len(sky["id"])
    exp = rng.uniform(0.0, 1.0, n) < 0.6
    idx = rng.choice(_SERSIC_N, n)
    return {"sersic_n": np.where(sky["extended"], np.where(exp, 1.0, idx), 0.0)}


def _psf(fwhm):
    fwhm = float(fwhm)
    if PSF_PROFILE == "kolmogorov":
        return galsim.Kolmogorov(fwhm=fwhm, gsparams=_GSPARAMS)
    if PSF_PROFILE == "moffat":
        return galsim.Moffat(beta=_MOFFAT_BETA, fwhm=fwhm, gsparams=_GSPARAMS)
    if PSF_PROFILE == "gaussian":
        return galsim.Gaussian(fwhm=fwhm, gsparams=_GSPARAMS)
    msg = f"unknown PSF_PROFILE {PSF_PROFILE!r}; use kolmogorov, moffat or gaussian"
    raise ValueError(msg)


def science_psf(
    x: float, y: float, nx: int, ny: int, fwhm_range: tuple[float, float]
) -> galsim.GSObject:
    """The science PSF (arcsec units) at 0-based pixel ``(x, y)`` of an ``nx × ny`` CCD."""
    u = float(np.clip(x / nx, 0, 1))
    v = float(np.clip(y / ny, 0, 1))
    lo, hi = fwhm_range
    fwhm = lo + (hi - lo) * 0.5 * (u + v)
    g1 = PSF_SHEAR * (2 * u - 1) / np.sqrt(2)
    g2 = PSF_SHEAR * (2 * v - 1) / np.sqrt(2)
    return _psf(fwhm).shear(g1=g1, g2=g2)


def template_psf(fwhm: float) -> galsim.GSObject:
    """The template PSF: a round profile (Kolmogorov) of FWHM ``fwhm`` arcsec."""
    return _psf(fwhm)


def template_psf_image(fwhm: float, half: int = 10) -> np.ndarray:
    """Pixel image (``2*half+1`` square, sum 1) of :func:`template_psf`."""
    n = 2 * half + 1
    img = template_psf(fwhm).drawImage(nx=n, ny=n, scale=PIXEL_SCALE_ARCSEC).array
    return (img / img.sum(dtype=np.float64)).astype(np.float64)


def _profile(fwhm):
    """Pixel value of a unit-flux PSF of ``fwhm`` at the radii of ``_STAR_HALVES``."""
    psf = _psf(fwhm)
    area = PIXEL_SCALE_ARCSEC**2
    return np.array(
        [psf.xValue(galsim.PositionD(h * PIXEL_SCALE_ARCSEC, 0.0)) * area for h in _STAR_HALVES]
    )


def _star_halves(flux, widest_fwhm, edge_level):
    """Half size of each star's stamp: the profile at the edge is below ``edge_level``."""
    prof = _profile(widest_fwhm * (1 + PSF_SHEAR))
    ok = np.abs(flux)[:, None] * prof[None, :] < edge_level
    first = np.where(ok.any(axis=1), ok.argmax(axis=1), len(_STAR_HALVES) - 1)
    return _STAR_HALVES[first]


def _galaxy(cat, i, flux):
    a = float(cat["gal_a"][i])
    b = float(cat["gal_b"][i])
    q = float(np.clip(b / a, 0.05, 1.0)) if a > 0 else 1.0
    hlr = 1.1774 * np.sqrt(max(a * b, 1e-3)) * PIXEL_SCALE_ARCSEC
    n = float(cat["sersic_n"][i]) if "sersic_n" in cat else 1.0
    prof = (
        galsim.Exponential(half_light_radius=hlr, flux=flux, gsparams=_GSPARAMS)
        if n == 1.0
        else galsim.Sersic(n=n, half_light_radius=hlr, flux=flux, gsparams=_GSPARAMS)
    )
    return prof.shear(q=q, beta=float(cat["gal_theta"][i]) * galsim.radians)


def _draw_all(image, cat, x, y, flux, psf_at, halves_star, out_sum):
    """Draw every object into ``image`` (a galsim.Image with 0-based bounds)."""
    n_cat = len(cat["extended"])
    scale = PIXEL_SCALE_ARCSEC
    for i in range(len(x)):
        if flux[i] == 0:
            continue
        psf = psf_at(x[i], y[i])
        ext = i < n_cat and bool(cat["extended"][i])
        if ext:
            obj = galsim.Convolve(_galaxy(cat, i, float(flux[i])), psf, gsparams=_GSPARAMS)
            half = int(np.clip(obj.getGoodImageSize(scale) // 2, *_GAL_HALF))
        else:
            obj = psf.withFlux(float(flux[i]))
            half = int(halves_star[i])
        ix, iy = int(np.rint(x[i])), int(np.rint(y[i]))
        bounds = galsim.BoundsI(ix - half, ix + half, iy - half, iy + half)
        stamp = galsim.ImageF(bounds, scale=scale)
        obj.drawImage(image=stamp, center=galsim.PositionD(float(x[i]), float(y[i])))
        out_sum[i] = stamp.array.sum(dtype=np.float64)
        overlap = bounds & image.bounds
        if overlap.isDefined():
            image[overlap] += stamp[overlap]


def render_science(
    cat: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    flux_e: np.ndarray,
    shape: tuple[int, int],
    fwhm_range: tuple[float, float],
    sky_e: float,
    calib: Mapping[str, np.ndarray],
    darktime: float,
    key: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray]:
    """Science electrons of one CCD, with Poisson noise, drawn by GalSim.

    Parameters
    ----------
    cat : dict of arrays
        The static-sky rows on this CCD (``extended``, ``gal_a``, ``gal_b``,
        ``gal_theta``, ``sersic_n``); rows of ``x``, ``y``, ``flux_e`` beyond
        ``len(cat["extended"])`` are point sources (transients).
    x, y : numpy.ndarray
        0-based pixel positions (true WCS).
    flux_e : numpy.ndarray
        Total fluxes in electrons.
    shape : tuple of int
        ``(ny, nx)``.
    fwhm_range : tuple of float
        PSF FWHM (arcsec) at the ``(0, 0)`` and ``(nx, ny)`` corners.
    sky_e : float
        Sky electrons per pixel.
    calib : dict
        ``flat`` and ``dark`` (e-/s) arrays of the CCD.
    darktime : float
    key : tuple of int
        Seed key of the Poisson noise.

    Returns
    -------
    img : numpy.ndarray
        float32 electrons: ``Poisson((sky + sources) × flat + dark × darktime)``.
    drawn_e : numpy.ndarray
        Sum of the stamp GalSim drew for each object (electrons, before flat and noise).
    """
    ny, nx = shape
    image = galsim.ImageF(nx, ny, xmin=0, ymin=0, scale=PIXEL_SCALE_ARCSEC)
    noise_e = np.sqrt(sky_e)
    halves = _star_halves(flux_e, max(fwhm_range), _EDGE_FRACTION * noise_e)
    halves[len(cat["extended"]) :] = np.maximum(halves[len(cat["extended"]) :], _TRANSIENT_HALF)
    drawn = np.zeros(len(x))
    _draw_all(
        image,
        cat,
        x,
        y,
        flux_e,
        lambda px, py: science_psf(px, py, nx, ny, fwhm_range),
        halves,
        drawn,
    )
    arr = image.array
    arr += np.float32(sky_e)
    arr *= calib["flat"]
    arr += calib["dark"] * np.float32(darktime)
    np.maximum(arr, 0.0, out=arr)
    image.addNoise(galsim.PoissonNoise(galsim.BaseDeviate(_seed(*key, _GALSIM))))
    return np.ascontiguousarray(image.array, dtype=np.float32), drawn


def render_template(
    cat: Mapping[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    shape: tuple[int, int],
    fwhm: float,
    noise: float,
    key: tuple[int, ...],
) -> np.ndarray:
    """One template tile (nJy) drawn by GalSim, with Gaussian noise of σ ``noise``.

    ``cat``, ``x``, ``y`` and ``flux`` (nJy) are as in :func:`render_science`; the
    PSF is :func:`template_psf` everywhere.
    """
    ny, nx = shape
    image = galsim.ImageF(nx, ny, xmin=0, ymin=0, scale=PIXEL_SCALE_ARCSEC)
    halves = _star_halves(flux, fwhm, _EDGE_FRACTION * noise)
    psf = template_psf(fwhm)
    _draw_all(image, cat, x, y, flux, lambda px, py: psf, halves, np.zeros(len(x)))
    image.addNoise(galsim.GaussianNoise(galsim.BaseDeviate(_seed(*key, _GALSIM)), sigma=noise))
    return np.ascontiguousarray(image.array, dtype=np.float32)
