"""Fused passes of the subtraction: NO_DATA, masks, FFT tiles, the difference, its variance."""

from __future__ import annotations

from collections.abc import Sequence

import numba
import numpy as np

from apdask._kernels.fused._threads import _threads

__all__ = [
    "fill_nodata",
    "tile_product",
    "weighted_stamp_rows",
    "tile_add",
    "tile_add_rows",
    "combine_inputs",
    "finish_difference",
    "difference_variance",
]


@numba.njit(parallel=True, cache=True)
def _nodata(image, variance, mask, nodata_bit, nodata):
    ny, nx = image.shape
    rows = np.zeros(ny, np.int64)
    for y in numba.prange(ny):
        n = 0
        for x in range(nx):
            bad = (mask[y, x] & nodata_bit) != 0 or not np.isfinite(image[y, x])
            bad = bad or not np.isfinite(variance[y, x])
            nodata[y, x] = bad
            n += bad
        rows[y] = n
    return rows.sum()


@numba.njit(parallel=True, cache=True)
def _fill(image, nodata, out):
    ny, nx = image.shape
    for y in numba.prange(ny):
        for x in range(nx):
            out[y, x] = np.float32(0.0) if nodata[y, x] else image[y, x]


@_threads
def fill_nodata(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, nodata_bit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Image with its no-data pixels set to 0, and where they are.

    Equal to ``nodata = (mask & nodata_bit != 0) | ~isfinite(image) | ~isfinite(variance)``
    and ``np.where(nodata, 0, image)``, in float32.

    Returns
    -------
    filled : numpy.ndarray
        float32 copy of ``image``; ``image`` itself (float32, not copied) when no pixel
        lacks data: read it, do not write to it.
    nodata : numpy.ndarray
        bool.
    """
    image = np.asarray(image, np.float32)
    nodata = np.empty(image.shape, np.bool_)
    count = _nodata(image, np.asarray(variance), np.asarray(mask), np.uint32(nodata_bit), nodata)
    if count == 0:
        return image, nodata
    out = np.empty(image.shape, np.float32)
    _fill(image, nodata, out)
    return out, nodata


@numba.njit(nogil=True, cache=True)
def weighted_stamp_rows(res: np.ndarray, first: int, sw: np.ndarray, out: np.ndarray) -> None:
    """``out[n, first + r, q·S + x] = res[r, q, n, x] · sw[n, q·S + x]`` in float64 (no GIL).

    ``res`` (float32, ``(n_kernels, S, n_stamps, S)``) holds the stamps' convolutions
    with a group of kernels, the rows of all stamps side by side; ``out`` the weighted
    convolutions of each stamp, one flattened ``S × S`` row per kernel.
    """
    nr, s, ns, sx = res.shape
    for n in range(ns):
        for r in range(nr):
            dst = out[n, first + r]
            for q in range(s):
                w = sw[n, q * sx : (q + 1) * sx]
                src = res[r, q, n]
                for x in range(sx):
                    dst[q * sx + x] = np.float64(src[x]) * w[x]


@numba.njit(nogil=True, cache=True)
def tile_product(
    acc: np.ndarray, kernels: np.ndarray, spectra: np.ndarray, index: np.ndarray
) -> None:
    """``acc = Σ_j kernels[j] · spectra[index[j]]`` (complex64, one tile; no GIL held)."""
    ny, nx = acc.shape
    for j in range(len(index)):
        k = kernels[j]
        f = spectra[index[j]]
        for y in range(ny):
            a, kk, ff = acc[y], k[y], f[y]
            if j == 0:
                for x in range(nx):
                    a[x] = kk[x] * ff[x]
            else:
                for x in range(nx):
                    a[x] += kk[x] * ff[x]


@numba.njit(nogil=True, cache=True)
def tile_add(
    dst: np.ndarray, res: np.ndarray, margin: int, wy: np.ndarray, wx: np.ndarray, first: bool
) -> None:
    """``dst (=|+=) res[m:m+h, m:m+w] · wy[:, None] · wx[None, :]`` (one tile; no GIL).

    ``wy`` and ``wx`` are the weights of the tile's rows and columns (length 0 for 1).
    """
    h, w = dst.shape
    for y in range(h):
        a = wy[y] if len(wy) else np.float32(1.0)
        for x in range(w):
            v = res[margin + y, margin + x] * a
            if len(wx):
                v *= wx[x]
            if first:
                dst[y, x] = v
            else:
                dst[y, x] += v


@numba.njit(nogil=True, cache=True)
def tile_add_rows(acc: np.ndarray, src: np.ndarray, lo: int, wy: np.ndarray) -> None:
    """``acc[lo + y] += wy[y] · src[lo + y]`` for the ``len(wy)`` rows from ``lo``
    (complex64 rows of one tile; no GIL held)."""
    nx = acc.shape[1]
    for y in range(len(wy)):
        a, s, w = acc[lo + y], src[lo + y], wy[y]
        for x in range(nx):
            a[x] += w * s[x]


@numba.njit(parallel=True, cache=True)
def _combine_inputs(img_s, var_s, mask_s, img_t, var_t, mask_t, nodata_bit, bad_bits, clear,
                    mask, bad, rows):  # fmt: skip
    ny, nx = mask.shape
    for y in numba.prange(ny):
        ns = 0
        nt = 0
        for x in range(nx):
            ms, mt = mask_s[y, x], mask_t[y, x]
            nd_s = (ms & nodata_bit) != 0 or not np.isfinite(img_s[y, x])
            nd_s = nd_s or not np.isfinite(var_s[y, x])
            nd_t = (mt & nodata_bit) != 0 or not np.isfinite(img_t[y, x])
            nd_t = nd_t or not np.isfinite(var_t[y, x])
            m = ms | mt
            mask[y, x] = m & clear
            bad[y, x] = nd_s or nd_t or (m & bad_bits) != 0
            ns += nd_s
            nt += nd_t
        rows[y, 0] = ns
        rows[y, 1] = nt


@_threads
def combine_inputs(
    science: tuple[np.ndarray, np.ndarray, np.ndarray],
    template: tuple[np.ndarray, np.ndarray, np.ndarray],
    nodata_bit: int,
    bad_bits: int,
    clear_bits: int,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The two inputs' masks, and how many pixels of each lack data, in one pass over
    the ``(image, variance, mask)`` planes of the science and the template.

    With ``nodata_x`` :func:`fill_nodata`'s no-data pixels of each image (``mask &
    nodata_bit != 0``, or image or variance not finite) and ``m = mask_s | mask_t``:
    ``mask = m & ~clear_bits`` (uint32) and ``bad = nodata_s | nodata_t | (m & bad_bits
    != 0)`` (bool).

    Returns
    -------
    mask, bad : numpy.ndarray
        The combined planes.
    count_s, count_t : int
        The science's and the template's no-data pixels (where not zero,
        :func:`fill_nodata` gives the image to use and where they are).
    """
    shape = np.shape(science[0])
    mask = np.empty(shape, np.uint32)
    bad = np.empty(shape, np.bool_)
    rows = np.empty((shape[0], 2), np.int64)
    img_s, var_s, mask_s = science
    img_t, var_t, mask_t = template
    _combine_inputs(
        np.asarray(img_s, np.float32),
        np.asarray(var_s),
        np.asarray(mask_s, np.uint32),
        np.asarray(img_t, np.float32),
        np.asarray(var_t),
        np.asarray(mask_t, np.uint32),
        np.uint32(nodata_bit),
        np.uint32(bad_bits),
        np.uint32(~np.uint32(clear_bits)),
        mask,
        bad,
        rows,
    )
    count_s, count_t = rows.sum(axis=0)
    return mask, bad, int(count_s), int(count_t)


@numba.njit(parallel=True, cache=True)
def _finish(diff, u, v, c0, cu, cv, scale, nodata, has_nodata):
    ny, nx = diff.shape
    for y in numba.prange(ny):
        by = c0 + cv * v[y]
        for x in range(nx):
            if has_nodata and nodata[y, x]:
                diff[y, x] = np.float32(0.0)
            else:
                diff[y, x] = (diff[y, x] - (by + cu * u[x])) * scale


@_threads
def finish_difference(
    diff: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    plane: Sequence[float],
    scale: float,
    nodata: np.ndarray | None = None,
) -> None:
    """In place: ``diff = scale * (diff − (c0 + cu u + cv v))``, 0 on ``nodata``.

    ``plane`` is ``(c0, cu, cv)``, or ``(c0,)`` for a constant.
    """
    c = [float(p) for p in plane] + [0.0] * (3 - len(plane))
    has = nodata is not None
    nd = nodata if has else np.zeros((1, 1), np.bool_)
    c0, cu, cv = (np.float32(x) for x in c)
    u, v = np.asarray(u, np.float32), np.asarray(v, np.float32)
    _finish(diff, u, v, c0, cu, cv, np.float32(scale), nd, has)


@numba.njit(parallel=True, cache=True)
def _variance(var_b, var_a, k2, scale, floor, fill, nodata, has_nodata, out):
    ny, nx = out.shape
    for y in numba.prange(ny):
        for x in range(nx):
            vb = max(var_b[y, x], np.float32(0.0))
            va = max(var_a[y, x], np.float32(0.0))
            val = (vb + k2 * va) * scale
            if (has_nodata and nodata[y, x]) or not np.isfinite(val):
                val = fill
            out[y, x] = max(val, floor)


@_threads
def difference_variance(
    var_b: np.ndarray,
    var_a: np.ndarray,
    kappa2: float,
    scale: float,
    floor: float,
    fill: float,
    nodata: np.ndarray | None = None,
) -> np.ndarray:
    """``max(scale (max(var_b, 0) + κ² max(var_a, 0)), floor)``, ``fill`` on ``nodata``
    (None: no pixel) and non-finite pixels; float32."""
    out = np.empty(np.shape(var_b), np.float32)
    has = nodata is not None
    _variance(
        np.asarray(var_b, np.float32),
        np.asarray(var_a, np.float32),
        np.float32(kappa2),
        np.float32(scale),
        np.float32(floor),
        np.float32(fill),
        nodata if has else np.zeros((1, 1), np.bool_),
        has,
        out,
    )
    return out
