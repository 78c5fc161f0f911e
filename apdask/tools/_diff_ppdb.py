"""``apdask diff --ppdb URL --alerts URI``: association and alerts of a foreign image.

The DiaSources of :func:`apdask.tools.diff.diff` go through the pipeline's own output
steps (:mod:`apdask.pipeline.outputs`), with the records a visit's CCD hands them:
``associate`` (forced photometry at the known DiaObjects, association), ``package``
(alerts with history and three cutouts), ``store`` (one PPDB transaction, after the
sink's preflight), ``recover`` (the stored rows' alerts when an earlier run stored
the CCD and stopped before sending) and ``publish`` (the sink, then the done record).
A (visit, detector) that is done (:func:`apdask.pipeline.run.ccd_done`) is neither
stored nor sent again.

A foreign image belongs to no camera.  Its detector is a stand-in with the given id
and the image's shape; its PPDB region is its own WCS footprint, padded
(:func:`apdask.ppdb.region_for_image`); its ``visit`` and ``detector`` come from the
command line, else the header's ``EXPNUM`` and ``CCDNUM``.  See
``docs/real-data.md``, "Association and alerts".
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import sqlalchemy
import sqlalchemy.exc
from astropy.table import Table

from apdask.alerts.sinks import sink_from_uri
from apdask.config import PipelineConfig
from apdask.core import ids
from apdask.core.camera import BANDS, Detector
from apdask.core.exposure import Exposure
from apdask.core.records import Measurement, PpdbHistory, Prefetch, RawHeader, Subtraction
from apdask.exceptions import ApdaskError, PpdbError, UnknownFilterError, UsageError
from apdask.pipeline.outputs import (
    associate_task,
    package_task,
    publish_task,
    recover_task,
    store_task,
)
from apdask.pipeline.run import ccd_done
from apdask.pipeline.steps import CcdFailure, PpdbUnavailableError
from apdask.ppdb import CcdPpdb, Ppdb, region_for_image

__all__ = ["check_publishable", "check_targets", "diff_ids", "publish_sources"]


def diff_ids(science: Exposure, visit: int | None, detector: int | None) -> tuple[int, int]:
    """The ``(visit, detector)`` of a foreign science image for the PPDB and its alerts.

    Given values win; else the header's ``EXPNUM`` and ``CCDNUM`` (kept by
    :func:`apdask.io.foreign.read_exposure` as ``meta["expnum"]``, ``meta["ccdnum"]``).

    Raises
    ------
    UsageError
        Neither given nor in the header, or out of the id's range (visit < 2**35,
        detector < 256).
    """
    path = science.meta.get("path", "the science image")
    if visit is None:
        visit = science.meta.get("expnum")
    if detector is None:
        detector = science.meta.get("ccdnum")
    if visit is None:
        msg = (
            f"--ppdb/--alerts need a visit id and {path} has no EXPNUM: pass --visit N, "
            "a different integer for each science exposure"
        )
        raise UsageError(msg)
    if detector is None:
        msg = f"--ppdb/--alerts need a detector id and {path} has no CCDNUM: pass --detector N"
        raise UsageError(msg)
    if not 0 <= int(visit) < ids.MAX_VISIT:
        raise UsageError(f"--visit must be in [0, 2**35), got {visit}")
    if not 0 <= int(detector) < 256:
        raise UsageError(f"--detector must be in [0, 256), got {detector}")
    return int(visit), int(detector)


def check_publishable(science: Exposure, template: Exposure) -> None:
    """Refuse, before any pixel work, a pair whose DiaSources the PPDB cannot hold.

    The PPDB and the alerts hold fluxes in nJy, times in MJD and per-band DiaObject
    columns for u g r i z y.

    Raises
    ------
    UsageError
        An image in counts without a zero point, or no exposure time (MJD).
    UnknownFilterError
        A band other than u g r i z y.
    """
    for who, e, opt in (("science", science, "--s-zp"), ("template", template, "--t-zp")):
        if e.meta.get("unit") != "nJy":
            msg = (
                f"the {who} image {e.meta.get('path', '')} is in {e.meta.get('unit')} with no "
                f"zero point, and the PPDB and alerts hold fluxes in nJy: give {opt} (the AB "
                "magnitude of one count) or a MAGZERO/PHOTZP header"
            )
            raise UsageError(msg)
    band = science.meta.get("band")
    if band not in BANDS:
        msg = (
            f"band {band!r} of the science image is not one of {', '.join(BANDS)}, the "
            "PPDB's DiaObject bands: pass --band with the nearest of them"
        )
        raise UnknownFilterError(msg)
    if not math.isfinite(float(science.meta.get("mjd", math.nan))):
        msg = "the science image has no time (MJD-OBS, MJD-AVG or DATE-OBS): pass --mjd"
        raise UsageError(msg)


def check_targets(ppdb: str, alerts: str) -> None:
    """Open the PPDB and the alert sink once, before any pixel work.

    Raises
    ------
    PpdbError
        The PPDB does not exist, is not initialised or cannot be reached (the message
        names ``apdask ppdb create``).
    ConfigurationError
        An unsupported alert sink URI.
    """
    Ppdb.open(ppdb, cache=True)
    sink_from_uri(alerts).close()


def _redacted(url: str) -> str:
    """``url`` without its password (for the report)."""
    if "://" not in url:
        return url
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("@", 1)[-1]


def _ok(x: Any) -> Any:
    """A step's result, or its failure raised with its own exit code."""
    if not isinstance(x, CcdFailure):
        return x
    err = x.error
    if isinstance(err, PpdbUnavailableError):
        cause = err.__cause__
        raise cause if isinstance(cause, ApdaskError) else PpdbError(str(err))
    raise err


