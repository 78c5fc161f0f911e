"""PSF stars picked out of a rich field: the stellar locus (apdask.pipeline.stars).

A galaxy-cluster-like field: a few stars among many brighter galaxies, some
saturated stars (flat-topped, not masked: no saturation level known) and cosmic
rays.  Before the locus the PSF was the median of the brightest isolated sources:
here a galaxy-dominated 4.5 px for a 3.0 px PSF (NIRCam Abell 2744: 6.8 px against
WebbPSF's 2.56 px).
"""

from __future__ import annotations

import numpy as np
import pytest

from apdask.pipeline.psf import (
    _shifted_in_halves,
    estimate_psf,
    estimate_psf_model,
    psf_fwhm,
    shifted_psfs,
)
from apdask.pipeline.stars import adaptive_sizes, stellar_locus
from tests._pixels import add_stars, exposure_from, gaussian_psf

FWHM = 3.0
SHAPE = (600, 600)


def _galaxy(img, x, y, flux, fwhm_major, q, theta):
    """Elliptical Gaussian galaxy seen through the PSF (widths added in quadrature)."""
    s_psf = FWHM / 2.3548
    a = np.hypot(fwhm_major / 2.3548, s_psf)
    b = np.hypot(q * fwhm_major / 2.3548, s_psf)
    h = int(np.ceil(5 * a))
    ix, iy = int(round(x)), int(round(y))
    yy, xx = np.mgrid[iy - h : iy + h + 1, ix - h : ix + h + 1]
    c, s = np.cos(theta), np.sin(theta)
    u, v = (xx - x) * c + (yy - y) * s, -(xx - x) * s + (yy - y) * c
    g = np.exp(-0.5 * ((u / a) ** 2 + (v / b) ** 2))
    img[iy - h : iy + h + 1, ix - h : ix + h + 1] += flux * g / g.sum()


def _rich_field(seed=3, n_stars=30, n_gal=180):
    rng = np.random.default_rng(seed)
    img = np.zeros(SHAPE)
    xs, ys = rng.uniform(40, 560, n_stars), rng.uniform(40, 560, n_stars)
    add_stars(img, xs, ys, 10 ** rng.uniform(3.7, 5.0, n_stars), FWHM)
    for _ in range(n_gal):  # brighter than the stars, and more numerous
        _galaxy(img, *rng.uniform(40, 560, 2), 10 ** rng.uniform(4.0, 5.7),
                rng.uniform(2.0, 8.0), rng.uniform(0.4, 1.0), rng.uniform(0, np.pi))  # fmt: skip
    sat = np.zeros(SHAPE)  # bright stars with flat (saturated, unmasked) cores
    add_stars(sat, rng.uniform(40, 560, 6), rng.uniform(40, 560, 6), np.full(6, 3e6), FWHM)
    img += np.minimum(sat, 2e4)
    var = img + 900.0
    img = img + rng.normal(0, 1, SHAPE) * np.sqrt(var)
    for x, y in rng.integers(5, 595, (40, 2)):  # cosmic rays: single pixels and short tracks
        img[y, x : x + int(rng.integers(1, 3))] += 5000.0
    return exposure_from(img, var), xs, ys


@pytest.fixture(scope="module")
def rich():
    return _rich_field()


def test_psf_of_a_galaxy_dominated_field_is_the_stars(rich):
    e, _, _ = rich
    psf = estimate_psf(e)
    assert psf_fwhm(psf) == pytest.approx(FWHM, rel=0.05)  # 3.05 px (the old median: 4.5)
    truth = gaussian_psf(FWHM)
    assert np.abs(psf - truth).max() < 0.08 * truth.max()
    model = estimate_psf_model(e)
    assert psf_fwhm(model.mean) == pytest.approx(FWHM, rel=0.05)
    stars = model.stars
    on = np.flatnonzero(stars["locus"])
    # the locus holds stars (within 2 px of a true star), not galaxies
    d = np.hypot(stars["x"][on, None] - rich[1][None], stars["y"][on, None] - rich[2][None])
    assert np.mean(d.min(axis=1) < 2.0) >= 0.9
    assert len(on) >= 10


def test_locus_is_the_smallest_narrow_sequence():
    """Sizes of 20 stars (3.0 px, 3 % scatter) among 60 galaxies (3.6–12 px) and 15
    cosmic rays (below 1 px): the stars, whatever their share."""
    rng = np.random.default_rng(0)
    fw = np.concatenate([3.0 * np.exp(rng.normal(0, 0.03, 20)), rng.uniform(3.6, 12, 60),
                         rng.uniform(0.3, 0.9, 15)])  # fmt: skip
    n = len(fw)
    keep = stellar_locus(fw, np.full(n, 0.05), np.full(n, 100.0), rng.uniform(0, 500, n),
                         rng.uniform(0, 500, n), (500, 500))  # fmt: skip
    assert keep[:20].sum() >= 19 and not keep[20:].any()


def test_adaptive_sizes_of_gaussians():
    stamps = np.array([gaussian_psf(f, 25) for f in (2.0, 3.0, 5.0)])
    fw, ell = adaptive_sizes(stamps, np.zeros(3), np.zeros(3), 4.5)
    # pixel-integrated Gaussians: FWHM² + 2.3548² / 12 px² (the pixel's own variance)
    assert fw == pytest.approx(np.sqrt(np.array([2.0, 3.0, 5.0]) ** 2 + 2.3548**2 / 12), rel=0.01)
    assert np.all(ell < 0.01)


def test_the_psf_model_selects_from_the_astrometry_search(rich):
    """The calibrate stage's star search (kept in Calibrated) serves the PSF model and
    the cosmic-ray pass: the same model, mask and image as searching again."""
    import dataclasses

    from apdask.core.records import Calibrated
    from apdask.pipeline import astrometry, tasks
    from apdask.pipeline.psf import psf_star_search
    from apdask.pipeline.stars import find_stars

    e, _, _ = rich
    peaks = astrometry.star_search(e)
    assert psf_star_search(e, peaks) is peaks  # the same FWHM guess (4.5 px)
    kw = dict(fwhm=4.5, nsigma=20.0, isolation=25, border=14, contrast=0.02, isolation_cut=False)
    again, shared = (
        find_stars(e.image, e.variance, e.mask, **kw),
        find_stars(e.image, e.variance, e.mask, peaks=peaks, **kw),
    )
    for k in ("x", "y", "snr", "flux", "neighbour", "nearest"):
        np.testing.assert_array_equal(shared[k], again[k])
    # a search made with another FWHM is not used
    other = dataclasses.replace(peaks, fwhm=3.0, y=peaks.y[:0])
    assert psf_star_search(e, other) is not other
    task = getattr(tasks.science_psf_task, "__wrapped__", tasks.science_psf_task)
    a, b = task(Calibrated(e)), task(Calibrated(e, peaks=peaks))
    assert b.peaks is None  # the repaired image is no longer the searched one
    np.testing.assert_array_equal(a.exposure.psf_model.psfs, b.exposure.psf_model.psfs)
    np.testing.assert_array_equal(a.exposure.mask, b.exposure.mask)
    np.testing.assert_array_equal(a.exposure.image, b.exposure.image)


def test_shifted_in_halves_is_one_call():
    """The PSF stars' stamps shifted in two halves (one in a thread) are those of one call."""
    rng = np.random.default_rng(5)
    stamps = rng.normal(size=(101, 29, 29))
    dx, dy = rng.uniform(-0.5, 0.5, (2, 101))
    np.testing.assert_array_equal(_shifted_in_halves(stamps, dx, dy), shifted_psfs(stamps, dx, dy))
