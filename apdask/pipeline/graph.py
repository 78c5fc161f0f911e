"""The lazy graph of a visit: one delayed chain per CCD and a gather into the visit report."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from apdask import config
from apdask.exceptions import (
    ConfigurationError,
)
from apdask.pipeline.tasks import (
    associate_task,
    calib_task,
    calibrate_task,
    darktime_task,
    detect_task,
    fetch_task,
    header_task,
    now_mjd,
    prefetch_task,
    read_amp_task,
    report_task,
    subtract_task,
    warp_task,
)

__all__ = ["build_visit_graph", "ccd_tasks"]


def ccd_tasks(next_visit, detector_name, *, repo, ppdb_url, sink_uri, distributor, timeout,
              image_names=None, replace=False):  # fmt: skip
    """The lazy chain of one CCD; returns a Delayed of its report dict."""
    from apdask.pipeline import isr

    det = next_visit.camera[detector_name]
    band, v = next_visit.filters, next_visit.visit
    tag = f"{v}-{det.name}"

    def d(fn, stage):
        def call(*args):
            return dask.delayed(fn, pure=False)(*args, dask_key_name=f"{stage}-{tag}")

        return call

    mjd_guess = next_visit.mjd if next_visit.mjd is not None else now_mjd()
    prefetch = d(prefetch_task, "prefetch")(
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
        dask.delayed(fetch_task)(distributor, name, timeout, dask_key_name=f"fetch-{tag}-{k}")
        for k, name in enumerate(image_names or next_visit.image_names(det.name))
    ]
    header = d(header_task, "header")(fetched, det, band, next_visit.duration, v)
    bias = da.from_delayed(d(calib_task, "calib-bias")(prefetch, "bias"), det.shape, np.float32)
    dark = da.from_delayed(d(calib_task, "calib-dark")(prefetch, "dark"), det.shape, np.float32)
    flat = da.from_delayed(d(calib_task, "calib-flat")(prefetch, "flat"), det.shape, np.float32)
    images = []
    for k, f in enumerate(fetched):
        amps = [
            da.from_delayed(
                dask.delayed(read_amp_task)(f, a.index, dask_key_name=f"read-{tag}-{k}-{a.index}"),
                a.raw_shape,
                np.float32,
            )
            for a in det.amplifiers
        ]
        darktime = d(darktime_task, f"darktime{k}")(header, k)
        images.append(isr.isr_arrays(amps, det, bias, dark, flat, darktime=darktime))
    science = d(calibrate_task, "calibrate")(images, header, det, band, prefetch)
    template = d(warp_task, "warp")(science, prefetch)
    sub = d(subtract_task, "subtract")(science, template)
    measured = d(detect_task, "detect")(sub, v, det, band, header)
    result = d(associate_task, "associate")(
        sub, measured, prefetch, header, det, band, ppdb_url, sink_uri, replace
    )
    return d(report_task, "report")(result, fetched, header, science, sub, measured, prefetch, det)


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
