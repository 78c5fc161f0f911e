"""Figures of what a visit produced, built on matplotlib and astropy.visualization.

Every function takes plain inputs (numpy arrays, astropy ``CCDData``/``NDData``,
astropy Tables, dicts of a visit report or of a decoded alert packet) and returns a
:class:`matplotlib.figure.Figure`:

* :func:`image_triplet`: science, template and difference with DIASources overlaid;
* :func:`alert_cutouts`: the three FITS cutouts of one alert packet;
* :func:`light_curve`: a DIAObject's DIASource fluxes with errors, in nJy and AB mag;
* :func:`focal_plane`: the camera's detectors coloured by one figure per CCD;
* :func:`stage_timings`: per-stage seconds of a CCD or of every CCD of a visit.

matplotlib is optional (``pip install 'apdask[notebook]'``) and imported when a
function is first called.  This module never selects a backend (it never calls
``matplotlib.use``): pass ``ax=`` or ``fig=`` to draw into your own figure, otherwise
a new one comes from :func:`matplotlib.pyplot.figure`, so that it shows inline in a
notebook and with ``plt.show()`` in a script.  To stay clear of pyplot's figure
manager, pass ``fig=matplotlib.figure.Figure()``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np

__all__ = [
    "AB_ZEROPOINT_NJY",
    "classify_sources",
    "njy_to_mag",
    "mag_to_njy",
    "image_triplet",
    "alert_cutouts",
    "light_curve",
    "focal_plane",
    "stage_timings",
]

#: AB magnitude of 1 nJy: ``m = 31.4 - 2.5 log10(flux / nJy)``.
AB_ZEROPOINT_NJY = 31.4

#: Marker style of each kind of DIASource in :func:`image_triplet`.
SOURCE_STYLES = {
    "positive": {"marker": "o", "edgecolors": "tab:green", "label": "positive"},
    "negative": {"marker": "s", "edgecolors": "tab:red", "label": "negative"},
    "dipole": {"marker": "D", "edgecolors": "tab:orange", "label": "dipole"},
}

#: Colours of the Rubin bands in :func:`light_curve`.
BAND_COLORS = {
    "u": "#0c71ff",
    "g": "#49be61",
    "r": "#c61c00",
    "i": "#ffc200",
    "z": "#f341a2",
    "y": "#5d0000",
}

_FLUX_FLOOR_NJY = 1e-3  # fluxes at or below this have no magnitude (mag 38.9)


def _matplotlib():
    """Import matplotlib (never selecting a backend) or say which extra installs it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        msg = (
            "apdask.tools.plot needs matplotlib, an optional dependency; install it with "
            "pip install 'apdask[notebook]' (or pip install matplotlib)"
        )
        raise ImportError(msg) from exc
    import matplotlib.figure

    return matplotlib


def _figure(fig, ax, figsize):
    """The figure to draw into: ``ax``'s, ``fig`` (cleared) or a new pyplot figure."""
    mpl = _matplotlib()
    if ax is not None:
        return ax.figure
    if fig is not None:
        if not isinstance(fig, mpl.figure.Figure):
            msg = f"fig must be a matplotlib Figure, got {type(fig).__name__}"
            raise TypeError(msg)
        fig.clear()
        return fig
    import matplotlib.pyplot as plt  # resolves, but never sets, the backend

    return plt.figure(figsize=figsize)


