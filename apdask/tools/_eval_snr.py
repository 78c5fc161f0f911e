"""The simulator's noise model and the expected difference-image SNR of its sources.

Re-exported by :mod:`apdask.tools.evaluate`.
"""

from __future__ import annotations

import json
import os

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import erf

from apdask.core.camera import PIXEL_SCALE_ARCSEC, get_camera, njy_per_electron
from apdask.tools.simulate import DARKTIME, EXPTIME, SKY_ELECTRONS

__all__ = ["expected_snr", "psf_image", "psf_noise_factors"]


# --------------------------------------------------------------------------------------
# noise model
# --------------------------------------------------------------------------------------
def _noise_model(repo, band, camera_name):
    """Per-detector noise parameters of the simulated data (electrons)."""
    camera = get_camera(camera_name)
    meta = _sim_meta(repo)
    rn2 = {d.name: float(np.mean([a.read_noise**2 for a in d.amplifiers])) for d in camera}
    rn2_mean = float(np.mean(list(rn2.values())))
    sky_e = SKY_ELECTRONS[band] * EXPTIME / 30.0
    return {
        "sky_e": sky_e,
        "dark_e": 0.002 * DARKTIME,
        "read_noise2": rn2,
        "template_var_e2": (sky_e + rn2_mean) / float(meta.get("template_depth", 10.0)),
        "k_njy": njy_per_electron(band, EXPTIME),
        "fwhm_range": tuple(meta.get("fwhm_range", (0.9, 1.1))),
        "template_fwhm": float(meta.get("template_fwhm", 0.7)),
        "psf": _psf_of(meta),
        "shape": {d.name: d.shape for d in camera},
    }


def _psf_of(meta):
    """The PSF profile :func:`expected_snr` uses for a repository's ``simulation.json``.

    ``None`` (the analytic Gaussian) for our engine and for repositories without the
    keys; the GalSim profile name (``"kolmogorov"``, ``"moffat"``, ``"gaussian"``)
    for ``"engine": "galsim"``.
    """
    if str(meta.get("engine", "apdask")) != "galsim":
        return None
    psf = str(meta.get("psf", "kolmogorov")).lower()
    if psf not in _GALSIM_PROFILES:
        msg = f"simulation.json: unknown GalSim psf {psf!r}; expected one of {_GALSIM_PROFILES}"
        raise ValueError(msg)
    return psf


# --------------------------------------------------------------------------------------
# PSF noise factors of non-Gaussian PSFs
# --------------------------------------------------------------------------------------
#: GalSim PSF profiles (``apdask.tools.simulate_galsim.PSF_PROFILE``) evaluate knows.
_GALSIM_PROFILES = ("kolmogorov", "moffat", "gaussian")
_MOFFAT_BETA = 3.5  # as apdask.simulate_galsim
_PSF_HALF = 64  # px: the GalSim engine's transient stamps are 129×129
_FWHM_STEP = 0.01  # arcsec: the cache key rounds FWHMs to this
_factor_cache: dict[tuple[str, float, float], tuple[float, float, float]] = {}


def psf_image(profile: str, fwhm_arcsec: float, half: int = _PSF_HALF) -> np.ndarray:
    """Pixel image (``2*half+1`` square, sum 1) of a simulated PSF, centred on a pixel.

    Parameters
    ----------
    profile : str
        ``"kolmogorov"``, ``"moffat"`` (β = 3.5) or ``"gaussian"``: the round GalSim
        profile that ``apdask simulate --engine galsim`` draws (pixel-integrated,
        ``drawImage(method="auto")``, as the engine does), or ``"apdask"`` for our
        engine's pixel-integrated Gaussian.
    fwhm_arcsec : float
    half : int

    Returns
    -------
    numpy.ndarray
    """
    fwhm = float(fwhm_arcsec)
    n = 2 * half + 1
    if profile == "apdask":
        s2 = np.sqrt(2.0) * fwhm / 2.3548 / PIXEL_SCALE_ARCSEC
        d = np.arange(-half, half + 1, dtype=float)
        g = 0.5 * (erf((d + 0.5) / s2) - erf((d - 0.5) / s2))
        img = g[:, None] * g[None, :]
    else:
        # optional: galsim comes with the 'sim' extra
        import galsim

        gsp = galsim.GSParams(maximum_fft_size=16384)
        if profile == "kolmogorov":
            obj = galsim.Kolmogorov(fwhm=fwhm, gsparams=gsp)
        elif profile == "moffat":
            obj = galsim.Moffat(beta=_MOFFAT_BETA, fwhm=fwhm, gsparams=gsp)
        elif profile == "gaussian":
            obj = galsim.Gaussian(fwhm=fwhm, gsparams=gsp)
        else:
            msg = f"unknown PSF profile {profile!r}; use one of {_GALSIM_PROFILES + ('apdask',)}"
            raise ValueError(msg)
        img = obj.drawImage(nx=n, ny=n, scale=PIXEL_SCALE_ARCSEC).array.astype(np.float64)
    return img / img.sum()


