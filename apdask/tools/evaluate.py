"""Comparison of pipeline output with the simulator's truth (``apdask evaluate``).

:func:`evaluate_visit` reads the DIASources of one visit from the alert files
under ``<repo>/alerts`` and compares them with ``<repo>/truth/visit_<V>.ecsv``:

* **completeness** of the injected transients against their *expected*
  difference-image PSF SNR.  The expected SNR comes from the truth flux and the
  simulator's noise model (sky, read noise, dark, the PSF of the FWHM at the
  source position, the template's own noise after convolution by the matching
  kernel and the source's Poisson noise), see :func:`expected_snr`.  The PSF is
  the one that was simulated (``"engine"`` and ``"psf"`` of
  ``truth/simulation.json``): our engine's Gaussian analytically, a GalSim
  profile (Kolmogorov, Moffat or Gaussian) from its pixel image, see
  :func:`psf_noise_factors`;
* **false positives per CCD**: DIASources with no truth source that changed
  between template and science (a transient or variable with expected
  ``|SNR| ≥ 3``) within the match radius, classified by what lies under them;
* **flux bias and pulls** of matched transients: median of ``meas/true − 1`` and
  the robust σ of ``(meas − true)/err``;
* **astrometric error**: median separation at SNR > 20;
* **difference-image noise / propagated σ**: robust σ of ``image/sqrt(variance)``
  over the unmasked pixels of the difference cutouts, away from the central source.

It writes ``evaluate.json`` and ``evaluate.png`` (matplotlib's object API, no backend set).
:func:`match_truth` is the small matcher the end-to-end test uses.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
from astropy.table import Table

from apdask.core.geometry import unit_vectors
from apdask.core.stats import robust_sigma

__all__ = [
    "match_truth",
    "load_truth",
    "expected_snr",
    "psf_image",
    "psf_noise_factors",
    "evaluate_visit",
    "evaluate_sources",
    "noise_ratio",
    "plot_evaluation",
    "TARGETS",
]

#: Targets of issue 6, checked in the ``targets`` section of the result.
TARGETS = {
    "completeness_snr_ge_7": (">=", 0.95),
    "completeness_snr_5_6": (">=", 0.50),
    "false_positives_per_ccd": ("<=", 1.0),
    "flux_bias_median": ("abs<=", 0.02),
    "flux_pull_sigma": ("in", (0.9, 1.1)),
    "astrometric_error_median_arcsec_snr_gt_20": ("<=", 0.05),
    "noise_ratio": ("in", (0.95, 1.05)),
}

#: Completeness bins in expected difference-image SNR.
SNR_BINS = (3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 15.0, 20.0, 40.0, 80.0, 200.0, 1e4)


def load_truth(repo, visit):
    """The truth table of one visit (``<repo>/truth/visit_<visit>.ecsv``)."""
    path = os.path.join(repo, "truth", f"visit_{visit}.ecsv")
    if not os.path.exists(path):
        msg = f"no truth table for visit {visit} at {path}; was the repository simulated?"
        raise FileNotFoundError(msg)
    return Table.read(path)


def _chord(radius_arcsec):
    return 2 * np.sin(np.deg2rad(radius_arcsec / 3600.0) / 2)


def _arcsec(chord):
    return np.rad2deg(2 * np.arcsin(np.asarray(chord) / 2)) * 3600.0


def match_truth(truth, dia_sources, radius_arcsec=1.0, kinds=("transient",)):
    """Match truth sources of the given kinds to DIASources by position.

    Parameters
    ----------
    truth : astropy.table.Table
        Truth with ``ra``, ``dec``, ``kind``, ``flux``, ``template_flux``.
    dia_sources : list of dict or Table
        DIASources with ``ra``, ``dec``, ``psfFlux``, ``psfFluxErr``.
    radius_arcsec : float
        Match radius.
    kinds : tuple of str
        Truth kinds to evaluate.

    Returns
    -------
    dict
        ``n_truth``, ``n_recovered``, ``fraction``, and per-match arrays
        ``sep_arcsec``, ``flux_true``, ``flux_meas``, ``flux_err``.
    """
    from scipy.spatial import cKDTree

    sel = np.isin(np.asarray(truth["kind"]).astype(str), kinds)
    t = truth[sel]
    ra = np.array([s["ra"] for s in dia_sources], dtype=float)
    dec = np.array([s["dec"] for s in dia_sources], dtype=float)
    out = {"n_truth": len(t), "n_recovered": 0, "fraction": float("nan")}
    if len(t) == 0 or len(ra) == 0:
        out.update(fraction=0.0 if len(t) else float("nan"), sep_arcsec=np.array([]))
        return out
    tree = cKDTree(unit_vectors(ra, dec))
    dist, idx = tree.query(
        unit_vectors(np.asarray(t["ra"]), np.asarray(t["dec"])),
        distance_upper_bound=_chord(radius_arcsec),
    )
    ok = np.isfinite(dist)
    sep = _arcsec(dist[ok])
    flux = np.array([dia_sources[i].get("psfFlux") or np.nan for i in idx[ok]], dtype=float)
    err = np.array([dia_sources[i].get("psfFluxErr") or np.nan for i in idx[ok]], dtype=float)
    true_diff = np.asarray(t["flux"])[ok] - np.asarray(t["template_flux"])[ok]
    out.update(
        n_recovered=int(ok.sum()),
        fraction=float(ok.mean()),
        sep_arcsec=sep,
        flux_true=true_diff,
        flux_meas=flux,
        flux_err=err,
        truth=t[ok],
    )
    return out


# --------------------------------------------------------------------------------------
# noise model
# --------------------------------------------------------------------------------------
def _noise_model(repo, band, camera_name):
    """Per-detector noise parameters of the simulated data (electrons)."""
    from apdask.core.camera import get_camera, njy_per_electron
    from apdask.tools.simulate import DARKTIME, EXPTIME, SKY_ELECTRONS

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
#: GalSim PSF profiles (``apdask.simulate_galsim.PSF_PROFILE``) evaluate knows.
_GALSIM_PROFILES = ("kolmogorov", "moffat", "gaussian")
_MOFFAT_BETA = 3.5  # as apdask.simulate_galsim
_PSF_HALF = 64  # px: the GalSim engine's transient stamps are 129×129
_FWHM_STEP = 0.01  # arcsec: the cache key rounds FWHMs to this
_factor_cache = {}


def psf_image(profile, fwhm_arcsec, half=_PSF_HALF):
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
    from apdask.core.camera import PIXEL_SCALE_ARCSEC

    fwhm = float(fwhm_arcsec)
    n = 2 * half + 1
    if profile == "apdask":
        from scipy.special import erf

        s2 = np.sqrt(2.0) * fwhm / 2.3548 / PIXEL_SCALE_ARCSEC
        d = np.arange(-half, half + 1, dtype=float)
        g = 0.5 * (erf((d + 0.5) / s2) - erf((d - 0.5) / s2))
        img = g[:, None] * g[None, :]
    else:
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


def psf_noise_factors(profile, fwhm_big_arcsec, fwhm_small_arcsec):
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


def expected_snr(delta_flux, fwhm_sci_px, fwhm_tpl_px, var_sci_e2, var_tpl_e2, k_njy, psf=None):
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
        ``apdask.camera.PIXEL_SCALE_ARCSEC``).

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
    from apdask.core.camera import PIXEL_SCALE_ARCSEC

    fb, fs = np.broadcast_arrays(np.asarray(fwhm_big_px, float) * PIXEL_SCALE_ARCSEC,
                                 np.asarray(fwhm_small_px, float) * PIXEL_SCALE_ARCSEC)  # fmt: skip
    kb = np.rint(fb / _FWHM_STEP).astype(np.int64)
    ks = np.rint(fs / _FWHM_STEP).astype(np.int64)
    out = np.empty((3,) + fb.shape)
    pairs, inv = np.unique(np.stack([kb.ravel(), ks.ravel()]), axis=1, return_inverse=True)
    vals = np.array([psf_noise_factors(psf, b * _FWHM_STEP, t * _FWHM_STEP) for b, t in pairs.T])
    out[:] = vals[np.asarray(inv).ravel()].T.reshape((3,) + fb.shape)
    return out[0], out[1], out[2]


def _truth_snr(truth, model):
    """Expected difference SNR of every truth row (uses the FWHM model of the simulator)."""
    from apdask.core.camera import PIXEL_SCALE_ARCSEC

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
        delta, fwhm / PIXEL_SCALE_ARCSEC, model["template_fwhm"] / PIXEL_SCALE_ARCSEC, v_s,
        model["template_var_e2"], model["k_njy"], psf=model.get("psf"),
    )  # fmt: skip


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def _alerts_of(repo, visit):
    """Alerts of one visit and the detector ids that have an alert file (processed CCDs)."""
    from apdask.alerts.sinks import read_alerts

    path = os.path.join(repo, "alerts", f"visit_{visit}")
    if not os.path.isdir(path):
        msg = f"no alerts for visit {visit} under {path}; run `apdask process-visit` first"
        raise FileNotFoundError(msg)
    processed = set()
    for name in os.listdir(path):
        stem = name.split(".")[0]
        if name.endswith(".avro") and stem.startswith(f"{visit}_"):
            try:
                processed.add(int(stem.split("_")[1]))
            except ValueError:
                continue
    return read_alerts(path), processed


def noise_ratio(stamps, fwhm_px=5.0, exclude_fwhm=3.0):
    """Robust σ of ``image / sqrt(variance)`` over difference cutouts, sources excluded.

    Parameters
    ----------
    stamps : iterable of bytes
        FITS cutouts as written by :func:`apdask.detect.make_cutout`.
    fwhm_px : float
        PSF FWHM; pixels within ``exclude_fwhm × fwhm_px`` of the centre are skipped.
    exclude_fwhm : float

    Returns
    -------
    dict
        ``ratio`` (1.4826 × MAD of the pulls), ``std`` (3σ-clipped standard
        deviation) and ``n_pixels``.
    """
    from astropy.io import fits

    from apdask.core.exposure import mask_bits

    bad = mask_bits("BAD", "SAT", "CR", "NO_DATA", "EDGE", "DETECTED", "DETECTED_NEGATIVE")
    pulls = []
    for b in stamps:
        if not b:
            continue
        with fits.open(io.BytesIO(b)) as h:
            img = np.asarray(h[0].data, float)
            var = np.asarray(h["UNCERT"].data, float)
            msk = np.asarray(h["MASK"].data)
        n = img.shape[0]
        yy, xx = np.mgrid[:n, :n] - n // 2
        ok = (np.hypot(xx, yy) > exclude_fwhm * fwhm_px) & np.isfinite(img) & (var > 0)
        ok &= (msk & bad) == 0
        pulls.append(img[ok] / np.sqrt(var[ok]))
    if not pulls:
        return {"ratio": float("nan"), "std": float("nan"), "n_pixels": 0}
    p = np.concatenate(pulls)
    med = np.median(p)
    mad = robust_sigma(p, med)
    clip = p[np.abs(p - med) < 3 * mad]
    # a 3σ-clipped Gaussian has std 0.9866 σ
    return {"ratio": float(mad), "std": float(np.std(clip) / 0.9866), "n_pixels": int(p.size)}


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------
def _robust_sigma(x):
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    if x.size < 3:
        return float("nan")
    return float(robust_sigma(x))


def _f(x):
    x = float(x)
    return x if np.isfinite(x) else None


def evaluate_sources(truth, sources, snr_true, *, radius_arcsec=1.0, n_ccd=None,
                     changed_snr=3.0):  # fmt: skip
    """Metrics of DIASources against truth (no file I/O).

    Parameters
    ----------
    truth : astropy.table.Table
        ``kind``, ``ra``, ``dec``, ``flux``, ``template_flux``, ``detector``.
    sources : list of dict
        DIASources (``ra``, ``dec``, ``psfFlux``, ``psfFluxErr``, ``snr``, ``detector``).
    snr_true : numpy.ndarray
        Expected difference SNR of every truth row (signed).
    radius_arcsec : float
        Match radius.
    n_ccd : int, optional
        Number of CCDs processed (default: number of CCDs in the truth table).
    changed_snr : float
        Truth rows with ``|snr_true|`` at least this are real changes; a DIASource
        within the radius of one is not a false positive.

    Returns
    -------
    dict
        JSON-ready metrics; see :func:`evaluate_visit`.
    """
    from scipy.spatial import cKDTree

    kind = np.asarray(truth["kind"]).astype(str)
    det_names = np.asarray(truth["detector"]).astype(str)
    n_ccd = n_ccd or len(set(det_names))
    t_xyz = unit_vectors(np.asarray(truth["ra"]), np.asarray(truth["dec"]))
    delta = np.asarray(truth["flux"], float) - np.asarray(truth["template_flux"], float)
    ra = np.array([s["ra"] for s in sources], float)
    dec = np.array([s["dec"] for s in sources], float)
    flux = np.array([np.nan if s.get("psfFlux") is None else s["psfFlux"] for s in sources], float)
    err = np.array([np.nan if s.get("psfFluxErr") is None else s["psfFluxErr"] for s in sources],
                   float)  # fmt: skip
    chord = _chord(radius_arcsec)

    # --- completeness of transients (a detection of the right sign within the radius)
    tr = np.flatnonzero(kind == "transient")
    found = np.zeros(len(tr), bool)
    m_src = np.full(len(tr), -1)
    m_sep = np.full(len(tr), np.nan)
    if len(sources) and len(tr):
        tree = cKDTree(unit_vectors(ra, dec))
        for j, i in enumerate(tr):
            cand = tree.query_ball_point(t_xyz[i], chord)
            cand = [c for c in cand if np.sign(flux[c]) == np.sign(delta[i]) or not np.isfinite(
                flux[c])]  # fmt: skip
            if cand:
                d = np.linalg.norm(unit_vectors(ra[cand], dec[cand]) - t_xyz[i], axis=1)
                k = int(np.argmin(d))
                found[j], m_src[j], m_sep[j] = True, cand[k], float(_arcsec(d[k]))
    s_tr = snr_true[tr]
    bins = []
    for lo, hi in zip(SNR_BINS[:-1], SNR_BINS[1:], strict=True):
        sel = (s_tr >= lo) & (s_tr < hi)
        bins.append(
            {"snr_lo": lo, "snr_hi": hi, "n": int(sel.sum()), "n_found": int(found[sel].sum()),
             "completeness": _f(found[sel].mean()) if sel.any() else None}
        )  # fmt: skip

    def _compl(sel):
        return _f(found[sel].mean()) if sel.any() else None

    # --- false positives: DIASources near no real change
    changed = np.abs(snr_true) >= changed_snr
    fp = np.zeros(len(sources), bool)
    fp_class = [""] * len(sources)
    if len(sources):
        tree_c = cKDTree(t_xyz[changed]) if changed.any() else None
        tree_all = cKDTree(t_xyz)
        stat_flux = np.asarray(truth["template_flux"], float)
        for i in range(len(sources)):
            p = unit_vectors(ra[i : i + 1], dec[i : i + 1])[0]
            if tree_c is not None and tree_c.query_ball_point(p, chord):
                continue
            fp[i] = True
            near = tree_all.query_ball_point(p, _chord(3.0))
            if near and np.nanmax(stat_flux[near]) > 1e6:
                fp_class[i] = "bright_star"
            elif near:
                fp_class[i] = "static_source"
            else:
                fp_class[i] = "empty_sky"
    det_of = np.array([str(s.get("detector")) for s in sources])
    per_ccd = {}
    for d in sorted(set(det_of[fp])) if fp.any() else []:
        per_ccd[d] = int(np.sum(fp & (det_of == d)))
    classes = {}
    for c in np.asarray(fp_class)[fp]:
        classes[c] = classes.get(c, 0) + 1

    # --- fluxes and positions of matched transients
    mi = m_src[found]
    st = s_tr[found]
    f_true = delta[tr][found]
    f_meas = flux[mi] if len(mi) else np.array([])
    f_err = err[mi] if len(mi) else np.array([])
    sep = m_sep[found]
    snr_meas = f_meas / f_err if len(mi) else np.array([])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = f_meas / f_true - 1
        pull = (f_meas - f_true) / f_err
    hi10 = st >= 10
    hi20 = snr_meas > 20
    out = {
        "n_ccd": int(n_ccd),
        "n_dia_sources": len(sources),
        "n_transients": len(tr),
        "n_transients_found": int(found.sum()),
        "completeness_bins": bins,
        "completeness_snr_ge_7": _compl(s_tr >= 7),
        "completeness_snr_5_6": _compl((s_tr >= 5) & (s_tr < 6)),
        "completeness_snr_ge_5": _compl(s_tr >= 5),
        "n_false_positives": int(fp.sum()),
        "false_positives_per_ccd": float(fp.sum()) / max(n_ccd, 1),
        "false_positives_by_ccd": per_ccd,
        "false_positives_by_class": classes,
        "n_flux_matches": int(np.isfinite(pull).sum()),
        "flux_bias_median": _f(np.nanmedian(rel[hi10])) if hi10.any() else None,
        "flux_bias_median_all": _f(np.nanmedian(rel)) if len(rel) else None,
        "flux_pull_sigma": _robust_sigma(pull) if len(pull) else None,
        "flux_pull_std": _f(np.nanstd(pull[np.abs(pull) < 5])) if len(pull) else None,
        "flux_pull_median": _f(np.nanmedian(pull)) if len(pull) else None,
        "astrometric_error_median_arcsec_snr_gt_20": _f(np.median(sep[hi20])) if hi20.any()
        else None,
        "astrometric_error_median_arcsec_all": _f(np.median(sep)) if len(sep) else None,
        "n_snr_gt_20": int(hi20.sum()),
        "_plot": {
            "snr_true": s_tr.tolist(), "found": found.tolist(), "pull": pull.tolist(),
            "rel": rel.tolist(), "sep": sep.tolist(), "snr_meas": snr_meas.tolist(),
            "snr_matched": st.tolist(),
        },
    }  # fmt: skip
    return out


def _check_targets(res):
    checks = {}
    for key, (op, val) in TARGETS.items():
        v = res.get(key)
        if v is None or not np.isfinite(v):
            checks[key] = {"value": None, "target": f"{op} {val}", "met": False}
            continue
        if op == ">=":
            met = v >= val
        elif op == "<=":
            met = v <= val
        elif op == "abs<=":
            met = abs(v) <= val
        else:
            met = val[0] <= v <= val[1]
        checks[key] = {"value": v, "target": f"{op} {val}", "met": bool(met)}
    return checks


def evaluate_visit(repo, visit, *, out_dir=None, radius_arcsec=1.0, plot=True):
    """Compare the alerts of one visit with the simulator's truth; write JSON and PNG.

    Parameters
    ----------
    repo : str or os.PathLike
        Repository with ``truth/``, ``visits/`` and ``alerts/visit_<visit>/``.
    visit : int
    out_dir : str, optional
        Where ``evaluate.json`` and ``evaluate.png`` go; default
        ``<repo>/evaluate/visit_<visit>``.
    radius_arcsec : float
        Match radius.
    plot : bool
        Write the PNG.

    Returns
    -------
    dict
        The metrics (also written as JSON): completeness per SNR bin and at the
        target SNRs, false positives per CCD and by class, flux bias and pulls,
        astrometric error, the difference-image noise ratio, and ``targets`` with
        one ``{"value", "target", "met"}`` entry per issue-6 target.
    """
    repo = os.fspath(repo)
    visit = int(visit)
    truth = load_truth(repo, visit)
    band = str(truth.meta.get("band", "r"))
    vpath = os.path.join(repo, "visits", f"visit_{visit}.json")
    camera_name = "comcam"
    if os.path.exists(vpath):
        with open(vpath) as f:
            camera_name = json.load(f).get("instrument", camera_name)
    alerts, processed = _alerts_of(repo, visit)
    sources = [a["diaSource"] for a in alerts]
    from apdask.core.camera import get_camera

    camera = get_camera(camera_name)
    processed |= {int(s["detector"]) for s in sources}
    for s in sources:
        s["detector"] = camera[int(s["detector"])].name
    # only the CCDs that were processed (an alert file exists) count
    ccds = sorted(camera[d].name for d in processed)
    truth = truth[np.isin(np.asarray(truth["detector"]).astype(str), ccds)]
    model = _noise_model(repo, band, camera_name)
    snr_true = _truth_snr(truth, model)
    alert_ccds = {s["detector"] for s in sources}
    res = evaluate_sources(truth, sources, snr_true, radius_arcsec=radius_arcsec,
                           n_ccd=len(ccds))  # fmt: skip
    fwhm_px = np.mean(model["fwhm_range"]) / 0.2
    res["noise"] = noise_ratio([a.get("cutoutDifference") for a in alerts], fwhm_px=fwhm_px)
    res["noise_ratio"] = res["noise"]["ratio"]
    res.update(
        {"repo": repo, "visit": visit, "band": band, "camera": camera_name, "ccds": ccds,
         "ccds_with_alerts": sorted(alert_ccds), "n_alerts": len(alerts),
         "match_radius_arcsec": radius_arcsec, "simulation": _sim_meta(repo)}
    )  # fmt: skip
    res["targets"] = _check_targets(res)
    out_dir = out_dir or os.path.join(repo, "evaluate", f"visit_{visit}")
    os.makedirs(out_dir, exist_ok=True)
    plot_data = res.pop("_plot")
    if plot:
        res["plot"] = os.path.join(out_dir, "evaluate.png")
        plot_evaluation(res, plot_data, res["plot"])
    res["json"] = os.path.join(out_dir, "evaluate.json")
    with open(res["json"], "w") as f:
        json.dump(res, f, indent=1, default=_json_default)
    return res


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def plot_evaluation(res, data, path):
    """Four-panel PNG: completeness, flux pulls, astrometry, false positives per CCD.

    Drawn on a bare :class:`matplotlib.figure.Figure`, which needs no backend: the
    caller's backend (a notebook's inline one, say) is left as it is.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        msg = ("evaluate's plot needs matplotlib: pip install 'apdask[notebook]', "
               "or call evaluate_visit(..., plot=False)")  # fmt: skip
        raise ImportError(msg) from exc

    fig = Figure(figsize=(11, 8.5))
    ax = fig.subplots(2, 2)
    b = [x for x in res["completeness_bins"] if x["n"]]
    if b:
        mid = [np.sqrt(x["snr_lo"] * min(x["snr_hi"], 400)) for x in b]
        ax[0, 0].errorbar(mid, [x["completeness"] for x in b], fmt="o-",
                          yerr=[np.sqrt(max(x["completeness"] * (1 - x["completeness"]), 0.25 / x[
                              "n"]) / x["n"]) for x in b])  # fmt: skip
    ax[0, 0].axhline(0.95, color="g", ls="--", lw=0.8)
    ax[0, 0].axhline(0.5, color="g", ls=":", lw=0.8)
    ax[0, 0].axvline(7, color="g", ls="--", lw=0.8)
    ax[0, 0].axvline(5.5, color="g", ls=":", lw=0.8)
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("expected difference-image SNR")
    ax[0, 0].set_ylabel("completeness")
    ax[0, 0].set_ylim(-0.02, 1.05)
    ax[0, 0].set_title(f"visit {res['visit']}: {res['n_transients_found']}/"
                       f"{res['n_transients']} transients")  # fmt: skip
    pull = np.asarray(data["pull"], float)
    pull = pull[np.isfinite(pull)]
    if pull.size:
        ax[0, 1].hist(np.clip(pull, -6, 6), bins=30, range=(-6, 6), density=True, alpha=0.6)
        g = np.linspace(-6, 6, 200)
        ax[0, 1].plot(g, np.exp(-0.5 * g * g) / np.sqrt(2 * np.pi), "k-", lw=1)
    ax[0, 1].set_xlabel("flux pull (meas − true) / err")
    ax[0, 1].set_title(f"pull σ {res['flux_pull_sigma']!s:.5}, bias {res['flux_bias_median']!s:.6}")
    sep = np.asarray(data["sep"], float)
    snr = np.asarray(data["snr_meas"], float)
    if sep.size:
        ax[1, 0].loglog(np.abs(snr), np.maximum(sep, 1e-4), ".", alpha=0.6)
    ax[1, 0].axhline(0.05, color="g", ls="--", lw=0.8)
    ax[1, 0].axvline(20, color="g", ls="--", lw=0.8)
    ax[1, 0].set_xlabel("measured SNR")
    ax[1, 0].set_ylabel("position error (arcsec)")
    ax[1, 0].set_title(f"noise / propagated σ = {res['noise_ratio']:.3f}")
    ccds = res["ccds"]
    ax[1, 1].bar(range(len(ccds)), [res["false_positives_by_ccd"].get(c, 0) for c in ccds])
    ax[1, 1].set_xticks(range(len(ccds)))
    ax[1, 1].set_xticklabels(ccds, rotation=60, fontsize=7)
    ax[1, 1].axhline(1, color="g", ls="--", lw=0.8)
    ax[1, 1].set_title(f"false positives per CCD: {res['false_positives_per_ccd']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
