"""Injection of point sources into real science images: completeness and flux bias.

:func:`injection_test` adds PSF-shaped point sources of known flux at random clean
positions of a science image, runs :func:`apdask.diff.diff` on it against the
template, matches the DiaSources to the injections and reports the completeness per
expected-S/N bin and the median flux bias.  See ``docs/real-data.md``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from apdask.core.exposure import MASK, Exposure
from apdask.io.foreign import read_exposure
from apdask.pipeline.psf import psf_fwhm, shifted_psf
from apdask.tools.diff import diff

__all__ = ["injection_test", "inject_point_sources"]


def inject_point_sources(
    exposure: Exposure,
    psf: npt.ArrayLike,
    x: Iterable[float],
    y: Iterable[float],
    flux: Iterable[float],
    *,
    seed: int | None = 0,
) -> Exposure:
    """A copy of ``exposure`` with point sources (``psf`` × ``flux``) added at ``(x, y)``.

    Sub-pixel positions use a Fourier shift of the PSF stamp.  When ``meta`` has a
    ``gain`` (e⁻ per count) the sources' Poisson noise is added and their variance put in
    the variance plane (``flux_scale`` converts the image's units to counts).
    """
    rng = np.random.default_rng(seed)
    img = np.array(exposure.image, np.float64)
    var = np.array(exposure.variance, np.float64)
    psf = np.asarray(psf, float)
    h = psf.shape[0] // 2
    gain = exposure.meta.get("gain")
    scale = exposure.meta.get("flux_scale") or 1.0
    ny, nx = img.shape
    for xi, yi, f in zip(x, y, flux, strict=True):
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        stamp = f * shifted_psf(psf, xi - ix, yi - iy)
        y0, y1, x0, x1 = iy - h, iy + h + 1, ix - h, ix + h + 1
        if y0 < 0 or x0 < 0 or y1 > ny or x1 > nx:
            continue
        if gain:
            counts = np.maximum(stamp / scale, 0.0)
            stamp = stamp + rng.normal(0.0, 1.0, stamp.shape) * np.sqrt(counts / gain) * scale
            var[y0:y1, x0:x1] += counts / gain * scale * scale
        img[y0:y1, x0:x1] += stamp
    return exposure.copy_with(image=img.astype(np.float32), variance=var.astype(np.float32))


def injection_test(
    science: str | os.PathLike[str] | Exposure,
    template: str | os.PathLike[str] | Exposure,
    *,
    snr: Sequence[float] = (5, 7, 10, 20, 50),
    per_bin: int = 20,
    per_run: int = 10,
    seed: int = 0,
    match_radius: float = 2.0,
    science_options: Mapping[str, Any] | None = None,
    template_options: Mapping[str, Any] | None = None,
    **diff_kwargs: Any,
) -> dict[str, Any]:
    """Completeness and flux bias of point sources injected into a real science image.

    Parameters
    ----------
    science, template : str, os.PathLike or apdask.image.Exposure
        As for :func:`apdask.diff.diff`.
    snr : sequence of float
        Expected difference-image S/N of the injected sources (bins).
    per_bin : int
        Injections per S/N value.
    per_run : int
        Injections per subtraction (kept apart by 4 PSF FWHM and from detections).
    seed : int
    match_radius : float
        Match radius in pixels.

    Returns
    -------
    dict
        ``bins``: one entry per S/N value with ``n``, ``found``, ``completeness``,
        ``flux_bias_median`` (``psfFlux / injected − 1`` of the found ones) and
        ``snr_measured_median``; ``n_false_new`` (detections in the runs not present in
        the plain difference nor matched to an injection).
    """
    if isinstance(science, str | os.PathLike):
        science = read_exposure(science, **(science_options or {}))
    if isinstance(template, str | os.PathLike):
        template = read_exposure(template, **(template_options or {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = diff(science, template, enforce_qa=False, **diff_kwargs)
    d = base.difference
    psf_sci = np.asarray(base.science.psf, float)
    psf_d = np.asarray(d.psf, float)
    fwhm = float(psf_fwhm(psf_d))
    # flux error of a PSF fit on the difference: sqrt(var) / sqrt(Σ P²) (white noise)
    var_c = base.info.variance_correction
    ny, nx = d.shape
    bad = (d.mask & (MASK["EDGE"] | MASK["NO_DATA"] | MASK["SAT"] | MASK["BAD"])) != 0
    p2 = float((psf_d**2).sum())
    # the difference is in science units; κ (kernel sum) scales a science source into it
    rng = np.random.default_rng(seed)
    bx = np.asarray(base.sources["x"], float) if len(base.sources) else np.zeros(0)
    by = np.asarray(base.sources["y"], float) if len(base.sources) else np.zeros(0)
    todo = [s for s in snr for _ in range(per_bin)]
    rng.shuffle(todo)
    results: dict[Any, dict[str, Any]] = {
        s: {"n": 0, "found": 0, "bias": [], "snr": []} for s in snr
    }
    n_false: Any = 0
    margin = int(np.ceil(2 * fwhm)) + psf_sci.shape[0] // 2 + 1
    for start in range(0, len(todo), per_run):
        batch = todo[start : start + per_run]
        xs: list[float] = []
        ys: list[float] = []
        tries = 0
        while len(xs) < len(batch) and tries < 5000:
            tries += 1
            x = rng.uniform(margin, nx - 1 - margin)
            y = rng.uniform(margin, ny - 1 - margin)
            if bad[int(round(y)), int(round(x))]:
                continue
            near = np.hypot(np.r_[bx, xs] - x, np.r_[by, ys] - y)
            if near.size and near.min() < 4 * fwhm:
                continue
            xs.append(x)
            ys.append(y)
        batch = batch[: len(xs)]
        ix, iy = np.rint(xs).astype(int), np.rint(ys).astype(int)
        var_at = np.asarray(d.variance, float)[iy, ix]
        flux = np.array(batch) * np.sqrt(var_at * var_c / p2)
        sci = inject_point_sources(science, psf_sci, xs, ys, flux, seed=seed + start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = diff(sci, template, enforce_qa=False, **diff_kwargs)
        sx = np.asarray(r.sources["x"], float) if len(r.sources) else np.zeros(0)
        sy = np.asarray(r.sources["y"], float) if len(r.sources) else np.zeros(0)
        used = np.zeros(len(sx), bool)
        for x, y, f, s in zip(xs, ys, flux, batch, strict=True):
            results[s]["n"] += 1
            if not len(sx):
                continue
            dist = np.hypot(sx - x, sy - y)
            k = int(np.argmin(dist))
            if dist[k] <= match_radius and r.sources["psfFlux"][k] > 0:
                used[k] = True
                results[s]["found"] += 1
                results[s]["bias"].append(float(r.sources["psfFlux"][k]) / f - 1.0)
                results[s]["snr"].append(float(r.sources["snr"][k]))
        for j in np.flatnonzero(~used):
            if not bx.size or np.hypot(bx - sx[j], by - sy[j]).min() > match_radius:
                n_false += 1
    bins = []
    for s in snr:
        e = results[s]
        bins.append({
            "snr": float(s), "n": e["n"], "found": e["found"],
            "completeness": e["found"] / e["n"] if e["n"] else None,
            "flux_bias_median": float(np.median(e["bias"])) if e["bias"] else None,
            "snr_measured_median": float(np.median(e["snr"])) if e["snr"] else None,
        })  # fmt: skip
    return {"bins": bins, "n_false_new": n_false, "fwhm_difference": fwhm,
            "n_runs": (len(todo) + per_run - 1) // per_run}  # fmt: skip
