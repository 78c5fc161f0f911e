"""Benchmark: apdask's stages beside the tools astronomers run, in one run on one CCD pair.

Not a unit test.  The pair is the simulated science / template pair of
``bench_subtract.make_pair`` (Gaussian PSFs, science FWHM 0.9–1.1″ across the CCD,
template 0.7″ and 10× deeper, ~5000 stars and ``--transients`` injected point sources
whose positions and fluxes are the truth), full size 4072 × 4000 by default.  Each row
times apdask's stage and the peer's on the same pixels and gives the ratio
(peer / apdask) and a quality figure:

* resampling: ``SWarp`` (Lanczos-3, onto a grid rotated 0.3° and shifted by a
  fraction of a pixel, given as a ``.head`` file) against
  :func:`apdask.pipeline.template.warp_template`; the input is a noiseless rendering
  of the template's stars, the quality the RMS of the warped image minus the stars
  rendered directly on the target grid, in units of the template's noise σ;
* PSF model: ``PSFEx`` on a Source Extractor LDAC catalogue (its time includes that
  catalogue) against :func:`apdask.pipeline.psf.estimate_psf_model`; quality: FWHM
  against the true FWHM at the centre of the CCD (5.0 px);
* subtraction: apdask's :func:`apdask.pipeline.subtract.difference.subtract` against
  ZOGY (the ``ZOGY`` function of the ``zogyp`` 1.6.3 wheel, Zackay et al. 2016, with the
  PSFEx PSFs; zogyp's own driver ``run_ZOGY`` cannot run on numpy 2, it calls the
  removed ``ndarray.newbyteorder``) and SFFT (``sfft`` 1.7.3, numpy backend, as in
  ``bench_realpairs.py``).  Quality: the robust σ of the difference over its
  propagated σ, and the transients found at S/N > 5 (local maxima within 2 px of an
  injected one; the rest counted as false), on apdask's matched-filter S/N for apdask
  and SFFT, on ZOGY's ``S_corr`` for ZOGY;
* detection and measurement: Source Extractor on apdask's difference image (its
  variance as a weight map, 5σ, 5 pixels) against apdask's matched filter, detection
  and measurement; detections matched to the injected transients (2 px), with the
  median measured / true flux (``FLUX_AUTO``, ``psfFlux``).

A peer that is not installed or fails gives a row with the reason.  The Debian tools
are found on ``PATH`` (``SWarp``, ``source-extractor``, ``psfex``); the wheels in
``--peers-dir`` (default ``.cache/peers`` of the checkout), where the run puts them with
``pip install --no-deps --target`` when they are not there yet (``--no-install``: never;
``--install``: again), never in the project's environment (sfft 1.7.3 overwrites
``numba.set_num_threads``, see ``_sfft_child``).  Every apdask step runs once untimed first (numba's
compiled code); peers run once, timed (their start-up is part of their cost).
Prints one JSON object, with ``/proc/loadavg`` before and after.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_subtract import _render, make_pair  # noqa: E402

from apdask.core.exposure import TemplateTile  # noqa: E402
from apdask.pipeline.measure.detection import detect_sources, matched_filter  # noqa: E402
from apdask.pipeline.measure.sources import measure_sources  # noqa: E402
from apdask.pipeline.psf import estimate_psf_model, psf_fwhm  # noqa: E402
from apdask.pipeline.subtract.difference import subtract  # noqa: E402
from apdask.pipeline.template import warp_template  # noqa: E402

TRUE_FWHM_CENTRE = 5.0  # px: bench_subtract's science FWHM, 0.9-1.1" at 0.2"/px, 1.0" mid-CCD
TEMPLATE_SIGMA_PX = 0.7 / 0.2 / 2.3548
WHEELS = ("sfft==1.7.3", "sep==1.4.1", "fastremap==1.21.0", "pyfftw==0.15.1", "zogyp==1.6.3")


def _loadavg():
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return None


def _rss_gb():
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)


def _say(what):
    print(f"[bench_peers] {what} (peak RSS {_rss_gb()} GB)", file=sys.stderr, flush=True)


def _timed(fn, repeat=1, warm=True):
    if warm:
        fn()
    out, ts = None, []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts)


def _row(stage, tool, ours_s=None, **kw):
    row = {"stage": stage, "tool": tool, "status": "ok", **kw}
    if ours_s is not None:
        row["apdask_s"] = round(ours_s, 3)
    if isinstance(row.get("seconds"), float):
        row["seconds"] = round(row["seconds"], 3)
        if ours_s:
            row["ratio_to_apdask"] = round(row["seconds"] / ours_s, 2)
    return row


def _missing(stage, tool, why, ours_s=None):
    return _row(stage, tool, ours_s, status=why)


def _run(cmd, cwd):
    """Run a peer's command; raise with its stderr tail when it fails."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        msg = f"{Path(cmd[0]).name} exit {proc.returncode}: {proc.stderr[-400:]}"
        raise RuntimeError(msg)
    return proc