def publish_sources(
    science: Exposure,
    template: Exposure,
    difference: Exposure,
    info: Any,
    sources: Table,
    qa: Mapping[str, Any] | None,
    *,
    ppdb: str,
    alerts: str,
    visit: int,
    detector: int,
    config: PipelineConfig | None = None,
) -> tuple[Table, dict[str, Any]]:
    """Associate one subtraction's DiaSources, store them and publish their alerts.

    Parameters
    ----------
    science, template, difference : apdask.core.exposure.Exposure
        As :func:`apdask.tools.diff.diff` returns them (nJy).
    info : apdask.core.records.SubtractionInfo
    sources : astropy.table.Table
        The DiaSources measured on ``difference``.
    qa : dict or None
        The subtraction's QA record.
    ppdb : str
        An existing PPDB: SQLAlchemy URL (``sqlite:///...``, ``postgresql://...``)
        or dax_apdb config file.
    alerts : str
        Alert sink: ``file://DIR`` (or a directory) or ``kafka://HOST:PORT/TOPIC``.
    visit, detector : int
        The identifiers of the rows and alerts.
    config : apdask.config.PipelineConfig, optional
        Default :meth:`PipelineConfig.resolve` now.

    Returns
    -------
    sources : astropy.table.Table
        The DiaSources with ``diaSourceId`` and ``diaObjectId``.
    summary : dict
        Counts (``n_new_objects``, ``n_associated``, ``n_forced``, ``n_alerts``),
        ``stored``, ``already_done``, and the sink's record (``alert_file``,
        ``alerts_delivered``, ``alerts_spooled``, ``done_record``...).

    Raises
    ------
    PpdbError
        The PPDB cannot be read or written (nothing stored, no alerts).
    AlertDeliveryError
        The sink cannot take the alerts (checked before the commit: nothing stored).
    """
    cfg = PipelineConfig.resolve() if config is None else config
    t0 = time.time()
    sources = Table(sources, copy=True)
    sources["visit"] = np.full(len(sources), visit, np.int64)
    sources["detector"] = np.full(len(sources), detector, np.int64)
    ny, nx = science.shape
    det = Detector(name=str(detector), id=detector, nx=nx, ny=ny, amplifiers=())
    mjd = float(science.meta["mjd"])
    ra, dec = science.wcs.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
    exptime = science.meta.get("exptime")
    header = RawHeader(
        metas=(), exptime=float(exptime) if exptime else 0.0, darktimes=(), mjd=mjd,
        visit=visit, ra=float(ra) % 360.0, dec=float(dec), rotpa=0.0, fetched=(),
        processing_started=t0,
    )  # fmt: skip
    with cfg.applied():
        db = Ppdb.open(ppdb, cache=True)
        region = region_for_image(science.wcs, (ny, nx), cfg.ppdb.region_padding_arcsec)
        history = CcdPpdb(db, det, region).read(mjd)  # as it was before this exposure
        sink = sink_from_uri(alerts)
        try:
            done = ccd_done(sink, db, visit, detector)
        finally:
            sink.close()
    t1 = time.time()
    prefetch = Prefetch(
        refcat=None, history=PpdbHistory(**history),
        timings={"prefetch_ppdb": t1 - t0},
    )  # fmt: skip
    sub = Subtraction(science, template, difference, info)
    band = str(science.meta["band"])
    measured = Measurement(sources, qa=qa)
    assoc = _ok(associate_task(sub, measured, prefetch, header, det, band, cfg))
    n = len(assoc.sources)
    summary: dict[str, Any] = {
        "ppdb": _redacted(ppdb),
        "alerts": alerts.split("?", 1)[0],
        "visit": visit,
        "detector": detector,
        "n_sources": n,
        "n_new_objects": int(np.sum(assoc.matched < 0)) if n else 0,
        "n_associated": int(np.sum(assoc.matched >= 0)) if n else 0,
        "n_forced": 0 if assoc.forced is None else len(assoc.forced),
        "already_done": done,
    }
    if done:  # stored and sent by an earlier run: nothing to store or to send again
        return assoc.sources, {**summary, "stored": False, "n_alerts": 0}
    packets = _ok(package_task(sub, assoc, prefetch, cfg))
    stored = _ok(store_task(assoc, packets, header, det, ppdb, False, cfg, alerts))
    sent = _ok(recover_task(stored, packets, sub, prefetch, header, det, ppdb, cfg))
    published = _ok(publish_task(stored, sent, header, det, alerts, cfg))
    timings = {**prefetch.timings, **assoc.timings, **stored.timings, **published["timings"]}
    summary.update(
        stored=stored.stored,
        n_alerts=len(sent),
        **{k: v for k, v in published.items() if k not in ("timings", "alert_written")},
        timings=timings,
    )
    return assoc.sources, summary
