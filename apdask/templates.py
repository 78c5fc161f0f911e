"""Warping template tiles onto a CCD's pixel grid.

For every target pixel the tile pixel coordinates come from the two WCSs,
evaluated exactly on a coarse grid (every ``grid`` pixels) and interpolated
bilinearly in between (full-frame WCS transforms are slow; TAN distortions are
smooth on 32-px scales, the interpolation error is < 1e-3 px).  The image is
resampled with a cubic B-spline (``scipy.ndimage.map_coordinates(order=3)``),
the variance with bilinear interpolation; fluxes per pixel are scaled by the
ratio of pixel areas so that total flux is conserved.  Overlapping tiles: the
first tile (in list order) with valid data wins.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from astropy.wcs.utils import proj_plane_pixel_area
from scipy import ndimage

from .detect import _interp_matrix, _workers
from .exceptions import NoTemplateCoverageError
from .image import MASK, Exposure

__all__ = ["warp_template"]

_GRID = 32
_PAD = 4


def _coarse_nodes(n, step):
    nodes = np.arange(0, n, step, dtype=float)
    if nodes[-1] != n - 1:
        nodes = np.append(nodes, n - 1)
    return nodes


def warp_template(tiles, wcs, shape, *, psf=None, grid=_GRID):
    """Resample template tiles onto the pixel grid of ``wcs`` / ``shape``.

    Parameters
    ----------
    tiles : sequence of apdask.image.TemplateTile
        Template tiles (nJy per pixel, variance nJy²); non-finite pixels have no data.
    wcs : astropy.wcs.WCS
        WCS of the target CCD (0-based pixel convention).
    shape : tuple of int
        Target ``(ny, nx)``.
    psf : numpy.ndarray, optional
        PSF stamp of the result; default the PSF of the first tile that has one.
    grid : int, optional
        Spacing in pixels of the exactly transformed coarse grid.

    Returns
    -------
    apdask.image.Exposure
        float32 image and variance on the target grid, NO_DATA where no tile covers,
        ``wcs`` as given, ``meta = {"band", "tiles", "coverage"}``: the ids of the
        tiles used and the fraction of target pixels with template data.

    Raises
    ------
    NoTemplateCoverageError
        If no tile covers any pixel of the target.
    """
    ny, nx = (int(shape[0]), int(shape[1]))
    if not tiles:
        msg = "no template tile overlaps the target footprint"
        raise NoTemplateCoverageError(msg)
    ynodes, xnodes = _coarse_nodes(ny, grid), _coarse_nodes(nx, grid)
    gx, gy = np.meshgrid(xnodes, ynodes)
    ra, dec = wcs.pixel_to_world_values(gx, gy)
    area_t = proj_plane_pixel_area(wcs.celestial)

    image = np.zeros((ny, nx), np.float32)
    variance = np.zeros((ny, nx), np.float32)
    filled = np.zeros((ny, nx), bool)
    used = []
    out_psf = psf
    for tile in tiles:
        tny, tnx = tile.image.shape
        tx, ty = tile.wcs.world_to_pixel_values(ra, dec)
        if not (np.isfinite(tx).all() and np.isfinite(ty).all()):
            continue
        # quick reject: no coarse node near the tile
        inside = (tx > -grid) & (tx < tnx - 1 + grid) & (ty > -grid) & (ty < tny - 1 + grid)
        if not inside.any():
            continue
        # target rows/cols whose tile coordinates can fall in the tile
        rows = np.nonzero(inside.any(axis=1))[0]
        cols = np.nonzero(inside.any(axis=0))[0]
        r0 = int(ynodes[max(rows[0] - 1, 0)])
        r1 = int(ynodes[min(rows[-1] + 1, len(ynodes) - 1)]) + 1
        c0 = int(xnodes[max(cols[0] - 1, 0)])
        c1 = int(xnodes[min(cols[-1] + 1, len(xnodes) - 1)]) + 1
        my = _interp_matrix(ynodes, ny)[r0:r1]
        mx = _interp_matrix(xnodes, nx)[c0:c1]
        fx = (my @ tx @ mx.T).astype(np.float32)
        fy = (my @ ty @ mx.T).astype(np.float32)
        # crop the tile to the needed region (spline prefilter cost ~ tile area)
        x_lo = max(int(np.floor(fx.min())) - _PAD, 0)
        x_hi = min(int(np.ceil(fx.max())) + _PAD + 1, tnx)
        y_lo = max(int(np.floor(fy.min())) - _PAD, 0)
        y_hi = min(int(np.ceil(fy.max())) + _PAD + 1, tny)
        if x_hi <= x_lo or y_hi <= y_lo:
            continue
        sub = np.asarray(tile.image[y_lo:y_hi, x_lo:x_hi], np.float32)
        subv = np.asarray(tile.variance[y_lo:y_hi, x_lo:x_hi], np.float32)
        good = np.isfinite(sub) & np.isfinite(subv)
        all_good = bool(good.all())
        if not all_good:
            sub = np.where(good, sub, 0.0).astype(np.float32)
            subv = np.where(good, subv, 0.0).astype(np.float32)
            gd = ndimage.minimum_filter(good.astype(np.float32), size=3, mode="nearest")
        else:
            gd = None
        fx -= x_lo
        fy -= y_lo
        coef = ndimage.spline_filter(sub, order=3, output=np.float32, mode="nearest")
        ratio = np.float32(area_t / proj_plane_pixel_area(tile.wcs.celestial))
        win_img = image[r0:r1, c0:c1]
        win_var = variance[r0:r1, c0:c1]
        win_fill = filled[r0:r1, c0:c1]
        lo_x, hi_x = -0.5 - x_lo, tnx - 0.5 - x_lo
        lo_y, hi_y = -0.5 - y_lo, tny - 0.5 - y_lo

        def _chunk(sl, fx=fx, fy=fy, coef=coef, subv=subv, all_good=all_good, ratio=ratio,
                   win_img=win_img, win_var=win_var, win_fill=win_fill, lo_x=lo_x, hi_x=hi_x,
                   lo_y=lo_y, hi_y=hi_y, gd=gd):  # fmt: skip
            cx, cy = fx[sl], fy[sl]
            cov = (cx >= lo_x) & (cx <= hi_x) & (cy >= lo_y) & (cy <= hi_y) & ~win_fill[sl]
            if not all_good:
                g = ndimage.map_coordinates(gd, [cy, cx], order=1, mode="nearest")
                cov &= g > 0.999
            if not cov.any():
                return
            val = ndimage.map_coordinates(coef, [cy, cx], order=3, mode="nearest",
                                          prefilter=False, output=np.float32)  # fmt: skip
            var = ndimage.map_coordinates(subv, [cy, cx], order=1, mode="nearest",
                                          output=np.float32)  # fmt: skip
            win_img[sl] = np.where(cov, val * ratio, win_img[sl])
            win_var[sl] = np.where(cov, var * (ratio * ratio), win_var[sl])
            win_fill[sl] |= cov

        step = max(64, (r1 - r0) // (4 * _workers()) + 1)
        chunks = [slice(i, min(i + step, r1 - r0)) for i in range(0, r1 - r0, step)]
        with ThreadPoolExecutor(_workers()) as pool:
            list(pool.map(_chunk, chunks))
        if not win_fill.any():
            continue
        used.append(tile.tile_id)
        if out_psf is None and tile.psf is not None:
            out_psf = np.asarray(tile.psf, float)
        if filled.all():
            break
    if not used:
        msg = f"no template tile has data on the target pixels ({len(tiles)} tile(s) checked)"
        raise NoTemplateCoverageError(msg)
    mask = np.where(filled, np.uint32(0), np.uint32(MASK["NO_DATA"]))
    if not filled.all():
        image[~filled] = 0.0
        variance[~filled] = np.float32(np.median(variance[filled]))
    meta = {"band": tiles[0].band, "tiles": used, "coverage": float(np.mean(filled))}
    return Exposure(image=image, variance=variance, mask=mask, wcs=wcs, psf=out_psf, meta=meta)