def _robust_sigma(a):
    a = a[np.isfinite(a)]
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def _match(xy, truth_xy, radius=2.0):
    """(matched injected transients, detections matching none) within ``radius`` px."""
    from scipy.spatial import cKDTree

    if len(xy) == 0:
        return 0, 0, np.zeros(0, int), np.zeros(0, bool)
    d, i = cKDTree(truth_xy).query(xy, distance_upper_bound=radius)
    hit = np.isfinite(d)
    return len(set(i[hit].tolist())), int(np.count_nonzero(~hit)), i, hit


def _peaks(snr, threshold=5.0, ignored=None):
    """Local maxima of ``snr`` above ``threshold``: (n, 2) array of x, y."""
    from scipy.ndimage import maximum_filter

    s = np.where(np.isfinite(snr), snr, 0.0)
    if ignored is not None:
        s = np.where(ignored, 0.0, s)
    ys, xs = np.nonzero((s > threshold) & (s == maximum_filter(s, size=5)))
    return np.column_stack([xs, ys]).astype(float)


def _header_card_file(wcs, shape, path):
    """A SWarp ``.head`` file: the output grid (FITS header cards, one per line)."""
    h = wcs.to_header()
    h["NAXIS"] = 2
    h["NAXIS1"], h["NAXIS2"] = shape[1], shape[0]
    Path(path).write_text("\n".join(str(c) for c in h.cards) + "\nEND\n")


# ------------------------------------------------------------------------- resampling


def bench_resampling(shape, n_stars, tmp, rng):
    """SWarp against warp_template on a noiseless star field; quality vs direct rendering."""
    ny, nx = shape
    src = WCS(naxis=2)
    src.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    src.wcs.crval = [150.0, -30.0]
    src.wcs.crpix = [nx / 2, ny / 2]
    src.wcs.cd = [[-0.2 / 3600, 0], [0, 0.2 / 3600]]
    tgt = WCS(naxis=2)
    tgt.wcs.ctype = src.wcs.ctype
    tgt.wcs.crval = [150.0 + 0.37 * 0.2 / 3600, -30.0 + 0.61 * 0.2 / 3600]
    tgt.wcs.crpix = src.wcs.crpix
    c, s = np.cos(np.radians(0.3)), np.sin(np.radians(0.3))
    tgt.wcs.cd = np.array([[-c, s], [s, c]]) * 0.2 / 3600
    margin = 30
    xs, ys = rng.uniform(margin, nx - margin, n_stars), rng.uniform(margin, ny - margin, n_stars)
    fl = 300 * (3e5 / 300) ** rng.uniform(0, 1, n_stars) ** 2.5
    zero = np.zeros(shape, np.float32)
    image = _render(shape, xs, ys, fl, TEMPLATE_SIGMA_PX, rng, zero)
    tx, ty = tgt.world_to_pixel_values(*src.pixel_to_world_values(xs, ys))
    inside = (tx > 15) & (tx < nx - 16) & (ty > 15) & (ty < ny - 16)
    truth = _render(shape, tx[inside], ty[inside], fl[inside], TEMPLATE_SIGMA_PX, rng, zero)
    noise = float(np.sqrt((900.0 + 36) / 10))  # the template's noise σ in make_pair
    core = (slice(40, ny - 40), slice(40, nx - 40))  # away from the uncovered corners

    def quality(warped, ref=None):
        r = (np.asarray(warped, float) - truth)[core]
        extra = {}
        if ref is not None:  # how far the two resamplings are from each other
            dd = (np.asarray(warped, float) - np.asarray(ref, float))[core]
            extra["rms_difference_to_apdask_over_noise"] = round(
                float(np.sqrt(np.mean(dd**2))) / noise, 5)  # fmt: skip
        return extra | {
            "rms_residual_over_noise": round(float(np.sqrt(np.mean(r**2))) / noise, 5),
            "max_abs_residual_over_noise": round(float(np.max(np.abs(r))) / noise, 2),
            "flux_ratio": round(float(np.sum(np.asarray(warped)[core]) / np.sum(truth[core])), 5),
        }

    tile = TemplateTile(image, np.full(shape, noise**2, np.float32), src, "r", "t0")
    ours, t_ours = _timed(lambda: warp_template([tile], tgt, shape))
    rows = {"apdask warp": _row("resampling", "apdask warp_template (Lanczos-3)",
                                seconds=t_ours, quality=quality(ours.image))}  # fmt: skip
    exe = shutil.which("SWarp") or shutil.which("swarp")
    if exe is None:
        rows["SWarp"] = _missing("resampling", "SWarp", "not installed (apt install swarp)", t_ours)
        return rows
    fits.writeto(tmp / "src.fits", image, src.to_header(), overwrite=True)
    _header_card_file(tgt, shape, tmp / "swarp.head")
    cmd = [exe, "src.fits", "-IMAGEOUT_NAME", "swarp.fits", "-WEIGHTOUT_NAME", "swarpw.fits",
           "-RESAMPLING_TYPE", "LANCZOS3", "-SUBTRACT_BACK", "N", "-FSCALASTRO_TYPE", "NONE",
           "-COMBINE", "Y", "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET",
           "-RESAMPLE_DIR", str(tmp), "-NTHREADS", str(os.cpu_count() or 1)]  # fmt: skip
    try:
        t0 = time.perf_counter()
        _run(cmd, tmp)
        t_sw = time.perf_counter() - t0
        out = fits.getdata(tmp / "swarp.fits").astype(np.float32)
        if out.shape != shape:
            raise RuntimeError(f"SWarp wrote {out.shape}, not the .head grid {shape}")
        q = quality(out, ours.image)
        rows["SWarp"] = _row("resampling", "SWarp (Lanczos-3)", t_ours, seconds=t_sw,
                             quality=q, note="FITS in and out included")  # fmt: skip
    except Exception as e:  # noqa: BLE001 - a row with the reason, not a crash
        rows["SWarp"] = _missing("resampling", "SWarp", f"failed: {e}", t_ours)
    return rows


