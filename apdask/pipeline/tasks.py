"""The pixel steps of one CCD's chain: fetch, header, read, calibrate, warp, subtract, detect.

Each function is one task of :func:`apdask.pipeline.graph.ccd_tasks`, named
``<step>-<visit>-<detector>`` in the graph, so the task stream times every step:
fetch → header → read/calib (ISR) → calibrate → warp → subtract → detect →
associate → package → store → publish → report.  Steps exchange the typed records
of :mod:`apdask.core.records` and take the configuration as a frozen
:class:`~apdask.config.PipelineConfig` resolved on the driver: no task reads
``dask.config`` on a worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from astropy.io import fits

from apdask._kernels.fused import in_thread
from apdask.config import PipelineConfig
from apdask.core.camera import Amplifier, Detector
from apdask.core.exposure import Exposure
from apdask.core.records import (
    Calibrated,
    Fetched,
    Measurement,
    PpdbHistory,
    Prefetch,
    Prewarped,
    RawHeader,
    Subtraction,
    Warped,
)
from apdask.exceptions import HeaderMismatchError, NoTemplateCoverageError, PpdbError, PsfFitError
from apdask.io.butler import Butler
from apdask.io.distributor import open_distributor
from apdask.io.raw import effective_exptime, read_raw, read_segment
from apdask.io.raw_header import check_raw_header
from apdask.pipeline import astrometry, isr
from apdask.pipeline.isr import mask_cosmic_rays
from apdask.pipeline.measure.detection import detect_sources, matched_filter
from apdask.pipeline.measure.sources import measure_sources
from apdask.pipeline.psf import (
    estimate_psf,
    estimate_psf_model,
    psf_star_search,
    sharpest_fwhm_px,
)
from apdask.pipeline.quality import assess, enforce, flag_sources, image_figures
from apdask.pipeline.steps import per_ccd
from apdask.pipeline.subtract import subtract
from apdask.pipeline.template import prewarp_template, shift_template, warp_template
from apdask.ppdb import Ppdb

__all__ = [
    "astrometry_task",
    "calib_task",
    "calibrate_task",
    "detect_task",
    "fetch_task",
    "header_task",
    "isr_amp_task",
    "prefetch_task",
    "read_amp_task",
    "science_psf_task",
    "science_task",
    "subtract_task",
    "warp_task",
]

log = logging.getLogger(__name__)


def fetch_task(distributor_url: str, name: str, timeout: float, cfg: PipelineConfig) -> Fetched:
    """Block until image ``name`` is at the distributor; its local path and arrival times.

    ``registered`` is the distributor's registration time (HTTP: the server's record;
    file: the mtime of the atomically renamed file), else the time the fetch returned.
    """
    t0 = time.time()
    with cfg.applied():
        dist = open_distributor(distributor_url)
        with _seceded():  # waiting for the image must not hold a worker thread
            if hasattr(dist, "retrieve"):
                info = dist.retrieve(name, timeout=timeout)
            else:
                info = {"path": dist.get(name, timeout=timeout)}
    t1 = time.time()
    registered = info.get("registered")
    return Fetched(
        path=str(info["path"]),
        name=name,
        registered=t1 if registered is None else float(registered),
        fetched=t1,
        waited=t1 - t0,
    )


@contextlib.contextmanager
def _seceded() -> Iterator[None]:
    """On a distributed worker, leave the thread pool while blocking, then rejoin.

    Fetch tasks block until the camera delivers the image.  Seceded, they do not
    occupy worker threads, so the visit's prefetch (templates, calibrations, PPDB
    history) runs at nextVisit time, before the images exist, and other visits'
    tasks run too.  Under the threaded scheduler this does nothing.
    """
    try:
        # lazy: distributed costs ~0.6 s of import, and only a Dask worker has one
        from distributed import rejoin, secede
        from distributed.worker import get_worker

        get_worker()
    except (ImportError, ValueError):
        yield
        return
    secede()
    try:
        yield
    finally:
        rejoin()


def header_task(
    fetched: Sequence[Fetched],
    detector: Detector,
    band: str,
    anticipated_exptime: float,
    visit: int,
) -> RawHeader:
    """Read the raw headers of all snaps and check them against the invocation."""
    started = time.time()
    raws = [read_raw(f.path) for f in fetched]
    metas = [
        check_raw_header(r.meta, detector, band, visit, f.name)
        for r, f in zip(raws, fetched, strict=True)
    ]
    if len({m.snap for m in metas}) != len(metas):
        msg = (
            f"images {', '.join(f.name for f in fetched)} all have SNAP={metas[0].snap}; "
            "pass the two different snaps of the visit"
        )
        raise HeaderMismatchError(msg)
    exptime = sum(effective_exptime(m) for m in metas)
    anticipated = anticipated_exptime * len(metas)
    if anticipated and abs(exptime - anticipated) > 0.01 * anticipated:
        log.warning(
            "effective exposure time %.3f s (from shutter motion) differs from the anticipated "
            "%.3f s by more than 1%%; using the effective one",
            exptime,
            anticipated,
        )
    return RawHeader(
        metas=tuple(metas),
        exptime=exptime,
        darktimes=tuple(m.darktime for m in metas),
        mjd=float(np.mean([m.mjd_mid for m in metas])),
        visit=metas[0].visit,
        ra=metas[0].ra,
        dec=metas[0].dec,
        rotpa=metas[0].rotpa,
        fetched=tuple(fetched),
        processing_started=started,
        segments=tuple(r.segments for r in raws),
    )


def read_amp_task(fetched: Fetched, index: int) -> np.ndarray:
    """The pixels of one amplifier segment of a raw (HDU ``index + 1``)."""
    with fits.open(fetched.path, memmap=False) as hdul:
        return np.asarray(hdul[index + 1].data, dtype=np.float32)


def isr_amp_task(
    header: RawHeader,
    snap: int,
    amp: Amplifier,
    bias: np.ndarray | None,
    dark: np.ndarray | None,
    flat: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One amplifier of one snap: its pixels read and its ISR (:func:`isr.isr_amp`).

    The pixels are read at the offset :func:`header_task` found (no header parsed
    again); ``bias``, ``dark`` and ``flat`` are the assembled master calibrations,
    of which the amplifier's section is used.
    """
    segments = header.segments[snap] if header.segments else ()
    segment = segments[amp.index] if segments else None
    if segment is None:
        raw = read_amp_task(header.fetched[snap], amp.index)
    else:
        raw = read_segment(header.fetched[snap].path, segment)
    return isr.isr_amp(
        raw, amp, isr.section(bias, amp), isr.section(dark, amp), isr.section(flat, amp),
        header.darktimes[snap],
    )  # fmt: skip


