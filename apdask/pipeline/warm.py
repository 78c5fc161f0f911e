"""Warm the numba kernels before the first image arrives.

The fused kernels (:mod:`apdask._kernels.fused`) are compiled on first use and cached
on disk.  Loading them from the cache costs about 0.4 s per process; compiling them,
in a fresh environment or after an upgrade, about a minute.  :func:`warm_kernels`
runs the pixel chain once on a small synthetic CCD, so that a worker pays this when it
starts, not when the first visit's image is waiting.  :func:`warm_plugin` does it on
every Dask worker that joins.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from astropy.wcs import WCS

from apdask._kernels import fused, lanczos
from apdask._kernels.trail import veres_fit, veres_jacobian
from apdask.core.camera import get_camera
from apdask.core.exposure import MASK, Exposure
from apdask.core.memory import keep_freed_memory
from apdask.pipeline.isr import assemble, isr_amp, mask_cosmic_rays
from apdask.pipeline.measure.detection import detect_sources, matched_filter
from apdask.pipeline.measure.sources import measure_sources
from apdask.pipeline.psf import estimate_psf_model, sharpest_fwhm_px
from apdask.pipeline.subtract.difference import subtract

__all__ = ["warm_kernels", "warm_plugin"]

log = logging.getLogger(__name__)


def _star_field(fwhm: float, seed: int, shape: tuple[int, int] = (256, 256)) -> Exposure:
    """A small sky-subtracted star field in nJy with noise, a WCS and a variance plane."""
    rng = np.random.default_rng(seed)
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    image = np.zeros(shape)
    sig = fwhm / 2.3548
    star_rng = np.random.default_rng(7)  # the same stars in both images
    for x, y, f in zip(star_rng.uniform(30, nx - 30, 40), star_rng.uniform(30, ny - 30, 40),
                       3e4 * 7.0 ** star_rng.uniform(0, 1, 40), strict=True):  # fmt: skip
        image += f / (2 * np.pi * sig**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sig**2))
    variance = 900.0 + np.abs(image)
    image += rng.normal(0.0, 1.0, shape) * np.sqrt(variance)
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [nx / 2, ny / 2]
    wcs.wcs.cd = np.diag([-0.2, 0.2]) / 3600.0
    return Exposure(image.astype(np.float32), variance.astype(np.float32),
                    np.zeros(shape, np.uint32), wcs)  # fmt: skip


def warm_kernels() -> float:
    """Run ISR, template warping, PSF modelling, cosmic-ray masking, subtraction, detection
    and measurement once on synthetic data, so that every numba kernel is compiled or loaded;
    seconds.

    Never raises: a failure is logged, and the first visit then pays as before.
    """
    t0 = time.perf_counter()
    try:
        amp = get_camera("testcam").detectors[0].amplifiers[0]
        ny, nx = amp.y1 - amp.y0, amp.x1 - amp.x0
        raw = np.random.default_rng(1).normal(1000.0, 5.0, amp.raw_shape).astype(np.float32)

        def section(value: float) -> np.ndarray:  # as the pipeline passes the calibrations:
            return np.full((ny, nx + 1), value, np.float32)[:, :nx]  # a frame's section

        img, var, _ = isr_amp(raw, amp, section(1000.0), section(0.0), section(1.0), 30.0)
        scale = np.float32(2.0)
        assemble([[img]], np.float32, scale), assemble([[var]], np.float32, scale, scale)
        science, template = _star_field(4.0, 1), _star_field(3.0, 2)
        # every branch that has a kernel of its own: a transient (segments), a cosmic
        # ray (its mask grown and interpolated over), saturated pixels (boxes around
        # them) and a corner without template data (filled)
        yy, xx = np.mgrid[0:256, 0:256]
        sig = 4.0 / 2.3548
        science.image += (
            2e5
            / (2 * np.pi * sig**2)
            * np.exp(-((xx - 100.3) ** 2 + (yy - 128.6) ** 2) / (2 * sig**2))
        ).astype(np.float32)
        science.image[60:63, 200] += 5e4
        science.mask[200:202, 40:42] |= MASK["SAT"]
        template.mask[:20, :20] |= MASK["NO_DATA"]
        template.image[:20, :20] = np.nan
        # the template's warp and the shift of a prewarped template (pipeline.template)
        small = np.ones((16, 16), np.float32)
        out = np.zeros((8, 8), np.float32)
        nodes = np.array([0.0, 7.0])
        grid = np.array([[3.5, 10.5], [3.5, 10.5]])
        lanczos.warp(small, small, grid, grid.T.copy(), lanczos.node_weights(nodes, 8),
                     lanczos.node_weights(nodes, 8), out, out.copy(), np.zeros((8, 8), bool),
                     bounds=(2.0, 12.0, 2.0, 12.0))  # fmt: skip
        lanczos.shift(small, small, np.zeros((16, 16), bool), 3.5, 3.5, (8, 8))
        lanczos.any_set(np.zeros((4, 4), np.uint32), MASK["NO_DATA"])
        model = estimate_psf_model(science)
        science = science.copy_with(psf=model.mean, psf_model=model)
        science = mask_cosmic_rays(science, sharpest_fwhm_px(model.psfs))
        diff, _ = subtract(science, template)
        matched = matched_filter(diff)
        found = detect_sources(diff, matched=matched)
        fused.thinned_values(matched[1], matched[2], 200_000)  # the QA's S/N sample
        # the trail fit's, which only elongated sources reach
        px = np.arange(4.0)
        t, m, dm = np.array([1.0, 1.0, 1.0, 0.0]), px.copy(), np.zeros((4, 4))
        veres_fit(px, px, px, px + 1.0, t, 1.0, m, dm, px.copy(), True)
        jac, steps = np.zeros((4, 4)), np.full(4, 1e-3)
        veres_jacobian(px, px, px, px + 1.0, t, 1.0, steps, px.copy(), jac, m, dm, px.copy())
        measure_sources(diff, science, template, found, visit=1, detector=0, band="r",
                        mjd=60000.0, matched=matched)  # fmt: skip
    except Exception as e:  # warming is an optimisation, never a failure
        log.warning("warming the numba kernels failed (%s: %s); the first CCD compiles them",
                    type(e).__name__, e)  # fmt: skip
    return time.perf_counter() - t0


def warm_plugin() -> Any:
    """A Dask worker plugin that runs :func:`warm_kernels` on each worker, in a
    background thread so the worker takes tasks meanwhile (a task needing a kernel
    still compiling waits for it).

    Register it with ``client.register_plugin(warm_plugin())``; workers that join later
    (adaptive scaling, a restarted job) warm too.
    """
    # lazy: distributed costs ~0.6 s of import, and the threaded scheduler needs none
    from distributed.diagnostics.plugin import WorkerPlugin

    class WarmKernels(WorkerPlugin):
        name = "apdask-warm-kernels"

        def setup(self, worker: Any) -> None:
            keep_freed_memory()  # the allocator policy before the worker's threads allocate
            threading.Thread(target=_warm_and_log, name="apdask-warm", daemon=True).start()

    return WarmKernels()


def _warm_and_log() -> None:
    log.info("numba kernels warm after %.1f s", warm_kernels())
