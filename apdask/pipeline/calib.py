"""The raw-calibration pipeline (DMTN-092 §2.3): verify one bias, dark, flat or CBP frame.

It is started at startIntegration with the image's *intent*, the CCD, any filter in
place, the anticipated exposure time, the distributor and the image name; there is
no nextVisit.  Everything else comes from the headers.  :func:`process_calib`

1. fetches the raw through the distributor (blocking, with the usual timeout) and
   checks its header against the invocation (DETNAME, IMGTYPE, FILTBAND);
2. runs ISR as far as the intent allows (:func:`apdask.isr.isr_arrays`):

   ======== ================================== ==========================
   intent   ISR steps                          frame units
   ======== ================================== ==========================
   bias     overscan, gain                     electrons
   dark     overscan, gain, bias; ÷ DARKTIME   electrons per second
   flat/cbp overscan, gain, bias, dark         normalised (median ratio 1)
   ======== ================================== ==========================

3. compares the frame with the current master calibration of the same kind
   (:meth:`apdask.butler.Butler.get_calib`) and computes per-amplifier metrics;
4. gives a pass/fail verdict against thresholds from ``apdask.calib.*``;
5. writes a JSON report into the Butler repository
   (``<repo>/calib-reports/<intent>/<instrument>_<exposure>_<ccd>.json``) and
   publishes it to a metrics sink: ``file://PATH`` (JSON Lines, the default
   ``<repo>/calib-reports/metrics.jsonl``) or ``kafka://HOST:PORT/TOPIC``.

The metrics are defined in ``docs/operations.md``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from typing import Any
from urllib.parse import urlparse

import dask
import numpy as np
from scipy import ndimage

from apdask import config
from apdask.core.camera import check_band
from apdask.core.stats import robust_sigma
from apdask.exceptions import ApdaskError, ConfigurationError, HeaderMismatchError

__all__ = [
    "INTENTS",
    "MetricsDeliveryError",
    "amp_metrics",
    "process_calib",
    "publish_metrics",
    "calib_frame",
]

log = logging.getLogger(__name__)

#: Intents the raw-calibration pipeline accepts, and the IMGTYPE each expects.
INTENTS = {"bias": "BIAS", "dark": "DARK", "flat": "FLAT", "cbp": "CBP"}
#: Master calibration each intent is compared with.
_MASTER = {"bias": "bias", "dark": "dark", "flat": "flat", "cbp": "flat"}
_THRESHOLD_KEYS = (
    "hot_nsigma", "outlier_nsigma", "dead_fraction", "max_hot_fraction", "max_dead_fraction",
    "max_outlier_fraction", "max_read_noise_e", "max_bias_offset_e", "max_dark_excess",
    "max_flat_ratio_dev",
)  # fmt: skip


class MetricsDeliveryError(ApdaskError):
    """The calibration metrics could not be published; they were spooled to a file."""

    exit_code = 74  # EX_IOERR


def _thresholds(overrides=None):
    out = {k: float(config.get(f"calib.{k}")) for k in _THRESHOLD_KEYS}
    for k, v in (overrides or {}).items():
        if k not in out:
            msg = f"unknown calibration threshold {k!r}; use one of {', '.join(_THRESHOLD_KEYS)}"
            raise ValueError(msg)
        out[k] = float(v)
    return out


def _robust_sigma(x):
    if x.size == 0:
        return float("nan")
    return float(robust_sigma(x))


def _read_noise_e(segment, amp):
    """Read noise (e⁻) from the serial overscan: robust σ after removing the row level."""
    from apdask.io.raw import overscan

    osc = np.asarray(overscan(segment, amp), np.float64)
    if osc.size == 0:
        return None
    row = ndimage.uniform_filter1d(np.median(osc, axis=1), 15, mode="nearest")
    return _robust_sigma(osc - row[:, None]) * amp.gain


def amp_metrics(
    frame: np.ndarray,
    master: np.ndarray,
    good: np.ndarray,
    intent: str,
    read_noise_e: float | None = None,
    thresholds: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Metrics and verdict of one amplifier's processed frame against its master.

    Parameters
    ----------
    frame, master : numpy.ndarray
        The amplifier's section of the processed frame and of the master calibration,
        in the units of the intent (e⁻ for bias, e⁻/s for dark, normalised for flat).
    good : numpy.ndarray of bool
        Pixels to use (not saturated, no data, or known bad).
    intent : {"bias", "dark", "flat", "cbp"}
    read_noise_e : float, optional
        Read noise measured from the overscan.
    thresholds : dict, optional
        Overrides of ``apdask.calib.*``.

    Returns
    -------
    dict
        ``mean``, ``median``, ``sigma`` (1.4826 × MAD) of the frame; ``read_noise_e``;
        ``master_ratio`` (flat: median of frame/master; dark: median frame / median
        master; bias: None) and ``master_diff`` (median of frame − master); counts
        ``n_hot``, ``n_dead`` (flat and CBP only, else None), ``n_outlier`` and
        ``n_pixels``; ``verdict`` (``"pass"``/``"fail"``) and ``failures``.
    """
    th = _thresholds(thresholds)
    x = np.asarray(frame, np.float64)[good]
    m = np.asarray(master, np.float64)[good]
    n = int(x.size)
    flat_like = intent in ("flat", "cbp")
    if flat_like:
        ok = np.isfinite(m) & (m > 0)
        resid = np.where(ok, x / np.where(ok, m, 1.0), np.nan)[ok]
    else:
        resid = x - m
    r_med = float(np.median(resid)) if resid.size else float("nan")
    r_sig = _robust_sigma(resid)
    dev = resid - r_med
    out = {
        "n_pixels": n,
        "mean": float(np.mean(x)) if n else None,
        "median": float(np.median(x)) if n else None,
        "sigma": _robust_sigma(x) if n else None,
        "read_noise_e": None if read_noise_e is None else float(read_noise_e),
        "master_diff": float(np.median(x - m)) if n else None,
        "master_ratio": None,
        "n_hot": int(np.sum(dev > th["hot_nsigma"] * r_sig)),
        "n_dead": int(np.sum(x < th["dead_fraction"])) if flat_like else None,
        "n_outlier": int(np.sum(np.abs(dev) > th["outlier_nsigma"] * r_sig)),
    }
    if flat_like:
        out["master_ratio"] = r_med
    elif intent == "dark" and n and np.mean(m) > 0:
        out["master_ratio"] = float(np.mean(x) / np.mean(m))
    out["failures"] = _failures(out, intent, th)
    out["verdict"] = "fail" if out["failures"] else "pass"
    return out


