"""Instrument signature removal: raw amplifier segments → calibrated nJy Exposure.

:func:`isr_arrays` builds a lazy dask graph (one task per amplifier) that does
overscan subtraction, trimming, flipping to the assembled orientation,
saturation / bad-pixel / no-data masking, gain, bias, dark and flat correction
and variance estimation in electrons.  :func:`calibrate` turns the computed
arrays into an :class:`~apdask.core.exposure.Exposure` in nJy, and
:func:`mask_cosmic_rays` flags and repairs cosmic rays.

Calibration products are assembled, detector-shaped arrays: the master bias in
electrons (residual after overscan), the dark in e-/s, the flat normalised to
mean 1 (≤ 0 or NaN = dead pixel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np
from scipy import ndimage

from apdask._kernels.fused import (
    amp_pass,
    cr_candidates,
    grow_pixels,
    in_thread,
    interpolate_pixels,
    place_block,
)
from apdask.core.camera import njy_per_electron
from apdask.core.exposure import MASK, Exposure
from apdask.pipeline.background import Background, fit_background

__all__ = ["assemble", "isr_arrays", "calibrate", "mask_cosmic_rays", "isr_amp", "section"]

#: Flat values at or below this are flagged BAD (and ≤ 0 / non-finite are dead).
FLAT_BAD = 0.5
#: Dark current above this (e-/s) flags a hot pixel / column as BAD.
DARK_HOT = 1.0
#: An amplifier with more than this fraction of its data pixels saturated or
#: non-finite is unusable as a whole: all its pixels are flagged NO_DATA too.
DEAD_AMP_FRACTION = 0.5
_OVERSCAN_SMOOTH = 15  # rows in the running mean of the overscan row medians


def isr_amp(
    raw: np.ndarray,
    amp: Any,
    bias: np.ndarray | None = None,
    dark: np.ndarray | None = None,
    flat: np.ndarray | None = None,
    darktime: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ISR of one amplifier segment (numpy in, numpy out).

    Parameters
    ----------
    raw : numpy.ndarray
        Raw segment in ADU, readout order, shape ``amp.raw_shape``.
    amp : apdask.core.camera.Amplifier
    bias, dark, flat : numpy.ndarray, optional
        The amplifier's section ``[y0:y1, x0:x1]`` of the assembled calibs.
    darktime : float
        Dark time in seconds.

    Returns
    -------
    image_e, variance_e2, mask : numpy.ndarray
        float32 electrons, float32 e², uint32 mask; assembled orientation.
    """
    raw = np.asarray(raw, dtype=np.float32)
    if raw.shape != amp.raw_shape:
        msg = f"amplifier {amp.name}: raw segment has shape {raw.shape}, expected {amp.raw_shape}"
        raise ValueError(msg)
    osc = raw[amp.overscan_slice]
    if osc.shape[1] > 0:
        osc_ok = np.isfinite(osc)
        row = (
            np.median(np.where(osc_ok, osc, np.nan), axis=1)
            if not osc_ok.all()
            else (np.median(osc, axis=1))
        )
        row = np.where(np.isfinite(row), row, np.nanmedian(row) if np.isfinite(row).any() else 0.0)
        row = ndimage.uniform_filter1d(row.astype(np.float64), _OVERSCAN_SMOOTH, mode="nearest")
    else:
        row = np.zeros(amp.ny)
    img, var, mask, lost = amp_pass(
        raw, amp.data_slice, row, flip_y=amp.flip_y, flip_x=amp.flip_x, gain=amp.gain,
        saturation=amp.saturation, bias=bias, dark=dark, darktime=float(darktime), flat=flat,
        read_noise=amp.read_noise, flat_bad=FLAT_BAD, dark_hot=DARK_HOT,
        bits=(MASK["SAT"], MASK["NO_DATA"], MASK["BAD"]),
    )  # fmt: skip
    if lost > DEAD_AMP_FRACTION * img.size:
        # a saturated (or unreadable) amplifier: its values carry no information and a
        # step of ~the full well at its border would ring through every convolution
        mask |= np.uint32(MASK["NO_DATA"])
        img[...] = 0.0
    return img, var, mask


def _task_arg(x):
    """A dask array as a task argument that refers to its chunk by key.

    Passed as is, a dask array is finalized into a task that inlines its whole
    dependency chain, so a shared upstream task (the visit's prefetch, the blocking
    fetch) would be recomputed inside every amplifier's task.
    """
    if not isinstance(x, da.Array):
        return x
    if x.npartitions > 1:
        x = x.rechunk(x.shape)
    return x.to_delayed(optimize_graph=False).ravel()[0]


def section(calib: np.ndarray | None, amp: Any) -> np.ndarray | None:
    """The amplifier's section ``[y0:y1, x0:x1]`` of an assembled calibration (a view)."""
    if calib is None:
        return None
    return calib[amp.y0 : amp.y1, amp.x0 : amp.x1]