# ------------------------------------------------------------------ Source Extractor


_SEX_PARAMS = ["NUMBER", "X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE", "FLUX_AUTO",
               "FLUXERR_AUTO", "FLUX_APER(1)", "FLUXERR_APER(1)", "FLUX_RADIUS", "ELONGATION",
               "FLAGS", "SNR_WIN", "FLUX_MAX", "VIGNET(25,25)"]  # fmt: skip


def _sextractor(exe, image_path, tmp, name, *, ldac, weight_path=None, thresh=5.0, sky=None):
    """Run Source Extractor; return its catalogue path."""
    (tmp / "sex.param").write_text("\n".join(_SEX_PARAMS) + "\n")
    (tmp / "gauss.conv").write_text(_gauss_conv(2.0))
    cat = tmp / f"{name}.cat"
    cmd = [exe, str(image_path), "-CATALOG_NAME", str(cat),
           "-CATALOG_TYPE", "FITS_LDAC" if ldac else "FITS_1.0",
           "-PARAMETERS_NAME", "sex.param", "-FILTER", "Y", "-FILTER_NAME", "gauss.conv",
           "-DETECT_THRESH", str(thresh), "-ANALYSIS_THRESH", str(thresh),
           "-DETECT_MINAREA", "5", "-PHOT_APERTURES", "10", "-SATUR_LEVEL", "1e9",
           "-GAIN", "0", "-PIXEL_SCALE", "0.2", "-SEEING_FWHM", "1.0",
           "-STARNNW_NAME", "/dev/null", "-CHECKIMAGE_TYPE", "NONE", "-VERBOSE_TYPE", "QUIET",
           "-NTHREADS", str(os.cpu_count() or 1)]  # fmt: skip
    if weight_path is not None:
        cmd += ["-WEIGHT_TYPE", "MAP_VAR", "-WEIGHT_IMAGE", str(weight_path)]
    if sky is not None:
        cmd += ["-BACK_TYPE", "MANUAL", "-BACK_VALUE", str(sky)]
    _run(cmd, tmp)
    return cat


def _gauss_conv(fwhm):
    h = 3
    yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
    k = np.exp(-(xx**2 + yy**2) / (2 * (fwhm / 2.3548) ** 2))
    rows = "\n".join(" ".join(f"{v:.5f}" for v in r) for r in k / k.max())
    return f"CONV NORM\n{rows}\n"


