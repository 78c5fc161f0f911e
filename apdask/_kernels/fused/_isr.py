"""Fused passes of cosmic-ray repair and background smoothing."""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba.extending import register_jitable

from apdask._kernels.fused._threads import _threads

__all__ = [
    "boxes_clear_of",
    "cr_candidates",
    "interpolate_pixels",
    "grow_pixels",
    "SearchPlanes",
    "search_planes",
    "smoothed_residual",
    "stamps_less_background",
]


@register_jitable(inline="always")
def _bilinear_at(coarse, jy, ty, jx, tx, y, x):
    """The background map of :meth:`apdask.pipeline.background.Background.bilinear` at
    one pixel."""
    one = np.float32(1.0)
    j, t, i, u = jy[y], ty[y], jx[x], tx[x]
    return (one - t) * ((one - u) * coarse[j, i] + u * coarse[j, i + 1]) + t * (
        (one - u) * coarse[j + 1, i] + u * coarse[j + 1, i + 1]
    )


@register_jitable(inline="always")
def _is_cr(img, coarse, jy, ty, jx, tx, var, mask, skip_bits, cr, r1, r2, nsigma, y, x):
    """The test of :func:`cr_candidates` at pixel ``(y, x)``."""
    ny, nx = img.shape
    zero = np.float32(0.0)
    v = max(var[y, x], zero)
    d = img[y, x] - _bilinear_at(coarse, jy, ty, jx, tx, y, x)
    # the mask and cr are read for the few pixels above the threshold only
    if not d > nsigma * np.sqrt(v) or (mask[y, x] & skip_bits) != 0 or cr[y, x]:
        return False
    y0, y1 = max(y - 1, 0), min(y + 1, ny - 1)
    x0, x1 = max(x - 1, 0), min(x + 1, nx - 1)
    # the four directions through the pixel: (a, b) opposite neighbours, ratio r
    for k in range(4):
        ay, by = (y, y) if k == 1 else (y0, y1)
        ax = x if k == 0 else (x1 if k == 3 else x0)
        bx = x if k == 0 else (x0 if k == 3 else x1)
        r = r1 if k < 2 else r2
        da = img[ay, ax] - _bilinear_at(coarse, jy, ty, jx, tx, ay, ax)
        db = img[by, bx] - _bilinear_at(coarse, jy, ty, jx, tx, by, bx)
        n = 0.5 * (da + db)
        vn = 0.25 * (max(var[ay, ax], zero) + max(var[by, bx], zero))
        if d - r * n > nsigma * np.sqrt(v + r * r * vn):
            return True
    return False


@numba.njit(parallel=True, cache=True)
def _cr_candidates(img, coarse, jy, ty, jx, tx, var, mask, skip_bits, cr, r1, r2, nsigma, out,
                   counts):  # fmt: skip
    ny, nx = img.shape
    for yy in numba.prange(ny):
        y = np.int64(yy)  # (the parallel index may be unsigned)
        c = 0
        for x in range(nx):
            if _is_cr(img, coarse, jy, ty, jx, tx, var, mask, skip_bits, cr, r1, r2, nsigma, y, x):
                out[y, x] = True
                c += 1
        counts[y] = c


@numba.njit(parallel=True, cache=True)
def _cr_at(img, coarse, jy, ty, jx, tx, var, mask, skip_bits, cr, r1, r2, nsigma, ys, xs, out):
    for k in numba.prange(len(ys)):
        out[k] = _is_cr(img, coarse, jy, ty, jx, tx, var, mask, skip_bits, cr, r1, r2, nsigma,
                        ys[k], xs[k])  # fmt: skip


