"""Images of :mod:`apdask.tools.plot`: science, template and difference, alert cutouts.

Re-exported by :mod:`apdask.tools.plot`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from astropy.io import fits

from apdask.tools._plot_base import _column, _figure, _n_rows

__all__ = ["CUTOUT_FIELDS", "SOURCE_STYLES", "alert_cutouts", "classify_sources", "image_triplet"]

#: Marker style of each kind of DIASource in :func:`image_triplet`.
SOURCE_STYLES = {
    "positive": {"marker": "o", "edgecolors": "tab:green", "label": "positive"},
    "negative": {"marker": "s", "edgecolors": "tab:red", "label": "negative"},
    "dipole": {"marker": "D", "edgecolors": "tab:orange", "label": "dipole"},
}


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
    # lazy: astropy.visualization imports matplotlib, which importing apdask.tools.plot
    # must not do (tests/tools/test_plot.py)
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
