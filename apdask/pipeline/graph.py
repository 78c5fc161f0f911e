"""The lazy graph of a visit: one delayed chain per CCD and a gather into the visit report.

Building the graph computes nothing and touches no pixels, database or sink.  The
configuration is resolved here, once, into a frozen :class:`~apdask.config.PipelineConfig`
that every task receives; tasks never read ``dask.config`` on a worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import dask
from dask.delayed import Delayed

from apdask.config import Locations, PipelineConfig
from apdask.core.records import CcdReport, VisitReport
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.outputs import (
    associate_task,
    package_task,
    publish_task,
    recover_task,
    report_task,
    store_task,
)
from apdask.pipeline.products import save_products_task
from apdask.pipeline.steps import now_mjd
from apdask.pipeline.tasks import (
    astrometry_task,
    calib_task,
    calibrate_task,
    detect_task,
    fetch_task,
    header_task,
    isr_amp_task,
    prefetch_task,
    prewarp_task,
    science_psf_task,
    science_task,
    subtract_task,
    warp_task,
)

__all__ = ["build_visit_graph", "ccd_tasks"]


def ccd_tasks(
    next_visit: NextVisit,
    detector_name: str,
    *,
    where: Locations,
    cfg: PipelineConfig,
    image_names: Sequence[str] | None = None,
    replace: bool = False,
) -> Delayed:
    """The lazy chain of one CCD; returns a Delayed of its report dict.

    Every step is one task with key ``<step>-<visit>-<detector>``.
    """
    det = next_visit.camera[detector_name]
    band, v = next_visit.filters, next_visit.visit
    tag = f"{v}-{det.name}"

    def step(fn: Callable[..., Any], name: str) -> Callable[..., Delayed]:
        def call(*args: Any) -> Delayed:
            return dask.delayed(fn, pure=False)(*args, dask_key_name=f"{name}-{tag}")

        return call

    mjd_guess = next_visit.mjd if next_visit.mjd is not None else now_mjd()
    prefetch = step(prefetch_task, "prefetch")(
        where.repo, where.ppdb, det, band, next_visit.ra, next_visit.dec,
        next_visit.rotationAngle, mjd_guess, cfg,
    )  # fmt: skip
    prewarped = step(prewarp_task, "prewarp")(
        where.repo, det, band, next_visit.ra, next_visit.dec, next_visit.rotationAngle, cfg
    )
    fetched = [
        dask.delayed(fetch_task)(
            where.distributor, name, where.timeout, cfg, dask_key_name=f"fetch-{tag}-{k}"
        )
        for k, name in enumerate(image_names or next_visit.image_names(det.name))
    ]
    header = step(header_task, "header")(fetched, det, band, next_visit.duration, v)
    calibs = [
        step(calib_task, f"calib-{kind}")(where.repo, det, kind, band, mjd_guess)
        for kind in ("bias", "dark", "flat")
    ]
    # one task per amplifier and snap reads its pixels (at the offset the header task
    # found) and removes its instrument signature; calibrate writes the blocks once
    # into the nJy frame
    images = [
        [
            [
                dask.delayed(isr_amp_task, pure=False)(
                    header, k, amp, *calibs, dask_key_name=f"isr_amp-{tag}-{k}-{amp.index}"
                )
                for amp in row
            ]
            for row in det.amp_grid()
        ]
        for k in range(len(fetched))
    ]
    calibrated = step(calibrate_task, "calibrate")(images, header, det, band)
    # two branches side by side: the WCS refined, then the template shifted onto it; the
    # science PSF model and cosmic rays, which need no WCS
    astrom = step(astrometry_task, "astrometry")(calibrated, prefetch)
    warped = step(warp_task, "warp")(astrom, prewarped, where.repo, det, header, cfg)
    psf = step(science_psf_task, "psf")(calibrated)
    science = step(science_task, "science")(psf, astrom)
    sub = step(subtract_task, "subtract")(science, warped, cfg)
    measured = step(detect_task, "detect")(sub, v, det, band, header, cfg)
    assoc = step(associate_task, "associate")(sub, measured, prefetch, header, det, band, cfg)
    packets = step(package_task, "package")(sub, assoc, prefetch, cfg)
    stored = step(store_task, "store")(
        assoc, packets, header, det, where.ppdb, replace, cfg, where.alerts
    )
    # the packets of the stored rows when an earlier run stored the CCD but sent nothing
    sent = step(recover_task, "recover")(
        stored, packets, sub, prefetch, header, det, where.ppdb, cfg
    )
    published = step(publish_task, "publish")(stored, sent, header, det, where.alerts, cfg)
    products = None
    if cfg.products.kinds:
        root = cfg.products.root(where.repo)
        products = step(save_products_task, "products")(published, sub, header, det, root, cfg)
    return step(report_task, "report")(
        published, stored, assoc, sent, header, science, warped, sub, measured, prefetch,
        det, products,
    )  # fmt: skip


def _gather(next_visit: NextVisit, ccd_reports: Sequence[CcdReport]) -> VisitReport:
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
    next_visit: NextVisit,
    *,
    repo: str | None = None,
    ppdb: str | None = None,
    alerts: str | None = None,
    distributor: str | None = None,
    timeout: float | None = None,
    detectors: Sequence[str] | None = None,
    images: Mapping[str, Sequence[str]] | None = None,
    replace: bool = False,
    config: PipelineConfig | None = None,
    check: Callable[[], None] | None = None,
    workers: Sequence[str] | None = None,
) -> Delayed:
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
        Replace the CCDs' earlier PPDB rows (and forget their done records) instead
        of keeping the stored rows (see :meth:`apdask.ppdb.database.Ppdb.store`).
        Without it, a CCD the PPDB already holds is not stored again: its alerts
        are re-made from the stored rows and sent (``recover_task``).
    config : PipelineConfig, optional
        Stage settings; default :meth:`PipelineConfig.resolve` now, on this process.
    check : callable, optional
        Called before each CCD's chain is built; it raises to abandon the build (the
        listener bounds the build time with it, ``apdask.listen.build_timeout_s``).
    workers : sequence of str, optional
        Dask worker addresses: each CCD's tasks prefer one of them, in turn (a loose
        restriction: another worker runs them when that one is gone).  A CCD's
        arrays (ISR blocks, calibrated image, template, difference) then stay on the
        worker that made them instead of being serialised to another.

    Returns
    -------
    dask.delayed.Delayed
        Computing it runs the visit and returns a report dict with one entry per CCD.

    Raises
    ------
    ConfigurationError
        No repository, a non-positive timeout, or a configuration value out of range.

    Notes
    -----
    Building the graph computes nothing and touches no pixels, database or sink.
    """
    where = Locations.resolve(
        repo, ppdb=ppdb, alerts=alerts, distributor=distributor, timeout=timeout
    )
    cfg = PipelineConfig.resolve() if config is None else config
    names = next_visit.detectors if detectors is None else tuple(detectors)
    reports = []
    for k, name in enumerate(names):
        if check is not None:
            check()
        # a CCD's chain prefers one worker (not required): its arrays stay where made
        place = (
            dask.annotate(workers=[workers[k % len(workers)]], allow_other_workers=True)
            if workers
            else contextlib.nullcontext()
        )
        with place:
            reports.append(
                ccd_tasks(
                    next_visit,
                    name,
                    where=where,
                    cfg=cfg,
                    image_names=(images or {}).get(name),
                    replace=replace,
                )
            )
    return dask.delayed(_gather)(next_visit, reports, dask_key_name=f"gather-{next_visit.visit}")
