"""Visit figures of :mod:`apdask.tools.plot`: the focal plane by CCD, seconds per stage.

Re-exported by :mod:`apdask.tools.plot`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from dask.utils import key_split

from apdask.core.camera import get_camera
from apdask.tools._plot_base import _figure, _matplotlib

__all__ = ["focal_plane", "stage_timings", "task_stream"]


def focal_plane(
    values,
    camera="lsstcam",
    *,
    ax=None,
    fig=None,
    cmap="viridis",
    label=None,
    annotate=None,
    vmin=None,
    vmax=None,
    figsize=(7.5, 6.5),
):
    """The camera's detectors drawn in the focal plane, coloured by one value per CCD.

    Parameters
    ----------
    values : dict
        Detector name (``"R22_S11"``) or integer id → number (alerts, a QA figure,
        latency, ...).  Detectors without a value are drawn as grey outlines; NaN
        values are light grey.
    camera : str or apdask.core.camera.Camera
        A name for :func:`apdask.core.camera.get_camera` (``"lsstcam"``, ``"comcam"``,
        ``"testcam"``), or a camera object.
    ax, fig : optional
        Axes or figure to draw into.
    cmap : str
    label : str, optional
        Colour-bar label.
    annotate : bool, optional
        Write each value on its CCD; default when the camera has at most 25 CCDs.
    vmin, vmax : float, optional
        Colour limits; default the range of the finite values.
    figsize : tuple of float

    Returns
    -------
    matplotlib.figure.Figure
        Its axes hold one ``PatchCollection`` of the detectors that have a value
        (``get_array()`` is their values) and one of the others.
    """
    # optional: matplotlib comes with the 'notebook' and 'test' extras
    from matplotlib.collections import PatchCollection

    if isinstance(camera, str):
        camera = get_camera(camera)
    dets = list(camera)
    vals = _detector_values(values, camera, dets)
    fig = _figure(fig, ax, figsize)
    if ax is None:
        ax = fig.add_subplot()
    on, off, arr = _detector_rectangles(dets, vals)
    values = np.asarray(arr, float)
    lo, hi = _colour_limits(values, vmin, vmax)
    cmap = _matplotlib().colormaps[cmap].with_extremes(bad="0.85")
    coll = PatchCollection(on, cmap=cmap, edgecolor="k", linewidth=0.5)
    coll.set_array(np.ma.masked_invalid(values))
    coll.set_clim(lo, hi)
    ax.add_collection(coll)
    ax.add_collection(PatchCollection(off, facecolor="none", edgecolor="0.6", linewidth=0.5))
    if annotate is None:
        annotate = len(dets) <= 25
    if annotate:
        _annotate(ax, vals, {d.name: d for d in dets})
    _focal_plane_axes(ax, dets, camera.name)
    if on:
        fig.colorbar(coll, ax=ax, label=label, shrink=0.8)
    return fig


def _detector_values(values, camera, dets):
    """``{detector name: float}`` of ``values`` keyed by name or id (None becomes NaN)."""
    by_name = {d.name: d for d in dets}
    by_id = {d.id: d for d in dets}
    vals = {}
    for key, v in values.items():
        det = by_id.get(key) if isinstance(key, int | np.integer) else by_name.get(str(key))
        if det is None:
            names = ", ".join(d.name for d in dets[:3])
            msg = f"unknown detector {key!r} for camera {camera.name}; names are like {names}"
            raise ValueError(msg)
        vals[det.name] = float(v) if v is not None else np.nan
    return vals


def _detector_rectangles(dets, vals):
    """Each detector's rectangle in mm: ``(with a value, without, their values)``."""
    # optional: matplotlib comes with the 'notebook' and 'test' extras
    from matplotlib.patches import Rectangle

    on, off, arr = [], [], []
    for d in dets:
        w, h = d.nx * d.pixel_size * 1e-3, d.ny * d.pixel_size * 1e-3
        t = np.deg2rad(d.rotation)
        # lower-left corner of the rotated rectangle centred on (fp_x, fp_y)
        x0 = d.fp_x - (np.cos(t) * w - np.sin(t) * h) / 2.0
        y0 = d.fp_y - (np.sin(t) * w + np.cos(t) * h) / 2.0
        rect = Rectangle((x0, y0), w, h, angle=d.rotation)
        if d.name in vals:
            on.append(rect)
            arr.append(vals[d.name])
        else:
            off.append(rect)
    return on, off, arr


