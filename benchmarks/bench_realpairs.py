"""Benchmark: ``apdask diff`` beside SFFT on the real DECam and NIRCam pairs.

Not a unit test.  On the pairs of ``../shared/realdata`` (its README): DECam
``DEC-OBS04a − DEC-OBS18a``, the mean stacks of the five of each (GAIN × 5), and
JWST NIRCam F200W (noise maps and WebbPSF models given), it times

* ``apdask``: :func:`apdask.tools.diff.diff` from the FITS files to the QA'd
  DiaSource table (load, PSF, kernel fit, subtraction, detection, measurement, QA),
  with DEFAULTS; the median of ``--repeat`` runs after one untimed run;
* ``sfft``: sfft's numpy backend (``Customized_Packet.CP``, the ``bench`` extra) on
  the same FITS pair: template convolved (``ForceConv="REF"``), apdask's kernel
  half-width, linear kernel and background, no mask, all cores; timed once after one
  untimed run (that run compiles sfft's numba functions).  Subtraction only: sfft
  has no detection.

and tabulates the residuals of each difference on one yardstick: the PSF matched
filter of :func:`apdask.pipeline.measure.detection.matched_filter` with apdask's
difference PSF and apdask's difference variance (its correlated-noise correction
included), on the pixels apdask does not ignore: the robust σ of that S/N map; then,
with the map divided by its σ (apdask rescales its own variance so), the count of
pixels with |S/N| > 5 and the S/N at the DECam transient (x 128, y 127).
SFFT's stored differences are measured the same way: the DECam stacks' decorrelated
difference ``sfft-FinalDifference.DeCorr.fits`` (ADU, as apdask's), and NIRCam's
``sfft-difference-SNR.fits``, an S/N map (unit variance); the latter is also given
as stored (per pixel).  Prints one JSON object (``--out`` also writes it), with
``/proc/loadavg`` before and after: the timings of a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apdask.core.exposure import MASK  # noqa: E402
from apdask.pipeline.measure.detection import matched_filter  # noqa: E402
from apdask.tools.diff import diff  # noqa: E402

REALDATA = Path(__file__).resolve().parents[2] / "shared" / "realdata"
DECAM_CENTRE = (128.0, 127.0)
_NIR_SCI = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"
_NIR_TPL = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"


def _loadavg():
    try:
        return Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return None


def _pairs(root, tmp):
    """name -> (science path, template path, diff() keyword arguments, stored SFFT)."""
    dec, nir = root / "decam-sfft", root / "nircam-a2744"
    paths = {}
    for name, prefix in (("sci", "DEC-OBS04"), ("tpl", "DEC-OBS18")):
        hdus = [fits.open(dec / f"{prefix}{c}.mini.fits")[0] for c in "abcde"]
        head = hdus[0].header.copy()
        head["GAIN"] = head["GAIN"] * 5  # the mean of five exposures
        paths[name] = Path(tmp) / f"decam-{name}-mean.fits"
        img = np.mean([h.data for h in hdus], axis=0).astype(np.float32)
        fits.PrimaryHDU(img, head).writeto(paths[name])
    return {
        "DECam DEC-OBS04a - DEC-OBS18a": (
            dec / "DEC-OBS04a.mini.fits", dec / "DEC-OBS18a.mini.fits", {}, None),
        "DECam mean stacks (5 + 5)": (
            paths["sci"], paths["tpl"], {},
            ("difference", dec / "sfft-FinalDifference.DeCorr.fits")),
        "NIRCam F200W (WebbPSF, noise maps)": (
            nir / f"{_NIR_SCI}.fits", nir / f"{_NIR_TPL}.fits",
            {"science_options": {"noise": nir / f"{_NIR_SCI}.noise.fits"},
             "template_options": {"noise": nir / f"{_NIR_TPL}.noise.fits"},
             "science_psf": nir / f"{_NIR_SCI}.WebbPSF.fits",
             "template_psf": nir / f"{_NIR_TPL}.WebbPSF.fits"},
            ("snr", nir / "sfft-difference-SNR.fits")),
    }  # fmt: skip


def _yardstick(image, result, unit_variance=False, centre=None):
    """Residual figures of ``image`` (a difference on the science grid, in apdask's
    difference units) through apdask's matched filter, with apdask's difference PSF and
    variance (or unit variance): the S/N map's robust σ, then, on the map divided by
    that σ (as apdask rescales its own), the pixels with |S/N| > 5 and the transient's
    S/N (the largest |S/N| within 3 px of ``centre``)."""
    d = result.difference
    img = np.where(np.isfinite(image), image, 0.0).astype(np.float32)
    var = np.ones_like(img) if unit_variance else d.variance
    mask = d.mask.copy()
    mask[~np.isfinite(image)] |= MASK["BAD"]
    _, snr, ignored = matched_filter(d.copy_with(image=img, variance=var, mask=mask))
    v = np.asarray(snr)[~ignored]
    v = v[np.isfinite(v) & (v != 0)]
    sigma = float(1.4826 * np.median(np.abs(v - np.median(v))))
    out = {
        "snr_robust_sigma": round(sigma, 3),
        "n_pixels_abs_snr_above_5": int(np.count_nonzero(np.abs(v) > 5 * sigma)),
    }
    if centre is not None:
        x, y = int(round(centre[0])), int(round(centre[1]))
        box = np.asarray(snr)[y - 3 : y + 4, x - 3 : x + 4]
        out["transient_snr"] = round(float(box.flat[np.argmax(np.abs(box))]) / sigma, 1)
    return out


def _sfft(sci, tpl, kernel_half, threads):
    """sfft's numpy backend on the pair: (difference in the input units, seconds)."""
    import numba
    from sfft.CustomizedPacket import Customized_Packet

    set_threads = numba.set_num_threads  # sfft 1.7.3 assigns an int to it (a bug)
    with tempfile.TemporaryDirectory() as d:
        files = {}
        for name, p in (("ref", tpl), ("sci", sci)):
            a = np.asarray(fits.getdata(p), np.float64)
            files[name] = os.path.join(d, f"{name}.fits")
            fits.writeto(files[name], np.where(np.isfinite(a), a, 0.0))
        out = os.path.join(d, "diff.fits")
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                Customized_Packet.CP(  # its numba functions use numba's default threads
                    FITS_REF=files["ref"], FITS_SCI=files["sci"], FITS_mREF=files["ref"],
                    FITS_mSCI=files["sci"], ForceConv="REF", GKerHW=int(kernel_half),
                    FITS_DIFF=out, KerPolyOrder=1, BGPolyOrder=1, BACKEND_4SUBTRACT="Numpy",
                    NUM_CPU_THREADS_4SUBTRACT=threads, VERBOSE_LEVEL=0,
                )  # fmt: skip
        finally:
            numba.set_num_threads = set_threads
        seconds = time.perf_counter() - t0
        return np.asarray(fits.getdata(out), float), seconds