def bench_detection(diff, sci, tpl, truth, tmp, exe):
    """Source Extractor against apdask's detection + measurement on apdask's difference."""
    txy, tflux = truth[:, :2], truth[:, 2]

    def ours():
        m = matched_filter(diff)
        dets = detect_sources(diff, matched=m)
        return measure_sources(diff, sci, tpl, dets, visit=1, detector=0, band="r", mjd=6e4,
                               matched=m)  # fmt: skip

    tab, t_ours = _timed(ours)
    xy = np.column_stack([np.asarray(tab["x"], float), np.asarray(tab["y"], float)])
    n_hit, n_false, idx, hit = _match(xy, txy)
    flux = np.asarray(tab["psfFlux"], float)
    rows = {"apdask detect+measure": _row(
        "detection + measurement", "apdask matched filter, detect_sources, measure_sources",
        seconds=t_ours, quality={
            "detections": len(tab), "transients_matched": n_hit, "injected": len(truth),
            "unmatched_detections": n_false,
            "median_flux_over_true": round(float(np.median(flux[hit] / tflux[idx[hit]])), 3)
            if n_hit else None})}  # fmt: skip
    if exe is None:
        rows["Source Extractor"] = _missing(
            "detection + measurement", "Source Extractor",
            "not installed (apt install source-extractor)", t_ours)  # fmt: skip
        return rows
    fits.writeto(tmp / "diff.fits", np.asarray(diff.image, np.float32), overwrite=True)
    var = np.where(diff.mask != 0, 1e30, diff.variance).astype(np.float32)
    fits.writeto(tmp / "diffvar.fits", var, overwrite=True)
    try:
        t0 = time.perf_counter()
        cat = _sextractor(exe, tmp / "diff.fits", tmp, "diff", ldac=False,
                          weight_path=tmp / "diffvar.fits", sky=0.0)  # fmt: skip
        t_sex = time.perf_counter() - t0
        c = fits.getdata(cat, 1)
        sxy = np.column_stack([c["X_IMAGE"] - 1.0, c["Y_IMAGE"] - 1.0])
        n_hit, n_false, idx, hit = _match(sxy, txy)
        sflux = np.asarray(c["FLUX_AUTO"], float)
        rows["Source Extractor"] = _row(
            "detection + measurement", "Source Extractor (5σ, 5 px, Gaussian filter)", t_ours,
            seconds=t_sex, note="reads the FITS difference and variance (written untimed)",
            quality={"detections": len(c), "transients_matched": n_hit, "injected": len(truth),
                     "unmatched_detections": n_false,
                     "median_flux_over_true": round(float(np.median(
                         sflux[hit] / tflux[idx[hit]])), 3) if n_hit else None})  # fmt: skip
    except Exception as e:  # noqa: BLE001
        rows["Source Extractor"] = _missing("detection + measurement", "Source Extractor",
                                            f"failed: {e}", t_ours)  # fmt: skip
    return rows


# ------------------------------------------------------------------------------ PSF


def _psfex(exe_sex, exe_psfex, image_path, tmp, name, sky):
    """Source Extractor LDAC catalogue + PSFEx: (PSF stamp at the centre, FWHM, seconds)."""
    t0 = time.perf_counter()
    cat = _sextractor(exe_sex, image_path, tmp, name, ldac=True, thresh=10.0, sky=sky)
    t_cat = time.perf_counter() - t0
    t0 = time.perf_counter()
    _run([exe_psfex, str(cat), "-c", "/dev/null", "-PSF_SIZE", "25,25", "-PSF_SAMPLING", "1.0",
          "-PSFVAR_DEGREES", "2", "-PSF_DIR", str(tmp), "-CHECKPLOT_TYPE", "NONE",
          "-CHECKIMAGE_TYPE", "NONE", "-WRITE_XML", "N", "-VERBOSE_TYPE", "QUIET",
          "-SAMPLE_FWHMRANGE", "2.0,12.0", "-SAMPLE_VARIABILITY", "0.3",
          "-NTHREADS", str(os.cpu_count() or 1)], tmp)  # fmt: skip
    t_psf = time.perf_counter() - t0
    with fits.open(tmp / f"{name}.psf") as h:
        head, comps = h[1].header, np.asarray(h[1].data[0][0], float)
    stamp = comps[0]  # the constant term: the PSF at the polynomial's origin (CCD centre)
    stamp = np.maximum(stamp, 0) / np.sum(np.maximum(stamp, 0))
    return stamp, float(head.get("PSF_FWHM", np.nan)), t_cat, t_psf