def psf_noise_factors(
    profile: str, fwhm_big_arcsec: float, fwhm_small_arcsec: float
) -> tuple[float, float, float]:
    """Noise factors of a PSF-fit flux on the difference image, from PSF pixel images.

    The broader of the science and template PSFs, ``P`` (FWHM ``fwhm_big_arcsec``), is
    the difference-image PSF; the sharper image (``P_s``) is convolved by the matching
    kernel ``K`` with ``K * P_s = P``.  With ``p`` the pixel image of ``P`` (sum 1):

    * ``nea = 1 / Σp²``: the noise-equivalent area (px²), the background variance
      factor of the broader image;
    * ``kernel = Σ(p ⋆ K)² / (Σp²)²``: the same for the sharper image's noise after
      the kernel (computed in Fourier space as ``Σ|p̂|⁴/|p̂_s|² / N / (Σp²)²``);
    * ``poisson = Σp³ / (Σp²)²``: the factor of the source's own Poisson noise.

    For a Gaussian these are ``4πσ²``, ``4πσ⁴/(2σ² − σ_s²)`` and ``4/3``
    (:func:`expected_snr`'s analytic formula).  Results are cached per profile and
    FWHMs rounded to 0.01″.

    Parameters
    ----------
    profile : str
        See :func:`psf_image`.
    fwhm_big_arcsec, fwhm_small_arcsec : float
        FWHMs of the broader and the sharper PSF.

    Returns
    -------
    tuple of float
        ``(nea, kernel, poisson)``.
    """
    fb = round(round(float(fwhm_big_arcsec) / _FWHM_STEP) * _FWHM_STEP, 4)
    fs = round(round(float(fwhm_small_arcsec) / _FWHM_STEP) * _FWHM_STEP, 4)
    key = (profile, fb, fs)
    hit = _factor_cache.get(key)
    if hit is not None:
        return hit
    p = psf_image(profile, fb)
    s2 = float(np.sum(p * p))
    nea = 1.0 / s2
    poisson = float(np.sum(p**3)) / s2**2
    if fs >= fb:
        kernel = nea
    else:
        q = psf_image(profile, fs)
        n = 2 * p.shape[0]  # zero-padded: no wrap-around of the kernel
        ph = np.abs(np.fft.rfft2(p, (n, n)))
        qh = np.abs(np.fft.rfft2(q, (n, n)))
        ok = qh > 1e-12 * qh.max()
        r = np.where(ok, ph**4 / np.where(ok, qh, 1.0) ** 2, 0.0)
        w = np.full(r.shape[1], 2.0)  # rfft: the other half of the spectrum
        w[0] = 1.0
        if n % 2 == 0:
            w[-1] = 1.0
        kernel = float(np.sum(r * w) / (n * n)) / s2**2
    out = (nea, kernel, poisson)
    _factor_cache[key] = out
    return out