def _run_pair(name, sci, tpl, kw, stored, repeat, threads, with_sfft):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # QA warnings: the report carries them
        r = diff(sci, tpl, enforce_qa=False, **kw)  # untimed: numba, caches
        ts = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            r = diff(sci, tpl, enforce_qa=False, **kw)
            ts.append(time.perf_counter() - t0)
    centre = DECAM_CENTRE if name.startswith("DECam") else None
    qa = r.report["qa"]
    row = {
        "apdask": {
            "seconds": round(statistics.median(ts), 3),
            "seconds_all": [round(t, 3) for t in ts],
            "psf_subtract_s": round(r.report["timing"]["psf+subtract"], 3),
            "kernel_half_width": int(r.info.kernel_size // 2),
            "qa_status": qa["status"],
            "kernel_sum": round(qa["kernel_sum"], 4),
            "variance_correction": qa["variance_correction"],
            "n_detections": len(r.sources),
            **_yardstick(r.difference.image, r, centre=centre),
        }
    }
    scale = r.science.meta.get("flux_scale") or 1.0  # input units -> apdask's (nJy)
    if with_sfft:
        try:
            _sfft(sci, tpl, r.info.kernel_size // 2, threads)  # compiles sfft's numba
            dsf, sec = _sfft(sci, tpl, r.info.kernel_size // 2, threads)
        except ImportError:
            row["sfft"] = "not installed (pip install sfft==1.7.3, the bench extra)"
        else:
            row["sfft"] = {
                "backend": "numpy",
                "seconds": round(sec, 3),
                "seconds_over_apdask": round(sec / row["apdask"]["seconds"], 2),
                **_yardstick(dsf * scale, r, centre=centre),
            }
    if stored is not None:
        kind, path = stored
        a = np.asarray(fits.getdata(path), float)
        if kind == "snr":
            fin = a[np.isfinite(a)]
            row["sfft_stored"] = {
                "file": path.name,
                **_yardstick(a, r, unit_variance=True, centre=centre),
                "as_stored_per_pixel": {
                    "snr_robust_sigma": round(
                        float(1.4826 * np.median(np.abs(fin - np.median(fin)))), 3
                    ),
                    "n_pixels_abs_snr_above_5": int(np.count_nonzero(np.abs(fin) > 5)),
                },  # fmt: skip
            }
        else:
            row["sfft_stored"] = {"file": path.name, **_yardstick(a * scale, r, centre=centre)}
    return row


def main(argv=None):
    """Run the benchmark and print the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3, help="timed apdask runs per pair")
    ap.add_argument("--realdata", default=str(REALDATA), help="the shared realdata folder")
    ap.add_argument("--only", default=None, help="pairs whose name contains this (e.g. DECam)")
    ap.add_argument("--no-sfft", action="store_true", help="apdask only")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="sfft's threads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    root = Path(args.realdata)
    rep = {"machine": {"cpus": os.cpu_count(), "loadavg_before": _loadavg()}}
    if not (root / "decam-sfft" / "DEC-OBS04a.mini.fits").exists():
        rep["skipped"] = f"no real data at {root} (see shared/realdata/README.md)"
        print(json.dumps(rep))
        return 0
    rep["pairs"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (sci, tpl, kw, stored) in _pairs(root, tmp).items():
            if args.only and args.only not in name:
                continue
            rep["pairs"][name] = _run_pair(name, sci, tpl, kw, stored, max(1, args.repeat),
                                           args.threads, not args.no_sfft)  # fmt: skip
    rep["machine"]["loadavg_after"] = _loadavg()
    text = json.dumps(rep, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