def bench_psf(sci, sci_path, tpl_path, tmp, exe_sex, exe_psfex):
    """PSFEx against estimate_psf_model; returns (rows, models, PSFEx stamps or None)."""
    model_s, t_ours = _timed(lambda: estimate_psf_model(sci))
    ny, nx = sci.image.shape
    ours_fwhm = psf_fwhm(np.asarray(model_s.at(nx / 2, ny / 2)))
    q = {"fwhm_px_centre": round(ours_fwhm, 3), "true_fwhm_px": TRUE_FWHM_CENTRE,
         "fwhm_error": round(ours_fwhm / TRUE_FWHM_CENTRE - 1, 4)}  # fmt: skip
    rows = {"apdask PSF": _row("PSF model", "apdask estimate_psf_model (3 × 3 cells)",
                               seconds=t_ours, quality=q)}  # fmt: skip
    if exe_sex is None or exe_psfex is None:
        what = "psfex" if exe_psfex is None else "source-extractor"
        rows["PSFEx"] = _missing("PSF model", "PSFEx", f"not installed (apt install {what})",
                                 t_ours)  # fmt: skip
        return rows, model_s, None
    try:
        stamp_s, fwhm_hdr, t_cat, t_psf = _psfex(exe_sex, exe_psfex, sci_path, tmp, "sci", 900.0)
        stamp_t, _, _, _ = _psfex(exe_sex, exe_psfex, tpl_path, tmp, "tpl", 0.0)
        fwhm = psf_fwhm(stamp_s)
        rows["PSFEx"] = _row(
            "PSF model", "PSFEx (Source Extractor LDAC catalogue, degree-2 variation)", t_ours,
            seconds=t_cat + t_psf, sextractor_catalogue_s=round(t_cat, 3),
            psfex_s=round(t_psf, 3), note="science image; FITS read included",
            quality={"fwhm_px_centre": round(fwhm, 3), "psfex_header_fwhm_px": fwhm_hdr,
                     "true_fwhm_px": TRUE_FWHM_CENTRE,
                     "fwhm_error": round(fwhm / TRUE_FWHM_CENTRE - 1, 4)})  # fmt: skip
        return rows, model_s, (stamp_s, stamp_t)
    except Exception as e:  # noqa: BLE001
        rows["PSFEx"] = _missing("PSF model", "PSFEx", f"failed: {e}", t_ours)
        return rows, model_s, None


# ---------------------------------------------------------------------- subtraction


def _peers_path(peers_dir):
    site = Path(peers_dir) / "site"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))  # after the project's packages: theirs never shadow ours
    return site


def install_peers(peers_dir):
    """``pip install --target <peers_dir>/site`` the peer wheels (no dependencies pulled)."""
    site = Path(peers_dir) / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps",
           "--timeout", "30", "--target", str(site), *WHEELS]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    except subprocess.TimeoutExpired:
        return False, "pip install timed out after 600 s"
    return proc.returncode == 0, proc.stderr[-300:]


def _padded_psf(stamp, shape):
    """A PSF stamp in a full frame, its centre at pixel (0, 0) (for a plain FFT)."""
    out = np.zeros(shape)
    h = stamp.shape[0] // 2
    out[: stamp.shape[0], : stamp.shape[1]] = stamp
    return np.roll(out, (-h, -h), axis=(0, 1))


def _tiles(n, k, overlap):
    """``k`` spans covering ``range(n)``, each grown by ``overlap``: (lo, hi, keep_lo, keep_hi)."""
    edges = np.linspace(0, n, k + 1).astype(int)
    return [(max(a - overlap, 0), min(b + overlap, n), a, b)
            for a, b in zip(edges[:-1], edges[1:], strict=True)]  # fmt: skip