def _sim_meta(repo):
    path = os.path.join(repo, "truth", "simulation.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def expected_snr(
    delta_flux: ArrayLike,
    fwhm_sci_px: ArrayLike,
    fwhm_tpl_px: ArrayLike,
    var_sci_e2: ArrayLike,
    var_tpl_e2: ArrayLike,
    k_njy: float,
    psf: str | None = None,
) -> np.ndarray:
    """Expected PSF-fit SNR of a point source on the difference image.

    Parameters
    ----------
    delta_flux : array_like
        Science minus template flux, nJy.
    fwhm_sci_px, fwhm_tpl_px : array_like
        Gaussian FWHM of the science and template PSFs in pixels.
    var_sci_e2, var_tpl_e2 : array_like
        Per-pixel background variance of the science image and of the template
        (in science electrons²).
    k_njy : float
        nJy per electron.
    psf : str, optional
        ``None`` (default): a Gaussian PSF, the analytic formula below.  Otherwise a
        profile of :func:`psf_image` (``"kolmogorov"``, ``"moffat"``, ``"gaussian"``
        for the GalSim engine): the three factors ``4πσ²``, ``4πσ⁴/(2σ² − σ_s²)``
        and ``4/3`` are replaced by those of :func:`psf_noise_factors`, computed
        from the pixel images of that profile at the two FWHMs (pixel scale
        ``apdask.core.camera.PIXEL_SCALE_ARCSEC``).

    Returns
    -------
    numpy.ndarray
        ``delta_flux / sigma`` where ``sigma²`` (e²) is ``4πσ_s²·V_s`` (science
        background), ``4πσ_s⁴/(2σ_s² − σ_t²)·V_t`` (template noise convolved by the
        matching kernel, measured with the science PSF) and ``(4/3)·|f|`` (the
        source's own Poisson noise under a Gaussian PSF).  When the template is the
        broader image the roles are swapped (difference PSF = template PSF).
    """
    f_e = np.abs(np.asarray(delta_flux, float)) / k_njy
    s_s = np.asarray(fwhm_sci_px, float) / 2.3548
    s_t = np.asarray(fwhm_tpl_px, float) / 2.3548
    big = np.maximum(s_s, s_t)
    small = np.minimum(s_s, s_t)
    v_big = np.where(s_s >= s_t, var_sci_e2, var_tpl_e2)
    v_small = np.where(s_s >= s_t, var_tpl_e2, var_sci_e2)
    if psf is None:
        nea = 4 * np.pi * big**2
        kernel = 4 * np.pi * big**4 / (2 * big**2 - small**2)
        poisson = 4.0 / 3.0
    else:
        nea, kernel, poisson = _numeric_factors(psf, big * 2.3548, small * 2.3548)
    var = nea * v_big + kernel * v_small + poisson * f_e
    return np.asarray(delta_flux, float) / k_njy / np.sqrt(var)


def _numeric_factors(psf, fwhm_big_px, fwhm_small_px):
    """:func:`psf_noise_factors` over arrays of FWHMs (px), one evaluation per rounded pair."""
    fb, fs = np.broadcast_arrays(
        np.asarray(fwhm_big_px, float) * PIXEL_SCALE_ARCSEC,
        np.asarray(fwhm_small_px, float) * PIXEL_SCALE_ARCSEC,
    )
    kb = np.rint(fb / _FWHM_STEP).astype(np.int64)
    ks = np.rint(fs / _FWHM_STEP).astype(np.int64)
    out = np.empty((3,) + fb.shape)
    pairs, inv = np.unique(np.stack([kb.ravel(), ks.ravel()]), axis=1, return_inverse=True)
    vals = np.array([psf_noise_factors(psf, b * _FWHM_STEP, t * _FWHM_STEP) for b, t in pairs.T])
    out[:] = vals[np.asarray(inv).ravel()].T.reshape((3,) + fb.shape)
    return out[0], out[1], out[2]


def _truth_snr(truth, model):
    """Expected difference SNR of every truth row (uses the FWHM model of the simulator)."""
    lo, hi = model["fwhm_range"]
    det = np.asarray(truth["detector"]).astype(str)
    nx = np.array([model["shape"][d][1] for d in det], float)
    ny = np.array([model["shape"][d][0] for d in det], float)
    x, y = np.asarray(truth["x"], float), np.asarray(truth["y"], float)
    fwhm = lo + (hi - lo) * 0.5 * (np.clip(x / nx, 0, 1) + np.clip(y / ny, 0, 1))
    rn2 = np.array([model["read_noise2"][d] for d in det])
    v_s = model["sky_e"] + model["dark_e"] + rn2
    delta = np.asarray(truth["flux"], float) - np.asarray(truth["template_flux"], float)
    return expected_snr(
        delta,
        fwhm / PIXEL_SCALE_ARCSEC,
        model["template_fwhm"] / PIXEL_SCALE_ARCSEC,
        v_s,
        model["template_var_e2"],
        model["k_njy"],
        psf=model.get("psf"),
    )
