"""Fused passes of detection: matched-filter inputs, the S/N map and footprint segmentation."""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import register_jitable

from apdask._kernels.fused._threads import _threads

__all__ = [
    "matched_inputs",
    "boxes_clear",
    "dilate",
    "snr_map",
    "above",
    "above_both",
    "local_peaks",
    "segments",
    "thinned_values",
]


@numba.njit(parallel=True, cache=True)
def _matched_inputs(image, variance, mask, ignore_bits, around_bits, img0, var0, bad, counts):
    ny, nx = image.shape
    for y in numba.prange(ny):
        c = np.int64(0)
        for x in range(nx):
            v = image[y, x]
            w = variance[y, x]
            m = mask[y, x]
            b = (m & ignore_bits) != 0 or not np.isfinite(v) or not np.isfinite(w)
            bad[y, x] = b
            img0[y, x] = np.float32(0.0) if b else v
            var0[y, x] = np.float32(0.0) if b else w
            c += np.int64((m & around_bits) != 0)
        counts[y] = c


@numba.njit(cache=True)  # serial: a sparse pass, not worth waking the threads
def _bit_pixels(mask, bits, counts, starts, ys, xs):
    ny, nx = mask.shape
    for y in range(ny):
        if counts[y] == 0:
            continue
        k = starts[y]
        for x in range(nx):
            if (mask[y, x] & bits) != 0:
                ys[k] = y
                xs[k] = x
                k += 1


@numba.njit(cache=True)
def _mark_boxes(bad, img0, var0, ys, xs, half):
    ny, nx = bad.shape
    for k in range(len(ys)):
        for y in range(max(ys[k] - half, 0), min(ys[k] + half + 1, ny)):
            for x in range(max(xs[k] - half, 0), min(xs[k] + half + 1, nx)):
                bad[y, x] = True
                img0[y, x] = np.float32(0.0)
                var0[y, x] = np.float32(0.0)


@numba.njit(cache=True)
def _boxes_clear(mask, ys, xs, half, out):
    ny, nx = mask.shape
    for k in range(len(ys)):
        out[k] = True
        for y in range(max(ys[k] - half, 0), min(ys[k] + half + 1, ny)):
            for x in range(max(xs[k] - half, 0), min(xs[k] + half + 1, nx)):
                if mask[y, x]:
                    out[k] = False
                    break
            if not out[k]:
                break


def boxes_clear(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray, half: int) -> np.ndarray:
    """Whether no pixel of ``mask`` is set within ``half`` pixels (square, clipped at
    the edges) of each ``(ys, xs)``: only those boxes are read."""
    out = np.empty(len(ys), np.bool_)
    _boxes_clear(mask, np.asarray(ys, np.int64), np.asarray(xs, np.int64), int(half), out)
    return out