@numba.njit(parallel=True, cache=True)
def _fill_flagged(flags, words, counts, starts, ys, xs):
    ny, nx = flags.shape
    step = nx // words.shape[1] if words.shape[1] else nx  # flags per word (8, or a row)
    for y in numba.prange(ny):
        if counts[y] == 0:
            continue
        k, end = starts[y], starts[y] + counts[y]
        # 8 flags at a time: most words of a row with a few flags are zero
        for w in range(nx // step):
            if k == end:
                break
            if step == nx or words[y, w] != 0:
                for x in range(w * step, (w + 1) * step):
                    if flags[y, x]:
                        ys[k] = y
                        xs[k] = x
                        k += 1


def _flagged_pixels(flags: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.nonzero(flags)`` given the count of flagged pixels in each row: only the
    rows with some are read."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(counts.sum())
    ys, xs = np.empty(n, np.int64), np.empty(n, np.int64)
    if n:
        if flags.shape[1] % 8 == 0 and flags.flags.c_contiguous:
            words = flags.view(np.uint64)  # (ny, nx / 8)
        else:  # a row at a time
            words = np.ones((flags.shape[0], 1), np.uint64)
        _fill_flagged(flags, words, counts, starts, ys, xs)
    return ys, xs


@_threads
def cr_candidates(
    img: np.ndarray,
    bkg: tuple[np.ndarray, ...],
    var: np.ndarray,
    mask: np.ndarray,
    skip_bits: int,
    cr: np.ndarray,
    r1: float,
    r2: float,
    nsigma: float,
    near: tuple[np.ndarray, np.ndarray] | None = None,
    above: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pixels sharper than the PSF allows (:func:`apdask.isr.mask_cosmic_rays`), as
    ``(y, x)`` in raster order.

    A pixel with none of ``skip_bits`` in ``mask`` and not in ``cr`` is a candidate
    when ``d = img − bkg`` exceeds ``nsigma σ`` and, along one of the four directions
    through it (edge pixels repeated beyond the border), ``d − r n > nsigma
    sqrt(σ² + r² σ_n²)`` with ``n`` the mean of the two opposite neighbours' ``d``,
    ``σ_n² = (σ_a² + σ_b²)/4``, and ``r = r1`` along rows and columns, ``r2`` along
    diagonals.  ``bkg`` is the ``(coarse, jy, ty, jx, tx)`` of
    :meth:`apdask.pipeline.background.Background.bilinear`, evaluated where needed.

    With ``near = (ys, xs)`` only the pixels within one pixel of those are tested: the
    only ones whose test can have changed since a pass after which just ``(ys, xs)``
    were changed (in ``img`` and ``cr``).  Else with ``above = (ys, xs)`` (raster order)
    only those pixels are tested: they must include every pixel with ``d > nsigma σ``
    (:func:`search_planes` finds them in the star search's pass).
    """
    coarse, jy, ty, jx, tx = bkg
    var, mask = np.asarray(var, np.float32), np.asarray(mask, np.uint32)
    ratios = np.float32(r1), np.float32(r2), np.float32(nsigma)
    args = (img, coarse, jy, ty, jx, tx, var, mask, np.uint32(skip_bits), cr, *ratios)
    if near is not None:
        ys, xs = grow_pixels(*near, 1, img.shape, chebyshev=True)
        hit = np.empty(len(ys), np.bool_)
        _cr_at(*args, ys, xs, hit)
        return ys[hit], xs[hit]
    if above is not None:
        ys, xs = np.asarray(above[0], np.int64), np.asarray(above[1], np.int64)
        hit = np.empty(len(ys), np.bool_)
        _cr_at(*args, ys, xs, hit)
        return ys[hit], xs[hit]
    out = np.zeros(img.shape, np.bool_)  # only the candidates are written
    counts = np.empty(img.shape[0], np.int64)
    _cr_candidates(*args, out, counts)
    return _flagged_pixels(out, counts)


@numba.njit(parallel=True, cache=True)
def _box_medians(img, bad, ys, xs, half, max_half, out, found):
    ny, nx = img.shape
    for k in numba.prange(len(ys)):
        h = half
        found[k] = False
        while h <= max_half and not found[k]:
            buf = np.empty((2 * h + 1) * (2 * h + 1), np.float32)
            m = 0
            for y in range(max(ys[k] - h, 0), min(ys[k] + h + 1, ny)):
                for x in range(max(xs[k] - h, 0), min(xs[k] + h + 1, nx)):
                    v = img[y, x]
                    if not bad[y, x] and np.isfinite(v):
                        buf[m] = v
                        m += 1
            if m:
                out[k] = np.median(buf[:m])
                found[k] = True
            h *= 2


@_threads
def interpolate_pixels(
    img: np.ndarray,
    bad: np.ndarray,
    ys: np.ndarray,
    xs: np.ndarray,
    half: int = 2,
    max_half: int = 64,
) -> np.ndarray:
    """Replace the pixels ``(ys, xs)`` of ``img`` in place by the median of the good
    (not ``bad``, finite) pixels in a ``(2h+1)²`` box, ``h = half`` doubled until one is
    found (beyond ``max_half``: the median of all good pixels)."""
    if len(ys) == 0:
        return img
    vals = np.empty(len(ys), np.float32)
    found = np.empty(len(ys), np.bool_)
    _box_medians(img, bad, np.asarray(ys, np.int64), np.asarray(xs, np.int64), int(half),
                 int(max_half), vals, found)  # fmt: skip
    if not found.all():
        good = ~bad & np.isfinite(img)
        vals[~found] = np.median(img[good]) if good.any() else np.nan
    img[ys, xs] = vals
    return img


def grow_pixels(
    ys: np.ndarray, xs: np.ndarray, r: int, shape: tuple[int, ...], chebyshev: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The pixels within Manhattan distance ``r`` of ``(ys, xs)`` and inside ``shape``,
    in raster order, each once: ``np.nonzero(binary_dilation(m, iterations=r))`` of the
    mask ``m`` of those pixels (the default cross-shaped structure), without a full
    frame.  With ``chebyshev``: within Chebyshev distance ``r`` (``(2r + 1)²`` boxes)."""
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    near = np.ones(dy.shape, bool) if chebyshev else np.abs(dy) + np.abs(dx) <= r
    yy = (np.asarray(ys, np.int64)[:, None] + dy[near]).ravel()
    xx = (np.asarray(xs, np.int64)[:, None] + dx[near]).ravel()
    ny, nx = shape[:2]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    flat = np.unique(yy[inside] * nx + xx[inside])
    return flat // nx, flat % nx


@numba.njit(cache=True)
def _stamps_less_background(image, coarse, jy, ty, jx, tx, ys, xs, half, out):
    one = np.float32(1.0)
    for k in range(len(ys)):
        for a in range(2 * half + 1):
            y = ys[k] - half + a
            j, t = jy[y], ty[y]  # _bilinear_at's blend, the row's terms taken once
            row, c0, c1 = image[y], coarse[j], coarse[j + 1]
            for b in range(2 * half + 1):
                x = xs[k] - half + b
                i, u = jx[x], tx[x]
                bkg = (one - t) * ((one - u) * c0[i] + u * c0[i + 1]) + t * (
                    (one - u) * c1[i] + u * c1[i + 1]
                )
                out[k, a, b] = np.float64(row[x]) - np.float64(bkg)


def stamps_less_background(
    image: np.ndarray, bkg: tuple[np.ndarray, ...], ys: np.ndarray, xs: np.ndarray, half: int
) -> np.ndarray:
    """float64 ``(n, 2 half + 1, 2 half + 1)`` windows of ``image`` centred on the pixels
    ``(ys, xs)`` (all inside the image), less the background (the ``(coarse, jy, ty, jx,
    tx)`` of :meth:`apdask.pipeline.background.Background.bilinear`, in single
    precision as in the full-frame passes)."""
    out = np.empty((len(ys), 2 * half + 1, 2 * half + 1))
    coarse, jy, ty, jx, tx = bkg
    ys, xs = np.asarray(ys, np.int64), np.asarray(xs, np.int64)
    _stamps_less_background(np.asarray(image), coarse, jy, ty, jx, tx, ys, xs, int(half), out)
    return out


@numba.njit(cache=True)
def _boxes_clear_of(row_start, px, ys, xs, half, out):
    ny = len(row_start) - 1
    for k in range(len(ys)):
        out[k] = True
        for y in range(max(ys[k] - half, 0), min(ys[k] + half + 1, ny)):
            a, b = row_start[y], row_start[y + 1]
            if a == b:
                continue
            # the row's first pixel at or right of the box's left edge: inside it?
            i = a + np.searchsorted(px[a:b], xs[k] - half)
            if i < b and px[i] <= xs[k] + half:
                out[k] = False
                break


def boxes_clear_of(
    pixels: tuple[np.ndarray, np.ndarray], shape: tuple[int, ...], ys: np.ndarray,
    xs: np.ndarray, half: int,
) -> np.ndarray:  # fmt: skip
    """Whether none of ``pixels`` (``(y, x)`` in raster order, inside ``shape``) lies
    within ``half`` pixels (square) of each ``(ys, xs)``: ``boxes_clear`` of their mask,
    without making it (a binary search in each row of each box)."""
    py, px = np.asarray(pixels[0], np.int64), np.asarray(pixels[1], np.int64)
    row_start = np.searchsorted(py, np.arange(shape[0] + 1)).astype(np.int64)
    out = np.empty(len(ys), np.bool_)
    _boxes_clear_of(row_start, px, np.asarray(ys, np.int64), np.asarray(xs, np.int64),
                    int(half), out)  # fmt: skip
    return out


@numba.njit(parallel=True, cache=True)
def _residual(image, coarse, jy, ty, jx, tx, runs, mask, ignore_bits, var, nsigma, data, bad,
              bright, nbad, nbright, sample):  # fmt: skip
    ny, nx = image.shape
    zero, one = np.float32(0.0), np.float32(1.0)
    screen = var.shape[0] == ny  # else no variance: no bright pixels
    for yy in numba.prange(ny):
        y = np.int64(yy)
        j, t = jy[y], ty[y]
        nb = nh = 0
        # along runs of one background cell: its four nodes are loop constants, so the
        # loop is a plain vector loop (no gathers); the blend is _bilinear_at's
        for r in range(len(runs) - 1):
            x0, x1 = runs[r], runs[r + 1]
            i = jx[x0]
            c00, c01 = coarse[j, i], coarse[j, i + 1]
            c10, c11 = coarse[j + 1, i], coarse[j + 1, i + 1]
            for x in range(x0, x1):
                v = image[y, x]
                u = tx[x]
                bkg = (one - t) * ((one - u) * c00 + u * c01) + t * ((one - u) * c10 + u * c11)
                d = v - bkg
                b = (mask[y, x] & ignore_bits) != 0 or not np.isfinite(v)
                bad[y, x] = b
                data[y, x] = zero if b else d
                nb += b
                if screen:  # the first test of _is_cr
                    h = d > nsigma * np.sqrt(max(var[y, x], zero))
                    bright[y, x] = h
                    nh += h
        nbad[y] = nb
        nbright[y] = nh
        if screen and y % 4 == 0:  # every 4th pixel's variance, NaN where bad or not finite
            for x in range(0, nx, 4):
                vv = var[y, x]
                sample[y // 4, x // 4] = vv if not bad[y, x] and np.isfinite(vv) else np.nan


@numba.njit(parallel=True, cache=True)
def _gaussian(data, w, out):
    ny, nx = data.shape
    r = (len(w) - 1) // 2
    for yy in numba.prange(ny):
        y = np.int64(yy)  # (numba: a signed index)
        row = out[y]
        # along columns (axis 0) into the output row, then along it (axis 1) from a
        # zero-padded copy: both inner loops are plain vector loops over x
        for x in range(nx):
            row[x] = np.float32(0.0)
        for k in range(max(-r, -y), min(r, ny - 1 - y) + 1):  # type: ignore[call-overload]
            wk = w[k + r]
            src = data[y + k]
            for x in range(nx):
                row[x] += wk * src[x]
        pad = np.zeros(nx + 2 * r, np.float32)
        pad[r : r + nx] = row
        for x in range(nx):
            row[x] = np.float32(0.0)
        for k in range(2 * r + 1):
            wk = w[k]
            for x in range(nx):
                row[x] += wk * pad[x + k]


class SearchPlanes(NamedTuple):
    """The planes of one star search (:func:`search_planes`)."""

    smoothed: np.ndarray  #: float32: the background-free image, bad pixels 0, smoothed
    bad: np.ndarray  #: bool: masked (``ignore_bits``) or non-finite pixels
    bad_pixels: tuple[np.ndarray, np.ndarray]  #: ``np.nonzero(bad)``
    #: ``np.nonzero(image − bkg > nsigma sqrt(max(variance, 0)))`` (empty without a
    #: variance): the pixels the first pass of :func:`cr_candidates` may flag
    bright: tuple[np.ndarray, np.ndarray]
    #: ``variance[::4, ::4]`` (float32), NaN where ``bad`` or not finite (empty without
    #: a variance)
    variance_sample: np.ndarray


def _gaussian_weights(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's Gaussian weights (float32)."""
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * t**2)
    return (w / w.sum()).astype(np.float32)


def _runs(j: np.ndarray) -> np.ndarray:
    """Boundaries of the runs of equal values of ``j``: ``[0, …, len(j)]`` (int64)."""
    return np.concatenate([[0], np.flatnonzero(np.diff(j)) + 1, [len(j)]]).astype(np.int64)


@_threads
def search_planes(
    image: np.ndarray,
    bkg: tuple[np.ndarray, ...],
    mask: np.ndarray,
    ignore_bits: int,
    sigma: float,
    truncate: float = 3.0,
    variance: np.ndarray | None = None,
    nsigma: float = 5.0,
) -> SearchPlanes:
    """:func:`smoothed_residual` with, from the same pass, ``np.nonzero(bad)``, a
    sample of the variance (:attr:`SearchPlanes.variance_sample`) and the pixels
    ``d = image − bkg > nsigma sqrt(max(variance, 0))`` (float32, as
    :func:`cr_candidates` tests them first): the cosmic-ray search then tests only
    those (its argument ``above``) instead of every pixel.

    Returns
    -------
    SearchPlanes
    """
    image = np.asarray(image, np.float32)
    ny, nx = image.shape
    data = np.empty(image.shape, np.float32)
    bad = np.empty(image.shape, np.bool_)
    coarse, jy, ty, jx, tx = bkg
    if variance is None:
        var, bright = np.empty((0, 0), np.float32), np.empty((0, 0), np.bool_)
        sample = np.empty((0, 0), np.float32)
    else:
        var, bright = np.asarray(variance, np.float32), np.empty(image.shape, np.bool_)
        sample = np.empty(((ny + 3) // 4, (nx + 3) // 4), np.float32)
    nbad, nbright = np.empty(ny, np.int64), np.zeros(ny, np.int64)
    _residual(image, coarse, jy, ty, jx, tx, _runs(jx), np.asarray(mask), np.uint32(ignore_bits),
              var, np.float32(nsigma), data, bad, bright, nbad, nbright, sample)  # fmt: skip
    out = np.empty(image.shape, np.float32)
    _gaussian(data, _gaussian_weights(sigma, truncate), out)
    bad_pixels, bright_pixels = _flagged_pixels(bad, nbad), _flagged_pixels(bright, nbright)
    return SearchPlanes(out, bad, bad_pixels, bright_pixels, sample)


def smoothed_residual(
    image: np.ndarray,
    bkg: tuple[np.ndarray, ...],
    mask: np.ndarray,
    ignore_bits: int,
    sigma: float,
    truncate: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """``gaussian_filter(where(bad, 0, image − bkg), sigma, mode="constant")`` and ``bad``.

    ``bkg`` is a bilinearly interpolated grid, ``(coarse, jy, ty, jx, tx)`` of
    :meth:`apdask.detect.Background.bilinear` (evaluated in the loop: no full-frame
    map).  ``bad`` is ``(mask & ignore_bits) != 0`` or a non-finite pixel.  The Gaussian
    weights and the order of the two passes (along columns, then rows) are
    scipy.ndimage's; single-precision sums, equal to it to about 1e-6.

    Returns
    -------
    smoothed : numpy.ndarray
        float32.
    bad : numpy.ndarray
        bool.
    """
    planes = search_planes(image, bkg, mask, ignore_bits, sigma, truncate)
    return planes.smoothed, planes.bad