def isr_arrays(
    amps: Sequence[Any],
    detector: Any,
    bias: Any = None,
    dark: Any = None,
    flat: Any = None,
    darktime: float = 0.0,
) -> tuple[da.Array, da.Array, da.Array]:
    """Lazy ISR of all amplifiers of a detector.

    Parameters
    ----------
    amps : sequence of array_like
        Raw segments (numpy or dask, ADU, readout order, ``amp.raw_shape``) in
        ``detector.amplifiers`` order.
    detector : apdask.core.camera.Detector
    bias, dark, flat : array_like, optional
        Assembled calibration arrays (numpy or dask): bias in e-, dark in e-/s,
        flat normalised to 1.
    darktime : float or dask.delayed.Delayed, optional
        Dark time in seconds (may be a Delayed, e.g. read from a header lazily).

    Returns
    -------
    image_e, variance_e2, mask : dask.array.Array
        Lazy assembled arrays (float32 e-, float32 e², uint32), chunked one
        amplifier per chunk (``detector.amp_chunks``).  Building them computes nothing.
    """
    amps = list(amps)
    if len(amps) != len(detector.amplifiers):
        msg = (
            f"detector {detector.name} has {len(detector.amplifiers)} amplifiers, "
            f"got {len(amps)} raw segments"
        )
        raise ValueError(msg)
    for calib, name in ((bias, "bias"), (dark, "dark"), (flat, "flat")):
        if calib is not None and tuple(calib.shape) != detector.shape:
            msg = (
                f"{name} has shape {tuple(calib.shape)}, "
                f"detector {detector.name} is {detector.shape}"
            )
            raise ValueError(msg)
    grid = detector.amp_grid()
    by_index = {a.index: k for k, a in enumerate(detector.amplifiers)}
    blocks: dict[str, list[Any]] = {"img": [], "var": [], "mask": []}
    task = dask.delayed(isr_amp, nout=3, pure=True)
    for row in grid:
        brow: dict[str, list[Any]] = {k: [] for k in blocks}
        for amp in row:
            raw = _task_arg(amps[by_index[amp.index]])
            sections = [_task_arg(section(c, amp)) for c in (bias, dark, flat)]
            out = task(raw, amp, *sections, darktime)
            shp = (amp.ny, amp.nx)
            brow["img"].append(da.from_delayed(out[0], shp, dtype=np.float32))
            brow["var"].append(da.from_delayed(out[1], shp, dtype=np.float32))
            brow["mask"].append(da.from_delayed(out[2], shp, dtype=np.uint32))
        for k in blocks:
            blocks[k].append(brow[k])
    return da.block(blocks["img"]), da.block(blocks["var"]), da.block(blocks["mask"])


def calibrate(
    image_e: np.ndarray,
    variance_e2: np.ndarray,
    mask: np.ndarray,
    band: str,
    exptime: float,
    wcs: Any,
    meta: dict[str, Any] | None = None,
) -> Exposure:
    """Scale ISR output in electrons to a calibrated nJy :class:`Exposure`.

    Parameters
    ----------
    image_e, variance_e2, mask : array_like or list
        Computed (numpy) outputs of :func:`isr_arrays`, or their amplifier blocks
        (:func:`assemble`).
    band : str
    exptime : float
        Exposure time in seconds.
    wcs : astropy.wcs.WCS
    meta : dict, optional
        Stored on the Exposure; ``band`` and ``exptime`` are added.

    Returns
    -------
    apdask.core.exposure.Exposure
        Image in nJy per pixel, variance in nJy² (scaled by the square).
    """
    scale = np.float32(njy_per_electron(band, exptime))
    img = assemble(image_e, np.float32, scale)
    var = assemble(variance_e2, np.float32, scale, scale)
    meta = dict(meta or {})
    meta.setdefault("band", band)
    meta.setdefault("exptime", float(exptime))
    mask = assemble(mask, np.uint32) if isinstance(mask, list) else np.asarray(mask, np.uint32)
    return Exposure(image=img, variance=var, mask=mask, wcs=wcs, meta=meta)


def assemble(planes: Any, dtype: Any, *scales: np.float32) -> np.ndarray:
    """One new array from an image or its amplifier blocks, times each of ``scales``.

    ``planes`` is an array or the nested list ``[row][column]`` of per-amplifier
    arrays that :func:`isr_arrays`'s outputs give with ``.to_delayed().tolist()``:
    they are written once into the assembled array (no concatenated copy first).
    """
    blocks = planes if isinstance(planes, list) else [[planes]]
    heights = [np.shape(row[0])[0] for row in blocks]
    widths = [np.shape(b)[1] for b in blocks[0]]
    out = np.empty((sum(heights), sum(widths)), dtype)
    y = 0
    for row, h in zip(blocks, heights, strict=True):
        x = 0
        for b in row:
            w = np.shape(b)[1]
            if (
                isinstance(b, np.ndarray)
                and b.dtype == out.dtype
                and len(scales) in (1, 2)
                and np.result_type(out.dtype, *scales) == out.dtype
            ):
                place_block(out, b, y, x, *scales)  # one pass, not one per scale
            else:
                dst = out[y : y + h, x : x + w]
                if scales:
                    np.multiply(np.asarray(b, dtype), scales[0], out=dst)
                    for s in scales[1:]:
                        dst *= s
                else:
                    dst[...] = b
            x += w
        y += h
    return out


