"""The nextVisit model and the visit graph: the one place that wires stages together.

``build_visit_graph`` returns a lazy ``dask.delayed`` object whose result is the
visit report.  For each CCD it builds an independent chain::

    prefetch (templates, calibs, PPDB history)      ─┐  no pixels needed
    fetch (blocking distributor get) → header check  │
      → ISR per amplifier chunk (dask.array)         │
      → calibrate + astrometry → warp template       │
      → subtract → detect + measure                  │
      → associate + PPDB store → alerts  ◄───────────┘
    gather → visit report

Building the graph reads no pixels and opens no database: every I/O call happens
inside a task.  Task keys are ``<stage>-<visit>-<detector>`` so per-stage timings
can be read off the scheduler's task stream.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import dask
import dask.array as da
import numpy as np

from . import config
from ._alloc import keep_freed_memory
from .camera import check_band, check_pointing, get_camera
from .exceptions import (
    ConfigurationError,
    HeaderMismatchError,
    NoTemplateCoverageError,
    PsfFitError,
    SubtractionQualityError,
)

__all__ = [
    "NextVisit",
    "build_visit_graph",
    "ccd_tasks",
    "check_raw_header",
    "visit_time_window",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NextVisit:
    """A nextVisit event, after Rubin's prompt-processing message.

    Attributes
    ----------
    instrument : str
        Camera name (``LSSTCam``, ``LSSTComCam``, ``TestCam``).
    groupId : str
        Unique id of the visit group; duplicates are processed once.
    visit : int
        Visit (exposure) id.
    position : tuple of float
        Boresight ``(ra, dec)`` in degrees.
    rotationAngle : float
        Camera rotation angle on the sky, degrees.
    filters : str
        Band ``u g r i z y``.
    duration : float
        Anticipated exposure time per image, seconds.
    nimages : int
        Number of snaps (1 or 2).
    detectors : tuple of str
        CCD names to process.
    timestamp : float
        Unix time of the announcement.
    mjd : float or None
        Anticipated exposure start, MJD TAI (informational).
    coordinateSystem : str
        Only ``"ICRS"`` is supported.
    """

    instrument: str
    groupId: str
    visit: int
    position: tuple
    rotationAngle: float
    filters: str
    duration: float
    nimages: int = 1
    detectors: tuple = field(default_factory=tuple)
    timestamp: float = 0.0
    mjd: float | None = None
    coordinateSystem: str = "ICRS"

    def __post_init__(self):
        camera = get_camera(self.instrument)
        check_pointing(*self.position)
        check_band(self.filters)
        for name in self.detectors:
            camera[name]  # raises UnknownDetectorError with the valid names
        if self.nimages not in (1, 2):
            msg = f"nimages must be 1 or 2, got {self.nimages!r}"
            raise ValueError(msg)
        if not self.duration > 0:
            msg = f"duration must be > 0 s, got {self.duration!r}"
            raise ValueError(msg)
        if self.coordinateSystem != "ICRS":
            msg = f"coordinateSystem must be ICRS, got {self.coordinateSystem!r}"
            raise ValueError(msg)

    @property
    def camera(self):
        """The :class:`~apdask.camera.Camera` of this visit."""
        return get_camera(self.instrument)

    @property
    def ra(self):
        return float(self.position[0])

    @property
    def dec(self):
        return float(self.position[1])

    @classmethod
    def from_dict(cls, d):
        """Build from a decoded JSON message; unknown keys are ignored."""
        required = ("instrument", "groupId", "visit", "position", "filters", "duration")
        missing = [k for k in required if k not in d]
        if missing:
            msg = f"nextVisit message lacks {', '.join(missing)}; see docs/formats.md"
            raise ValueError(msg)
        camera = get_camera(d["instrument"])
        detectors = d.get("detectors") or camera.names
        return cls(
            instrument=camera.name,
            groupId=str(d["groupId"]),
            visit=int(d["visit"]),
            position=(float(d["position"][0]), float(d["position"][1])),
            rotationAngle=float(d.get("rotationAngle", 0.0)),
            filters=str(d["filters"]),
            duration=float(d["duration"]),
            nimages=int(d.get("nimages", 1)),
            detectors=tuple(detectors),
            timestamp=float(d.get("timestamp", 0.0)),
            mjd=None if d.get("mjd") is None else float(d["mjd"]),
            coordinateSystem=d.get("coordinateSystem", "ICRS"),
        )

    @classmethod
    def from_json(cls, path_or_text):
        """Read a nextVisit message from a JSON file path or string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            msg = f"nextVisit message is not valid JSON: {e}"
            raise ValueError(msg) from None
        return cls.from_dict(d)

    def to_dict(self):
        d = asdict(self)
        d["position"] = list(self.position)
        d["detectors"] = list(self.detectors)
        return d

    def image_names(self, detector_name):
        """Raw image names of one CCD (one per snap), by the simulator's convention."""
        from .rawio import raw_name

        return [
            raw_name(self.instrument, self.visit, detector_name, s) for s in range(self.nimages)
        ]


