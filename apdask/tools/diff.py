"""``apdask diff``: difference imaging of any calibrated FITS pair.

:func:`diff` runs the pipeline's own stages from calibration on, in the order
``process-ccd`` runs them (:mod:`apdask.visit`): PSF model and cosmic rays of the
science image, template PSF, :func:`apdask.subtract.subtract`, matched filter,
:func:`apdask.detect.detect_sources`, :func:`apdask.detect.measure_sources`, then
the subtraction QA (:mod:`apdask.diffqa`).  :func:`publish` associates the
DiaSources with a PPDB, stores them and sends their alerts with the pipeline's own
output steps (``--ppdb``/``--alerts``; :mod:`apdask.tools._diff_ppdb`).
:func:`write_outputs` writes ``difference.fits``, ``diaSources.ecsv`` and
``report.json`` into a temporary folder and renames it to ``--out``: a failure
writes nothing.  See ``docs/real-data.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table

from apdask import config
from apdask.core.exposure import Exposure, mask_plane_cards
from apdask.core.jsonsafe import json_ready
from apdask.core.records import SubtractionInfo
from apdask.exceptions import PsfFitError, UsageError
from apdask.io.foreign import read_exposure, read_psf
from apdask.pipeline.isr import mask_cosmic_rays
from apdask.pipeline.measure.detection import detect_sources, matched_filter
from apdask.pipeline.measure.sources import measure_sources
from apdask.pipeline.psf import estimate_psf, estimate_psf_model, sharpest_fwhm_px
from apdask.pipeline.quality import assess, enforce, flag_sources, snr_sigma
from apdask.pipeline.register import match_template
from apdask.pipeline.subtract.difference import subtract
from apdask.tools._diff_ppdb import check_publishable, check_targets, diff_ids, publish_sources

__all__ = ["diff", "DiffResult", "publish", "write_outputs", "run_cli"]

#: Units of the DiaSource columns written to ``diaSources.ecsv`` (DPDD / APDB schema).
_UNITS = {
    "midpointMjdTai": "d", "ra": "deg", "dec": "deg", "raErr": "deg", "decErr": "deg",
    "x": "pix", "y": "pix", "xErr": "pix", "yErr": "pix",
    "ixx": "pix2", "iyy": "pix2", "ixy": "pix2", "ixxPSF": "pix2", "iyyPSF": "pix2",
    "ixyPSF": "pix2", "bboxSize": "pix",
}  # fmt: skip
_FLUX_COLS = ("psfFlux", "psfFluxErr", "apFlux", "apFluxErr", "scienceFlux", "scienceFluxErr",
              "templateFlux", "templateFluxErr")  # fmt: skip


@dataclass
class DiffResult:
    """What :func:`diff` returns: the images, the DiaSources and the report."""

    difference: Exposure
    sources: Table
    report: dict[str, Any]
    science: Exposure
    template: Exposure
    info: SubtractionInfo


def _exposure(x, options, psf):
    if isinstance(x, str | os.PathLike):
        return read_exposure(x, psf=psf, **(options or {}))
    if psf is not None:
        stamp = read_psf(psf) if isinstance(psf, str | os.PathLike) else np.asarray(psf, float)
        x = x.copy_with(psf=stamp / stamp.sum())
    return x


def diff(
    science: str | os.PathLike[str] | Exposure,
    template: str | os.PathLike[str] | Exposure,
    *,
    science_options: Mapping[str, Any] | None = None,
    template_options: Mapping[str, Any] | None = None,
    science_psf: str | os.PathLike[str] | np.ndarray | None = None,
    template_psf: str | os.PathLike[str] | np.ndarray | None = None,
    enforce_qa: bool = True,
    correct_noise: bool = True,
) -> DiffResult:
    """Difference image, DiaSources and QA of a calibrated science/template pair.

    Parameters
    ----------
    science, template : str, os.PathLike or apdask.image.Exposure
        FITS files (read with :func:`apdask.foreign.read_exposure`) or exposures.
    science_options, template_options : dict, optional
        Keyword arguments of :func:`~apdask.foreign.read_exposure` (``gain``,
        ``zero_point``, ``unit``, ``noise``...).
    science_psf, template_psf : str or numpy.ndarray, optional
        PSF models (e.g. WebbPSF FITS images); default estimated from the stars.
    enforce_qa : bool, optional
        Raise :class:`~apdask.exceptions.SubtractionQualityError` when the QA fails.
    correct_noise : bool, optional
        Rescale the difference's variance by the square of its S/N map's robust σ when
        that is off by more than ``apdask.subtract.qa.snr_sigma_correct`` (correlated
        noise of resampled inputs); reported as ``variance_correction``.

    Returns
    -------
    DiffResult

    Raises
    ------
    apdask.exceptions.InputImageError
        Unusable inputs (no celestial WCS, unknown units, all NaN, zero variance).
    apdask.exceptions.NoOverlapError
        The template does not overlap the science image.
    apdask.exceptions.PsfFitError
        Too few stars for a PSF or a kernel.
    apdask.exceptions.SubtractionQualityError
        The subtraction failed a QA check (``apdask.subtract.qa.*``).
    """
    t0 = time.perf_counter()
    sci = _exposure(science, science_options, science_psf)
    tpl0 = _exposure(template, template_options, template_psf)
    tpl = match_template(tpl0, sci)
    if tpl.psf is None and tpl0.psf is not None:
        tpl = tpl.copy_with(psf=tpl0.psf)
    t1 = time.perf_counter()
    step = "science image: "
    try:  # as visit._subtract
        if sci.psf is None:
            model = estimate_psf_model(sci)
            sci = sci.copy_with(psf=model.mean, psf_model=model)
            sci = mask_cosmic_rays(sci, sharpest_fwhm_px(model.psfs))
        else:
            sci = mask_cosmic_rays(sci, sharpest_fwhm_px(sci.psf[None]))
        if tpl.psf is None:
            step = "template: "
            tpl = tpl.copy_with(psf=estimate_psf(tpl))
        step = ""
        difference, info = subtract(sci, tpl)
    except PsfFitError as e:
        raise PsfFitError(f"{step}{e}") from None
    t2 = time.perf_counter()
    matched = matched_filter(difference)  # as visit._detect
    # resampled (drizzled, SWarped) inputs have correlated noise: their variance planes
    # hold the per-pixel variance, below the noise at the PSF scale that detection sees.
    # The S/N map's robust σ measures the ratio; the variance is rescaled by its square
    sig = snr_sigma(matched)
    if correct_noise and sig is not None and abs(sig - 1.0) > float(config.get(
            "subtract.qa.snr_sigma_correct")):  # fmt: skip
        info = dataclasses.replace(info, variance_correction=sig * sig, snr_map_sigma_before=sig)
        difference = difference.copy_with(variance=difference.variance * np.float32(sig * sig))
        matched = matched_filter(difference)
    dets = detect_sources(difference, matched=matched)
    sources = measure_sources(
        difference, sci, tpl, dets, visit=int(sci.meta.get("visit", 0)),
        detector=int(sci.meta.get("detector", 0)), band=str(sci.meta.get("band", "")),
        mjd=float(sci.meta.get("mjd", float("nan"))), matched=matched,
    )  # fmt: skip
    t3 = time.perf_counter()
    qa = assess(difference, info, sources, sci, tpl, matched=matched)
    flag_sources(sources, qa)  # a warned subtraction: pixelFlags_suspect on every row
    report = {
        "science": _describe(sci),
        "template": {
            **_describe(tpl),
            "resampled": bool(tpl.meta.get("resampled")),
            "coverage": tpl.meta.get("coverage"),
        },  # fmt: skip
        "qa": qa,
        "subtraction": info.as_dict(),
        "n_sources": len(sources),
        "snr_map_robust_sigma": qa["snr_map_sigma"],
        "n_pixels_abs_snr_above_5": int(
            np.count_nonzero((np.abs(matched[1]) > 5) & ~np.asarray(matched[2]))
        ),  # fmt: skip
        "timing": {"load+register": t1 - t0, "psf+subtract": t2 - t1, "detect+measure": t3 - t2},
    }
    if enforce_qa:
        enforce(qa)
    return DiffResult(difference, sources, json_ready(report), sci, tpl, info)


def _describe(e):
    keys = ("path", "band", "mjd", "unit", "input_unit", "zero_point", "gain", "saturation",
            "variance_source", "exptime")  # fmt: skip
    out = {k: e.meta.get(k) for k in keys}
    out["shape"] = list(e.shape)
    return out


def _source_table(sources, difference, qa=None):
    tab = Table(sources, copy=True)
    unit = difference.meta.get("unit", "nJy")
    funit = "nJy" if unit == "nJy" else {"count": "ct", "electron": "electron"}.get(unit, unit)
    for c in tab.colnames:
        if c in _UNITS:
            tab[c].unit = _UNITS[c]
        elif c in _FLUX_COLS:
            tab[c].unit = funit
    if qa is not None:  # a warned subtraction is flagged on its DiaSources' table
        tab.meta["qa_status"] = qa["status"]
        tab.meta["qa_reasons"] = list(qa["reasons"])
    tab.meta["comments"] = [
        "apdask diff DiaSources: official DiaSource column names (DPDD); x, y are 0-based "
        "pixel coordinates of the science image with pixel centres on integers"
    ]
    return tab


def _difference_hdus(result):
    d = result.difference
    head = d.wcs.to_header(relax=True) if d.wcs is not None else fits.Header()
    head["BUNIT"] = d.meta.get("unit", "nJy")
    hdus = [fits.PrimaryHDU()]
    hdus.append(fits.ImageHDU(np.asarray(d.image, np.float32), head, name="IMAGE"))
    hdus.append(fits.ImageHDU(np.asarray(d.variance, np.float32), head, name="VARIANCE"))
    mh = head.copy()
    del mh["BUNIT"]

    for key, value, comment in mask_plane_cards():
        mh[key] = (value, comment)
    hdus.append(fits.ImageHDU(np.asarray(d.mask, np.int32), mh, name="MASK"))
    hdus.append(fits.ImageHDU(np.asarray(d.psf, np.float32), name="PSF"))
    hdus.append(fits.ImageHDU(np.asarray(result.info.kernel, np.float32), name="KERNEL"))
    return fits.HDUList(hdus)


def publish(
    result: DiffResult,
    ppdb: str,
    alerts: str,
    *,
    visit: int | None = None,
    detector: int | None = None,
) -> DiffResult:
    """Associate ``result``'s DiaSources with a PPDB, store them and send their alerts.

    The pipeline's own steps (:mod:`apdask.pipeline.outputs`): forced photometry at
    the known DiaObjects of the image's sky region and association, alerts with
    history and cutouts, one PPDB transaction, then the sink and the done record.  A
    (visit, detector) already done is neither stored nor sent again.

    Parameters
    ----------
    result : DiffResult
        What :func:`diff` returned (fluxes in nJy: give zero points for counts).
    ppdb : str
        An existing PPDB: ``sqlite:///PATH``, ``postgresql://...`` or a dax_apdb
        config file (create it with ``apdask ppdb create URL``).
    alerts : str
        ``file://DIR`` (or a directory) or ``kafka://HOST:PORT/TOPIC[?spool_dir=...]``.
    visit, detector : int, optional
        Default the science header's ``EXPNUM`` and ``CCDNUM``.

    Returns
    -------
    DiffResult
        ``sources`` with ``diaSourceId`` and ``diaObjectId``; ``report["ppdb"]`` with
        the counts and the sink's record.

    Raises
    ------
    UsageError, UnknownFilterError
        No visit or detector id, counts without zero points, a band not in ugrizy, no
        MJD.
    PpdbError
        The PPDB cannot be read or written: nothing stored, no alerts.
    AlertDeliveryError
        The sink cannot take the alerts: nothing stored.
    """
    visit, detector = diff_ids(result.science, visit, detector)
    check_publishable(result.science, result.template)
    sources, summary = publish_sources(
        result.science, result.template, result.difference, result.info, result.sources,
        result.report.get("qa"), ppdb=ppdb, alerts=alerts, visit=visit, detector=detector,
    )  # fmt: skip
    report = json_ready({**result.report, "ppdb": summary})
    return dataclasses.replace(result, sources=sources, report=report)


def write_outputs(result: DiffResult, out: str | os.PathLike[str]) -> str:
    """Write ``difference.fits``, ``diaSources.ecsv`` and ``report.json`` into ``out``.

    Written into a temporary folder beside ``out`` that is renamed to it at the end, so
    that a failure leaves nothing; an existing ``out`` is replaced only then.
    """
    out = os.path.abspath(os.fspath(out))
    parent = os.path.dirname(out) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".apdask-diff-", dir=parent)
    try:
        _difference_hdus(result).writeto(os.path.join(tmp, "difference.fits"))
        _source_table(result.sources, result.difference, result.report.get("qa")).write(
            os.path.join(tmp, "diaSources.ecsv"), format="ascii.ecsv"
        )
        with open(os.path.join(tmp, "report.json"), "w") as f:
            json.dump(result.report, f, indent=1, allow_nan=False)
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=".apdask-diff-old-", dir=parent)
            os.rename(out, os.path.join(old, "x"))
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# --------------------------------------------------------------------------------------
# command line (apdask diff)


def _options(args: argparse.Namespace, who: str) -> dict[str, Any]:
    s = who[0]
    given = {
        "gain": getattr(args, f"{s}_gain"),
        "zero_point": getattr(args, f"{s}_zp"),
        "unit": getattr(args, f"{s}_unit"),
        "noise": getattr(args, f"{s}_noise"),
        "saturation": getattr(args, f"{s}_saturation"),
        "band": args.band,
    }
    if who == "science":
        given.update(visit=args.visit, detector=args.detector, mjd=args.mjd)
    return {k: v for k, v in given.items() if v is not None}


def _sink(uri: str) -> str:
    """A plain directory as an absolute ``file://`` URI; other URIs as given."""
    return uri if "://" in uri else "file://" + os.path.abspath(uri)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``apdask diff``; returns the exit status (0: pass or warn)."""
    opts = {who: _options(args, who) for who in ("science", "template")}
    science: Any = args.science
    template: Any = args.template
    to_ppdb = args.ppdb is not None or args.alerts is not None
    if to_ppdb:  # every check that needs no pixel work, before the subtraction
        if args.ppdb is None or args.alerts is None:
            msg = (
                "--ppdb and --alerts go together (association stores the DiaSources and "
                "sends their alerts): give both, e.g. --ppdb sqlite:///ppdb/apdb.db "
                "--alerts alerts/"
            )
            raise UsageError(msg)
        science = read_exposure(args.science, **opts["science"])
        template = read_exposure(args.template, **opts["template"])
        visit, detector = diff_ids(science, args.visit, args.detector)
        check_publishable(science, template)
        check_targets(args.ppdb, _sink(args.alerts))
        science = science.copy_with(meta={**science.meta, "visit": visit, "detector": detector})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = diff(
            science, template, science_options=opts["science"],
            template_options=opts["template"], science_psf=args.science_psf,
            template_psf=args.template_psf,
        )  # fmt: skip
    for w in caught:  # QA and coverage warnings: stderr (and the report), not a failure
        print(f"apdask: warning: {w.message}", file=sys.stderr)
    if to_ppdb:  # PPDB and alerts first: a failure there leaves no --out behind
        result = publish(result, args.ppdb, _sink(args.alerts), visit=visit, detector=detector)
    out = write_outputs(result, args.out)
    qa = result.report["qa"]
    summary = {"out": out, "n_sources": result.report["n_sources"], "qa_status": qa["status"]}
    summary["reasons"] = qa["reasons"]
    if to_ppdb:
        pp = result.report["ppdb"]
        keys = ("visit", "detector", "n_new_objects", "n_associated", "n_alerts", "stored",
                "already_done", "alert_file", "alerts_delivered", "alerts_spooled")  # fmt: skip
        summary.update({k: pp.get(k) for k in keys if k in pp})
        if pp["already_done"]:
            print(
                f"apdask: visit {visit} detector {detector} is already stored and its alerts "
                "sent: nothing stored or sent again (a new exposure needs a new --visit)",
                file=sys.stderr,
            )
    print(json.dumps(summary))
    return 0
