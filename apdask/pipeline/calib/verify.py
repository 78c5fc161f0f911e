"""Verification of one raw calibration frame: fetch, check, measure, report."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import dask

from apdask import config
from apdask.core.camera import check_band
from apdask.exceptions import ConfigurationError
from apdask.io.butler import Butler
from apdask.io.distributor import open_distributor
from apdask.io.raw import effective_exptime, read_raw
from apdask.io.raw_header import check_raw_header
from apdask.pipeline.calib.frames import (
    _MASTER,
    INTENTS,
    _ignore_bits,
    _known_defects,
    _read_noise_e,
    _thresholds,
    amp_metrics,
    calib_frame,
)
from apdask.pipeline.calib.metrics import _atomic_json, publish_metrics

__all__ = ["process_calib"]

log = logging.getLogger("apdask.pipeline.calib")


def _check_header(meta, detector, intent, band, exptime, name):
    """Check the raw's header (:func:`~apdask.io.raw_header.check_raw_header`); its exptime."""
    check_raw_header(meta, detector, band, name=name, imgtype=INTENTS[intent], intent=intent,
                     ccd_option=True)  # fmt: skip
    actual = effective_exptime(meta) if intent in ("flat", "cbp") else meta.exptime
    if exptime is not None and abs(actual - exptime) > 0.01 * max(exptime, 1e-9):
        log.warning(
            "%s: exposure time %.3f s from the header differs from the anticipated %.3f s "
            "by more than 1%%; using the header's",
            name,
            actual,
            exptime,
        )
    return actual


def _check_arguments(intent: str, band: str | None, exptime: float | None) -> str:
    """The intent in lower case, once intent, band and exposure time are checked."""
    intent = str(intent).lower()
    if intent not in INTENTS:
        msg = f"unknown intent {intent!r}; use --intent bias, dark, flat or cbp"
        raise ValueError(msg)
    if band is not None:
        check_band(band)
    elif intent in ("flat", "cbp"):
        msg = f"--intent {intent} needs --filter (the master flat is per band)"
        raise ValueError(msg)
    if exptime is not None and exptime < 0:
        msg = f"exposure time must be >= 0 s, got {exptime!r}; e.g. --exptime 30"
        raise ValueError(msg)
    return intent


def _amp_reports(
    raw: Any, det: Any, intent: str, masters: dict[str, Any], th: dict[str, float]
) -> list[dict[str, Any]]:
    """:func:`amp_metrics` of every amplifier of the calibrated frame, with its name."""
    frame, mask = calib_frame(raw, intent, masters, raw.meta.darktime)
    master = masters[_MASTER[intent]]
    good = ((mask & _ignore_bits()) == 0) & ~_known_defects(masters)
    segments = dask.compute(*raw.amps, scheduler="threads")
    amps = []
    for amp, seg in zip(det.amplifiers, segments, strict=True):
        sl = (slice(amp.y0, amp.y1), slice(amp.x0, amp.x1))
        mt = amp_metrics(
            frame[sl],
            master[sl],
            good[sl],
            intent,
            read_noise_e=_read_noise_e(seg, amp),
            thresholds=th,
        )
        amps.append({"amp": amp.name, **mt})
    return amps


