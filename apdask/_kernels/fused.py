"""Fused full-frame passes of subtraction, detection and cosmic-ray repair (numba).

A 4k × 4k CCD is 16 M pixels: every NumPy expression over it reads and writes
64 MB arrays and allocates a temporary, and a chain of them costs more than the
FFTs themselves.  Each function here does in one pass over the pixels (rows in
parallel) what took a chain of NumPy expressions, and writes into arrays it is
given, so the subtraction allocates few full frames.  Each is equal to the NumPy
expression in its docstring to float32 rounding (``tests/test_fused.py``).
"""

from __future__ import annotations

import functools
import os

import numba
import numpy as np
import threadpoolctl


def allocated_cpus():
    """CPUs this process may use: its allocation, never the machine's core count.

    The smaller of the affinity mask (``os.sched_getaffinity``: cgroups, ``taskset``,
    SLURM's task/affinity plugin) and SLURM's ``SLURM_CPUS_PER_TASK`` (else
    ``SLURM_CPUS_ON_NODE``) inside a SLURM job, whose affinity may be the whole
    node when SLURM confines no tasks.  1 where the platform has no affinity mask.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity mask on this platform (macOS)
        n = 1
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        try:
            slurm = int(os.environ[var])
        except (KeyError, ValueError):
            continue
        if slurm >= 1:
            n = min(n, slurm)
            break
    return max(1, n)


def _worker_share(cpus):
    """Threads per task on the Dask worker running this code, or None outside one.

    A worker runs ``nthreads`` tasks at once, so each task gets its share of the
    CPUs (``APDASK_JOB_PROCESSES`` worker processes of a dask-jobqueue job share
    the job's CPUs; :func:`apdask.services.batch.jobqueue_cluster` sets it).
    """
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    nthreads = max(1, int(getattr(worker.state, "nthreads", 0) or worker.nthreads or 1))
    try:
        procs = max(1, int(os.environ.get("APDASK_JOB_PROCESSES", "1")))
    except ValueError:
        procs = 1
    return max(1, cpus // (nthreads * procs))


def inner_threads():
    """Threads for the parallel loops and FFTs inside one task.

    Configuration ``apdask.compute.inner_threads`` when set.  Else the allocation
    (:func:`allocated_cpus`), on a Dask worker divided by the worker's ``nthreads``
    (the tasks it runs at once), and capped by ``OMP_NUM_THREADS`` when set (dask's
    nanny sets it to 1 in worker processes, so that several worker processes on one
    allocation do not oversubscribe it).  Never
    ``os.cpu_count()``: inside a one-CPU SLURM job on a 64-core node that would
    start 64 threads.
    """
    import dask.config

    configured = dask.config.get("apdask.compute.inner_threads", None)
    if configured is not None:
        return max(1, int(configured))
    cpus = allocated_cpus()
    share = _worker_share(cpus)
    n = cpus if share is None else share
    try:
        return max(1, min(int(os.environ.get("OMP_NUM_THREADS", n)), n))
    except ValueError:
        return n


_blas = None


def one_blas_thread(fn):
    """Run ``fn`` with BLAS limited to one thread (a cached ``threadpoolctl`` controller).

    The pipeline's BLAS calls are small matrix products, and OpenBLAS's workers,
    once woken, spin for about 0.1 s after each call: on 2 cores that took a core
    from the FFT tiles and numba loops that followed, and doubled the kernel fit's
    time at random.  Parallelism comes from :func:`inner_threads` instead.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        global _blas
        if _blas is None:
            _blas = threadpoolctl.ThreadpoolController()
        with _blas.limit(limits=1, user_api="blas"):
            return fn(*args, **kwargs)

    return run


def _threads(fn):
    """Run a numba-parallel wrapper with :func:`inner_threads` threads."""

    def run(*args, **kwargs):
        numba.set_num_threads(min(inner_threads(), numba.config.NUMBA_NUM_THREADS))
        return fn(*args, **kwargs)

    run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn
    return run


__all__ = [
    "allocated_cpus",
    "inner_threads",
    "one_blas_thread",
    "fill_nodata",
    "above",
    "combine_masks",
    "cr_candidates",
    "finish_difference",
    "grow_diamond",
    "interpolate_over",
    "difference_variance",
    "dilate",
    "matched_inputs",
    "segments",
    "smoothed_residual",
    "snr_map",
    "tile_add",
    "tile_product",
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
def fill_nodata(image, variance, mask, nodata_bit):
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
def tile_product(acc, kernels, spectra, index):
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
def tile_add(dst, res, margin, wy, wx, first):
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


@numba.njit(parallel=True, cache=True)
def _combine_masks(mask_s, mask_t, nodata_s, nodata_t, bad_bits, clear, mask, bad, nodata):
    ny, nx = mask.shape
    for y in numba.prange(ny):
        for x in range(nx):
            m = mask_s[y, x] | mask_t[y, x]
            nd = nodata_s[y, x] or nodata_t[y, x]
            mask[y, x] = m & clear
            nodata[y, x] = nd
            bad[y, x] = nd or (m & bad_bits) != 0


@_threads
def combine_masks(mask_s, mask_t, nodata_s, nodata_t, bad_bits, clear_bits):
    """The two inputs' masks in one pass: ``(mask, bad, nodata)``.

    ``mask = (mask_s | mask_t) & ~clear_bits`` (uint32), ``nodata = nodata_s |
    nodata_t`` and ``bad = nodata | ((mask_s | mask_t) & bad_bits != 0)`` (bool).
    """
    shape = np.shape(mask_s)
    mask = np.empty(shape, np.uint32)
    bad = np.empty(shape, np.bool_)
    nodata = np.empty(shape, np.bool_)
    _combine_masks(np.asarray(mask_s, np.uint32), np.asarray(mask_t, np.uint32), nodata_s,
                   nodata_t, np.uint32(bad_bits), np.uint32(~np.uint32(clear_bits)), mask, bad,
                   nodata)  # fmt: skip
    return mask, bad, nodata


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
def finish_difference(diff, u, v, plane, scale, nodata=None):
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
def _variance(var_b, var_a, k2, scale, floor, fill, nodata, out):
    ny, nx = out.shape
    for y in numba.prange(ny):
        for x in range(nx):
            vb = max(var_b[y, x], np.float32(0.0))
            va = max(var_a[y, x], np.float32(0.0))
            val = (vb + k2 * va) * scale
            if nodata[y, x] or not np.isfinite(val):
                val = fill
            out[y, x] = max(val, floor)


@_threads
def difference_variance(var_b, var_a, kappa2, scale, floor, fill, nodata):
    """``max(scale (max(var_b, 0) + κ² max(var_a, 0)), floor)``, ``fill`` on ``nodata``
    and non-finite pixels; float32."""
    out = np.empty(np.shape(var_b), np.float32)
    _variance(np.asarray(var_b, np.float32), np.asarray(var_a, np.float32),
              np.float32(kappa2), np.float32(scale), np.float32(floor), np.float32(fill),
              nodata, out)  # fmt: skip
    return out


@numba.njit(parallel=True, cache=True)
def _matched_inputs(image, variance, mask, ignore_bits, img0, var0, bad):
    ny, nx = image.shape
    for y in numba.prange(ny):
        for x in range(nx):
            v = image[y, x]
            w = variance[y, x]
            b = (mask[y, x] & ignore_bits) != 0 or not np.isfinite(v) or not np.isfinite(w)
            bad[y, x] = b
            img0[y, x] = np.float32(0.0) if b else v
            var0[y, x] = np.float32(0.0) if b else w


@numba.njit(cache=True)
def _mark_boxes(bad, img0, var0, ys, xs, half):
    ny, nx = bad.shape
    for k in range(len(ys)):
        for y in range(max(ys[k] - half, 0), min(ys[k] + half + 1, ny)):
            for x in range(max(xs[k] - half, 0), min(xs[k] + half + 1, nx)):
                bad[y, x] = True
                img0[y, x] = np.float32(0.0)
                var0[y, x] = np.float32(0.0)


@_threads
def matched_inputs(image, variance, mask, ignore_bits, around=None, half=0):
    """The matched filter's inputs: image and variance with left-out pixels set to 0.

    A pixel is left out (``bad``) when ``mask & ignore_bits`` is set, when its image or
    variance value is not finite, or when it lies within ``half`` pixels (square) of a
    pixel of ``around`` (a bool image, e.g. saturated pixels).

    Returns
    -------
    image0, variance0 : numpy.ndarray
        float32.
    bad : numpy.ndarray
        bool.
    """
    image = np.asarray(image, np.float32)
    img0 = np.empty(image.shape, np.float32)
    var0 = np.empty(image.shape, np.float32)
    bad = np.empty(image.shape, np.bool_)
    _matched_inputs(image, np.asarray(variance, np.float32), np.asarray(mask),
                    np.uint32(ignore_bits), img0, var0, bad)  # fmt: skip
    if around is not None and half > 0:
        n = int(np.count_nonzero(around))
        if 0 < n <= 20_000:  # a few saturated stars: mark boxes around their pixels
            ys, xs = np.nonzero(around)
            _mark_boxes(bad, img0, var0, ys.astype(np.int64), xs.astype(np.int64), int(half))
        elif n:  # large areas: one dilation of the whole mask (cumulative sums)
            grown = dilate(around, int(half))
            bad |= grown
            img0[grown] = 0.0
            var0[grown] = 0.0
    return img0, var0, bad


def dilate(mask, half):
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
def snr_map(filt, vfilt, bad):
    """``filt / sqrt(vfilt)`` where ``vfilt > 0`` and not ``bad``, else 0 (float32)."""
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


@numba.njit(parallel=True, cache=True)
def _count_above(image, t, sign, counts):
    ny, nx = image.shape
    for y in numba.prange(ny):
        c = 0
        for x in range(nx):
            if sign * image[y, x] > t:
                c += 1
        counts[y] = c


@numba.njit(parallel=True, cache=True)
def _fill_above(image, t, sign, starts, ys, xs):
    ny, nx = image.shape
    for y in numba.prange(ny):
        k = starts[y]
        for x in range(nx):
            if sign * image[y, x] > t:
                ys[k] = y
                xs[k] = x
                k += 1


@_threads
def above(image, threshold, sign=1):
    """``np.nonzero(sign * image > threshold)`` (raster order) without a full-frame mask."""
    image = np.asarray(image)
    t, sg = image.dtype.type(threshold), image.dtype.type(1 if sign > 0 else -1)
    counts = np.empty(image.shape[0], np.int64)
    _count_above(image, t, sg, counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(counts.sum())
    ys, xs = np.empty(n, np.int64), np.empty(n, np.int64)
    _fill_above(image, t, sg, starts, ys, xs)
    return ys, xs


def segments(image, threshold, n_pixels, sign=1):
    """8-connected groups of at least ``n_pixels`` pixels above ``threshold``
    (of ``-image`` when ``sign`` is negative).

    Equal to photutils ``detect_sources(image, threshold, n_pixels)`` (pixels
    ``> threshold``, 8-connectivity, labels in raster order of each group's first
    pixel), but only the pixels above the threshold are visited after one comparison
    pass, and no segmentation image is made.

    Returns
    -------
    numpy.ndarray
        int64 ``(n, 7)``: pixel count, half-open bounding box ``x0, x1, y0, y1``, and
        the ``x, y`` of the first (raster order) highest pixel of each group.
    numpy.ndarray
        float64 ``(n,)``: that highest value.
    """
    ys, xs = above(image, threshold, sign)
    if len(ys) == 0:
        return np.zeros((0, 7), np.int64), np.zeros(0)
    vals = image[ys, xs].astype(np.float64) * (1.0 if sign > 0 else -1.0)
    out, best = _segments(ys, xs, vals, image.shape[1])
    keep = out[:, 0] >= n_pixels
    return out[keep], best[keep]


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
def cr_candidates(img, bkg, var, skip, cr, r1, r2, nsigma):
    """Pixels sharper than the PSF allows (:func:`apdask.pipeline.isr.mask_cosmic_rays`).

    A pixel not in ``skip`` or ``cr`` is a candidate when ``d = img − bkg`` exceeds
    ``nsigma σ`` and, along one of the four directions through it (edge pixels
    repeated beyond the border), ``d − r n > nsigma sqrt(σ² + r² σ_n²)`` with ``n``
    the mean of the two opposite neighbours' ``d``, ``σ_n² = (σ_a² + σ_b²)/4``, and
    ``r = r1`` along rows and columns, ``r2`` along diagonals.
    """
    out = np.empty(img.shape, np.bool_)
    _cr_candidates(img, bkg, np.asarray(var, np.float32), skip, cr, np.float32(r1),
                   np.float32(r2), np.float32(nsigma), out)  # fmt: skip
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
def interpolate_over(img, bad, half=2, max_half=64):
    """Replace ``bad`` pixels of ``img`` in place by the median of the good (not bad,
    finite) pixels in a ``(2h+1)²`` box, ``h = half`` doubled until one is found
    (beyond ``max_half``: the median of all good pixels)."""
    ys, xs = np.nonzero(bad)
    if len(ys) == 0:
        return img
    vals = np.empty(len(ys), np.float32)
    found = np.empty(len(ys), np.bool_)
    _box_medians(img, bad, ys.astype(np.int64), xs.astype(np.int64), int(half), int(max_half),
                 vals, found)  # fmt: skip
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


def grow_diamond(mask, r):
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
        y = np.int64(yy)
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
def smoothed_residual(image, bkg, mask, ignore_bits, sigma, truncate=3.0):
    """``gaussian_filter(where(bad, 0, image − bkg), sigma, mode="constant")`` and ``bad``.

    ``bkg`` is a bilinearly interpolated grid, ``(coarse, jy, ty, jx, tx)`` of
    :meth:`apdask.pipeline.background.Background.bilinear` (evaluated in the loop: no full-frame
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
    _smooth(image, coarse, jy, ty, jx, tx, np.asarray(mask), np.uint32(ignore_bits), w, data, tmp,
            out, bad)  # fmt: skip
    return out, bad