def _zogy(sci, tpl, stamps, sky, tmp, exe_sex, tiles):
    """zogyp's ZOGY function with the PSFEx PSFs, on ``tiles`` × ``tiles`` overlapping
    sub-images (as zogyp's own ``sub_imagex/y``; a full 4k × 4k frame needs ~10 GB in
    ZOGY's complex128 arrays): (D, S_corr, σ_D propagated, seconds)."""
    bindir = tmp / "bin"  # zogyp runs `sextractor` when imported; Debian names it source-extractor
    bindir.mkdir(exist_ok=True)
    link = bindir / "sextractor"
    if not link.exists():
        link.symlink_to(exe_sex)
    os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ['PATH']}"
    os.environ.setdefault("MPLBACKEND", "Agg")
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from zogyp.zip import ZOGY
    sn = float(np.sqrt(np.median(sci.variance)))
    sr = float(np.sqrt(np.median(tpl.variance)))
    ny, nx = sci.image.shape
    d_all, s_all = np.zeros((ny, nx)), np.zeros((ny, nx))
    t0 = time.perf_counter()
    for y0, y1, ky0, ky1 in _tiles(ny, tiles, 32):
        for x0, x1, kx0, kx1 in _tiles(nx, tiles, 32):
            cut = (slice(y0, y1), slice(x0, x1))
            n = np.asarray(sci.image[cut], float) - sky
            r = np.asarray(tpl.image[cut], float)
            pn, pr = _padded_psf(stamps[0], n.shape), _padded_psf(stamps[1], n.shape)
            d, _, s_corr, _, _ = ZOGY(r, n, pr, pn, sr, sn, 1.0, 1.0,
                                      np.asarray(tpl.variance[cut], float),
                                      np.asarray(sci.variance[cut], float), 0.0, 0.0)  # fmt: skip
            keep = (slice(ky0 - y0, ky1 - y0), slice(kx0 - x0, kx1 - x0))
            d_all[ky0:ky1, kx0:kx1] = d[keep]
            s_all[ky0:ky1, kx0:kx1] = s_corr[keep]
            del d, s_corr, n, r, pn, pr
    return d_all, s_all, float(np.hypot(sn, sr)), time.perf_counter() - t0


def _sfft_child(ref, sci, out, kernel_half):
    """In a child process (``--sfft-child``): sfft's numpy backend twice (the first run
    compiles sfft's numba functions); prints both runs' seconds."""
    import numba
    from sfft.CustomizedPacket import Customized_Packet

    set_threads = numba.set_num_threads  # sfft 1.7.3 assigns an int to it (a bug)
    ts = []
    try:
        for _ in range(2):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                Customized_Packet.CP(
                    FITS_REF=ref, FITS_SCI=sci, FITS_mREF=ref, FITS_mSCI=sci, ForceConv="REF",
                    GKerHW=int(kernel_half), FITS_DIFF=out, KerPolyOrder=1, BGPolyOrder=1,
                    BACKEND_4SUBTRACT="Numpy", NUM_CPU_THREADS_4SUBTRACT=os.cpu_count() or 1,
                    VERBOSE_LEVEL=0,
                )  # fmt: skip
            ts.append(time.perf_counter() - t0)
    finally:
        numba.set_num_threads = set_threads
    print(json.dumps({"seconds": ts[-1], "first_run_s": ts[0]}))