def mask_cosmic_rays(
    exposure: Exposure,
    psf_fwhm_px: float,
    nsigma: float = 5.0,
    grow: int = 1,
    iterations: int = 2,
    background: Background | None = None,
    above: tuple[np.ndarray, np.ndarray] | None = None,
    above_nsigma: float | None = None,
) -> Exposure:
    """Flag cosmic rays (CR bit) and replace them by the local median.

    A pixel is a cosmic ray when it is > ``nsigma`` above the local background and,
    along at least one of the four directions through it (rows, columns,
    diagonals), it is sharper than any PSF of FWHM ``psf_fwhm_px`` allows: with
    ``n`` the mean of the two opposite neighbours (background subtracted),
    ``I - R n > nsigma * sqrt(σ² + R² σ_n²)``, where ``R = PSF(0) / PSF(d)`` for
    the neighbour distance ``d`` (1 or √2 pixels) and a PSF 20% sharper than
    given.  A star's centre is never sharper than its PSF; a cosmic ray is sharp
    across its track in at least one direction.

    Parameters
    ----------
    exposure : apdask.core.exposure.Exposure
    psf_fwhm_px : float
        PSF FWHM in pixels (the sharpest stars on the exposure).
    nsigma : float, optional
        Significance threshold.
    grow : int, optional
        Grow the CR mask by this many pixels before interpolation.
    iterations : int, optional
        Detection passes (a second pass catches the shoulders of long tracks).
    background : apdask.pipeline.background.Background, optional
        The image's background as :func:`~apdask.pipeline.background.fit_background`
        fits it (``lazy``), when already fitted (by the star search): fitted here if
        not given.
    above : tuple of numpy.ndarray, optional
        ``(y, x)`` in raster order of every pixel more than ``above_nsigma`` σ above
        ``background``, when known (the star search's
        :attr:`~apdask.pipeline.stars.StarPeaks.bright`): the first pass tests only
        those, not every pixel.  Used only when ``above_nsigma <= nsigma`` (else the
        list could miss pixels the test flags, and every pixel is tested).
    above_nsigma : float, optional
        The threshold ``above`` was listed at; default ``nsigma``.

    Returns
    -------
    apdask.core.exposure.Exposure
        A copy with CR pixels flagged and interpolated (variance kept).
    """
    if above is not None and above_nsigma is not None and above_nsigma > nsigma:
        above = None  # not a superset of the pixels the first test flags
    # the copy of the mask that gets the CR bits, made beside the image's (the passes
    # read the exposure's own mask, unchanged until the end)
    out_mask = in_thread(np.array, exposure.mask, np.uint32)
    img = np.array(exposure.image, dtype=np.float32)
    var = np.asarray(exposure.variance, np.float32)
    mask = np.asarray(exposure.mask, np.uint32)
    copied = out_mask()
    skip_bits = MASK["SAT"] | MASK["NO_DATA"] | MASK["BAD"]
    if background is None:
        background = fit_background(img, mask, lazy=True)
    bkg = background.bilinear()
    sigma = max(float(psf_fwhm_px), 0.5) / 2.3548
    # a slightly sharper PSF than measured is still allowed (conservative for stars)
    sig_eff = 0.8 * sigma
    r1 = np.exp(1.0 / (2 * sig_eff**2))
    r2 = np.exp(2.0 / (2 * sig_eff**2))
    # the cosmic-ray pixels as a mask (what the passes read) and as a list (what they
    # change): no full-frame search
    cr = np.zeros(img.shape, bool)
    ys = xs = np.zeros(0, np.int64)
    for it in range(iterations):
        # after the first pass only the pixels next to those interpolated can change
        near = (ys, xs) if it else None
        cy, cx = cr_candidates(img, bkg, var, mask, skip_bits, cr, r1, r2, nsigma, near, above)
        if len(cy) == 0:
            break
        if grow > 0:
            cy, cx = grow_pixels(cy, cx, grow, img.shape)
            ok = (mask[cy, cx] & skip_bits) == 0
            cy, cx = cy[ok], cx[ok]
        new = ~cr[cy, cx]
        ys, xs = np.concatenate([ys, cy[new]]), np.concatenate([xs, cx[new]])
        cr[ys, xs] = True
        interpolate_pixels(img, cr, ys, xs)
    copied[ys, xs] |= MASK["CR"]
    return exposure.copy_with(image=img, mask=copied)