def prefetch_task(
    repo: str,
    ppdb_url: str,
    detector: Detector,
    band: str,
    ra: float,
    dec: float,
    rotpa: float,
    mjd: float,
    cfg: PipelineConfig,
) -> Prefetch:
    """Reference catalog and PPDB history: no pixels needed.

    The template is prefetched beside it, by :func:`prewarp_task`, and the master
    calibrations by :func:`calib_task`.
    """
    t0 = time.time()
    butler = Butler(repo)
    corners = detector.footprint(ra, dec, rotpa, padding_arcsec=60.0)
    refcat = butler.get_drp_objects(corners)
    t1 = time.time()
    # The CCD's PPDB history as it was before this visit (as-of read): a re-run, or
    # a run racing with the visit's other CCDs, sees the same history.  A PPDB
    # failure is recorded and makes this CCD (only) report an error, without alerts.
    ppdb_error, history = None, {"objects": None, "sources": None, "forced": None, "drp": None}
    try:
        with cfg.applied():
            history = Ppdb.for_ccd(
                ppdb_url, detector, ra, dec, rotpa, cache=True,
                padding_arcsec=cfg.ppdb.region_padding_arcsec,
            ).read(mjd)  # fmt: skip
    except PpdbError as err:
        ppdb_error = str(err)
    if history["drp"] is not None and len(history["drp"]) == 0:
        history["drp"] = refcat  # DRP catalog not loaded into the PPDB: use the Butler's
    t2 = time.time()
    return Prefetch(
        refcat=refcat,
        history=PpdbHistory(**history),
        ppdb_error=ppdb_error,
        timings={"prefetch_butler": t1 - t0, "prefetch_ppdb": t2 - t1},
    )


