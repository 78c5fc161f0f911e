"""Fused passes of cosmic-ray repair and background smoothing."""

from __future__ import annotations

import numba
import numpy as np

from apdask._kernels.fused._threads import _threads

__all__ = ["cr_candidates", "interpolate_over", "grow_diamond", "smoothed_residual"]


@numba.njit(parallel=True, cache=True)
def _cr_candidates(img, bkg, var, skip, cr, r1, r2, nsigma, out):
    ny, nx = img.shape
    for yy in numba.prange(ny):
        y = np.int64(yy)  # (the parallel index may be unsigned)
        y0, y1 = max(y - 1, 0), min(y + 1, ny - 1)
        for x in range(nx):
            out[y, x] = False
            if skip[y, x] or cr[y, x]:
                continue
            v = max(var[y, x], np.float32(0.0))
            d = img[y, x] - bkg[y, x]
            if not d > nsigma * np.sqrt(v):
                continue
            x0, x1 = max(x - 1, 0), min(x + 1, nx - 1)
            # the four directions through the pixel: (a, b) opposite neighbours, ratio r
            for k in range(4):
                ay, by = (y, y) if k == 1 else (y0, y1)
                ax = x if k == 0 else (x1 if k == 3 else x0)
                bx = x if k == 0 else (x0 if k == 3 else x1)
                r = r1 if k < 2 else r2
                n = 0.5 * ((img[ay, ax] - bkg[ay, ax]) + (img[by, bx] - bkg[by, bx]))
                vn = 0.25 * (max(var[ay, ax], np.float32(0.0)) + max(var[by, bx], np.float32(0.0)))
                if d - r * n > nsigma * np.sqrt(v + r * r * vn):
                    out[y, x] = True
                    break


@_threads
def cr_candidates(
    img: np.ndarray,
    bkg: np.ndarray,
    var: np.ndarray,
    skip: np.ndarray,
    cr: np.ndarray,
    r1: float,
    r2: float,
    nsigma: float,
) -> np.ndarray:
    """Pixels sharper than the PSF allows (:func:`apdask.isr.mask_cosmic_rays`).

    A pixel not in ``skip`` or ``cr`` is a candidate when ``d = img − bkg`` exceeds
    ``nsigma σ`` and, along one of the four directions through it (edge pixels
    repeated beyond the border), ``d − r n > nsigma sqrt(σ² + r² σ_n²)`` with ``n``
    the mean of the two opposite neighbours' ``d``, ``σ_n² = (σ_a² + σ_b²)/4``, and
    ``r = r1`` along rows and columns, ``r2`` along diagonals.
    """
    out = np.empty(img.shape, np.bool_)
    _cr_candidates(
        img,
        bkg,
        np.asarray(var, np.float32),
        skip,
        cr,
        np.float32(r1),
        np.float32(r2),
        np.float32(nsigma),
        out,
    )
    return out


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
def interpolate_over(
    img: np.ndarray, bad: np.ndarray, half: int = 2, max_half: int = 64
) -> np.ndarray:
    """Replace ``bad`` pixels of ``img`` in place by the median of the good (not bad,
    finite) pixels in a ``(2h+1)²`` box, ``h = half`` doubled until one is found
    (beyond ``max_half``: the median of all good pixels)."""
    ys, xs = np.nonzero(bad)
    if len(ys) == 0:
        return img
    vals = np.empty(len(ys), np.float32)
    found = np.empty(len(ys), np.bool_)
    _box_medians(
        img, bad, ys.astype(np.int64), xs.astype(np.int64), int(half), int(max_half), vals, found
    )
    if not found.all():
        good = ~bad & np.isfinite(img)
        vals[~found] = np.median(img[good]) if good.any() else np.nan
    img[ys, xs] = vals
    return img


@numba.njit(cache=True)
def _diamonds(out, ys, xs, r):
    ny, nx = out.shape
    for k in range(len(ys)):
        for dy in range(-r, r + 1):
            y = ys[k] + dy
            if y < 0 or y >= ny:
                continue
            w = r - abs(dy)
            for x in range(max(xs[k] - w, 0), min(xs[k] + w + 1, nx)):
                out[y, x] = True


def grow_diamond(mask: np.ndarray, r: int) -> np.ndarray:
    """``scipy.ndimage.binary_dilation(mask, iterations=r)`` (the default cross-shaped
    structure: every pixel within Manhattan distance ``r``), visiting only set pixels."""
    ys, xs = np.nonzero(mask)
    out = mask.copy()
    if r > 0 and len(ys):
        _diamonds(out, ys.astype(np.int64), xs.astype(np.int64), int(r))
    return out


@numba.njit(parallel=True, cache=True)
def _smooth(image, coarse, jy, ty, jx, tx, mask, ignore_bits, w, data, tmp, out, bad):
    ny, nx = image.shape
    r = (len(w) - 1) // 2
    one = np.float32(1.0)
    for y in numba.prange(ny):
        j, t = jy[y], ty[y]
        for x in range(nx):
            v = image[y, x]
            b = (mask[y, x] & ignore_bits) != 0 or not np.isfinite(v)
            bad[y, x] = b
            i, u = jx[x], tx[x]
            bkg = (one - t) * ((one - u) * coarse[j, i] + u * coarse[j, i + 1]) + t * (
                (one - u) * coarse[j + 1, i] + u * coarse[j + 1, i + 1]
            )
            data[y, x] = np.float32(0.0) if b else v - bkg
    for yy in numba.prange(ny):  # along columns (axis 0), row by row
        y = np.int64(yy)  # type: ignore[assignment]  # (numba: a signed index)
        for x in range(nx):
            tmp[y, x] = np.float32(0.0)
        for k in range(max(-r, -y), min(r, ny - 1 - y) + 1):
            wk = w[k + r]
            for x in range(nx):
                tmp[y, x] += wk * data[y + k, x]
    for y in numba.prange(ny):  # along rows (axis 1)
        for x in range(nx):
            out[y, x] = np.float32(0.0)
        for k in range(-r, r + 1):
            wk = w[k + r]
            for x in range(max(0, -k), min(nx, nx - k)):
                out[y, x] += wk * tmp[y, x + k]


@_threads
def smoothed_residual(
    image: np.ndarray,
    bkg: np.ndarray,
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
    radius = int(truncate * float(sigma) + 0.5)
    t = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * t**2)
    w = (w / w.sum()).astype(np.float32)
    image = np.asarray(image, np.float32)
    data = np.empty(image.shape, np.float32)
    tmp = np.empty(image.shape, np.float32)
    out = np.empty(image.shape, np.float32)
    bad = np.empty(image.shape, np.bool_)
    coarse, jy, ty, jx, tx = bkg
    _smooth(
        image,
        coarse,
        jy,
        ty,
        jx,
        tx,
        np.asarray(mask),
        np.uint32(ignore_bits),
        w,
        data,
        tmp,
        out,
        bad,
    )
    return out, bad
