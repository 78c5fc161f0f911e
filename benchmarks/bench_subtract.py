"""Benchmark: one full-size CCD from calibrated pixels to a DIASource table with cutouts.

Not a unit test.  Builds a synthetic ITL-size (4072 × 4000) science / template pair in
memory (Gaussian PSFs, science FWHM varying 0.9–1.1″, template 0.7″ and 10× deeper,
~5000 stars and ``--transients`` injected point sources), with the PSFs prefetched,
and times in the same process:

* ``rfft2_pair``: one forward + inverse ``scipy.fft.rfft2`` of the padded frame
  (the hardware floor the issue compares against);
* ``subtract``: :func:`apdask.pipeline.subtract.difference.subtract` without its two by-products
  (kernel fit, convolution, decorrelation, mask and variance planes: the difference
  image), again with a constant kernel (``spatial_order=0``), and the whole call,
  which also lists the template's bright sources and measures the aperture
  correction (these go into the total);
* ``detect`` / ``measure`` / ``cutouts``: the DIASource table and three cutouts each
  (:class:`apdask.alerts.stamps.StampMaker`, sized by ``bboxSize`` as in the pipeline);
* ``sourcefinder``: photutils ``SourceFinder`` on the same difference image;
* ``sfft``: with ``--sfft``, sfft's numpy backend (``Customized_Packet.CP``) on the same
  pair, when it is installed (the ``bench`` extra); about 100 s on 2 cores.

Every timed step is run once untimed first (numba's compiled code is loaded and the
heap grows on the first call; a pipeline worker pays that once, not per CCD).  ISR is
not included (see ``benchmarks/README.md``).  Prints one JSON object;
``--out`` also writes it to a file.  Peak memory is ``tracemalloc``'s peak of
Python-allocated memory (numpy arrays included) plus the process's max RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apdask.alerts.stamps import StampMaker  # noqa: E402
from apdask.core.exposure import Exposure  # noqa: E402
from apdask.core.memory import keep_freed_memory  # noqa: E402
from apdask.pipeline.measure.detection import detect_sources, matched_filter
from apdask.pipeline.measure.sources import measure_sources  # noqa: E402
from apdask.pipeline.psf import estimate_psf_model
from apdask.pipeline.subtract.difference import subtract  # noqa: E402

PEERS = {
    "SFFT (A100 GPU)": 1.4,
    "PyTorchDIA (GPU)": 11.5,
    "ZOGY (CPU)": 37.0,
    "HOTPANTS (CPU)": 43.0,
}


def _render(shape, xs, ys, fl, sig, rng_noise, var):
    from scipy.special import erf

    img = np.zeros(shape, np.float32)
    h = 12
    offs = np.arange(-h, h + 1)
    for x, y, f, s in zip(xs, ys, fl, np.broadcast_to(sig, xs.shape), strict=True):
        ix, iy = int(round(x)), int(round(y))
        ex = (ix + offs[:, None] + np.array([-0.5, 0.5]) - x) / (np.sqrt(2) * s)
        ey = (iy + offs[:, None] + np.array([-0.5, 0.5]) - y) / (np.sqrt(2) * s)
        gx = 0.5 * (erf(ex[:, 1]) - erf(ex[:, 0]))
        gy = 0.5 * (erf(ey[:, 1]) - erf(ey[:, 0]))
        img[iy - h : iy + h + 1, ix - h : ix + h + 1] += np.float32(f) * np.outer(gy, gx)
    img += rng_noise.standard_normal(shape, dtype=np.float32) * np.sqrt(var).astype(np.float32)
    return img


def make_pair(shape=(4000, 4072), n_stars=5000, n_transients=200, seed=0):
    """Science and template Exposures (nJy-like units) with PSF models attached."""
    from astropy.wcs import WCS

    rng = np.random.default_rng(seed)
    ny, nx = shape
    xs = rng.uniform(20, nx - 20, n_stars)
    ys = rng.uniform(20, ny - 20, n_stars)
    fl = 300 * (3e5 / 300) ** rng.uniform(0, 1, n_stars) ** 2.5
    fwhm_s = (0.9 + 0.2 * 0.5 * (xs / nx + ys / ny)) / 0.2
    sky = 900.0
    tv = np.full(shape, (sky + 36) / 10, np.float32)
    tpl = _render(shape, xs, ys, fl, 0.7 / 0.2 / 2.3548, rng, tv)
    tx = rng.uniform(40, nx - 40, n_transients)
    ty = rng.uniform(40, ny - 40, n_transients)
    tf = rng.uniform(800, 20000, n_transients)
    fwhm_t = (0.9 + 0.2 * 0.5 * (tx / nx + ty / ny)) / 0.2
    allx, ally = np.concatenate([xs, tx]), np.concatenate([ys, ty])
    allf = np.concatenate([fl, tf])
    sig = np.concatenate([fwhm_s, fwhm_t]) / 2.3548
    truth = np.zeros(shape, np.float32)
    sv = np.full(shape, sky + 36, np.float32)
    sci = _render(shape, allx, ally, allf, sig, rng, sv) + np.float32(sky)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, -30.0]
    w.wcs.crpix = [nx / 2, ny / 2]
    w.wcs.cd = [[-0.2 / 3600, 0], [0, 0.2 / 3600]]
    del truth
    mask = np.zeros(shape, np.uint32)
    s = Exposure(sci, sv + np.maximum(sci - sky, 0), mask.copy(), w, None, {"visit": 1})
    t = Exposure(tpl, tv, mask.copy(), w, None, {})
    return s, t, np.column_stack([tx, ty, tf])


def _run_sfft(sci, tpl, kernel_half):
    """sfft's numpy backend (``Customized_Packet.CP``) on the same pair, timed once.

    Same kernel half-width as ours, linear kernel and background variation, the
    template convolved, both cores.  The first call in a fresh environment also
    compiles sfft's numba functions (cached afterwards); that is reported apart.
    """
    import contextlib
    import io
    import tempfile

    try:
        from sfft.CustomizedPacket import Customized_Packet
    except ImportError:
        return "not installed (pip install sfft, the bench extra); skipped"
    from astropy.io import fits

    with tempfile.TemporaryDirectory() as d:
        paths = {}
        for name, arr in (("ref", tpl.image), ("sci", sci.image)):
            paths[name] = os.path.join(d, f"{name}.fits")
            fits.writeto(paths[name], np.asarray(arr, np.float64))
        log = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(log):
            Customized_Packet.CP(
                FITS_REF=paths["ref"], FITS_SCI=paths["sci"], FITS_mREF=paths["ref"],
                FITS_mSCI=paths["sci"], ForceConv="REF", GKerHW=int(kernel_half),
                FITS_DIFF=os.path.join(d, "diff.fits"), KerPolyOrder=1, BGPolyOrder=1,
                BACKEND_4SUBTRACT="Numpy", NUM_CPU_THREADS_4SUBTRACT=os.cpu_count() or 1,
                VERBOSE_LEVEL=1,
            )  # fmt: skip
        total = time.perf_counter() - t0
    compile_s = next(
        (float(line.split("[")[1].split(" s]")[0]) for line in log.getvalue().splitlines()
         if "Function Compilations" in line and "TAKES" in line), 0.0,
    )  # fmt: skip
    return {
        "backend": "numpy",
        "kernel_half_width": int(kernel_half),
        "total_s": round(total, 2),
        "numba_compile_s": round(compile_s, 2),
        "subtraction_s": round(total - compile_s, 2),
    }


def _time(fn, repeat):
    out, ts = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts), ts


def main(argv=None):
    """Run the benchmark and print the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nx", type=int, default=4072)
    ap.add_argument("--ny", type=int, default=4000)
    ap.add_argument("--transients", type=int, default=200)
    ap.add_argument("--no-sourcefinder", action="store_true")
    ap.add_argument("--sfft", action="store_true", help="also run sfft (numpy) on the pair, ~100 s")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    import scipy.fft as sfft

    heap = keep_freed_memory()  # as the pipeline's stages do (apdask/_alloc.py)
    sci, tpl, truth = make_pair((args.ny, args.nx), n_transients=args.transients)
    t0 = time.perf_counter()
    model_s = estimate_psf_model(sci)
    sci = sci.copy_with(psf=model_s.mean, psf_model=model_s)
    tpl = tpl.copy_with(psf=estimate_psf_model(tpl, cells=1).mean)
    t_psf = time.perf_counter() - t0
    fy = sfft.next_fast_len(args.ny + 40, real=True)
    fx = sfft.next_fast_len(args.nx + 40, real=True)
    img32 = np.asarray(sci.image, np.float32)
    w = os.cpu_count() or 1
    sfft.irfft2(sfft.rfft2(img32, s=(fy, fx), workers=w), s=(fy, fx), workers=w)  # warm
    _, t_fft, _ = _time(  # the reference: a median of 3 × --repeat pairs
        lambda: sfft.irfft2(sfft.rfft2(img32, s=(fy, fx), workers=w), s=(fy, fx), workers=w),
        3 * args.repeat,
    )
    # one untimed run of each step first, as for the FFT pair: a pipeline worker is
    # long-lived, and the first call loads numba's compiled code and grows the heap
    warm, _ = subtract(sci, tpl)
    measure_sources(warm, sci, tpl, detect_sources(warm, matched=matched_filter(warm)), visit=1,
                    detector=0, band="r", mjd=6e4)  # fmt: skip
    del warm
    # subtraction alone: kernel fit, convolution, decorrelation, mask and variance
    # planes; then the whole call, which also lists the template's bright sources and
    # measures the aperture correction (both needed downstream, both in the total)
    core = {"apcorr": False, "bright": False}
    (_, info_core), t_sub, ts_sub = _time(lambda: subtract(sci, tpl, **core), args.repeat)
    (diff, info), t_full, _ = _time(lambda: subtract(sci, tpl), args.repeat)
    # the same with a constant kernel (one inverse transform instead of three): the
    # cost of the spatially varying kernel, and how close a single pass comes to the floor
    (_, info0), t_sub0, _ = _time(lambda: subtract(sci, tpl, spatial_order=0, **core), args.repeat)
    tracemalloc.start()  # a separate run: tracing slows allocation-heavy code down
    subtract(sci, tpl)
    _, peak_sub = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # the matched filter is shared by detection and measurement, as in the pipeline
    (matched, dets), t_det, _ = _time(
        lambda: (m := matched_filter(diff), detect_sources(diff, matched=m)), args.repeat
    )
    tab, t_meas, _ = _time(
        lambda: measure_sources(
            diff, sci, tpl, dets, visit=1, detector=0, band="r", mjd=6e4, matched=matched
        ),  # fmt: skip
        args.repeat,
    )

    def cutouts():  # as the pipeline makes them (visit._make_alerts): bboxSize, 30..102 px
        makers = [StampMaker(e) for e in (diff, sci, tpl)]
        size = np.clip(np.asarray(tab["bboxSize"], int), 30, 102)
        rows = zip(tab["x"], tab["y"], size, strict=True)
        return [m.stamp(x, y, s) for x, y, s in rows for m in makers]

    _, t_cut, _ = _time(cutouts, args.repeat)
    rep = {
        "shape": [args.ny, args.nx],
        "cpu_count": os.cpu_count(),
        "freed_memory_kept_in_heap": heap,
        "padded_frame": [fy, fx],
        "psf_model_s (prefetched, not in total)": round(t_psf, 3),
        "rfft2_pair_s": round(t_fft, 3),
        "subtract_s": round(t_sub, 3),
        "subtract_runs_s": [round(t, 3) for t in ts_sub],
        "subtract_over_fft_pair": round(t_sub / t_fft, 2),
        "subtract_steps_s": {k: round(v, 3) for k, v in info_core["timing"].items()},
        "subtract_with_bright_sources_and_apcorr_s": round(t_full, 3),
        "subtract_with_bright_sources_and_apcorr_steps_s": {
            k: round(v, 3) for k, v in info.timing.items()
        },
        "subtract_constant_kernel_s": round(t_sub0, 3),
        "subtract_constant_kernel_over_fft_pair": round(t_sub0 / t_fft, 2),
        "subtract_constant_kernel_steps_s": {k: round(v, 3) for k, v in info0["timing"].items()},
        "detect_s": round(t_det, 3),
        "measure_s": round(t_meas, 3),
        "cutouts_s": round(t_cut, 3),
        "total_subtract_to_table_s": round(t_full + t_det + t_meas + t_cut, 3),
        "n_dia_sources": len(tab),
        "n_injected": len(truth),
        "noise_ratio": round(info.noise_ratio, 4),
        "tracemalloc_peak_subtract_GB": round(peak_sub / 1e9, 3),
        "max_rss_GB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3),
        "peers_published_s": PEERS,
    }
    if not args.no_sourcefinder:
        try:
            from photutils.segmentation import SourceFinder

            snr = diff.image / np.sqrt(diff.variance)
            finder = SourceFinder(n_pixels=5, progress_bar=False)
            _, t_sf, _ = _time(lambda: finder(snr, 5.0), 1)
            rep["photutils_sourcefinder_s"] = round(t_sf, 3)
        except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
            rep["photutils_sourcefinder_s"] = f"failed: {e}"
    rep["sfft"] = _run_sfft(sci, tpl, info.kernel_size // 2) if args.sfft else "not run (--sfft)"
    text = json.dumps(rep, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
