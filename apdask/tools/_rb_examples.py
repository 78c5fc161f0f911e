"""Labelled DIASources for the reliability model: planted reals and artefacts.

Every example is a DIASource that the pipeline's own detection and measurement
produced, with the features that :func:`apdask.pipeline.measure.reliability.
reliability_features` computes at inference.  Labels come from what was put in the
pixels before the pipeline ran:

* **real**: the simulator's transients and variable stars (truth tables), point
  sources planted in a science image (a new source, or one on a static source: a host
  or a variable) or in a template (a source that faded: a negative DIASource), and
  the DECam transient of ``../shared/realdata`` (see its README);
* **bogus**: artefacts planted in the science image (dipoles of moved stars, rings of
  a PSF mismatch at stars, cosmic-ray tracks and hot pixels), cosmic rays and hot
  pixels planted in the template (negative DIASources), and every other detection
  away from any real source (subtraction residuals, noise, edges).

Detections near a real source of the wrong sign or at the wrong distance are left
out.  Used by :mod:`apdask.tools.train_reliability`.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from apdask.core.exposure import MASK, Exposure
from apdask.pipeline.measure.reliability import RELIABILITY_FEATURES, reliability_features
from apdask.pipeline.psf import psf_fwhm, psfs_at, shifted_psfs

__all__ = ["Examples", "Planted", "plant", "label_sources", "bright_peaks"]

#: What a planted artefact is called in :attr:`Examples.kind`.
ARTEFACTS = ("dipole", "ring", "cosmic")
#: Fraction of the planted cosmic rays and hot pixels that go into the template (an
#: unmasked one there is a sharp negative DIASource; single-exposure templates, such as
#: the DECam pairs', have many).
TEMPLATE_COSMIC_FRACTION = 1.0 / 3.0
#: Pixels where nothing is planted.
_AVOID = MASK["BAD"] | MASK["SAT"] | MASK["EDGE"] | MASK["NO_DATA"]

T = TypeVar("T")


@dataclass
class Examples:
    """Labelled DIASources: features, label (1 real, 0 bogus) and where each came from."""

    features: np.ndarray
    label: np.ndarray
    kind: np.ndarray  #: "truth", "planted", "planted-negative", "known", an artefact, "natural"
    snr: np.ndarray
    dataset: np.ndarray  #: "sim-apdask", "sim-galsim", "decam", "nircam"
    split: np.ndarray  #: "train" or "test"

    @classmethod
    def empty(cls) -> Examples:
        k = len(RELIABILITY_FEATURES)
        return cls(
            features=np.zeros((0, k)),
            label=np.zeros(0, np.int8),
            kind=np.zeros(0, "U16"),
            snr=np.zeros(0),
            dataset=np.zeros(0, "U16"),
            split=np.zeros(0, "U8"),
        )

    @classmethod
    def concat(cls, parts: Sequence[Examples]) -> Examples:
        parts = [p for p in parts if len(p.label)] or [cls.empty()]
        return cls(
            *(np.concatenate([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(cls))
        )

    def select(self, keep: np.ndarray) -> Examples:
        return Examples(*(getattr(self, f.name)[keep] for f in dataclasses.fields(self)))

    def to_table(self) -> Table:
        t = Table(self.features, names=RELIABILITY_FEATURES)
        for f in ("label", "kind", "snr", "dataset", "split"):
            t[f] = getattr(self, f)
        return t


@dataclass(frozen=True)
class Planted:
    """What was put in (or is known to be in) an image pair, on the science pixel grid."""

    x: np.ndarray
    y: np.ndarray
    sign: np.ndarray  #: +1 brighter in the science image, -1 fainter, 0 an artefact
    kind: np.ndarray  #: see :attr:`Examples.kind`

    @classmethod
    def of(cls, x: Any, y: Any, sign: Any, kind: Any) -> Planted:
        x = np.atleast_1d(np.asarray(x, float))
        return cls(
            x,
            np.atleast_1d(np.asarray(y, float)),
            np.broadcast_to(np.asarray(sign, float), x.shape).copy(),
            np.broadcast_to(np.asarray(kind, "U16"), x.shape).copy(),
        )

    def __add__(self, other: Planted) -> Planted:
        return Planted(
            *(
                np.concatenate([getattr(self, f), getattr(other, f)])
                for f in ("x", "y", "sign", "kind")
            )
        )

    @property
    def real(self) -> np.ndarray:
        return self.sign != 0

    def reals_unknown(self) -> Planted:
        """The same, with the real sources made ``"unknown"`` (no label near them)."""
        real = self.real
        return Planted(self.x, self.y, np.where(real, 0.0, self.sign),
                       np.where(real, "unknown", self.kind))  # fmt: skip


def bright_peaks(exposure: Exposure, fwhm: float, nsigma: float = 20.0) -> Table:
    """Local maxima of an image ``nsigma`` above its noise: ``x``, ``y``, ``flux`` (peak
    over the PSF's peak, a point-source flux estimate).  The static sources of a real
    image, where artefacts are planted."""
    img = np.asarray(exposure.image, float)
    sig = np.sqrt(np.maximum(np.asarray(exposure.variance, float), 1e-30))
    bkg = np.median(img[np.isfinite(img)])
    snr = np.where(np.isfinite(img), (img - bkg) / sig, 0.0)
    size = max(3, int(2 * fwhm) | 1)
    peak = (snr == ndimage.maximum_filter(snr, size)) & (snr > nsigma)
    peak &= (np.asarray(exposure.mask) & (_AVOID | MASK["CR"])) == 0
    y, x = np.nonzero(peak)
    psf = np.asarray(exposure.psf, float)
    return Table(
        {"x": x.astype(float), "y": y.astype(float), "flux": (img[y, x] - bkg) / psf.max()}
    )


def _positions(rng, n, shape, mask, fwhm, taken, margin):
    """``n`` random pixel positions off masked pixels and >= 4 FWHM from ``taken``."""
    ny, nx = shape
    out: list[tuple[float, float]] = []
    pts = list(taken)
    for _ in range(50 * n + 50):
        if len(out) == n:
            break
        x, y = rng.uniform(margin, nx - 1 - margin), rng.uniform(margin, ny - 1 - margin)
        if mask[int(round(y)), int(round(x))] & _AVOID:
            continue
        if pts and np.min(np.hypot(*(np.array(pts) - (x, y)).T)) < 4 * fwhm:
            continue
        out.append((x, y))
        pts.append((x, y))
    return np.array(out).reshape(-1, 2)


def _add_stamps(img, stamps, x, y):
    """Add ``(n, S, S)`` stamps centred on the nearest pixels of ``(x, y)`` (clipped)."""
    ny, nx = img.shape
    h = stamps.shape[1] // 2
    for s, xi, yi in zip(stamps, x, y, strict=True):
        ix, iy = int(np.floor(xi + 0.5)), int(np.floor(yi + 0.5))
        y0, x0 = max(iy - h, 0), max(ix - h, 0)
        y1, x1 = min(iy + h + 1, ny), min(ix + h + 1, nx)
        if y1 > y0 and x1 > x0:
            img[y0:y1, x0:x1] += s[y0 - iy + h : y1 - iy + h, x0 - ix + h : x1 - ix + h]


def _point_sources(exposure, psf_source, x, y, flux):
    """PSF stamps of ``flux`` at sub-pixel ``(x, y)`` from ``psf_source``'s PSF model."""
    if len(x) == 0:
        return np.zeros((0, 1, 1))
    psfs = psfs_at(psf_source, np.asarray(psf_source.psf, float), x, y)
    dx, dy = x - np.floor(x + 0.5), y - np.floor(y + 0.5)
    return shifted_psfs(psfs, dx, dy) * np.asarray(flux)[:, None, None]


def _flux_for_snr(variance, psf, x, y, snr):
    """Flux of a point source of S/N ``snr`` at ``(x, y)`` on an image of ``variance``."""
    var = np.asarray(variance, float)[np.rint(y).astype(int), np.rint(x).astype(int)]
    return snr * np.sqrt(var / float((np.asarray(psf, float) ** 2).sum()))


def plant(
    science: Exposure,
    template: Exposure,
    statics: Table,
    *,
    seed: int,
    n_real: int,
    n_artefact: int,
    psf_source: Exposure | None = None,
    template_psf: np.ndarray | None = None,
    variance: np.ndarray | None = None,
    hosts: Table | None = None,
) -> tuple[Exposure, Exposure, Planted]:
    """Plant real sources and artefacts into a science/template pair on one pixel grid.

    Parameters
    ----------
    science, template : apdask.core.exposure.Exposure
        The pair before subtraction (science: calibrated, cosmic rays not yet masked).
    statics : astropy.table.Table
        Static sources (``x``, ``y``, ``flux``), e.g. :func:`bright_peaks` or truth stars,
        where dipoles and rings go (the brightest fifth left out: the kernel's stamps).
    seed : int
    n_real, n_artefact : int
        How many real sources and artefacts.
    psf_source : Exposure, optional
        Exposure whose PSF (model) shapes the science sources; default ``science``.
    template_psf : numpy.ndarray, optional
        PSF of the template's sources; default ``template.psf``, else the science's.
    variance : numpy.ndarray, optional
        The difference image's variance (e.g. of a run without planted sources), which
        sets the fluxes of the reals (S/N 4 to 300, to 100 on a static source); default
        1.2 x the science's.
    hosts : astropy.table.Table, optional
        Static sources that host a third of the reals (offset a little when new, centred
        when faded); default ``statics`` (the brightest fifth left out).

    Returns
    -------
    science, template : Exposure
        Copies with the sources added.
    planted : Planted
    """
    rng = np.random.default_rng(seed)
    psf_source = psf_source or science
    psf = np.asarray(psf_source.psf, float)
    fwhm = float(psf_fwhm(psf))
    sci, tpl = np.array(science.image, np.float64), np.array(template.image, np.float64)
    margin = 3 * fwhm + 5
    hosts = _not_brightest(statics if hosts is None else hosts)
    n_host = int((rng.random(n_real) < 0.3).sum()) if len(hosts) else 0
    st = hosts[rng.integers(0, len(hosts), n_host)]
    pos = _positions(
        rng,
        n_real - len(st),
        sci.shape,
        science.mask,
        fwhm,
        zip(statics["x"], statics["y"], strict=True),
        margin,
    )
    # a new source near a static one is offset from it (a supernova in its host); a
    # static source that faded (planted in the template) is centred on it
    n = len(pos) + len(st)
    neg = rng.random(n) < 0.3
    jitter = rng.normal(0, 0.3 * fwhm, (n, 2)) * ((np.arange(n) >= len(pos)) & ~neg)[:, None]
    x = np.r_[pos[:, 0], np.asarray(st["x"], float)] + jitter[:, 0]
    y = np.r_[pos[:, 1], np.asarray(st["y"], float)] + jitter[:, 1]
    ny, nx = sci.shape
    ok = (x > margin) & (x < nx - 1 - margin) & (y > margin) & (y < ny - 1 - margin)
    x, y, neg = x[ok], y[ok], neg[ok]
    on_static = np.arange(n)[ok] >= len(pos)
    snr = np.exp(rng.uniform(np.log(4.0), np.log(np.where(on_static, 100.0, 300.0))))
    var = 1.2 * np.asarray(science.variance, float) if variance is None else variance
    flux = _flux_for_snr(var, psf, x, y, snr)
    _add_stamps(
        sci, _point_sources(science, psf_source, x[~neg], y[~neg], flux[~neg]), x[~neg], y[~neg]
    )
    tpsf = next(p for p in (template_psf, template.psf, psf) if p is not None)
    stamps = _point_sources(
        template, template.copy_with(psf=tpsf, psf_model=None), x[neg], y[neg], flux[neg]
    )
    _add_stamps(tpl, stamps, x[neg], y[neg])
    planted = Planted.of(x, y, np.where(neg, -1, 1), np.where(neg, "planted-negative", "planted"))
    planted += _plant_artefacts(
        rng, sci, tpl, science, template, psf_source, _not_brightest(statics), n_artefact, fwhm,
        margin, planted,
    )  # fmt: skip
    return (
        science.copy_with(image=sci.astype(np.float32)),
        template.copy_with(image=tpl.astype(np.float32)),
        planted,
    )


def _not_brightest(statics: Table) -> Table:
    """Static sources but the brightest fifth: those are the matching kernel's stamps, and
    a source or artefact planted on one would spoil the whole subtraction, not test the
    classifier."""
    if not len(statics):
        return statics
    flux = np.asarray(statics["flux"], float)
    return statics[flux <= np.quantile(flux, 0.8)]


def _plant_artefacts(rng, img, tpl, science, template, psf_source, statics, n, fwhm, margin,
                     planted):  # fmt: skip
    """Dipoles and rings at static sources (the brighter, the likelier), cosmic rays and
    hot pixels anywhere (a third of them in the template ``tpl``: negative DIASources)."""
    kinds = rng.choice(ARTEFACTS, n, p=[0.35, 0.25, 0.4])
    ny, nx = img.shape
    sx, sy = np.asarray(statics["x"], float), np.asarray(statics["y"], float)
    inside = (sx > margin) & (sx < nx - 1 - margin) & (sy > margin) & (sy < ny - 1 - margin)
    st = statics[inside & (np.asarray(statics["flux"], float) > 0)]
    at_static = kinds != "cosmic"
    n_st = min(len(st), int(at_static.sum()))
    kinds[np.flatnonzero(at_static)[n_st:]] = "cosmic"
    prob = np.sqrt(np.asarray(st["flux"], float))
    pick = st[rng.choice(len(st), n_st, replace=False, p=prob / prob.sum())] if n_st else st[:0]
    xs, ys, ks = [], [], []
    for k, row in zip(kinds[kinds != "cosmic"], pick, strict=True):
        x, y, f = float(row["x"]), float(row["y"]), float(row["flux"])
        p = _point_sources(science, psf_source, np.array([x]), np.array([y]), np.array([f]))[0]
        if k == "dipole":  # the star moved by a fraction of the FWHM
            d = fwhm * np.exp(rng.uniform(np.log(0.02), np.log(0.5)))
            a = rng.uniform(0, 2 * np.pi)
            xy = (np.array([x + d * np.cos(a)]), np.array([y + d * np.sin(a)]))
            res = _point_sources(science, psf_source, *xy, np.array([f]))[0] - p
        else:  # a PSF too sharp or too broad by a little
            eps = rng.uniform(0.02, 0.3) * rng.choice((-1.0, 1.0))
            res = eps * (ndimage.gaussian_filter(p, fwhm * rng.uniform(0.05, 0.3)) - p)
        _add_stamps(img, res[None], [x], [y])
        xs.append(x)
        ys.append(y)
        ks.append(str(k))
    taken = list(zip(planted.x, planted.y, strict=True)) + list(zip(xs, ys, strict=True))
    pos = _positions(rng, int((kinds == "cosmic").sum()), img.shape, science.mask, fwhm, taken, 8)
    sig = np.sqrt(np.maximum(np.asarray(science.variance, float), 0.0))
    tsig = np.sqrt(np.maximum(np.asarray(template.variance, float), 0.0))
    in_template = rng.random(len(pos)) < TEMPLATE_COSMIC_FRACTION
    for (x, y), in_tpl in zip(pos, in_template, strict=True):
        target, s = (tpl, tsig) if in_tpl else (img, sig)
        _add_stamps(target, _cosmic_ray(rng, fwhm) * s[int(y), int(x)], [x], [y])
        xs.append(float(x))
        ys.append(float(y))
        ks.append("cosmic-template" if in_tpl else "cosmic")
    return Planted.of(xs, ys, 0, ks)


def _cosmic_ray(rng, fwhm):
    """A ``(1, 15, 15)`` stamp, in units of the noise: a straight track 1 to 11 pixels
    long (a fifth are single hot pixels), 5 to 300 σ a pixel; three in five spread by
    charge diffusion over a Gaussian of 0.12 to 0.3 PSF FWHM (sharper than any star, yet
    not always caught by the cosmic-ray masking)."""
    stamp = np.zeros((15, 15))
    length = int(rng.integers(1, 12)) if rng.random() < 0.8 else 1
    a = rng.uniform(0, np.pi)
    t = np.arange(length) - (length - 1) / 2
    px = np.clip(np.rint(7 + t * np.cos(a)).astype(int), 0, 14)
    py = np.clip(np.rint(7 + t * np.sin(a)).astype(int), 0, 14)
    amp = np.exp(rng.uniform(np.log(5.0), np.log(300.0))) * rng.uniform(0.5, 1.5, length)
    np.add.at(stamp, (py, px), amp)
    if rng.random() < 0.6:
        s = fwhm * rng.uniform(0.12, 0.3)
        stamp = ndimage.gaussian_filter(stamp, s) * np.sqrt(2 * np.pi * s * s)
    return stamp[None]


def label_sources(
    sources: Table, planted: Planted, fwhm: float, naturals: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Labels (1 real, 0 bogus, -1 left out) and kinds of measured DIASources.

    A DIASource within ``max(1.5, 0.5 FWHM)`` pixels of a planted real source of its
    sign is real; one farther than 2.5 FWHM from every real source is bogus, of the
    kind of the nearest artefact within 2 FWHM (else ``"natural"``, kept only when
    ``naturals``), unless it lies within 2 FWHM of a position of kind ``"unknown"``; the
    rest is left out.
    """
    n = len(sources)
    label, kind = np.full(n, -1, np.int8), np.full(n, "", "U16")
    if n == 0:
        return label, kind
    xy = np.column_stack([np.asarray(sources["x"], float), np.asarray(sources["y"], float)])
    sign = np.where(np.asarray(sources["isNegative"], bool), -1.0, 1.0)
    real = planted.real
    unknown = planted.kind == "unknown"
    d_real = np.full(n, np.inf)
    k_real = np.zeros(n, int)
    if real.any():
        d_real, k_real = cKDTree(np.column_stack([planted.x, planted.y])[real]).query(xy)
    r_idx = np.flatnonzero(real)
    near = d_real <= max(1.5, 0.5 * fwhm)
    if len(r_idx):
        near &= planted.sign[r_idx[np.minimum(k_real, len(r_idx) - 1)]] == sign
    label[near] = 1
    kind[near] = planted.kind[r_idx[k_real[near]]]
    far = d_real > 2.5 * fwhm
    a_idx = np.flatnonzero(~real & ~unknown)
    d_art, k_art = (
        cKDTree(np.column_stack([planted.x, planted.y])[a_idx]).query(xy)
        if len(a_idx)
        else (np.full(n, np.inf), np.zeros(n, int))
    )
    art = far & (d_art <= 2.0 * fwhm)
    label[art] = 0
    kind[art] = planted.kind[a_idx[k_art[art]]]
    if naturals:
        nat = far & ~art
        label[nat] = 0
        kind[nat] = "natural"
    if unknown.any():  # nothing is known of what lies there: no label
        d_unk, _ = cKDTree(np.column_stack([planted.x, planted.y])[unknown]).query(xy)
        drop = (label == 0) & (d_unk <= 2.0 * fwhm)
        label[drop], kind[drop] = -1, ""
    return label, kind


def examples_from(
    sources: Table,
    difference: Exposure,
    science: Exposure | None,
    template: Exposure | None,
    planted: Planted,
    *,
    dataset: str,
    split: str,
    naturals: bool = True,
    keep: np.ndarray | None = None,
) -> Examples:
    """The labelled :class:`Examples` of one measured difference image."""
    fwhm = float(psf_fwhm(np.asarray(difference.psf, float)))
    label, kind = label_sources(sources, planted, fwhm, naturals)
    use = label >= 0 if keep is None else (label >= 0) & keep
    feats = reliability_features(sources, difference, science, template)
    n = int(use.sum())
    return Examples(
        feats[use],
        label[use],
        kind[use],
        np.asarray(sources["snr"], float)[use] if n else np.zeros(0),
        np.full(n, dataset, "U16"),
        np.full(n, split, "U8"),
    )


def quiet(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` with the pipeline's QA warnings silenced (they are
    expected on planted artefacts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def realdata_root() -> str:
    """``../shared/realdata`` next to the project's checkout (its README describes it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", "shared", "realdata"))
