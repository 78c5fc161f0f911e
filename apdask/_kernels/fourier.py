"""Fourier helpers shared by subtraction and detection.

Full frames are convolved tile by tile (overlap-save, :func:`convolve_tiles`): a
512 × 512 tile's transforms stay in the processor's cache, and the tiles are spread
over the cores, each transformed by ``ducc0`` (the successor of the pocketfft that
``scipy.fft`` wraps; it writes into buffers reused from tile to tile).  Each tile is
transformed once per image and every kernel product is formed on it, so a sum of
several convolutions (the difference image) costs one forward transform per image and
one inverse per output term.  The inverse is made in two passes, along y then along
x, and only for the rows of the tile's core in the second; terms weighted along y
only are added between the two, sharing the pass along x of the unweighted terms
(:class:`_OutputPlan`).  With compact kernels and a margin of their half-size
the result is the 'same'-size linear convolution, zero outside the image, to float32
rounding.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ducc0
import numpy as np

from apdask._kernels.fused import tile_add, tile_add_rows, tile_product

__all__ = ["convolve_tiles", "fast_length", "small_kernel_rfft2", "tile_size"]


def small_kernel_rfft2(kernels: Sequence[np.ndarray], fy: int, fx: int) -> np.ndarray:
    """``rfft2`` on an ``fy × fx`` grid of small odd kernels centred on the origin.

    Each kernel (``n × n``, centre at ``n // 2``) is placed with its centre at
    pixel (0, 0), wrapping around, as for a 'same'-size convolution.  It is
    non-zero in only ``n`` rows and columns, so its transform is
    ``E_y · K · E_x`` with DFT matrices ``E_y`` (``fy × n``) and ``E_x``
    (``n × (fx // 2 + 1)``): one matrix product instead of a full-frame FFT,
    equal to ``scipy.fft.rfft2`` of the padded array to single precision.

    Parameters
    ----------
    kernels : sequence of numpy.ndarray
        Odd square kernels, all of the same size.
    fy, fx : int
        The transform grid.

    Returns
    -------
    numpy.ndarray
        complex64, shape ``(len(kernels), fy, fx // 2 + 1)``.
    """
    n = np.shape(kernels[0])[0]
    off = np.arange(n) - n // 2
    # phases reduced modulo the period first: exact for any grid size
    ex = np.exp(-2j * np.pi * (np.outer(off, np.arange(fx // 2 + 1)) % fx) / fx)
    ey = np.exp(-2j * np.pi * (np.outer(np.arange(fy), off) % fy) / fy)
    ex, ey = ex.astype(np.complex64), ey.astype(np.complex64)
    out = np.empty((len(kernels), fy, fx // 2 + 1), np.complex64)
    for i, k in enumerate(kernels):
        np.matmul(ey, np.asarray(k, np.complex64) @ ex, out=out[i])
    return out


def tile_size(n_pixels: int, margin: int, tile: int | None = None) -> tuple[int, int]:
    """Transform length and core (output) length of the tiles along one axis.

    An axis that fits in one tile with its margins gets one transform of
    ``n_pixels + 2 margin``.  Otherwise it is cut into the fewest cores that tiles
    of at most ``tile`` (default the smallest of 512, 768, 1024, ... with margins at
    most a quarter of it) hold, of equal length, so that no tile is mostly padding.
    Transform lengths are :func:`fast_length`.
    """
    margin = int(margin)
    if tile is None:
        tile = next(t for t in (512, 768, 1024, 1536, 2048, 4096) if 8 * margin <= t or t == 4096)
    tile = max(int(tile), 4 * margin + 1)
    if n_pixels + 2 * margin <= tile:
        return fast_length(n_pixels + 2 * margin), n_pixels
    count = -(-n_pixels // (tile - 2 * margin))
    core = -(-n_pixels // count)
    return fast_length(core + 2 * margin), core


def fast_length(n: int) -> int:
    """The smallest length from ``n`` whose transforms are fast: ``2^a 3^b 5^c`` with
    ``b <= 3``.

    Radix-3 passes are the slow ones: ``ducc0.fft.good_size`` picks 486 = 2·3⁵ for 483,
    whose transforms cost 15 % more per point than those of 500 = 2²·5³ (``r2c`` and
    ``c2r`` of a 486² tile against a 500² one, single-threaded).
    """
    m = max(int(n), 1)
    while not _fast(m):
        m += 1
    return m


def _fast(m: int) -> bool:
    """Whether ``m`` is ``2^a 3^b 5^c`` with ``b <= 3``."""
    if m % 81 == 0:
        return False
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1


def convolve_tiles(
    images: Sequence[np.ndarray],
    outputs: Sequence[tuple[np.ndarray, Sequence[Any]]],
    *,
    threads: int = 1,
    tile: int | None = None,
) -> Any:
    """Sums of weighted convolutions of full frames with small kernels, by overlap-save.

    For every ``(out, terms)`` in ``outputs``::

        out = Σ_terms  wy[:, None] · wx[None, :] · Σ_parts  kernel ⊗ images[i]

    'same'-size convolution, the images zero outside their bounds.  Each tile of each
    image is transformed once; the unweighted terms of an output share one inverse
    transform, every weighted term needs its own.

    Parameters
    ----------
    images : sequence of numpy.ndarray
        2-D float32 images of one shape, finite.
    outputs : sequence of (numpy.ndarray, list)
        ``out`` (float32, the images' shape; overwritten) and its ``terms``: tuples
        ``(wy, wx, parts)`` with 1-D weights along y and x (or None for 1) and
        ``parts`` a list of ``(image_index, kernel)``, the kernels odd and square.
    threads : int, optional
        Tiles processed at once (each transform is single-threaded).
    tile : int, optional
        Transform side of interior tiles (see :func:`tile_size`).
    """
    images = [np.asarray(im, np.float32) for im in images]
    ny, nx = images[0].shape
    kernels = [np.asarray(k, np.float32) for _, terms in outputs for t in terms for _, k in t[2]]
    margin = max(k.shape[0] // 2 for k in kernels)
    ty, tx = tile_size(ny, margin, tile), tile_size(nx, margin, tile)
    plans = [_OutputPlan.make(terms, ty[0], tx[0]) for _, terms in outputs]
    used = sorted({i for p in plans for i in p.images()})
    tiles = [(y0, x0) for y0 in range(0, ny, ty[1]) for x0 in range(0, nx, tx[1])]
    local = threading.local()

    def buffers():  # per thread, reused for every tile it processes
        if not hasattr(local, "b"):
            fsh = (ty[0], tx[0] // 2 + 1)
            local.b = _TileBuffers(
                np.zeros((ty[0], tx[0]), np.float32),
                np.empty((max(used) + 1, *fsh), np.complex64),
                np.empty(fsh, np.complex64),
                np.empty(fsh, np.complex64),
                np.empty((ty[0], tx[0]), np.float32),
            )
        return local.b

    def run(y0, x0):
        b = buffers()
        for i in used:
            _forward(images[i], y0 - margin, x0 - margin, b.window, b.spectra[i])
        h, w = min(ty[1], ny - y0), min(tx[1], nx - x0)
        for (out, _), plan in zip(outputs, plans, strict=True):
            plan.inverse(b, out[y0 : y0 + h, x0 : x0 + w], y0, x0, margin)

    threads = max(1, min(int(threads), len(tiles)))
    if threads == 1:
        for t in tiles:
            run(*t)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda t: run(*t), tiles))


@dataclass(frozen=True)
class _TileBuffers:
    """One thread's tile buffers: the zero-padded window, the images' spectra, two
    spectrum accumulators and the inverse transform."""

    window: np.ndarray
    spectra: np.ndarray
    acc: np.ndarray
    acc2: np.ndarray
    result: np.ndarray


def _forward(image, ys, xs, buf, out):
    """``rfft2`` of the tile window of ``image`` at origin ``(ys, xs)`` into ``out``:
    zeros outside the image (set in ``buf`` only where the window leaves it)."""
    ny, nx = image.shape
    ty, tx = buf.shape
    ylo, yhi, xlo, xhi = max(ys, 0), min(ys + ty, ny), max(xs, 0), min(xs + tx, nx)
    if (ylo, yhi, xlo, xhi) == (ys, ys + ty, xs, xs + tx):
        src = image[ylo:yhi, xlo:xhi]
    else:
        iy0, iy1, ix0, ix1 = ylo - ys, yhi - ys, xlo - xs, xhi - xs
        buf[:iy0], buf[iy1:], buf[:, :ix0], buf[:, ix1:] = 0, 0, 0, 0
        buf[iy0:iy1, ix0:ix1] = image[ylo:yhi, xlo:xhi]
        src = buf
    ducc0.fft.r2c(src, axes=(0, 1), nthreads=1, out=out)


def _inverse_y(acc):
    """In place: the inverse transform along y (the first pass of ``irfft2``)."""
    ducc0.fft.c2c(acc, axes=(0,), forward=False, inorm=2, nthreads=1, out=acc)


def _inverse_x(acc, out, lo, hi, tx):
    """Rows ``lo:hi`` of ``out``: the inverse real transform along x of those rows of
    ``acc`` (already inverted along y), which it overwrites."""
    ducc0.fft.c2r(
        acc[lo:hi],
        axes=(1,),
        lastsize=tx,
        forward=False,
        inorm=2,
        nthreads=1,
        out=out[lo:hi],
        allow_overwriting_input=True,
    )


@dataclass(frozen=True)
class _OutputPlan:
    """The terms of one output, grouped by how their inverse transforms are shared.

    ``base`` is the sum of the unweighted terms; ``rows`` the terms weighted along y
    only: a weight along y commutes with the transform along x, so those terms are
    weighted and added after the transform along y, and share one transform along x
    with ``base``.  ``cols`` (weighted along x) each need their own.  A term is
    ``(wy, wx, image indices, stacked kernel spectra)``.
    """

    base: tuple[Any, Any, np.ndarray, np.ndarray] | None
    rows: list[tuple[Any, Any, np.ndarray, np.ndarray]]
    cols: list[tuple[Any, Any, np.ndarray, np.ndarray]]

    @classmethod
    def make(cls, terms: Sequence[Any], ty: int, tx: int) -> _OutputPlan:
        """The plan of an output's ``terms`` on ``ty × tx`` tiles."""
        spec = _term_spectra(terms, ty, tx)
        base = next((t for t in spec if t[0] is None and t[1] is None), None)
        rows = [t for t in spec if t[0] is not None and t[1] is None]
        cols = [t for t in spec if t[1] is not None]
        return cls(base, rows, cols)

    def images(self) -> set[int]:
        """Indices of the images whose spectra the terms use."""
        terms = ([self.base] if self.base is not None else []) + self.rows + self.cols
        return {int(i) for term in terms for i in term[2]}

    def inverse(self, b: _TileBuffers, dst: np.ndarray, y0: int, x0: int, m: int) -> None:
        """``dst`` (the tile's core at ``(y0, x0)``) from the spectra in ``b``."""
        h, w = dst.shape
        lo, hi, tx = m, m + h, b.result.shape[1]
        none = np.zeros(0, np.float32)
        first = True
        if self.base is not None or self.rows:
            if self.base is not None:
                tile_product(b.acc, self.base[3], b.spectra, self.base[2])
            else:
                b.acc.fill(0)
            _inverse_y(b.acc)
            for wy, _, idx, ks in self.rows:
                tile_product(b.acc2, ks, b.spectra, idx)
                _inverse_y(b.acc2)
                tile_add_rows(b.acc, b.acc2, lo, wy[y0 : y0 + h])
            _inverse_x(b.acc, b.result, lo, hi, tx)
            tile_add(dst, b.result, m, none, none, True)
            first = False
        for wy, wx, idx, ks in self.cols:
            tile_product(b.acc2, ks, b.spectra, idx)
            _inverse_y(b.acc2)
            _inverse_x(b.acc2, b.result, lo, hi, tx)
            wy = none if wy is None else wy[y0 : y0 + h]
            tile_add(dst, b.result, m, wy, wx[x0 : x0 + w], first)
            first = False


def _term_spectra(terms, ty, tx):
    """An output's terms as ``(wy, wx, image indices, stacked kernel spectra)``, the
    unweighted terms merged into the first, one spectrum per image."""
    merged: dict[Any, Any] = {}
    weighted = []
    for wy, wx, parts in terms:
        dst = merged if wy is None and wx is None else {}
        for i, k in parts:
            s = small_kernel_rfft2([k], ty, tx)[0]
            dst[i] = dst[i] + s if i in dst else s
        if dst is not merged:
            wy = None if wy is None else np.asarray(wy, np.float32)
            wx = None if wx is None else np.asarray(wx, np.float32)
            weighted.append((wy, wx, dst))
    out = []
    for wy, wx, d in ([(None, None, merged)] if merged else []) + weighted:
        out.append((wy, wx, np.array(list(d), np.int64), np.array(list(d.values()))))
    return out