def _template_tiles(repo: str, detector: Detector, band: str, ra: float, dec: float,
                    rotpa: float) -> Sequence[Any]:  # fmt: skip
    corners = detector.footprint(ra, dec, rotpa, padding_arcsec=60.0)
    return Butler(repo).get_templates(band, corners)


def prewarp_task(
    repo: str,
    detector: Detector,
    band: str,
    ra: float,
    dec: float,
    rotpa: float,
    cfg: PipelineConfig,
) -> Prewarped:
    """The template tiles read and, with ``apdask.template.prewarp``, warped onto the
    CCD's predicted grid (grown by ``margin_px``) with its PSF, before the image exists.

    A failure here is not the CCD's: it is kept in ``error`` and :func:`warp_task` warps
    the tiles itself, raising then what the CCD must report.
    """
    t0 = time.time()
    tiles = _template_tiles(repo, detector, band, ra, dec, rotpa)
    if not cfg.template.prewarp:
        return Prewarped(None, tiles=tiles, timings={"prefetch_template": time.time() - t0})
    try:
        wcs = detector.predicted_wcs(ra, dec, rotpa)
        tmpl = prewarp_template(tiles, wcs, detector.shape, cfg.template.margin_px)
        if tmpl.psf is None:
            tmpl = tmpl.copy_with(psf=estimate_psf(tmpl))
    except (NoTemplateCoverageError, PsfFitError) as e:
        return Prewarped(None, tiles=tiles, error=str(e), timings={"prewarp": time.time() - t0})
    return Prewarped(tmpl, timings={"prewarp": time.time() - t0})


def calib_task(repo: str, detector: Detector, kind: str, band: str, mjd: float) -> np.ndarray:
    """The master calibration ``kind`` (bias, dark, flat) valid at ``mjd``, read at prefetch.

    A task of its own per kind, so that each frame is released as soon as the CCD's
    ISR has used it (the rest of the prefetch stays with the CCD to its end).
    """
    return Butler(repo).get_calib(kind, detector.id, band if kind == "flat" else None, mjd)


def calibrate_task(
    images: Sequence[Sequence[Sequence[tuple[Any, Any, Any]]]],
    header: RawHeader,
    detector: Detector,
    band: str,
) -> Calibrated:
    """Combine snaps and calibrate to nJy, on the predicted WCS, and search it for stars.

    ``images`` holds, per snap, the ``[row][column]`` grid (``detector.amp_grid()``) of
    the amplifiers' :func:`isr_amp_task` results ``(image_e, variance_e2, mask)``.
    The WCS is refined by :func:`astrometry_task`, beside the science PSF
    (:func:`science_psf_task`), which needs no WCS; both select their stars from the
    one search kept in ``peaks``.
    """
    t0 = time.time()
    snaps = [_planes(grid) for grid in images]
    image_e: Any
    variance: Any
    mask: Any
    image_e, variance, mask = snaps[0]  # amplifier blocks, assembled once below
    if len(snaps) > 1:  # snaps summed into new arrays; a single snap's are assembled once
        image_e = isr.assemble(image_e, np.float32)
        variance = isr.assemble(variance, np.float32)
        mask = isr.assemble(mask, np.uint32)
        for img, var, msk in snaps[1:]:
            image_e += isr.assemble(img, np.float32)
            variance += isr.assemble(var, np.float32)
            mask |= isr.assemble(msk, np.uint32)
    wcs = detector.predicted_wcs(header.ra, header.dec, header.rotpa)
    meta = {
        "visit": header.visit,
        "detector": detector.id,
        "detector_name": detector.name,
        "band": band,
        "mjd": header.mjd,
        "exptime": header.exptime,
    }
    exp = isr.calibrate(image_e, variance, mask, band, header.exptime, wcs, meta)
    peaks = astrometry.star_search(exp)  # for both branches: the WCS fit and the PSF model
    return Calibrated(exp, timings={"calibrate": time.time() - t0}, peaks=peaks)


