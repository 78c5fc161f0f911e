"""Light curves of :mod:`apdask.tools.plot`: fluxes in nJy with an AB-magnitude axis.

Re-exported by :mod:`apdask.tools.plot`.
"""

from __future__ import annotations

import numpy as np

from apdask.tools._plot_base import _column, _figure, _n_rows

__all__ = ["AB_ZEROPOINT_NJY", "BAND_COLORS", "light_curve", "mag_to_njy", "njy_to_mag"]

#: AB magnitude of 1 nJy: ``m = 31.4 - 2.5 log10(flux / nJy)``.
AB_ZEROPOINT_NJY = 31.4

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
    # optional: matplotlib comes with the 'notebook' and 'test' extras
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # full MJDs: few enough to read
    ax.set_xlabel("midpointMjdTai (MJD)")
    ax.set_ylabel("psfFlux (nJy)")
    if title:
        ax.set_title(title)
    _mag_axis(ax)
    return fig


def _mag_axis(ax):
    """Secondary AB-magnitude axis, ticked only where the visible flux is positive."""
    # optional: matplotlib comes with the 'notebook' and 'test' extras
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