@_threads
def matched_inputs(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    ignore_bits: int,
    around: np.ndarray | int | None = None,
    half: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The matched filter's inputs: image and variance with left-out pixels set to 0.

    A pixel is left out (``bad``) when ``mask & ignore_bits`` is set, when its image or
    variance value is not finite, or when it lies within ``half`` pixels (square) of a
    pixel of ``around``: a bool image (e.g. saturated pixels), or mask bits (the
    pixels with ``mask & around`` set, found in the same pass).

    Returns
    -------
    image0, variance0 : numpy.ndarray
        float32.
    bad : numpy.ndarray
        bool.
    """
    image = np.asarray(image, np.float32)
    mask = np.asarray(mask)
    img0 = np.empty(image.shape, np.float32)
    var0 = np.empty(image.shape, np.float32)
    bad = np.empty(image.shape, np.bool_)
    bits = int(around) if isinstance(around, int | np.integer) else 0
    counts = np.empty(image.shape[0], np.int64)
    _matched_inputs(
        image,
        np.asarray(variance, np.float32),
        mask,
        np.uint32(ignore_bits),
        np.uint32(bits),
        img0,
        var0,
        bad,
        counts,
    )
    if around is None or half <= 0:
        return img0, var0, bad
    n = int(counts.sum()) if bits else int(np.count_nonzero(around))
    if 0 < n <= 20_000:  # a few saturated stars: mark boxes around their pixels
        if bits:
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
            ys, xs = np.empty(n, np.int64), np.empty(n, np.int64)
            _bit_pixels(mask, np.uint32(bits), counts, starts, ys, xs)
        else:
            ys, xs = (a.astype(np.int64) for a in np.nonzero(np.asarray(around)))
        _mark_boxes(bad, img0, var0, ys, xs, int(half))
    elif n:  # large areas: one dilation of the whole mask (cumulative sums)
        grown = dilate((mask & bits) != 0 if bits else np.asarray(around), int(half))
        bad |= grown
        img0[grown] = 0.0
        var0[grown] = 0.0
    return img0, var0, bad


def dilate(mask: np.ndarray, half: int) -> np.ndarray:
    """A boolean mask grown by ``half`` pixels (square), using cumulative sums."""
    if half <= 0 or not mask.any():
        return mask
    ny, nx = mask.shape
    c = np.pad(mask.astype(np.int32), ((half + 1, half), (half + 1, half))).cumsum(0).cumsum(1)
    k = 2 * half + 1
    tot = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return tot[:ny, :nx] > 0


@numba.njit(parallel=True, cache=True)
def _snr(filt, vfilt, bad, out):
    ny, nx = out.shape
    for y in numba.prange(ny):
        for x in range(nx):
            v = vfilt[y, x]
            out[y, x] = filt[y, x] / np.sqrt(v) if v > 0 and not bad[y, x] else np.float32(0.0)


@_threads
def snr_map(
    filt: np.ndarray, vfilt: np.ndarray, bad: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``filt / sqrt(vfilt)`` where ``vfilt > 0`` and not ``bad``, else 0 (float32).

    ``out`` (float32, C order) receives it when given; it may be ``vfilt`` itself
    (each pixel is read before it is written), which saves a full frame.
    """
    if out is None:
        out = np.empty(bad.shape, np.float32)
    _snr(filt, vfilt, bad, out)
    return out


@numba.njit(cache=True)
def _find(parent, k):
    while parent[k] != k:
        parent[k] = parent[parent[k]]
        k = parent[k]
    return k


@numba.njit(cache=True)
def _segments(ys, xs, vals, nx):
    n = len(ys)
    lin = ys.astype(np.int64) * nx + xs
    parent = np.arange(n)
    for k in range(n):
        y, x = ys[k], xs[k]
        for dy, dx in ((0, -1), (-1, -1), (-1, 0), (-1, 1)):
            yy, xx = y + dy, x + dx
            if yy < 0 or xx < 0 or xx >= nx:
                continue
            q = yy * nx + xx
            j = np.searchsorted(lin, q)
            if j < n and lin[j] == q:
                a, b = _find(parent, k), _find(parent, j)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    comp = np.full(n, -1, np.int64)
    label = np.empty(n, np.int64)
    m = 0
    for k in range(n):
        r = _find(parent, k)
        if comp[r] < 0:
            comp[r] = m
            m += 1
        label[k] = comp[r]
    out = np.empty((m, 7), np.int64)  # count, x0, x1, y0, y1, peak x, peak y
    best = np.full(m, -np.inf)
    for c in range(m):
        out[c, 0] = 0
        out[c, 1] = out[c, 3] = 1 << 62
        out[c, 2] = out[c, 4] = -1
    for k in range(n):
        c = label[k]
        out[c, 0] += 1
        out[c, 1] = min(out[c, 1], xs[k])
        out[c, 2] = max(out[c, 2], xs[k] + 1)
        out[c, 3] = min(out[c, 3], ys[k])
        out[c, 4] = max(out[c, 4], ys[k] + 1)
        if vals[k] > best[c]:
            best[c] = vals[k]
            out[c, 5] = xs[k]
            out[c, 6] = ys[k]
    return out, best


#: Pixels per block of the block counts of :func:`above` and :func:`thinned_values`.
_BLOCK = 64


@numba.njit(parallel=True, cache=True)
def _count_above(image, t, sign, counts, counts_neg, both):
    ny, nx = image.shape
    nb = counts.shape[1]
    for y in numba.prange(ny):
        for b in range(nb):
            x0 = b * _BLOCK
            c, cn = np.int64(0), np.int64(0)
            if x0 + _BLOCK <= nx:  # a constant trip count, branch-free: vectorised
                for i in range(_BLOCK):
                    v = sign * image[y, x0 + i]
                    c += np.int64(v > t)
                    if both:
                        cn += np.int64(-v > t)
            else:
                for x in range(x0, nx):
                    v = sign * image[y, x]
                    c += np.int64(v > t)
                    if both:
                        cn += np.int64(-v > t)
            counts[y, b] = c
            if both:
                counts_neg[y, b] = cn


@numba.njit(cache=True)  # serial: a sparse pass, not worth waking the threads
def _fill_above(image, t, sign, counts, ys, xs):
    ny, nx = image.shape
    nb = counts.shape[1]
    k = 0
    for y in range(ny):
        for b in range(nb):
            if counts[y, b] == 0:  # most blocks: nothing above the threshold
                continue
            for x in range(b * _BLOCK, min((b + 1) * _BLOCK, nx)):
                if sign * image[y, x] > t:
                    ys[k] = y
                    xs[k] = x
                    k += 1


@_threads
def above(image: np.ndarray, threshold: float, sign: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero(sign * image > threshold)`` (raster order) without a full-frame mask.

    One parallel pass counts the pixels above per row block of :data:`_BLOCK`
    pixels; the serial pass that lists them then visits only the blocks that have
    any (a row through a source is mostly below the threshold too).
    """
    image = np.asarray(image)
    t, sg = image.dtype.type(threshold), image.dtype.type(1 if sign > 0 else -1)
    counts = np.empty((image.shape[0], -(-image.shape[1] // _BLOCK)), np.int64)
    _count_above(image, t, sg, counts, counts[:0], False)
    return _listed(image, t, sg, counts)


@_threads
def above_both(
    image: np.ndarray, threshold: float
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """:func:`above` with ``sign`` 1 and -1, from one counting pass over the image."""
    image = np.asarray(image)
    t = image.dtype.type(threshold)
    counts = np.empty((2, image.shape[0], -(-image.shape[1] // _BLOCK)), np.int64)
    one = image.dtype.type(1)
    _count_above(image, t, one, counts[0], counts[1], True)
    return _listed(image, t, one, counts[0]), _listed(image, t, -one, counts[1])


def _listed(image, t, sign, counts):
    """The pixels ``sign * image > t`` in raster order, from their block counts."""
    n = int(counts.sum())
    ys, xs = np.empty(n, np.int64), np.empty(n, np.int64)
    if n:
        _fill_above(image, t, sign, counts, ys, xs)
    return ys, xs


@register_jitable(inline="always")
def _is_peak(image, y, x, t):
    """Whether ``image[y, x]`` is above ``t`` and not below any of its 8 neighbours."""
    ny, nx = image.shape
    v = image[y, x]
    if not v > t:
        return False
    for yy in range(max(y - 1, 0), min(y + 2, ny)):
        for xx in range(max(x - 1, 0), min(x + 2, nx)):
            if not v >= image[yy, xx]:
                return False
    return True


#: Pixels per block of the screen of :func:`_find_peaks`.
_PEAK_BLOCK = 64


@numba.njit(parallel=True, cache=True)
def _find_peaks(image, t, found, counts):
    ny, nx = image.shape
    cap = found.shape[1]
    for yy in numba.prange(ny):
        y = np.int64(yy)  # (numba: a signed index)
        c = 0
        for x0 in range(0, nx, _PEAK_BLOCK):
            x1 = min(x0 + _PEAK_BLOCK, nx)
            m = 0
            for x in range(x0, x1):  # a vector loop: most blocks have no pixel above t
                m += image[y, x] > t
            if m == 0:
                continue
            for x in range(x0, x1):
                if image[y, x] > t and _is_peak(image, y, x, t):
                    if c < cap:
                        found[y, c] = x
                    c += 1
        counts[y] = c


@numba.njit(parallel=True, cache=True)
def _gather_peaks(image, t, found, counts, starts, ys, xs):
    ny, nx = image.shape
    cap = found.shape[1]
    for yy in numba.prange(ny):
        y = np.int64(yy)
        k = starts[y]
        if counts[y] <= cap:  # the row's peaks were kept
            for c in range(counts[y]):
                ys[k + c] = y
                xs[k + c] = found[y, c]
            continue
        for x in range(nx):  # more than were kept: the row again
            if image[y, x] > t and _is_peak(image, y, x, t):
                ys[k] = y
                xs[k] = x
                k += 1


@_threads
def local_peaks(image: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(y, x)`` in raster order of the pixels above ``threshold`` not below any of
    their 8 neighbours (``(image == maximum_filter(image, 3)) & (image > threshold)``
    with the edges padded with ``-inf``), without a full-frame mask.

    One pass: each row's first 16 peaks are kept as they are found (a row with more is
    searched again), and blocks of 64 pixels with none above ``threshold`` (most) are
    skipped after a vector comparison.
    """
    image = np.asarray(image)
    t = np.float64(threshold)  # compared in double precision, as NumPy compares
    counts = np.empty(image.shape[0], np.int64)
    found = np.empty((image.shape[0], 16), np.int64)
    _find_peaks(image, t, found, counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(counts.sum())
    ys, xs = np.empty(n, np.int64), np.empty(n, np.int64)
    _gather_peaks(image, t, found, counts, starts, ys, xs)
    return ys, xs


def segments(
    image: np.ndarray,
    threshold: float,
    n_pixels: int,
    sign: int = 1,
    pixels: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """8-connected groups of at least ``n_pixels`` pixels above ``threshold``
    (of ``-image`` when ``sign`` is negative).

    Equal to photutils ``detect_sources(image, threshold, n_pixels)`` (pixels
    ``> threshold``, 8-connectivity, labels in raster order of each group's first
    pixel), but only the pixels above the threshold are visited after one comparison
    pass, and no segmentation image is made.  ``pixels``: those pixels, when already
    listed (:func:`above`, or :func:`above_both` for both signs at once).

    Returns
    -------
    numpy.ndarray
        int64 ``(n, 7)``: pixel count, half-open bounding box ``x0, x1, y0, y1``, and
        the ``x, y`` of the first (raster order) highest pixel of each group.
    numpy.ndarray
        float64 ``(n,)``: that highest value.
    """
    ys, xs = above(image, threshold, sign) if pixels is None else pixels
    if len(ys) == 0:
        return np.zeros((0, 7), np.int64), np.zeros(0)
    vals = image[ys, xs].astype(np.float64) * (1.0 if sign > 0 else -1.0)
    out, best = _segments(ys, xs, vals, image.shape[1])
    keep = out[:, 0] >= n_pixels
    return out[keep], best[keep]


@numba.njit(parallel=True, nogil=True, cache=True)
def _count_valid(image, ignored, counts):
    ny, nx = image.shape
    nb = counts.shape[1]
    for y in numba.prange(ny):
        for b in range(nb):
            x0 = b * _BLOCK
            c = np.int64(0)
            if x0 + _BLOCK <= nx:  # a constant trip count, branch-free: vectorised
                for i in range(_BLOCK):
                    v = image[y, x0 + i]
                    c += np.int64((not ignored[y, x0 + i]) & (np.abs(v) < np.inf) & (v != 0))
            else:
                for x in range(x0, nx):
                    v = image[y, x]
                    c += np.int64((not ignored[y, x]) & (np.abs(v) < np.inf) & (v != 0))
            counts[y, b] = c


@numba.njit(nogil=True, cache=True)  # serial: a sparse pass, not worth waking threads
def _take_valid(image, ignored, counts, starts, step, out):
    ny, nx = image.shape
    nb = counts.shape[1]
    for y in range(ny):
        k = starts[y]  # valid pixels before this row's block b
        take = -(-k // step) * step  # the next valid pixel to take
        for b in range(nb):
            c = counts[y, b]
            x0, x1 = b * _BLOCK, min((b + 1) * _BLOCK, nx)
            if take < k + c:
                if c == x1 - x0:  # every pixel of the block valid: index directly
                    while take < k + c:
                        out[take // step] = image[y, x0 + take - k]
                        take += step
                else:
                    j = k
                    for x in range(x0, x1):
                        v = image[y, x]
                        if (not ignored[y, x]) & (np.abs(v) < np.inf) & (v != 0):
                            if j == take:
                                out[take // step] = image[y, x]
                                take += step
                            j += 1
            k += c


@_threads
def thinned_values(image: np.ndarray, ignored: np.ndarray, target: int) -> np.ndarray:
    """Every ``step``-th finite non-zero value of ``image`` where not ``ignored``
    (raster order), ``step = max(1, n // target)`` for the ``n`` such values.

    Equal to ``v = image[~ignored]; v = v[np.isfinite(v) & (v != 0)]; v[::step]``
    without the full-frame temporaries.
    """
    image = np.asarray(image)
    ignored = np.asarray(ignored, np.bool_)
    counts = np.empty((image.shape[0], -(-image.shape[1] // _BLOCK)), np.int64)
    _count_valid(image, ignored, counts)
    rows = counts.sum(axis=1)
    n = int(rows.sum())
    step = max(1, n // max(int(target), 1))
    starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)
    out = np.empty((n + step - 1) // step, image.dtype)
    if n:
        _take_valid(image, ignored, counts, starts, np.int64(step), out)
    return out