def _failures(mt, intent, th):
    fails = []
    n = max(mt["n_pixels"], 1)

    def check(bad, text, key):
        if bad:
            fails.append(f"{text} (apdask.calib.{key}={th[key]:g})")

    if mt["n_pixels"] == 0:
        return ["no usable pixels"]
    rn = mt["read_noise_e"]
    check(rn is not None and rn > th["max_read_noise_e"], f"read noise {rn:.2f} e-",
          "max_read_noise_e")  # fmt: skip
    check(mt["n_hot"] / n > th["max_hot_fraction"], f"{mt['n_hot']} hot pixels",
          "max_hot_fraction")  # fmt: skip
    check(mt["n_outlier"] / n > th["max_outlier_fraction"], f"{mt['n_outlier']} outliers",
          "max_outlier_fraction")  # fmt: skip
    if intent in ("flat", "cbp"):
        check(mt["n_dead"] / n > th["max_dead_fraction"], f"{mt['n_dead']} dead pixels",
              "max_dead_fraction")  # fmt: skip
        ratio = mt["master_ratio"]
        check(not abs(ratio - 1.0) <= th["max_flat_ratio_dev"],
              f"flat/master ratio {ratio:.4f}", "max_flat_ratio_dev")  # fmt: skip
    elif intent == "dark":
        check(mt["master_diff"] > th["max_dark_excess"],
              f"dark current {mt['master_diff']:.4f} e-/s above the master",
              "max_dark_excess")  # fmt: skip
    else:
        check(abs(mt["master_diff"]) > th["max_bias_offset_e"],
              f"bias offset {mt['master_diff']:.2f} e- from the master",
              "max_bias_offset_e")  # fmt: skip
    return fails


def calib_frame(
    raw: Any, intent: str, masters: dict[str, Any], darktime: float
) -> tuple[np.ndarray, np.ndarray]:
    """Run ISR as far as ``intent`` allows; return (frame, mask) in the intent's units.

    Parameters
    ----------
    raw : apdask.rawio.RawExposure
    intent : {"bias", "dark", "flat", "cbp"}
    masters : dict
        ``bias``, ``dark`` (and ``flat`` for flat/CBP) assembled master arrays.
    darktime : float
        DARKTIME of the frame, s.

    Returns
    -------
    frame : numpy.ndarray
        float64 assembled frame: e⁻ (bias), e⁻/s (dark) or normalised (flat, CBP:
        scaled so that the median of frame / master flat over the CCD is 1).
    mask : numpy.ndarray
        uint32 ISR mask.
    """
    from apdask.pipeline.isr import isr_arrays

    det = raw.detector
    if intent == "bias":
        img, _, mask = isr_arrays(raw.amps, det)
    elif intent == "dark":
        img, _, mask = isr_arrays(raw.amps, det, bias=masters["bias"])
    else:
        img, _, mask = isr_arrays(raw.amps, det, bias=masters["bias"], dark=masters["dark"],
                                  darktime=darktime)  # fmt: skip
    img, mask = dask.compute(img, mask, scheduler="threads")
    frame = np.asarray(img, np.float64)
    if intent == "dark":
        if not darktime > 0:
            msg = f"dark frame {raw.path} has DARKTIME={darktime}; a dark needs DARKTIME > 0"
            raise HeaderMismatchError(msg)
        frame /= darktime
    elif intent in ("flat", "cbp"):
        flat = np.asarray(masters["flat"], np.float64)
        ok = (mask & _ignore_bits()) == 0
        ok &= np.isfinite(flat) & (flat > 0)
        scale = np.median(frame[ok] / flat[ok]) if ok.any() else 0.0
        if not scale > 0:
            msg = f"{intent} frame {raw.path} has no signal (median {scale:g} e-)"
            raise HeaderMismatchError(msg)
        frame /= scale
    return frame, mask