def visit_time_window(mjd, months=None):
    """Start of the history window (MJD) for a visit at ``mjd``."""
    months = config.get("ppdb.history_months", months)
    return mjd - 30.4375 * months


# --------------------------------------------------------------------------------------
# Task functions.  Each runs inside the graph; arguments are small (paths, ids, tables).

#: Errors of one CCD's pixel data that end that CCD's chain, not the visit's.
_CCD_DATA_ERRORS = (NoTemplateCoverageError, PsfFitError, SubtractionQualityError)


@dataclass
class _CcdFailure:
    """What a pixel stage of a failed CCD hands on, in place of its result."""

    error: Exception


def _per_ccd(fn):
    """Stage wrapper: a CCD data error becomes a :class:`_CcdFailure` that later stages
    pass on (no PPDB write, no alerts), so the visit's other CCDs still run."""

    @functools.wraps(fn)
    def stage(*args):
        failed = next((a for a in args if isinstance(a, _CcdFailure)), None)
        if failed is not None:
            return failed
        keep_freed_memory()  # in whichever worker process runs the stage
        try:
            return fn(*args)
        except _CCD_DATA_ERRORS as err:
            return _CcdFailure(err)

    return stage


def _fetch(distributor_url, name, timeout):
    """Block until image ``name`` is at the distributor; its local path and arrival times.

    ``registered`` is the distributor's registration time (HTTP: the server's record;
    file: the mtime of the atomically renamed file), else the time the fetch returned.
    """
    from .distributor import open_distributor

    t0 = time.time()
    dist = open_distributor(distributor_url)
    with _seceded():  # waiting for the image must not hold a worker thread
        if hasattr(dist, "retrieve"):
            info = dist.retrieve(name, timeout=timeout)
        else:
            info = {"path": dist.get(name, timeout=timeout)}
    t1 = time.time()
    registered = info.get("registered")
    return {
        "path": info["path"],
        "name": name,
        "registered": t1 if registered is None else float(registered),
        "fetched": t1,
        "waited": t1 - t0,
    }


@contextlib.contextmanager
def _seceded():
    """On a distributed worker, leave the thread pool while blocking, then rejoin.

    Fetch tasks block until the camera delivers the image.  Seceded, they do not
    occupy worker threads, so the visit's prefetch (templates, calibrations, PPDB
    history) runs at nextVisit time, before the images exist, and other visits'
    tasks run too.  Under the threaded scheduler this does nothing.
    """
    try:
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