def process_calib(
    intent: str,
    ccd: str,
    image: str,
    *,
    repo: str,
    distributor: str,
    band: str | None = None,
    exptime: float | None = None,
    metrics: str | None = None,
    timeout: float | None = None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Verify one raw calibration frame and publish its report (DMTN-092 §2.3).

    Parameters
    ----------
    intent : {"bias", "dark", "flat", "cbp"}
        What the frame was taken for; must match its IMGTYPE.
    ccd : str
        CCD name, e.g. ``R22_S11``.
    image : str
        Image name at the distributor.
    repo : str
        Butler repository (camera, master calibrations; the report goes here).
    distributor : str
        ``file://DIR`` or ``http://HOST:PORT``.
    band : str, optional
        Filter in place; required for flat and CBP (selects the master flat).
    exptime : float, optional
        Anticipated exposure time, s; the header's value is used, with a warning on a
        difference above 1 %.
    metrics : str, optional
        Metrics sink; default ``apdask.calib.metrics`` or
        ``file://<repo>/calib-reports/metrics.jsonl``.
    timeout : float, optional
        Seconds to wait for the image; default ``apdask.distributor.timeout``.
    thresholds : dict, optional
        Overrides of the ``apdask.calib.*`` thresholds.

    Returns
    -------
    dict
        The report: header facts, ``amplifiers`` (one :func:`amp_metrics` dict each,
        plus ``amp``), ``verdict``, ``failures``, ``report_path`` and ``metrics_sink``.

    Raises
    ------
    UnknownDetectorError, UnknownFilterError, ValueError
        Bad arguments (checked before anything is fetched).
    ImageTimeoutError, DistributorUnavailableError
        The image did not arrive.
    HeaderMismatchError
        DETNAME, IMGTYPE or FILTBAND contradict the invocation.
    ConfigurationError
        No repository, or no master calibration valid at the frame's date.
    MetricsDeliveryError
        Kafka did not take the metrics (the report is in the repository regardless).
    """
    t0 = time.time()
    intent = _check_arguments(intent, band, exptime)
    if repo is None or not os.path.isdir(os.path.join(repo, "butler.zarr")):
        msg = f"no Butler repository at {repo}; pass --repo DIR (made by `apdask simulate`)"
        raise ConfigurationError(msg)
    butler = Butler(repo)
    camera = butler.camera
    if camera is None:
        raise ConfigurationError(f"repository {repo} records no camera")
    det = camera[ccd]  # UnknownDetectorError names the valid CCDs
    timeout = float(config.get("distributor.timeout", timeout))
    path = open_distributor(distributor).get(image, timeout=timeout)
    t_fetched = time.time()
    raw = read_raw(path, camera=camera)
    meta = raw.meta
    actual_exptime = _check_header(meta, det, intent, band, exptime, image)
    mjd = meta.mjd_begin
    masters = {k: butler.get_calib(k, det.id, None, mjd) for k in ("bias", "dark")}
    if intent in ("flat", "cbp"):
        masters["flat"] = butler.get_calib("flat", det.id, meta.band, mjd)
    th = _thresholds(thresholds)
    amps = _amp_reports(raw, det, intent, masters, th)
    failures = [f"{a['amp']}: {f}" for a in amps for f in a["failures"]]
    report = {
        "kind": "calib-verification",
        "intent": intent,
        "instrument": camera.name,
        "detector": det.name,
        "detector_id": det.id,
        "image": image,
        "exposure_id": meta.exposure_id,
        "imgtype": meta.imgtype,
        "band": meta.band,
        "mjd": mjd,
        "exptime_anticipated": exptime,
        "exptime": actual_exptime,
        "darktime": meta.darktime,
        "units": {"bias": "e-", "dark": "e-/s"}.get(intent, "normalised"),
        "verdict": "fail" if failures else "pass",
        "failures": failures,
        "thresholds": th,
        "amplifiers": amps,
        "image_registered": t_fetched,
        "processing_s": time.time() - t_fetched,
        "wall_s": time.time() - t0,
        "created": time.time(),
    }
    out_dir = os.path.join(os.path.abspath(repo), "calib-reports")
    report_path = os.path.join(out_dir, intent, f"{camera.name}_{meta.exposure_id}_{det.name}.json")
    report["report_path"] = report_path
    sink = config.get("calib.metrics", metrics) or f"file://{out_dir}/metrics.jsonl"
    report["metrics_sink"] = sink
    _atomic_json(report_path, report)
    publish_metrics(report, sink, spool=os.path.join(out_dir, "spool.jsonl"))
    log.info("%s %s %s: %s", intent, det.name, image, report["verdict"])
    return report