def _planes(grid: Sequence[Sequence[tuple[Any, Any, Any]]]) -> tuple[list[list[Any]], ...]:
    """The image, variance and mask block grids of a grid of per-amplifier triples."""
    return tuple([[amp[i] for amp in row] for row in grid] for i in range(3))


def astrometry_task(calibrated: Calibrated, prefetch: Prefetch) -> Calibrated:
    """The calibrated image with its WCS refined against the prefetched reference catalogue
    (on the stars :func:`calibrate_task` found)."""
    t0 = time.time()
    exp, refcat = calibrated.exposure, prefetch.refcat
    ra, dec = np.asarray(refcat["ra"]), np.asarray(refcat["dec"])
    new_wcs, info = astrometry.refine_wcs(exp, ra, dec, peaks=calibrated.peaks)
    timings = {**calibrated.timings, "astrometry": time.time() - t0}
    return Calibrated(exp.copy_with(wcs=new_wcs), astrometry=info, timings=timings)


@per_ccd
def warp_task(
    calibrated: Calibrated,
    prewarped: Prewarped,
    repo: str,
    detector: Detector,
    header: RawHeader,
    cfg: PipelineConfig,
) -> Warped:
    """The template on the science image's pixel grid (Lanczos-3), with its PSF.

    The prefetch's warp on the predicted grid is shifted onto the refined WCS when the
    two differ by a translation (:func:`apdask.pipeline.template.shift_template`);
    otherwise the tiles are warped here.
    """
    t0 = time.time()
    science = calibrated.exposure
    ny, nx = science.shape
    timings = dict(prewarped.timings)
    if prewarped.exposure is not None:
        tmpl, figures = shift_template(
            prewarped.exposure, science.wcs, (ny, nx),
            max_residual_px=cfg.template.max_residual_px,
        )  # fmt: skip
        if tmpl is not None:
            _warn_coverage(science, float(tmpl.meta["coverage"]))
            timings["warp"] = time.time() - t0
            return Warped(tmpl, coverage=float(tmpl.meta["coverage"]), timings=timings,
                          method="shift", shift=figures)  # fmt: skip
        log.info(
            "%s: refined WCS departs from the predicted one by %.3f px beyond a shift of "
            "(%.1f, %.1f) px: warping the template tiles again",
            _where(science), figures["residual_px"], figures["shift_x"], figures["shift_y"],
        )  # fmt: skip
    ccd, visit, band = (science.meta.get(k) for k in ("detector_name", "visit", "band"))
    tiles = prewarped.tiles
    if tiles is None:
        tiles = _template_tiles(repo, detector, str(band), header.ra, header.dec, header.rotpa)
    try:
        tmpl = warp_template(tiles, science.wcs, (ny, nx))
    except NoTemplateCoverageError as e:
        ra, dec = science.wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
        msg = (
            f"CCD {ccd}, visit {visit}: no {band}-band template covers it: {e}; ingest a "
            f"template tile around RA {float(ra):.4f}, Dec {float(dec):.4f} with "
            "`apdask butler ingest-template`"
        )
        raise NoTemplateCoverageError(msg) from None
    coverage = float(tmpl.meta["coverage"])
    _warn_coverage(science, coverage)
    if tmpl.psf is None:  # the template's PSF, here: beside the science image's
        try:
            tmpl = tmpl.copy_with(psf=estimate_psf(tmpl))
        except PsfFitError as e:
            raise PsfFitError(f"{_where(science)}: template: {e}") from None
    timings["warp"] = time.time() - t0
    return Warped(tmpl, coverage=coverage, timings=timings)


def _warn_coverage(science: Exposure, coverage: float) -> None:
    if coverage < 1.0:
        ccd, visit, band = (science.meta.get(k) for k in ("detector_name", "visit", "band"))
        log.warning(
            "visit %s CCD %s: the %s-band template covers only %.1f%% of the CCD; the rest "
            "is masked NO_DATA and not searched for DIASources",
            visit, ccd, band, 100.0 * coverage,
        )  # fmt: skip