def check_raw_header(meta, detector, band, visit=None, name=None):
    """Check a raw's header against the invocation; raise HeaderMismatchError if it differs."""
    name = name or meta.detector_name
    if meta.detector_name != detector.name:
        msg = (
            f"raw {name} has DETNAME={meta.detector_name} but CCD {detector.name} was "
            "requested; pass the image of that CCD"
        )
        raise HeaderMismatchError(msg)
    if meta.band != band:
        msg = f"raw {name} has FILTBAND={meta.band} but --filter {band} was given"
        raise HeaderMismatchError(msg)
    if visit is not None and meta.visit != visit:
        msg = f"raw {name} belongs to visit {meta.visit}, expected {visit}"
        raise HeaderMismatchError(msg)
    return meta


def _check_header(fetched, detector, band, anticipated_exptime, visit):
    """Read the raw headers of all snaps and check them against the invocation."""
    from .rawio import effective_exptime, read_raw

    started = time.time()
    metas = [
        check_raw_header(read_raw(f["path"]).meta, detector, band, visit, f["name"])
        for f in fetched
    ]
    if len({m.snap for m in metas}) != len(metas):
        msg = (
            f"images {', '.join(f['name'] for f in fetched)} all have SNAP={metas[0].snap}; "
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
    return {
        "metas": metas,
        "exptime": exptime,
        "darktimes": [m.darktime for m in metas],
        "mjd": float(np.mean([m.mjd_mid for m in metas])),
        "visit": metas[0].visit,
        "ra": metas[0].ra,
        "dec": metas[0].dec,
        "rotpa": metas[0].rotpa,
        "fetched": fetched,
        "processing_started": started,
    }


def _read_amp(fetched, index):
    from astropy.io import fits

    with fits.open(fetched["path"], memmap=False) as hdul:
        return np.asarray(hdul[index + 1].data, dtype=np.float32)


def _darktime(header, snap):
    return header["darktimes"][snap]


def _prefetch(repo, ppdb_url, detector, band, ra, dec, rotpa, mjd):
    """Templates, calibrations, reference catalog and PPDB history: no pixels needed."""
    from .butler import Butler
    from .exceptions import PpdbError
    from .ppdb import Ppdb

    t0 = time.time()
    butler = Butler(repo)
    corners = detector.footprint(ra, dec, rotpa, padding_arcsec=60.0)
    tiles = butler.get_templates(band, corners)
    calibs = {
        "bias": butler.get_calib("bias", detector.id, None, mjd),
        "dark": butler.get_calib("dark", detector.id, None, mjd),
        "flat": butler.get_calib("flat", detector.id, band, mjd),
    }
    refcat = butler.get_drp_objects(corners)
    t1 = time.time()
    # The CCD's PPDB history as it was before this visit (as-of read): a re-run, or
    # a run racing with the visit's other CCDs, sees the same history.  A PPDB
    # failure is recorded and makes this CCD (only) report an error, without alerts.
    ppdb_error, history = None, {"objects": None, "sources": None, "forced": None, "drp": None}
    try:
        history = Ppdb.for_ccd(ppdb_url, detector, ra, dec, rotpa, cache=True).read(mjd)
    except PpdbError as err:
        ppdb_error = str(err)
    if history["drp"] is not None and len(history["drp"]) == 0:
        history["drp"] = refcat  # DRP catalog not loaded into the PPDB: use the Butler's
    t2 = time.time()
    return {
        "tiles": tiles,
        "calibs": calibs,
        "refcat": refcat,
        **history,
        "ppdb_error": ppdb_error,
        "timings": {"prefetch_butler": t1 - t0, "prefetch_ppdb": t2 - t1},
    }


def _calib(pre, kind):
    return pre["calibs"][kind]


def _science(images, header, detector, band, prefetch):
    """Combine snaps, calibrate to nJy, mask cosmic rays and refine the WCS."""
    from . import astrometry, isr

    t0 = time.time()
    image_e = sum(i[0] for i in images)
    variance = sum(i[1] for i in images)
    mask = np.bitwise_or.reduce([i[2] for i in images])
    wcs = detector.predicted_wcs(header["ra"], header["dec"], header["rotpa"])
    meta = {
        "visit": header["visit"],
        "detector": detector.id,
        "detector_name": detector.name,
        "band": band,
        "mjd": header["mjd"],
        "exptime": header["exptime"],
    }
    exp = isr.calibrate(image_e, variance, mask, band, header["exptime"], wcs, meta)
    refcat = prefetch["refcat"]
    new_wcs, info = astrometry.refine_wcs(exp, np.asarray(refcat["ra"]), np.asarray(refcat["dec"]))
    exp = exp.copy_with(wcs=new_wcs)
    exp.meta["astrometry"] = info
    exp.meta["timings"] = {"calibrate": time.time() - t0}
    return exp


@_per_ccd
def _template(science, prefetch):
    from .templates import warp_template

    t0 = time.time()
    ccd, visit, band = (science.meta.get(k) for k in ("detector_name", "visit", "band"))
    try:
        tmpl = warp_template(prefetch["tiles"], science.wcs, science.shape)
    except NoTemplateCoverageError as e:
        ra, dec = science.wcs.pixel_to_world_values((science.shape[1] - 1) / 2,
                                                    (science.shape[0] - 1) / 2)  # fmt: skip
        msg = (
            f"CCD {ccd}, visit {visit}: no {band}-band template covers it: {e}; ingest a "
            f"template tile around RA {float(ra):.4f}, Dec {float(dec):.4f} with "
            "`apdask butler ingest-template`"
        )
        raise NoTemplateCoverageError(msg) from None
    coverage = tmpl.meta["coverage"]
    if coverage < 1.0:
        log.warning(
            "visit %s CCD %s: the %s-band template covers only %.1f%% of the CCD; the rest "
            "is masked NO_DATA and not searched for DIASources",
            visit, ccd, band, 100.0 * coverage,
        )  # fmt: skip
    tmpl.meta["timings"] = {"warp": time.time() - t0}
    return tmpl


@_per_ccd
def _subtract(science, template):
    from .isr import mask_cosmic_rays
    from .subtract import estimate_psf, estimate_psf_model, subtract

    t0 = time.time()
    ccd = science.meta.get("detector_name", science.meta.get("detector"))
    step = "science image: "
    try:
        model = estimate_psf_model(science)
        science = science.copy_with(psf=model.mean, meta={**science.meta, "psf_model": model})
        science = mask_cosmic_rays(science, _sharpest_fwhm_px(model.psfs))
        if template.psf is None:
            step = "template: "
            template = template.copy_with(psf=estimate_psf(template))
        step = ""
        diff, info = subtract(science, template)
    except PsfFitError as e:
        msg = f"CCD {ccd}, visit {science.meta.get('visit')}: {step}{e}"
        raise PsfFitError(msg) from None
    t1 = time.time()
    info["timings"] = {"psf+subtract": t1 - t0}
    return {"science": science, "template": template, "difference": diff, "info": info}


def _sharpest_fwhm_px(psfs):
    """FWHM (px) of the Gaussian as sharp as the sharpest of the PSF stamps ``(..., S, S)``.

    :func:`apdask.isr.mask_cosmic_rays` flags pixels sharper than a Gaussian of the
    FWHM it is given allows, from the ratio of a pixel to its neighbours.  Here that
    ratio is the stamps' own: ``σ² = 1 / (2 ln R)`` with ``R`` the centre pixel over the
    mean of its four side neighbours.  Second moments would overstate the FWHM of a
    PSF with broad wings (Kolmogorov: ~20 %), and the cores of bright stars would be
    flagged as cosmic rays and interpolated away.
    """
    p = np.asarray(psfs, float).reshape((-1,) + np.shape(psfs)[-2:])
    c = p.shape[-1] // 2
    side = 0.25 * (p[:, c, c - 1] + p[:, c, c + 1] + p[:, c - 1, c] + p[:, c + 1, c])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(side > 0, p[:, c, c] / side, np.nan)
    ratio = ratio[np.isfinite(ratio) & (ratio > 1.0)]
    if len(ratio) == 0:
        return 4.5
    return 2.3548 * math.sqrt(1.0 / (2.0 * math.log(float(ratio.max()))))


@_per_ccd
def _detect(sub, visit, detector, band, mjd_of):
    from .detect import detect_sources, matched_filter, measure_sources

    t0 = time.time()
    diff = sub["difference"]
    matched = matched_filter(diff)
    dets = detect_sources(diff, matched=matched)
    table = measure_sources(
        diff, sub["science"], sub["template"], dets,
        visit=visit, detector=detector.id, band=band, mjd=mjd_of["mjd"], matched=matched,
    )  # fmt: skip
    from .diffqa import assess, enforce  # subtraction QA: fail = this CCD fails

    qa = assess(diff, sub["info"], table, sub["science"], sub["template"], matched=matched)
    enforce(qa, where=f"CCD {detector.name}, visit {visit}", log=log)
    return {"sources": table, "qa": qa, "timings": {"detect+measure": time.time() - t0}}


def _associate_store_alert(sub, measured, prefetch, header, detector, band, ppdb_url, sink_uri,
                           replace=False):  # fmt: skip
    """Association, PPDB write and alert packaging for one CCD."""
    if isinstance(measured, _CcdFailure):
        return measured  # nothing of a failed CCD reaches the PPDB or the alert sink
    from astropy.table import vstack

    from . import alerts, associate, detect, ids
    from .exceptions import PpdbError
    from .ppdb import Ppdb

    t0 = time.time()
    visit, mjd = header["visit"], header["mjd"]
    if prefetch.get("ppdb_error"):
        return _failed_ccd(detector, visit, prefetch["ppdb_error"])
    sources = measured["sources"]
    n = len(sources)
    sources["diaSourceId"] = ids.dia_source_ids(visit, detector.id, n)
    processed = _processed_mjd(header)
    sources["timeProcessedMjdTai"] = processed
    objects = prefetch["objects"]
    history = prefetch["sources"]
    # Forced photometry at every known DIAObject in the CCD, first: this visit's
    # forced fluxes count in the updated objects' fpFluxMean.
    diff, sci = sub["difference"], sub["science"]
    known = objects if len(objects) else None
    forced = None
    if known is not None:
        fp = detect.forced_photometry(diff, sci, np.asarray(known["ra"]), np.asarray(known["dec"]))
        keep = ~np.asarray(fp["flag_edge"], dtype=bool)
        forced = fp[keep]
        forced["diaObjectId"] = np.asarray(known["diaObjectId"])[keep]
        forced["ra"] = np.asarray(known["ra"])[keep]
        forced["dec"] = np.asarray(known["dec"])[keep]
        forced["diaForcedSourceId"] = ids.dia_forced_source_ids(visit, detector.id, len(forced))
        forced["visit"] = visit
        forced["detector"] = detector.id
        forced["midpointMjdTai"] = mjd
        forced["band"] = band
        forced["timeProcessedMjdTai"] = processed
    t1 = time.time()
    out = associate.associate_ccd(sources, prefetch, mjd, forced)
    matched, new_objects, sources = out["matched"], out["objects"], out["sources"]
    t2 = time.time()
    # Alerts: one per DIASource, with 12-month history and the three cutouts.  Packets
    # are built before the PPDB write and written to the sink after it; the sink write is
    # idempotent (same ids, same file), so a re-run after a failed sink write is safe.
    all_history = vstack([history, sources]) if len(history) else sources
    packets = _make_alerts(sources, new_objects, all_history, prefetch["forced"], sub)
    t4 = time.time()
    try:
        stored = Ppdb.open(ppdb_url, cache=True).store(
            mjd, new_objects, sources, forced, visit=visit, detector=detector.id,
            replace=replace, drp_matches=out["drp_matches"],
        )  # fmt: skip
    except PpdbError as err:  # no alerts for this CCD; the visit's other CCDs go on
        return _failed_ccd(detector, visit, str(err))
    t5 = time.time()
    sink = alerts.sink_from_uri(sink_uri)
    try:
        written = sink.write(visit, detector.id, packets)  # SinkResult: delivered / spooled
    finally:
        sink.close()
    t6 = time.time()
    return {
        "detector": detector.name,
        "detector_id": detector.id,
        "visit": visit,
        "n_sources": n,
        "n_new_objects": int(np.sum(matched < 0)) if n else 0,
        "n_forced": 0 if forced is None else len(forced),
        "n_alerts": len(packets),
        "stored": bool(stored),
        "alert_file": None if written.path is None else str(written.path),
        "alerts_delivered": written.delivered,
        "alerts_spooled": written.spooled,
        "alerts_trimmed": len(written.trimmed),
        "alert_spool": None if written.spool_path is None else str(written.spool_path),
        "alert_written": time.time(),
        "timings": {
            "forced": t1 - t0,
            "associate": t2 - t1,
            "alert_packets": t4 - t2,
            "ppdb_store": t5 - t4,
            "alert_sink": t6 - t5,
        },
    }


def _make_alerts(sources, objects, history, forced_history, sub):
    """One alert packet per DIASource, in the official schema, serialised column-wise.

    ``package_alerts`` and ``StampMaker`` give bytes identical to ``make_alert`` with
    ``detect.make_cutout`` (the tests check this) at a fraction of the cost.
    """
    from . import alerts, detect
    from .stamps import StampMaker

    schema = alerts.load_schema(config.get("alerts.schema_version"))
    makers = [StampMaker(sub[k]) for k in ("difference", "science", "template")]
    cutouts = []
    for x, y, bbox in zip(sources["x"], sources["y"], sources["bboxSize"], strict=True):
        size = detect.cutout_size(bbox)
        cutouts.append(tuple(m.stamp(x, y, size) for m in makers))
    return alerts.package_alerts(
        sources, history=history, forced_history=forced_history, objects=objects,
        cutouts=cutouts, schema=schema,
    )  # fmt: skip


def _failed_ccd(detector, visit, error, exc=None):
    """Report entry of a CCD whose PPDB access or pixel processing failed (no alerts sent).

    With the exception ``exc``, ``error_type`` (its class name in
    :mod:`apdask.exceptions`) and ``exit_code`` are added.
    """
    if exc is None:
        log.error("visit %s CCD %s: %s", visit, detector.name, error)
    else:  # the message names the CCD and the visit
        log.error("%s: %s", type(exc).__name__, error)
    out = {
        "detector": detector.name,
        "detector_id": detector.id,
        "visit": visit,
        "n_sources": 0,
        "n_new_objects": 0,
        "n_forced": 0,
        "n_alerts": 0,
        "stored": False,
        "error": error,
        "alert_file": None,
        "alert_written": time.time(),
        "timings": {},
    }
    if exc is not None:
        out["error_type"] = type(exc).__name__
        out["exit_code"] = int(getattr(exc, "exit_code", 1))
        if getattr(exc, "qa", None) is not None:  # SubtractionQualityError
            out["qa"] = exc.qa
    return out


def _processed_mjd(header):
    """Nominal ``timeProcessedMjdTai``: the end of the exposure.

    Deterministic per visit, so that re-running a CCD reproduces its rows
    exactly (see docs/ppdb.md, Idempotence).
    """
    return float(header["mjd"]) + 0.5 * float(header["exptime"]) / 86400.0


def _now_mjd():
    return 40587.0 + time.time() / 86400.0 + 37.0 / 86400.0  # unix → MJD (TAI ≈ UTC + 37 s)


def _ccd_report(result, fetched, header, science, sub, measured, prefetch, detector):
    if isinstance(result, _CcdFailure):
        return _failed_ccd(detector, header["visit"], str(result.error), result.error)
    timings = {}
    for part in (prefetch, science.meta, sub["info"], measured, result):
        timings.update(part.get("timings", {}))
    registered = max(f["registered"] for f in fetched)
    out = dict(result)
    out["timings"] = timings
    out["image_registered"] = registered
    out["latency_s"] = result["alert_written"] - registered
    # Unix times (s) of one CCD's path from image arrival to alerts; docs/distributor.md.
    out["latency"] = {
        "image_registered": registered,
        "image_fetched": max(f.get("fetched", f["registered"]) for f in fetched),
        "processing_started": header.get("processing_started"),
        "processing_ended": time.time(),
        "alerts_written": result["alert_written"],
        "arrival_to_alerts_s": result["alert_written"] - registered,
        "fetch_wait_s": max(f.get("waited", 0.0) for f in fetched),
    }
    out["exptime"] = header["exptime"]
    out["astrometry"] = science.meta.get("astrometry", {})
    # fraction of the CCD with template data; the rest is NO_DATA and was not searched
    out["template_coverage"] = float(sub["template"].meta.get("coverage", 1.0))
    out["template_partial"] = out["template_coverage"] < 1.0
    out["subtraction"] = {k: v for k, v in sub["info"].items() if k not in ("timings", "kernel")}
    out["qa"] = measured.get("qa")
    return out


# --------------------------------------------------------------------------------------
# Graph construction


def ccd_tasks(next_visit, detector_name, *, repo, ppdb_url, sink_uri, distributor, timeout,
              image_names=None, replace=False):  # fmt: skip
    """The lazy chain of one CCD; returns a Delayed of its report dict."""
    from . import isr

    det = next_visit.camera[detector_name]
    band, v = next_visit.filters, next_visit.visit
    tag = f"{v}-{det.name}"

    def d(fn, stage):
        def call(*args):
            return dask.delayed(fn, pure=False)(*args, dask_key_name=f"{stage}-{tag}")

        return call

    mjd_guess = next_visit.mjd if next_visit.mjd is not None else _now_mjd()
    prefetch = d(_prefetch, "prefetch")(
        repo,
        ppdb_url,
        det,
        band,
        next_visit.ra,
        next_visit.dec,
        next_visit.rotationAngle,
        mjd_guess,
    )
    fetched = [
        dask.delayed(_fetch)(distributor, name, timeout, dask_key_name=f"fetch-{tag}-{k}")
        for k, name in enumerate(image_names or next_visit.image_names(det.name))
    ]
    header = d(_check_header, "header")(fetched, det, band, next_visit.duration, v)
    bias = da.from_delayed(d(_calib, "calib-bias")(prefetch, "bias"), det.shape, np.float32)
    dark = da.from_delayed(d(_calib, "calib-dark")(prefetch, "dark"), det.shape, np.float32)
    flat = da.from_delayed(d(_calib, "calib-flat")(prefetch, "flat"), det.shape, np.float32)
    images = []
    for k, f in enumerate(fetched):
        amps = [
            da.from_delayed(
                dask.delayed(_read_amp)(f, a.index, dask_key_name=f"read-{tag}-{k}-{a.index}"),
                a.raw_shape,
                np.float32,
            )
            for a in det.amplifiers
        ]
        darktime = d(_darktime, f"darktime{k}")(header, k)
        images.append(isr.isr_arrays(amps, det, bias, dark, flat, darktime=darktime))
    science = d(_science, "calibrate")(images, header, det, band, prefetch)
    template = d(_template, "warp")(science, prefetch)
    sub = d(_subtract, "subtract")(science, template)
    measured = d(_detect, "detect")(sub, v, det, band, header)
    result = d(_associate_store_alert, "associate")(
        sub, measured, prefetch, header, det, band, ppdb_url, sink_uri, replace
    )
    return d(_ccd_report, "report")(result, fetched, header, science, sub, measured, prefetch, det)


def _gather(next_visit, ccd_reports):
    return {
        "visit": next_visit.visit,
        "groupId": next_visit.groupId,
        "instrument": next_visit.instrument,
        "band": next_visit.filters,
        "n_alerts": int(sum(r["n_alerts"] for r in ccd_reports)),
        "n_alerts_delivered": int(sum(r.get("alerts_delivered", 0) for r in ccd_reports)),
        "n_alerts_spooled": int(sum(r.get("alerts_spooled", 0) for r in ccd_reports)),
        "failed": [r["detector"] for r in ccd_reports if r.get("error")],
        "ccds": list(ccd_reports),
    }


def build_visit_graph(
    next_visit,
    *,
    repo=None,
    ppdb=None,
    alerts=None,
    distributor=None,
    timeout=None,
    detectors=None,
    images=None,
    replace=False,
):
    """Build the lazy graph of one visit; computing it returns the visit report.

    Parameters
    ----------
    next_visit : NextVisit
        The announced visit.
    repo : str, optional
        Butler repository; default ``apdask.repo`` from configuration.
    ppdb : str, optional
        PPDB config file; default ``apdask.ppdb.url`` or ``<repo>/ppdb/apdb.yaml``.
    alerts : str, optional
        Alert sink URI; default ``apdask.alerts.sink`` or ``file://<repo>/alerts``.
    distributor : str, optional
        Distributor URL; default ``apdask.distributor.url`` or ``file://<repo>/raw``.
    timeout : float, optional
        Seconds each image fetch blocks; default ``apdask.distributor.timeout``.
    detectors : sequence of str, optional
        Subset of the visit's detectors to process.
    images : dict, optional
        Image names per CCD name (one per snap); default ``NextVisit.image_names``.
    replace : bool
        Replace the CCDs' earlier PPDB rows instead of skipping stored CCDs
        (see :meth:`apdask.ppdb.Ppdb.store`).

    Returns
    -------
    dask.delayed.Delayed
        Computing it runs the visit and returns a report dict with one entry per CCD.

    Notes
    -----
    Building the graph computes nothing and touches no pixels, database or sink.
    """
    repo = config.get("repo", repo)
    if repo is None:
        msg = "no Butler repository given; pass --repo DIR or set apdask.repo"
        raise ConfigurationError(msg)
    ppdb = config.get("ppdb.url", ppdb) or f"{repo}/ppdb/apdb.yaml"
    alerts = config.get("alerts.sink", alerts) or f"file://{repo}/alerts"
    if alerts.startswith("kafka://") and "spool_dir=" not in alerts:
        from urllib.parse import quote  # undelivered alerts spool next to the repository

        spool = config.get("alerts.spool_dir") or f"{repo}/alerts-spool"
        alerts += ("&" if "?" in alerts else "?") + "spool_dir=" + quote(str(spool), safe="/")
    distributor = config.get("distributor.url", distributor) or f"file://{repo}/raw"
    timeout = float(config.get("distributor.timeout", timeout))
    if not timeout > 0:
        msg = f"timeout must be > 0 seconds, got {timeout!r}; e.g. --timeout 120"
        raise ValueError(msg)
    names = next_visit.detectors if detectors is None else tuple(detectors)
    reports = [
        ccd_tasks(
            next_visit,
            name,
            repo=repo,
            ppdb_url=ppdb,
            sink_uri=alerts,
            distributor=distributor,
            timeout=timeout,
            image_names=(images or {}).get(name),
            replace=replace,
        )  # fmt: skip
        for name in names
    ]
    return dask.delayed(_gather)(next_visit, reports, dask_key_name=f"gather-{next_visit.visit}")