def njy_to_mag(flux):
    """AB magnitude of a flux in nJy; NaN where the flux is not positive.

    Parameters
    ----------
    flux : array_like
        Flux in nJy.

    Returns
    -------
    numpy.ndarray
        ``31.4 - 2.5 log10(flux)``.
    """
    f = np.asarray(flux, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(f > 0, AB_ZEROPOINT_NJY - 2.5 * np.log10(np.where(f > 0, f, 1.0)), np.nan)


def mag_to_njy(mag):
    """Flux in nJy of an AB magnitude (the inverse of :func:`njy_to_mag`)."""
    return 10.0 ** (-0.4 * (np.asarray(mag, dtype=float) - AB_ZEROPOINT_NJY))


# --------------------------------------------------------------------------------------
# images


def _pixels(image):
    """2-D float array of an ndarray, CCDData/NDData, a FITS HDU or an apdask Exposure."""
    for attr in ("data", "image"):  # NDData/HDU, Exposure
        if hasattr(image, attr) and not isinstance(image, np.ndarray):
            image = getattr(image, attr)
            break
    arr = np.asarray(image, dtype=float)
    if arr.ndim != 2:
        msg = f"an image must be 2-D, got shape {arr.shape}"
        raise ValueError(msg)
    return arr


def _norm(data, stretch):
    """An astropy ``ImageNormalize`` with ``"zscale"`` (linear) or ``"asinh"`` limits."""
    from astropy.visualization import (
        AsinhStretch,
        ImageNormalize,
        LinearStretch,
        PercentileInterval,
        ZScaleInterval,
    )

    if stretch == "zscale":
        interval, st = ZScaleInterval(), LinearStretch()
    elif stretch == "asinh":
        interval, st = PercentileInterval(99.5), AsinhStretch(a=0.1)
    else:
        msg = f"stretch must be 'zscale' or 'asinh', got {stretch!r}"
        raise ValueError(msg)
    good = data[np.isfinite(data)]
    vmin, vmax = interval.get_limits(good) if good.size else (0.0, 1.0)
    if not vmax > vmin:
        vmax = vmin + 1.0
    return ImageNormalize(vmin=vmin, vmax=vmax, stretch=st, clip=False)


def _show(ax, data, stretch, title, cmap="gray"):
    ax.imshow(data, origin="lower", cmap=cmap, norm=_norm(data, stretch), interpolation="nearest")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def _column(sources, name):
    if isinstance(sources, Mapping) or hasattr(sources, "colnames"):
        return np.asarray(sources[name]) if name in _names(sources) else None
    return np.asarray([s[name] for s in sources]) if sources and name in sources[0] else None


def _names(sources):
    return list(sources.colnames) if hasattr(sources, "colnames") else list(sources)


def classify_sources(sources):
    """Kind of each DIASource: ``"dipole"``, ``"negative"`` or ``"positive"``.

    ``isDipole`` wins; otherwise ``isNegative``, or the sign of ``psfFlux`` when the
    table has no ``isNegative`` column.

    Parameters
    ----------
    sources : astropy.table.Table, dict of arrays or list of dict

    Returns
    -------
    numpy.ndarray of str
    """
    n = _n_rows(sources)
    kind = np.full(n, "positive", dtype=object)
    neg = _column(sources, "isNegative")
    if neg is None:
        flux = _column(sources, "psfFlux")
        neg = np.zeros(n, bool) if flux is None else np.asarray(flux, float) < 0
    kind[np.asarray(neg, bool)] = "negative"
    dip = _column(sources, "isDipole")
    if dip is not None:
        kind[np.asarray(dip, bool)] = "dipole"
    return kind


def _n_rows(sources):
    if hasattr(sources, "colnames"):
        return len(sources)
    if isinstance(sources, Mapping):
        return len(next(iter(sources.values()))) if sources else 0
    return len(sources)


def _source_pixels(sources, wcs):
    """``(x, y)`` of the sources: their ``x``/``y`` columns, else ``ra``/``dec`` via ``wcs``."""
    x, y = _column(sources, "x"), _column(sources, "y")
    if x is not None and y is not None:
        return np.asarray(x, float), np.asarray(y, float)
    ra, dec = _column(sources, "ra"), _column(sources, "dec")
    if ra is None or dec is None or wcs is None:
        msg = (
            "sources need x and y pixel columns, or ra and dec with a WCS (an image with "
            ".wcs or the wcs= argument)"
        )
        raise ValueError(msg)
    x, y = wcs.celestial.world_to_pixel_values(np.asarray(ra, float), np.asarray(dec, float))
    return np.asarray(x, float), np.asarray(y, float)


def image_triplet(
    science,
    template,
    difference,
    sources=None,
    *,
    stretch="zscale",
    wcs=None,
    titles=("science", "template", "difference"),
    fig=None,
    figsize=(13, 4.6),
):
    """Science, template and difference side by side, DIASources marked by kind.

    Positive detections are green circles, negative ones red squares and dipoles
    orange diamonds, on all three panels (one scatter collection per kind and panel,
    labelled with the kind).

    Parameters
    ----------
    science, template, difference : numpy.ndarray, CCDData or NDData
        Images of the same shape, indexed ``[y, x]``.
    sources : astropy.table.Table, dict of arrays or list of dict, optional
        DIASources with pixel ``x``, ``y`` (or ``ra``, ``dec`` and a WCS), and
        ``isDipole``/``isNegative`` or ``psfFlux`` for the kind.
    stretch : {"zscale", "asinh"}
        Linear stretch between zscale limits, or asinh up to the 99.5th percentile.
    wcs : astropy.wcs.WCS, optional
        For sources given by ``ra``/``dec``; default the difference image's ``.wcs``.
    titles : tuple of str
    fig : matplotlib.figure.Figure, optional
        Figure to draw into (cleared first).
    figsize : tuple of float

    Returns
    -------
    matplotlib.figure.Figure
        With three image axes, in the order science, template, difference.
    """
    images = [_pixels(im) for im in (science, template, difference)]
    if len({im.shape for im in images}) != 1:
        shapes = [im.shape for im in images]
        msg = f"science, template and difference must have one shape, got {shapes}"
        raise ValueError(msg)
    fig = _figure(fig, None, figsize)
    axes = fig.subplots(1, 3, sharex=True, sharey=True)
    for ax, data, title in zip(axes, images, titles, strict=True):
        _show(ax, data, stretch, title)
    if sources is not None and _n_rows(sources):
        x, y = _source_pixels(sources, wcs if wcs is not None else getattr(difference, "wcs", None))
        kind = classify_sources(sources)
        for ax in axes:
            for name, style in SOURCE_STYLES.items():
                sel = kind == name
                if sel.any():
                    ax.scatter(x[sel], y[sel], s=90, facecolors="none", linewidths=1.2, **style)
        axes[-1].legend(loc="upper right", fontsize="small", framealpha=0.7)
    for ax, data in zip(axes, images, strict=True):
        ax.set_xlim(-0.5, data.shape[1] - 0.5)
        ax.set_ylim(-0.5, data.shape[0] - 0.5)
    fig.tight_layout()
    return fig


def _fits_image(blob):
    """The first image HDU's data of FITS bytes, as float (None for a missing cutout)."""
    from astropy.io import fits

    if blob is None:
        return None
    with fits.open(io.BytesIO(bytes(blob))) as hdul:
        for hdu in hdul:
            if hdu.data is not None and getattr(hdu, "is_image", False) and hdu.data.ndim == 2:
                return np.array(hdu.data, dtype=float)
    return None


#: Cutout fields of an alert packet, in the order :func:`alert_cutouts` draws them.
CUTOUT_FIELDS = ("cutoutScience", "cutoutTemplate", "cutoutDifference")


def alert_cutouts(alert, *, stretch="zscale", fig=None, figsize=(9, 3.4)):
    """The science, template and difference cutouts of one decoded alert packet.

    Parameters
    ----------
    alert : dict
        A decoded packet (``apdask.alerts.sinks.read_alerts``, ``fastavro``, or
        ``lsst.alert.packet``) whose ``cutoutScience``, ``cutoutTemplate`` and
        ``cutoutDifference`` are FITS bytes or None.
    stretch : {"zscale", "asinh"}
    fig : matplotlib.figure.Figure, optional
    figsize : tuple of float

    Returns
    -------
    matplotlib.figure.Figure
        Three axes; a missing cutout leaves its axis empty with "no cutout".
    """
    if not isinstance(alert, Mapping):
        msg = f"alert must be a decoded packet dict, got {type(alert).__name__}"
        raise TypeError(msg)
    fig = _figure(fig, None, figsize)
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, CUTOUT_FIELDS, strict=True):
        data = _fits_image(alert.get(key))
        name = key.removeprefix("cutout").lower()
        if data is None:
            ax.set_title(name)
            ax.text(0.5, 0.5, "no cutout", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        else:
            _show(ax, data, stretch, name)
    src = alert.get("diaSource") or {}
    parts = [f"diaSourceId {alert.get('diaSourceId', src.get('diaSourceId'))}"]
    if src.get("psfFlux") is not None:
        parts.append(f"psfFlux {src['psfFlux']:.0f} nJy")
    if src.get("snr") is not None:
        parts.append(f"S/N {src['snr']:.1f}")
    fig.suptitle(", ".join(parts), fontsize="medium")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# light curve


def light_curve(sources, *, ax=None, fig=None, title=None, figsize=(7, 4)):
    """A DIAObject's light curve: ``psfFlux`` ± ``psfFluxErr`` against time, per band.

    The left axis is in nJy; a secondary right axis gives AB magnitudes
    (``m = 31.4 - 2.5 log10(flux / nJy)``) where the flux is positive.

    Parameters
    ----------
    sources : astropy.table.Table
        DIASources (or forced sources) of one object, with ``midpointMjdTai``,
        ``psfFlux``, ``psfFluxErr`` and ``band``.  A dict of columns or a list of
        row dicts works too.
    ax : matplotlib.axes.Axes, optional
    fig : matplotlib.figure.Figure, optional
    title : str, optional
        Default: the ``diaObjectId`` when the table has one value of it.
    figsize : tuple of float

    Returns
    -------
    matplotlib.figure.Figure
        One ``errorbar`` per band, labelled with the band, one point per row.
    """
    need = ("midpointMjdTai", "psfFlux", "psfFluxErr", "band")
    missing = [c for c in need if _column(sources, c) is None] if _n_rows(sources) else []
    if missing:
        msg = f"light_curve needs the columns {need}; missing {missing}"
        raise ValueError(msg)
    fig = _figure(fig, ax, figsize)
    if ax is None:
        ax = fig.add_subplot()
    if _n_rows(sources):
        t = np.asarray(_column(sources, "midpointMjdTai"), float)
        f = np.asarray(_column(sources, "psfFlux"), float)
        e = np.asarray(_column(sources, "psfFluxErr"), float)
        band = np.asarray(_column(sources, "band")).astype(str)
        order = list(BAND_COLORS) + sorted(set(band) - set(BAND_COLORS))
        for b in [b for b in order if b in set(band)]:
            sel = band == b
            ax.errorbar(
                t[sel],
                f[sel],
                yerr=e[sel],
                fmt="o",
                ms=5,
                capsize=2,
                label=b,
                color=BAND_COLORS.get(b),
            )
        ax.legend(title="band", fontsize="small")
        ids = _column(sources, "diaObjectId")
        if title is None and ids is not None and len(set(ids.tolist())) == 1:
            title = f"diaObjectId {ids[0]}"
    ax.axhline(0.0, color="0.6", lw=0.8, zorder=0)
    ax.ticklabel_format(axis="x", useOffset=False, style="plain")
    ax.set_xlabel("midpointMjdTai (MJD)")
    ax.set_ylabel("psfFlux (nJy)")
    if title:
        ax.set_title(title)
    _mag_axis(ax)
    return fig


def _mag_axis(ax):
    """Secondary AB-magnitude axis, ticked only where the visible flux is positive."""
    from matplotlib.ticker import FixedLocator, MaxNLocator

    def forward(f):
        f = np.maximum(np.asarray(f, float), _FLUX_FLOOR_NJY)
        return AB_ZEROPOINT_NJY - 2.5 * np.log10(f)

    sec = ax.secondary_yaxis("right", functions=(forward, mag_to_njy))
    sec.set_ylabel("AB magnitude")
    lo, hi = ax.get_ylim()
    if hi > _FLUX_FLOOR_NJY:
        lo = max(lo, hi / 8.0)  # below this the magnitude ticks crowd at zero flux
        mags = MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(forward(hi), forward(lo))
        ticks = [m for m in mags if lo <= mag_to_njy(m) <= hi]
        sec.yaxis.set_major_locator(FixedLocator(ticks))
    else:
        sec.yaxis.set_major_locator(FixedLocator([]))
    return sec


# --------------------------------------------------------------------------------------
# focal plane


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
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if isinstance(camera, str):
        from apdask.core.camera import get_camera

        camera = get_camera(camera)
    dets = list(camera)
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
    fig = _figure(fig, ax, figsize)
    if ax is None:
        ax = fig.add_subplot()
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
    values = np.asarray(arr, float)
    finite = values[np.isfinite(values)]
    lo = vmin if vmin is not None else (finite.min() if finite.size else 0.0)
    hi = vmax if vmax is not None else (finite.max() if finite.size else 1.0)
    if hi <= lo:
        hi = lo + 1.0
    cmap = _matplotlib().colormaps[cmap].with_extremes(bad="0.85")
    coll = PatchCollection(on, cmap=cmap, edgecolor="k", linewidth=0.5)
    coll.set_array(np.ma.masked_invalid(values))
    coll.set_clim(lo, hi)
    ax.add_collection(coll)
    ax.add_collection(PatchCollection(off, facecolor="none", edgecolor="0.6", linewidth=0.5))
    if annotate is None:
        annotate = len(dets) <= 25
    if annotate:
        for name, v in vals.items():
            d = by_name[name]
            text = "nan" if not np.isfinite(v) else f"{v:.3g}"
            box = {"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.7, "lw": 0}
            ax.text(
                d.fp_x, d.fp_y, f"{name}\n{text}", ha="center", va="center", fontsize=7, bbox=box
            )
    allx = [d.fp_x for d in dets]
    ally = [d.fp_y for d in dets]
    half = max(max(d.nx, d.ny) * d.pixel_size * 1e-3 for d in dets) * 0.6
    ax.set_xlim(min(allx) - half, max(allx) + half)
    ax.set_ylim(min(ally) - half, max(ally) + half)
    ax.set_aspect("equal")
    ax.set_xlabel("focal plane x (mm)")
    ax.set_ylabel("focal plane y (mm)")
    ax.set_title(camera.name)
    if on:
        fig.colorbar(coll, ax=ax, label=label, shrink=0.8)
    return fig


# --------------------------------------------------------------------------------------
# timings


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