@per_ccd
def science_psf_task(calibrated: Calibrated) -> Calibrated:
    """The science image's PSF model and cosmic-ray mask.

    It needs no template, so it runs beside the warp (``psf-<visit>-<ccd>``).
    """
    t0 = time.time()
    science = calibrated.exposure
    try:
        # the calibrate stage's star search, when made with the PSF's FWHM guess
        peaks = psf_star_search(science, calibrated.peaks)
        model = estimate_psf_model(science, peaks=peaks)
        science = science.copy_with(psf=model.mean, psf_model=model)
        fwhm = sharpest_fwhm_px(model.psfs)
        # the search's bright pixels: the only ones the first CR pass need test
        science = mask_cosmic_rays(
            science, fwhm, background=peaks.bkg, above=peaks.bright,
            above_nsigma=peaks.bright_nsigma,
        )  # fmt: skip
    except PsfFitError as e:
        msg = f"{_where(science)}: science image: {e}"
        raise PsfFitError(msg) from None
    timings = {**calibrated.timings, "psf": time.time() - t0}
    # the image has changed (cosmic rays repaired): the search is not handed on
    return dataclasses.replace(calibrated, exposure=science, timings=timings, peaks=None)


@per_ccd
def science_task(psf: Calibrated, astrom: Calibrated) -> Calibrated:
    """The science image of :func:`science_psf_task` (PSF model, cosmic rays masked) on
    the refined WCS of :func:`astrometry_task`: the two ran side by side."""
    exposure = psf.exposure.copy_with(wcs=astrom.exposure.wcs)
    timings = {**astrom.timings, **psf.timings}
    return Calibrated(exposure, astrometry=astrom.astrometry, timings=timings)


@per_ccd
def subtract_task(science: Calibrated, warped: Warped, cfg: PipelineConfig) -> Subtraction:
    """The PSF-matched, decorrelated difference of the science image (with its PSF model
    and cosmic rays masked, :func:`science_psf_task`) and the warped template."""
    t0 = time.time()
    try:
        diff, info = subtract(science.exposure, warped.exposure, **dataclasses.asdict(cfg.subtract))
    except PsfFitError as e:
        raise PsfFitError(f"{_where(science.exposure)}: {e}") from None
    timings = {"subtract": time.time() - t0}
    return Subtraction(science.exposure, warped.exposure, diff, info, timings=timings)


def _where(science: Exposure) -> str:
    ccd = science.meta.get("detector_name", science.meta.get("detector"))
    return f"CCD {ccd}, visit {science.meta.get('visit')}"


@per_ccd
def detect_task(
    sub: Subtraction, visit: int, detector: Detector, band: str, header: RawHeader,
    cfg: PipelineConfig,
) -> Measurement:  # fmt: skip
    """Detect and measure DIASources on the difference image."""
    t0 = time.time()
    diff = sub.difference
    matched = matched_filter(diff)
    dets = detect_sources(
        diff, threshold_sigma=cfg.detection.threshold_sigma, n_pixels=cfg.detection.n_pixels,
        matched=matched,
    )  # fmt: skip
    # the QA figures of the images alone: in a thread, beside the measurement (which
    # runs no parallel pass)
    figures = in_thread(image_figures, diff, sub.info, matched)
    table = measure_sources(
        diff, sub.science, sub.template, dets,
        visit=visit, detector=detector.id, band=band, mjd=header.mjd, matched=matched,
        aperture_radius=cfg.measurement.aperture_radius,
    )  # fmt: skip
    # subtraction QA (docs/real-data.md): a failed check fails this CCD, a warning is logged
    qa = assess(diff, sub.info, table, sub.science, sub.template, matched=matched,
                thresholds=dict(cfg.qa), figures=figures())  # fmt: skip
    enforce(qa, where=f"CCD {detector.name}, visit {visit}", log=log)
    flag_sources(table, qa)  # a warned CCD: every DiaSource carries pixelFlags_suspect
    return Measurement(table, timings={"detect+measure": time.time() - t0}, qa=qa)