def _known_defects(masters):
    """Pixels the masters already flag (hot in the dark, dead or bad in the flat)."""
    from apdask.pipeline.isr import DARK_HOT, FLAT_BAD

    known = np.zeros(np.shape(masters["bias"]), bool)
    if "dark" in masters:
        dark = np.asarray(masters["dark"])
        known |= ~np.isfinite(dark) | (dark > DARK_HOT)
    if "flat" in masters:
        flat = np.asarray(masters["flat"])
        known |= ~np.isfinite(flat) | (flat <= FLAT_BAD)
    return known


def _ignore_bits():
    from apdask.core.exposure import MASK

    return MASK["SAT"] | MASK["NO_DATA"] | MASK["BAD"]


def _check_header(meta, detector, intent, band, exptime, name):
    from apdask.io.raw import effective_exptime

    if meta.detector_name != detector.name:
        msg = (f"raw {name} has DETNAME={meta.detector_name} but --ccd {detector.name} was "
               "given; pass the image of that CCD")  # fmt: skip
        raise HeaderMismatchError(msg)
    if meta.imgtype != INTENTS[intent]:
        msg = (f"raw {name} has IMGTYPE={meta.imgtype} but --intent {intent} was given; "
               f"pass --intent {meta.imgtype.lower()} or the right image")  # fmt: skip
        raise HeaderMismatchError(msg)
    if band is not None and meta.band != band:
        msg = f"raw {name} has FILTBAND={meta.band} but --filter {band} was given"
        raise HeaderMismatchError(msg)
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


def _atomic_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=float)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _append_line(path, line):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(line + "\n")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_UN)


def publish_metrics(
    report: dict[str, Any], uri: str, spool: str | None = None, timeout: float = 10.0
) -> str:
    """Publish a calibration report to a metrics sink.

    Parameters
    ----------
    report : dict
        The report of :func:`process_calib` (one JSON message).
    uri : str
        ``file://PATH`` (or a plain path): append one JSON line to PATH.
        ``kafka://HOST:PORT/TOPIC``: produce one message, key ``<instrument>/<ccd>``,
        with an idempotent producer, and wait for its delivery report.
    spool : str, optional
        JSON Lines file a failed Kafka delivery is appended to.
    timeout : float, optional
        Seconds to wait for Kafka delivery.

    Returns
    -------
    str
        Where the metrics went.

    Raises
    ------
    MetricsDeliveryError
        If Kafka did not acknowledge the message (it is then in ``spool``).
    ConfigurationError
        For an unusable URI.
    """
    line = json.dumps(report, default=float, separators=(",", ":"))
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "kafka":
        topic = parsed.path.lstrip("/")
        if not parsed.netloc or not topic or "/" in topic:
            msg = f"metrics sink {uri!r} must look like kafka://HOST:PORT/TOPIC"
            raise ConfigurationError(msg)
        return _produce(parsed.netloc, topic, report, line, spool, timeout)
    if parsed.scheme not in ("", "file"):
        msg = f"unsupported metrics sink {uri!r}; use file://PATH or kafka://HOST:PORT/TOPIC"
        raise ConfigurationError(msg)
    path = parsed.path if parsed.scheme == "file" else uri
    _append_line(path, line)
    return f"file://{os.path.abspath(path)}"


def _produce(
    servers: str,
    topic: str,
    report: dict[str, Any],
    line: str,
    spool: str | None,
    timeout: float,
) -> str:
    from confluent_kafka import KafkaException, Producer

    errors: list[str] = []
    try:
        producer = Producer({
            "bootstrap.servers": servers, "enable.idempotence": True, "acks": "all",
            "message.timeout.ms": int(timeout * 1000),
        })  # fmt: skip
        key = f"{report.get('instrument')}/{report.get('detector')}"

        def on_delivery(err: Any, _msg: Any) -> None:
            if err:
                errors.append(str(err))

        producer.produce(topic, value=line.encode(), key=key.encode(), on_delivery=on_delivery)
        left = producer.flush(timeout)
    except (KafkaException, BufferError) as exc:
        errors.append(str(exc))
        left = 1
    if left or errors:
        where = ""
        if spool:
            _append_line(spool, line)
            where = f"; the report was spooled to {spool}"
        msg = (f"calibration metrics were not delivered to kafka://{servers}/{topic} "
               f"({'; '.join(errors) or 'no acknowledgement'}){where}")  # fmt: skip
        raise MetricsDeliveryError(msg)
    return f"kafka://{servers}/{topic}"


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
        mt = amp_metrics(frame[sl], master[sl], good[sl], intent,
                         read_noise_e=_read_noise_e(seg, amp), thresholds=th)  # fmt: skip
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
    from apdask.io.butler import Butler
    from apdask.io.distributor import open_distributor
    from apdask.io.raw import read_raw

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
