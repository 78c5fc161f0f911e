"""Variants of simulated raws for the distributor and snap tests (fixed seeds)."""

from __future__ import annotations

import dataclasses

import dask
import numpy as np
from astropy.io import fits

from apdask.io.raw import read_raw, write_raw


def write_variant(src, dst, renoise_adu=0.0, seed=0, **changes):
    """Write a copy of raw ``src`` to ``dst`` with metadata ``changes`` applied.

    Parameters
    ----------
    src, dst : str
        Source raw and destination path.
    renoise_adu : float
        Standard deviation of independent Gaussian noise (ADU) added to every
        segment, so a second snap does not repeat the first one's noise.
    seed : int
        Seed of that noise.
    **changes
        ``RawMetadata`` fields to replace, e.g. ``snap=1`` or ``shutter={...}``.
    """
    raw = read_raw(src)
    segments = dask.compute(*raw.amps, scheduler="sync")
    if renoise_adu:
        rng = np.random.default_rng(seed)
        segments = [s + rng.normal(0.0, renoise_adu, s.shape) for s in segments]
    meta = dataclasses.replace(raw.meta, header=fits.Header(), **changes)
    return write_raw(dst, raw.detector, segments, meta)


def second_snap(src, dst, gap_s=2.0):
    """A second snap of the same visit: SNAP=1, starting after the first one's readout."""
    meta = read_raw(src).meta
    shift = (meta.darktime + gap_s) / 86400.0
    return write_variant(
        src, dst, renoise_adu=5.0, seed=1, snap=1,
        mjd_begin=meta.mjd_begin + shift, mjd_end=meta.mjd_end + shift,
    )  # fmt: skip
