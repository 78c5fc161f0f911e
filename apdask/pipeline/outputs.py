"""The output steps of one CCD's chain: associate, package, store, recover, publish, report.

Alert packets are built first (``package``), then the PPDB is written in one
transaction (``store``), then the sink (``publish``), then the CCD's done record: no
row is stored for a CCD whose alerts cannot be made, and a crash or sink failure
after the store is repaired by re-running, which re-sends the alerts of the stored
rows without storing them again (``recover``; docs/alerts.md, "Zero loss across a
crash").
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from astropy.table import Table, vstack

from apdask.alerts.packets import EncodedAlert, package_alerts
from apdask.alerts.schema import load_schema
from apdask.alerts.sinks import sink_from_uri
from apdask.alerts.stamps import StampMaker
from apdask.config import PipelineConfig
from apdask.core import ids
from apdask.core.camera import Detector
from apdask.core.faults import fault_point
from apdask.core.records import (
    Association,
    CcdReport,
    Measurement,
    Prefetch,
    RawHeader,
    Stored,
    Subtraction,
)
from apdask.exceptions import PpdbError
from apdask.pipeline import associate
from apdask.pipeline.measure.cutouts import cutout_size
from apdask.pipeline.measure.photometry import forced_photometry
from apdask.pipeline.steps import CcdFailure, PpdbUnavailableError, now_mjd, per_ccd
from apdask.ppdb import Ppdb

__all__ = [
    "associate_task",
    "package_task",
    "publish_task",
    "recover_task",
    "report_task",
    "store_task",
]

log = logging.getLogger(__name__)


@per_ccd
def associate_task(
    sub: Subtraction,
    measured: Measurement,
    prefetch: Prefetch,
    header: RawHeader,
    detector: Detector,
    band: str,
    cfg: PipelineConfig,
) -> Association:
    """Forced photometry at known DIAObjects, then association of the new DIASources."""
    if prefetch.ppdb_error:
        raise PpdbUnavailableError(prefetch.ppdb_error)
    t0 = time.time()
    visit, mjd = header.visit, header.mjd
    sources = measured.sources.copy(copy_data=False)  # the detect task's table stays its own
    n = len(sources)
    sources["diaSourceId"] = ids.dia_source_ids(visit, detector.id, n)
    processed = header.processed_mjd
    sources["timeProcessedMjdTai"] = processed
    sources["exposureTime"] = np.float32(header.exptime)  # s, summed over the snaps
    objects = prefetch.history.objects
    history = prefetch.history.sources
    # Forced photometry at every known DIAObject in the CCD, first: this visit's
    # forced fluxes count in the updated objects' fpFluxMean.
    known = objects if len(objects) else None
    forced = None
    if known is not None:
        fp = forced_photometry(
            sub.difference, sub.science, np.asarray(known["ra"]), np.asarray(known["dec"])
        )
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
    out = associate.associate_ccd(
        sources, prefetch.history.as_mapping(), mjd, forced,
        radius_arcsec=cfg.association.radius_arcsec,
    )  # fmt: skip
    sources = out["sources"]
    t2 = time.time()
    all_history = vstack([history, sources]) if len(history) else sources
    return Association(
        sources=sources,
        objects=out["objects"],
        forced=forced,
        matched=out["matched"],
        drp_matches=out["drp_matches"],
        history=all_history,
        timings={"forced": t1 - t0, "associate": t2 - t1},
    )


@per_ccd
def package_task(
    sub: Subtraction, assoc: Association, prefetch: Prefetch, cfg: PipelineConfig
) -> list[EncodedAlert]:
    """One alert packet per DIASource: history, DIAObject and three cutouts, encoded.

    Built before the PPDB write, so that a CCD whose packets cannot be made writes
    nothing.  ``package_alerts`` and ``StampMaker`` give bytes identical to
    ``make_alert`` with ``make_cutout`` (the tests check this) at a fraction of the cost.
    """
    return _packets(sub, assoc.sources, assoc.history, prefetch.history.forced, assoc.objects, cfg)


def _packets(
    sub: Subtraction,
    sources: Table,
    history: Table,
    forced_history: Table | None,
    objects: Table,
    cfg: PipelineConfig,
) -> list[EncodedAlert]:
    """The encoded alerts of ``sources``, with cutouts of ``sub`` at their positions."""
    # The triggering DIASource's timeProcessedMjdTai is the wall clock (TAI) when the
    # packets are made; the PPDB row keeps the nominal, reproducible value.
    sources = Table(sources, copy=False)  # the stored table is kept as it is
    sources.replace_column("timeProcessedMjdTai", np.full(len(sources), now_mjd()))
    schema = load_schema(cfg.alerts.schema_version)
    makers = [StampMaker(e) for e in (sub.difference, sub.science, sub.template)]
    for m in makers:  # one WCS call per exposure for the local WCS of every stamp
        m.prepare(sources["x"], sources["y"])
    lo, hi = cfg.cutouts.min_size, cfg.cutouts.max_size
    cutouts = []
    for x, y, bbox in zip(sources["x"], sources["y"], sources["bboxSize"], strict=True):
        size = cutout_size(bbox, min_size=lo, max_size=hi)
        cutouts.append(tuple(m.stamp(x, y, size) for m in makers))
    return package_alerts(
        sources, history=history, forced_history=forced_history, objects=objects,
        cutouts=cutouts, schema=schema,
    )  # fmt: skip


@per_ccd
def store_task(
    assoc: Association,
    packets: list[EncodedAlert],
    header: RawHeader,
    detector: Detector,
    ppdb_url: str,
    replace: bool,
    cfg: PipelineConfig,
    sink_uri: str | None = None,
) -> Stored:
    """Write the CCD's sources, new object versions and forced sources in one transaction.

    Takes the packets as an input to run after them (no row is written for a CCD whose
    alerts could not be made) and to check first that the sink ``sink_uri`` has room
    for them (:meth:`~apdask.alerts.sinks.FileSink.preflight`): a sink that cannot take
    them fails the CCD with :class:`~apdask.exceptions.AlertDeliveryError` (74) and
    nothing stored.  With ``replace``, the CCD's done record in the
    sink ``sink_uri`` is removed first: until the new alerts are sent, the CCD is not
    done.
    """
    t0 = time.time()
    if sink_uri is not None:  # a sink that cannot take the alerts: fail before the commit
        with cfg.applied():
            sink = sink_from_uri(sink_uri)
            if hasattr(sink, "preflight"):
                sink.preflight(sum(len(p.body) for p in packets))
    try:
        with cfg.applied():
            if replace and sink_uri is not None:
                replaced = sink_from_uri(sink_uri)
                replaced.done.remove(header.visit, detector.id)
                if getattr(replaced, "acks", None) is not None:  # new rows: send them all
                    replaced.acks.remove(header.visit, detector.id)
            stored = Ppdb.open(ppdb_url, cache=True).store(
                header.mjd, assoc.objects, assoc.sources, assoc.forced, visit=header.visit,
                detector=detector.id, replace=replace, drp_matches=assoc.drp_matches,
            )  # fmt: skip
    except PpdbError as err:  # no alerts for this CCD; the visit's other CCDs go on
        raise PpdbUnavailableError(str(err)) from err  # the cause keeps its exit code
    if stored:
        fault_point("ppdb-committed")  # tests only
    return Stored(bool(stored), timings={"ppdb_store": time.time() - t0})


@per_ccd
def recover_task(
    stored: Stored,
    packets: list[EncodedAlert],
    sub: Subtraction,
    prefetch: Prefetch,
    header: RawHeader,
    detector: Detector,
    ppdb_url: str,
    cfg: PipelineConfig,
) -> list[EncodedAlert]:
    """The packets to publish: this run's, or the stored rows' if an earlier run stored them.

    A CCD that the PPDB already holds (and that is not being replaced) is re-run only
    because it has no done record: an earlier run committed it and then stopped
    before its alerts were delivered or spooled.  Its rows are not stored again; its
    alerts are re-made from the rows that run stored (its DiaSources and the DiaObject
    versions of the visit, :meth:`apdask.ppdb.Ppdb.get_ccd_rows`), with the history
    read before the visit and this run's cutouts of the same pixels.  So the alerts
    always describe what the PPDB holds, with the same ``diaSourceId`` values.
    """
    if stored.stored:
        return packets
    t0 = time.time()
    try:
        with cfg.applied():
            db = Ppdb.open(ppdb_url, cache=True)
            if not db.is_sql:  # no per-CCD read: the re-run's packets (same ids)
                return packets
            rows = db.get_ccd_rows(header.visit, detector.id, header.mjd)
    except PpdbError as err:
        raise PpdbUnavailableError(str(err)) from err  # the cause keeps its exit code
    history = prefetch.history.sources
    history = vstack([history, rows.sources]) if len(history) else rows.sources
    out = _packets(sub, rows.sources, history, prefetch.history.forced, rows.objects, cfg)
    log.warning(
        "visit %s CCD %s was stored by an earlier run that did not send its alerts: "
        "%d alerts re-made from the stored rows in %.1f s, not stored again",
        header.visit, detector.name, len(out), time.time() - t0,
    )  # fmt: skip
    return out


@per_ccd
def publish_task(
    stored: Stored,
    packets: list[EncodedAlert],
    header: RawHeader,
    detector: Detector,
    sink_uri: str,
    cfg: PipelineConfig,
) -> dict[str, Any]:
    """Send the CCD's alerts to the sink (after the PPDB write), then record it as done.

    The done record (:class:`apdask.alerts.done.DoneRecords`) is written once the
    sink has returned: every alert acknowledged, spooled or written.
    """
    t0 = time.time()
    with cfg.applied():
        sink = sink_from_uri(sink_uri)
        if hasattr(sink, "journal"):  # Kafka: journal the acknowledgements until done
            sink.journal = True
        try:
            written = sink.write(header.visit, detector.id, packets)  # delivered / spooled
        finally:
            sink.close()
        fault_point("sink-written")  # tests only
        done = sink.done.write(
            header.visit, detector.id, sink=sink_uri.split("?", 1)[0], n_alerts=len(packets),
            delivered=written.delivered, spooled=written.spooled,
            alert_file=written.path, spool_path=written.spool_path, resent=not stored.stored,
        )  # fmt: skip
        acks = getattr(sink, "acks", None)  # Kafka: the acknowledgements journal is spent
        if acks is not None:
            acks.remove(header.visit, detector.id)
    return {
        "alert_file": None if written.path is None else str(written.path),
        "alerts_delivered": written.delivered,
        "alerts_spooled": written.spooled,
        "alerts_trimmed": len(written.trimmed),
        "alert_spool": None if written.spool_path is None else str(written.spool_path),
        "alerts_resent": not stored.stored,
        "done_record": str(done),
        "alert_written": time.time(),
        "timings": {"alert_sink": time.time() - t0},
    }


def _failed_ccd(
    detector: Detector, visit: int, error: str, exc: Exception | None = None
) -> CcdReport:
    """Report entry of a CCD whose PPDB access or pixel processing failed (no alerts sent).

    With the exception ``exc``, ``error_type`` (its class name in
    :mod:`apdask.exceptions`) and ``exit_code`` are added.
    """
    if exc is None:
        log.error("visit %s CCD %s: %s", visit, detector.name, error)
    else:  # the message names the CCD and the visit
        log.error("%s: %s", type(exc).__name__, error)
    out: CcdReport = {
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
            out["qa"] = exc.qa  # type: ignore[attr-defined]
    return out


def report_task(
    published: Any,
    stored: Any,
    assoc: Any,
    packets: Any,
    header: RawHeader,
    calibrated: Any,
    warped: Any,
    sub: Any,
    measured: Any,
    prefetch: Prefetch,
    detector: Detector,
    products: Any = None,
) -> CcdReport:
    """The CCD's entry of the visit report: counts, timings, latency and QA figures.

    ``products`` is what :func:`apdask.pipeline.products.save_products_task` returned
    (None when no image products are kept).
    """
    failed = next((x for x in (published, stored, assoc, packets, warped, calibrated, sub,
                               measured, products) if isinstance(x, CcdFailure)), None)  # fmt: skip
    if failed is not None:
        err = failed.error
        if isinstance(err, PpdbUnavailableError):
            return _failed_ccd(detector, header.visit, str(err))
        return _failed_ccd(detector, header.visit, str(err), err)
    timings: dict[str, float] = {}
    parts = (prefetch.timings, calibrated.timings, warped.timings, sub.timings,
             measured.timings, assoc.timings, stored.timings, published["timings"],
             (products or {}).get("timings", {}))  # fmt: skip
    for part in parts:
        timings.update(part)
    n = len(assoc.sources)
    registered = max(f.registered for f in header.fetched)
    written = published["alert_written"]
    out: CcdReport = {
        "detector": detector.name,
        "detector_id": detector.id,
        "visit": header.visit,
        "n_sources": n,
        "n_new_objects": int(np.sum(assoc.matched < 0)) if n else 0,
        "n_forced": 0 if assoc.forced is None else len(assoc.forced),
        "n_alerts": len(packets),
        "stored": stored.stored,
        **{k: v for k, v in published.items() if k != "timings"},
        "timings": timings,
        "image_registered": registered,
        "latency_s": written - registered,
        # Unix times (s) of one CCD's path from image arrival to alerts; docs/distributor.md.
        "latency": {
            "image_registered": registered,
            "image_fetched": max(f.fetched for f in header.fetched),
            "processing_started": header.processing_started,
            "processing_ended": time.time(),
            "alerts_written": written,
            "arrival_to_alerts_s": written - registered,
            "fetch_wait_s": max(f.waited for f in header.fetched),
        },
        "exptime": header.exptime,
        "astrometry": dict(calibrated.astrometry),
        # fraction of the CCD with template data; the rest is NO_DATA and was not searched
        "template_coverage": warped.coverage,
        # "shift": the prefetch's warp moved onto the refined WCS; "warp": tiles warped
        "template_warp": {"method": warped.method, **warped.shift},
        "subtraction": sub.info.as_dict(),
        "qa": None if measured.qa is None else dict(measured.qa),
        "products": dict((products or {}).get("paths", {})),
    }
    out["template_partial"] = out["template_coverage"] < 1.0
    return out
