"""The per-pixel pass of one amplifier's ISR (:func:`apdask.pipeline.isr.isr_amp`) and
the scaled copy of its blocks into the assembled frame (:func:`apdask.pipeline.isr.assemble`)."""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import register_jitable

__all__ = ["amp_pass", "place_block"]

_F32_MAX = np.float32(np.finfo(np.float32).max)


@register_jitable
def _finite_or(v):
    """``numpy.nan_to_num`` of one float32 and whether it was finite."""
    if np.isfinite(v):
        return v, False
    if np.isnan(v):
        return np.float32(0.0), True
    return (_F32_MAX if v > 0 else -_F32_MAX), True


@numba.njit(nogil=True, cache=True)  # amplifiers' tasks run it side by side
def _amp_pass(raw, y0, x0, row, flip_y, flip_x, gain, saturation, bias, dark, darktime,
              flat, read_var, flat_bad, dark_hot, bits, img, var, mask):  # fmt: skip
    sat_bit, nodata_bit, bad_bit = bits
    ny, nx = img.shape
    lost = 0
    for y in range(ny):
        sy = y0 + (ny - 1 - y if flip_y else y)
        r = row[sy - y0]
        for x in range(nx):
            sx = x0 + (nx - 1 - x if flip_x else x)
            v = raw[sy, sx]
            m = np.uint32(0)
            if not np.isfinite(v):
                v = np.float32(0.0)
                m |= nodata_bit
            if v >= saturation:
                m |= sat_bit
            if m != 0:
                lost += 1
            p = (v - r) * gain
            if bias.shape[0]:
                b, b_bad = _finite_or(bias[y, x])
                p -= b
                if b_bad:
                    m |= bad_bit
            if dark.shape[0]:
                d, d_bad = _finite_or(dark[y, x])
                p -= d * darktime
                if d_bad or dark[y, x] > dark_hot:
                    m |= bad_bit
            f = np.float32(1.0)
            if flat.shape[0]:
                fl = flat[y, x]
                dead = not np.isfinite(fl) or fl <= 0
                if dead or fl <= flat_bad:
                    m |= bad_bit
                if not dead:
                    f = fl
            p /= f
            var[y, x] = max(p, np.float32(0.0)) / f + read_var / (f * f)
            img[y, x] = np.float32(0.0) if m & nodata_bit else p
            mask[y, x] = m
    return lost


def amp_pass(
    raw: np.ndarray,
    data_slice: tuple[slice, slice],
    row: np.ndarray,
    *,
    flip_y: bool,
    flip_x: bool,
    gain: float,
    saturation: float,
    bias: np.ndarray | None,
    dark: np.ndarray | None,
    darktime: float,
    flat: np.ndarray | None,
    read_noise: float,
    flat_bad: float,
    dark_hot: float,
    bits: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """One pass over an amplifier's data section: electrons, variance and mask.

    Equal, to float32 rounding, to this NumPy chain (``d = raw[data_slice]`` with
    non-finite values 0, flipped to the assembled orientation; ``f`` the flat with 1
    where it is dead, ≤ 0 or non-finite)::

        img = ((d - row[:, None]) * gain - nan_to_num(bias) - nan_to_num(dark) * darktime) / f
        var = maximum(img, 0) / f + read_noise**2 / f**2
        img[non-finite raw] = 0

    and ``mask``: SAT where ``d >= saturation``, NO_DATA where the raw is non-finite,
    BAD where the bias or dark is non-finite, the dark above ``dark_hot`` or the flat
    at or below ``flat_bad`` (or dead).  ``bits`` are the (SAT, NO_DATA, BAD) mask
    bits.  Also returns the number of saturated or non-finite data pixels.
    """
    sy, sx = data_slice
    ny, nx = len(range(*sy.indices(raw.shape[0]))), len(range(*sx.indices(raw.shape[1])))
    none = np.zeros((0, 0), np.float32)

    def calib(a: np.ndarray | None) -> np.ndarray:
        # an amplifier's section of the assembled frame as it is: no copy
        return none if a is None else np.asarray(a, np.float32)

    img = np.empty((ny, nx), np.float32)
    var = np.empty((ny, nx), np.float32)
    mask = np.empty((ny, nx), np.uint32)
    lost = _amp_pass(
        np.ascontiguousarray(raw, np.float32), sy.start or 0, sx.start or 0,
        np.ascontiguousarray(row, np.float32), bool(flip_y), bool(flip_x),
        np.float32(gain), np.float32(saturation), calib(bias), calib(dark),
        np.float32(darktime), calib(flat), np.float32(read_noise**2), np.float32(flat_bad),
        np.float32(dark_hot), tuple(np.uint32(b) for b in bits), img, var, mask,
    )  # fmt: skip
    return img, var, mask, int(lost)


@numba.njit(nogil=True, cache=True)
def _place_times(out, block, y0, x0, s):
    ny, nx = block.shape
    for y in range(ny):
        for x in range(nx):
            out[y0 + y, x0 + x] = block[y, x] * s


@numba.njit(nogil=True, cache=True)
def _place_times2(out, block, y0, x0, s1, s2):
    ny, nx = block.shape
    for y in range(ny):
        for x in range(nx):
            out[y0 + y, x0 + x] = block[y, x] * s1 * s2


def place_block(
    out: np.ndarray, block: np.ndarray, y0: int, x0: int, *scales: float | np.floating
) -> None:
    """Write ``block`` times ``scales`` (one or two) into ``out`` at ``(y0, x0)``, in one pass.

    Equal, bit for bit, to ``dst = out[y0:y0 + ny, x0:x0 + nx]``, then
    ``np.multiply(block, scales[0], out=dst)`` and ``dst *= scales[1]``, where the
    scales do not promote ``block``'s dtype (float32 scales for a float32 block).
    """
    if len(scales) not in (1, 2):
        msg = f"place_block takes one or two scales, got {len(scales)}"
        raise ValueError(msg)
    dtype = block.dtype.type
    if len(scales) == 1:
        _place_times(out, block, int(y0), int(x0), dtype(scales[0]))
    else:
        _place_times2(out, block, int(y0), int(x0), dtype(scales[0]), dtype(scales[1]))