def _sfft(sci, tpl, kernel_half, tmp, peers_dir):
    """sfft on the pair in a child process (FITS written untimed; an out-of-memory kill
    there leaves this run a row with the reason): (difference, seconds)."""
    files = {}
    for name, e in (("ref", tpl), ("sci", sci)):
        files[name] = str(tmp / f"sfft-{name}.fits")
        fits.writeto(files[name], np.asarray(e.image, np.float64), overwrite=True)
    out = str(tmp / "sfft-diff.fits")
    cmd = [sys.executable, __file__, "--sfft-child", files["ref"], files["sci"], out,
           str(int(kernel_half)), "--peers-dir", str(peers_dir)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "ModuleNotFoundError" in proc.stderr:
            raise ImportError(proc.stderr.strip().splitlines()[-1])
        why = "killed (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
        raise RuntimeError(f"sfft child {why}: {proc.stderr[-300:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    return np.asarray(fits.getdata(out), float), times


def _found(snr_map, ign, truth):
    """Transients found at S/N > 5 on ``snr_map`` rescaled to unit robust σ."""
    s = np.asarray(snr_map, float)
    s = s / _robust_sigma(s[~ign])  # rescaled to unit σ, as apdask rescales its own
    n_hit, n_false, _, _ = _match(_peaks(s, 5.0, ign), truth[:, :2])
    return {"transients_matched": n_hit, "injected": len(truth), "unmatched_peaks": n_false}


def _ours_subtract(sci, tpl, truth):
    """apdask's subtraction, timed: (difference, info, seconds, its row)."""
    (diff, info), t_ours = _timed(lambda: subtract(sci, tpl))
    _, snr, ignored = matched_filter(diff)
    prop = np.sqrt(np.asarray(diff.variance, float))
    q = {"noise_over_propagated": round(_robust_sigma((diff.image / prop)[~ignored]), 3),
         **_found(snr, ignored, truth)}  # fmt: skip
    row = _row("subtraction", "apdask subtract (spatially varying kernel, decorrelated)",
               seconds=t_ours, quality=q)  # fmt: skip
    return diff, info, t_ours, row


def bench_subtraction(sci, tpl, truth, stamps, tmp, exe_sex, peers_dir, zogy_tiles):
    """apdask's subtraction against ZOGY."""
    diff, info, t_ours, row = _ours_subtract(sci, tpl, truth)
    rows = {"apdask subtract": row}
    if stamps is None or exe_sex is None:
        rows["ZOGY"] = _missing("subtraction", "ZOGY", "needs the PSFEx PSFs (PSFEx row)", t_ours)
        return rows, diff, info, t_ours
    _peers_path(peers_dir)
    try:
        sky = 900.0  # make_pair's science sky (ZOGY wants background-subtracted images)
        d, s_corr, sigma_d, t_z = _zogy(sci, tpl, stamps, sky, tmp, exe_sex, zogy_tiles)
        edge = np.zeros(d.shape, bool)
        edge[:30], edge[-30:], edge[:, :30], edge[:, -30:] = True, True, True, True
        rows["ZOGY"] = _row(
            "subtraction", "ZOGY (zogyp 1.6.3 ZOGY(), PSFEx PSFs, one PSF per image)",
            t_ours, seconds=t_z, sub_images=f"{zogy_tiles} x {zogy_tiles}",
            note="the PSFEx time is in the PSFEx row",
            quality={"noise_over_propagated": round(_robust_sigma(d[~edge]) / sigma_d, 3),
                     "on": "S_corr", **_found(np.where(edge, 0, s_corr), edge, truth)})  # fmt: skip
    except ImportError as e:
        rows["ZOGY"] = _missing(
            "subtraction", "ZOGY", f"not installed ({e}; see 'install' in the report)", t_ours
        )
    except Exception as e:  # noqa: BLE001
        rows["ZOGY"] = _missing("subtraction", "ZOGY", f"failed: {e!r}"[:400], t_ours)
    return rows, diff, info, t_ours


def bench_sfft(sci, tpl, truth, diff, info, t_ours, tmp, peers_dir, note=""):
    """SFFT against apdask's subtraction ``diff`` (timed ``t_ours``) of the same pair."""
    _peers_path(peers_dir)
    name = "SFFT 1.7.3 (numpy backend, template convolved, linear kernel)"
    try:
        d_sf, times = _sfft(sci, tpl, info.kernel_size // 2, tmp, peers_dir)
    except ImportError as e:
        why = f"not installed ({e}; see 'install' in the report)"
        return _missing("subtraction", "SFFT (numpy)", why, t_ours)
    except Exception as e:  # noqa: BLE001
        return _missing("subtraction", "SFFT (numpy)", f"failed: {e!r}"[:400], t_ours)
    _, _, ignored = matched_filter(diff)
    prop = np.sqrt(np.asarray(diff.variance, float))
    img = np.where(np.isfinite(d_sf), d_sf, 0.0).astype(np.float32)
    _, s, ign = matched_filter(diff.copy_with(image=img))  # apdask's PSF and variance
    q = {"noise_over_propagated": round(_robust_sigma((d_sf / prop)[~ignored]), 3),
         **_found(s, ign, truth)}  # fmt: skip
    return _row("subtraction", name, t_ours, seconds=times["seconds"], quality=q,
                first_run_with_numba_compile_s=round(times["first_run_s"], 3),
                note=f"second of two runs in one process{note}")  # fmt: skip


def _sfft_small_pair(side, n_stars, n_transients, tmp, peers_dir):
    """SFFT and apdask's subtraction on a ``side`` × ``side`` pair of the same simulation."""
    sci, tpl, truth = make_pair((side, side), n_stars=n_stars, n_transients=n_transients, seed=1)
    model = estimate_psf_model(sci)
    sci = sci.copy_with(psf=model.mean, psf_model=model)
    tpl = tpl.copy_with(psf=estimate_psf_model(tpl, cells=1).mean)
    diff, info, t_ours, _ = _ours_subtract(sci, tpl, truth)
    row = bench_sfft(sci, tpl, truth, diff, info, t_ours, tmp, peers_dir,
                     note=f"; on a {side} x {side} pair (sfft needs > 6 GB at 4k x 4k), "
                     "apdask_s on the same pair")  # fmt: skip
    row["pair_shape"] = [side, side]
    return row


def main(argv=None):
    """Run the benchmark and print the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nx", type=int, default=4072)
    ap.add_argument("--ny", type=int, default=4000)
    ap.add_argument("--transients", type=int, default=200)
    ap.add_argument("--no-sfft", action="store_true", help="skip SFFT (minutes at full size)")
    ap.add_argument(
        "--peers-dir",
        default=str(ROOT / ".cache" / "peers"),
        help="where the zogyp / sfft wheels are (pip install --target DIR/site)",
    )
    ap.add_argument(
        "--install",
        action="store_true",
        help="pip install the wheels into --peers-dir/site, even if there",
    )
    ap.add_argument("--no-install", action="store_true",
                    help="never pip install the wheels (their rows then say why)")  # fmt: skip
    ap.add_argument(
        "--zogy-tiles",
        type=int,
        default=None,
        help="ZOGY on N x N sub-images (default: 2048 px or less each)",
    )
    ap.add_argument(
        "--sfft-side",
        type=int,
        default=2048,
        help="SFFT on a pair of this side when the main pair is larger (memory)",
    )
    ap.add_argument("--out")
    ap.add_argument("--sfft-child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.sfft_child:
        _peers_path(args.peers_dir)
        _sfft_child(*args.sfft_child)
        return 0
    zogy_tiles = args.zogy_tiles or -(-max(args.nx, args.ny) // 2048)
    rep = {"machine": {"cpus": os.cpu_count(), "loadavg_before": _loadavg()}}
    site = Path(args.peers_dir) / "site"
    have = all((site / m).is_dir() for m in ("sfft", "zogyp", "sep-1.4.1.dist-info"))
    if args.install or (not have and not args.no_install):
        ok, err = install_peers(args.peers_dir)
        rep["install"] = f"ok: {site}" if ok else f"failed: {err}"
    shape = (args.ny, args.nx)
    n_stars = max(50, int(5000 * args.nx * args.ny / (4072 * 4000)))
    rng = np.random.default_rng(7)
    sci, tpl, truth = make_pair(shape, n_stars=n_stars, n_transients=args.transients, seed=0)
    rep["pair"] = {"source": "benchmarks/bench_subtract.py make_pair (simulated, with truth)",
                   "shape": list(shape), "stars": n_stars, "transients": len(truth)}  # fmt: skip
    exe_sex, exe_psfex = shutil.which("source-extractor"), shutil.which("psfex")
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sci_path, tpl_path = tmp / "sci.fits", tmp / "tpl.fits"
        fits.writeto(sci_path, np.asarray(sci.image, np.float32), sci.wcs.to_header())
        fits.writeto(tpl_path, np.asarray(tpl.image, np.float32), tpl.wcs.to_header())
        _say("pair made")
        rows.update(bench_resampling(shape, n_stars, tmp, rng))
        _say("resampling done")
        psf_rows, model_s, stamps = bench_psf(sci, sci_path, tpl_path, tmp, exe_sex, exe_psfex)
        rows.update(psf_rows)
        _say("PSF done")
        sci_p = sci.copy_with(psf=model_s.mean, psf_model=model_s)
        tpl_p = tpl.copy_with(psf=estimate_psf_model(tpl, cells=1).mean)
        sub_rows, diff, info, t_sub = bench_subtraction(
            sci_p, tpl_p, truth, stamps, tmp, exe_sex, args.peers_dir, zogy_tiles
        )
        rows.update(sub_rows)
        _say("ZOGY done")
        if args.no_sfft:
            rows["SFFT"] = _missing("subtraction", "SFFT (numpy)", "not run (--no-sfft)", t_sub)
        elif max(shape) <= args.sfft_side:
            rows["SFFT"] = bench_sfft(sci_p, tpl_p, truth, diff, info, t_sub, tmp, args.peers_dir)
        else:  # a smaller pair: sfft's numpy backend needs > 6 GB on a 4k x 4k frame
            side = args.sfft_side
            rows["SFFT"] = _sfft_small_pair(side, n_stars * side**2 // (shape[0] * shape[1]),
                                            max(10, len(truth) * side**2 // (shape[0] * shape[1])),
                                            tmp, args.peers_dir)  # fmt: skip
        _say("subtraction done")
        rows.update(bench_detection(diff, sci_p, tpl_p, truth, tmp, exe_sex))
    rep["rows"] = rows
    rep["max_rss_GB"] = _rss_gb()
    rep["machine"]["loadavg_after"] = _loadavg()
    text = json.dumps(rep, indent=1, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