def _colour_limits(values, vmin, vmax):
    """``(lo, hi)``: ``vmin``/``vmax``, else the range of the finite values; never empty."""
    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _annotate(ax, vals, by_name):
    """Each detector's name and value, written at its centre."""
    for name, v in vals.items():
        d = by_name[name]
        text = "nan" if not np.isfinite(v) else f"{v:.3g}"
        box = {"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.7, "lw": 0}
        ax.text(d.fp_x, d.fp_y, f"{name}\n{text}", ha="center", va="center", fontsize=7, bbox=box)


def _focal_plane_axes(ax, dets, title):
    """Limits around every detector, equal aspect, labels in mm."""
    allx = [d.fp_x for d in dets]
    ally = [d.fp_y for d in dets]
    half = max(max(d.nx, d.ny) * d.pixel_size * 1e-3 for d in dets) * 0.6
    ax.set_xlim(min(allx) - half, max(allx) + half)
    ax.set_ylim(min(ally) - half, max(ally) + half)
    ax.set_aspect("equal")
    ax.set_xlabel("focal plane x (mm)")
    ax.set_ylabel("focal plane y (mm)")
    ax.set_title(title)


def _timing_rows(timings):
    """``(row labels, stage names, seconds[row, stage])`` of any accepted timing input."""
    if not isinstance(timings, Mapping):
        msg = f"timings must be a dict or a visit/CCD report dict, got {type(timings).__name__}"
        raise TypeError(msg)
    if "ccds" in timings:  # a visit report: one row per CCD that has timings
        per = [(c["detector"], c.get("timings") or {}) for c in timings["ccds"]]
        per = [(name, t) for name, t in per if t]
    elif isinstance(timings.get("timings"), Mapping):  # one CCD's report
        per = [(timings.get("detector", "CCD"), timings["timings"])]
    else:  # stage -> seconds
        per = [(None, timings)]
    stages: list[str] = []
    for _, t in per:
        stages.extend(s for s in t if s not in stages)
    sec = np.array([[float(t.get(s, 0.0)) for s in stages] for _, t in per]).reshape(
        len(per), len(stages)
    )
    return [name for name, _ in per], stages, sec


def stage_timings(timings, *, ax=None, fig=None, title=None, figsize=None):
    """Seconds per pipeline stage, as horizontal bars.

    Parameters
    ----------
    timings : dict
        One of: stage → seconds (for example ``report["task_seconds"]`` of
        ``apdask.pipeline.run.run_visit``, or one CCD's ``"timings"``); one CCD's report
        (with ``"timings"``); or a visit report (with ``"ccds"``), drawn as one bar
        per CCD stacked by stage.
    ax, fig : optional
    title : str, optional
    figsize : tuple of float, optional

    Returns
    -------
    matplotlib.figure.Figure
        One bar per stage (a single CCD or a flat dict), or ``n_ccd × n_stage``
        stacked bar segments (a visit report), each segment labelled by its stage.
    """
    rows, stages, sec = _timing_rows(timings)
    if figsize is None:
        n = len(stages) if len(rows) <= 1 else max(len(rows), 0.6 * len(stages))
        figsize = (8, 1.2 + 0.35 * max(n, 1))
    fig = _figure(fig, ax, figsize)
    if ax is None:
        ax = fig.add_subplot()
    if len(rows) <= 1:
        vals = sec[0] if len(rows) else np.zeros(0)
        y = np.arange(len(stages))
        ax.barh(y, vals, color="tab:blue", label="seconds")
        ax.set_yticks(y, stages)
        for yi, v in zip(y, vals, strict=True):
            ax.text(v, yi, f" {v:.2f}", va="center", fontsize=8)
        if title is None and rows and rows[0] is not None:
            title = f"{rows[0]}: {vals.sum():.1f} s"
    else:
        y = np.arange(len(rows))
        left = np.zeros(len(rows))
        cmap = _matplotlib().colormaps["tab20"]
        for k, stage in enumerate(stages):
            ax.barh(y, sec[:, k], left=left, label=stage, color=cmap(k % 20))
            left += sec[:, k]
        ax.set_yticks(y, rows)
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        if title is None and "visit" in timings:
            title = f"visit {timings['visit']}: seconds per stage and CCD"
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _stream_rows(records):
    """``(row labels, [(row, stage, start, stop, action)])`` of task-stream records."""
    if isinstance(records, Mapping) or not all(isinstance(r, Mapping) for r in records):
        msg = (
            "records must be a list of task-stream dicts (distributed.get_task_stream's "
            "`.data`, or client.get_task_stream())"
        )
        raise TypeError(msg)
    rows: dict[tuple, int] = {}
    workers: dict[str, int] = {}
    spans = []
    for r in records:
        worker = str(r.get("worker", "?"))
        workers.setdefault(worker, len(workers))
        row = rows.setdefault((worker, r.get("thread", 0)), len(rows))
        stage = key_split(r.get("key", "?"))
        for ss in r.get("startstops", ()):
            spans.append((row, stage, float(ss["start"]), float(ss["stop"]), ss.get("action")))
    threads: dict[str, int] = {}
    labels = []
    for w, _ in rows:  # "worker i, thread j", both numbered from 0 in order of appearance
        labels.append(f"worker {workers[w]}, thread {threads.get(w, 0)}")
        threads[w] = threads.get(w, 0) + 1
    return labels, spans


def task_stream(records, *, ax=None, fig=None, title=None, figsize=(9, 3.5)):
    """The task stream of a run: one row per worker thread, one bar per task, by stage.

    The picture of the Dask dashboard's *Task Stream*, for a notebook or a report:
    compute spans are coloured by stage (the task key's prefix, e.g. ``subtract``),
    transfers and disk reads drawn in black.  Rows are labelled ``worker i, thread j``,
    numbered in order of appearance.

    Parameters
    ----------
    records : list of dict
        Task-stream records: ``distributed.get_task_stream(client)``'s ``.data``, or
        ``client.get_task_stream()``; each has ``key``, ``worker``, ``thread`` and
        ``startstops`` (``action``, ``start``, ``stop`` in Unix seconds).
    ax, fig : optional
    title : str, optional
    figsize : tuple of float

    Returns
    -------
    matplotlib.figure.Figure
        Its axes hold one bar container (``ax.containers``) per stage, labelled with
        the stage, in order of first start, with one bar per compute span, and one
        labelled ``"transfer"`` if data moved; x is seconds since the first task
        started, y the row of the worker thread.
    """
    labels, spans = _stream_rows(records)
    fig = _figure(fig, ax, figsize)
    if ax is None:
        ax = fig.add_subplot()
    t0 = min((s[2] for s in spans), default=0.0)
    stages: list[str] = []
    for _, stage, _, _, action in sorted(spans, key=lambda s: s[2]):
        if action == "compute" and stage not in stages:
            stages.append(stage)
    cmap = _matplotlib().colormaps["tab20"]
    groups = [(s, cmap(k % 20)) for k, s in enumerate(stages)] + [("transfer", "k")]
    for name, colour in groups:
        sel = [
            (row, start - t0, stop - start)
            for row, stage, start, stop, action in spans
            if (action == "compute" and stage == name)
            or (action != "compute" and name == "transfer")
        ]
        if sel:
            row, left, width = np.array(sel, float).T
            ax.barh(row, width, left=left, height=0.8, color=colour, label=name)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("seconds since the first task started")
    if spans:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  ncols=1 + len(groups) // 14)  # fmt: skip
    ax.set_title(title or f"task stream: {len(records)} tasks on {len(labels)} threads")
    fig.tight_layout()
    return fig
