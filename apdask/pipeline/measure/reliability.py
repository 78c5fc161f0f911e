"""Real/bogus ``reliability`` of DIASources: features and a small boosted-tree model.

:func:`score_reliability` fills the DiaSource columns ``reliability`` (the probability,
0 to 1, that a DIASource is astrophysical) and ``reliabilityVersion`` where
:func:`apdask.pipeline.measure.sources.measure_sources` measures the sources, so the
PPDB rows and the alert packets carry them.

The features (:data:`RELIABILITY_FEATURES`) come from the measured columns (S/N, PSF
fit χ², aperture to PSF flux, template and science S/N, second moments against the
PSF's, dipole and pixel flags) and from the difference pixels around each source
(opposite-sign flux, peak sharpness, correlation with the PSF and its contrast with
narrower and broader Gaussians, masked fraction), all in units of the PSF so that one
model serves any pixel scale.  The model is a sum of depth-limited regression trees
(gradient boosting on the log-odds) in a small JSON file shipped with the package,
evaluated with numpy only.  It is trained by
:mod:`apdask.tools.train_reliability`; ``docs/alerts.md`` ("Reliability") gives its
training data and ROC curves.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
from astropy.table import Table

from apdask.core.exposure import Exposure, mask_bits
from apdask.pipeline.psf import psf_fwhm

__all__ = [
    "RELIABILITY_FEATURES",
    "ReliabilityModel",
    "load_reliability_model",
    "reliability_features",
    "score_reliability",
]

#: Names of the columns of :func:`reliability_features`, in order.
RELIABILITY_FEATURES = (
    "log_abs_snr",  # log10 |psfFlux / psfFluxErr|
    "log_chi2_per_dof",  # log10 psfChi2 / psfNdata
    "ap_over_psf",  # apFlux / psfFlux
    "template_snr",  # asinh(templateFlux / templateFluxErr / 3)
    "science_snr",  # asinh(scienceFlux / scienceFluxErr / 3)
    "change_fraction",  # |psfFlux| / (|psfFlux| + |templateFlux|)
    "log_size_ratio",  # log10 (ixx + iyy) / (ixxPSF + iyyPSF)
    "ellipticity",  # |(ixx - iyy, 2 ixy)| / (ixx + iyy)
    "bbox_over_fwhm",  # bboxSize / FWHM
    "is_negative",
    "is_dipole",
    "flag_cr",  # pixelFlags_cr
    "flag_edge",  # pixelFlags_edge | _nodata | psfFlux_flag_edge | centroid_flag
    "flag_saturated",  # pixelFlags_saturated
    "flag_bad",  # pixelFlags_bad
    "opposite_core",  # opposite-sign over same-sign flux within 1 FWHM
    "opposite_wide",  # the same within 2.5 FWHM
    "peak_ratio",  # brightest pixel over |psfFlux| x the PSF's peak
    "psf_correlation",  # Pearson correlation of the pixels with the PSF within 2 FWHM
    "masked_fraction",  # fraction of pixels within 2 FWHM with a mask bit set
    "science_sharpness",  # science: brightest pixel over scienceFlux x its PSF's peak
    "template_sharpness",  # the same on the template (a cosmic ray in it: >> 1)
    "narrow_vs_psf",  # correlation with a Gaussian half the PSF's width minus with the PSF's
    "broad_vs_psf",  # the same with a Gaussian 1.6 times the PSF's width
    "peak_over_fit",  # brightest central pixel over a PSF-width Gaussian fit's peak
)

#: The model shipped with the package.
_DEFAULT_MODEL = "reliability_v2.json"
#: Mask planes that make a pixel unusable for the pixel features.
_BAD_BITS = mask_bits("BAD", "SAT", "CR", "EDGE", "NO_DATA", "SUSPECT")
#: Longest ``reliabilityVersion`` the APDB schema stores (``length: 7``).
_VERSION_LENGTH = 7


@dataclass(frozen=True)
class ReliabilityModel:
    """Boosted regression trees on the log-odds of "real", as complete binary trees.

    Tree ``t`` sends a source at internal node ``k`` right when
    ``features[:, feature[t, k]] > threshold[t, k]``, from node 0 down ``depth``
    levels (children of ``k``: ``2k + 1`` and ``2k + 2``); the source's log-odds is
    ``base`` plus the sum of the ``leaf`` values it reaches.

    Attributes
    ----------
    version : str
        ``reliabilityVersion`` (at most 7 characters, the APDB column's length).
    features : tuple of str
        Feature names, in the column order of the feature matrix.
    base : float
        Initial log-odds.
    feature, threshold : numpy.ndarray
        ``(n_trees, 2**depth - 1)`` split feature indices and thresholds.
    leaf : numpy.ndarray
        ``(n_trees, 2**depth)`` leaf values (learning rate included).
    meta : dict
        What the training recorded (data, seeds, held-out figures).
    """

    version: str
    features: tuple[str, ...]
    base: float
    feature: np.ndarray
    threshold: np.ndarray
    leaf: np.ndarray
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        n_trees, n_inner = self.feature.shape
        depth = int(np.log2(n_inner + 1))
        if (
            2**depth - 1 != n_inner
            or self.threshold.shape != (n_trees, n_inner)
            or self.leaf.shape != (n_trees, 2**depth)
        ):
            msg = (
                f"reliability model {self.version!r}: tree arrays of shapes "
                f"{self.feature.shape}, {self.threshold.shape}, {self.leaf.shape} are not "
                "complete binary trees; retrain with apdask.tools.train_reliability"
            )
            raise ValueError(msg)
        if n_trees and (self.feature.min() < 0 or self.feature.max() >= len(self.features)):
            msg = (
                f"reliability model {self.version!r}: a split names a feature beyond its "
                f"{len(self.features)}; retrain it with apdask.tools.train_reliability"
            )
            raise ValueError(msg)
        if not 0 < len(self.version) <= _VERSION_LENGTH:
            msg = (
                f"reliabilityVersion {self.version!r} must be 1 to {_VERSION_LENGTH} "
                "characters (the APDB column's length)"
            )
            raise ValueError(msg)

    @property
    def depth(self) -> int:
        """Depth of the trees."""
        return int(np.log2(self.leaf.shape[1]))

    def log_odds(self, features: np.ndarray) -> np.ndarray:
        """Log-odds of "real" for a feature matrix ``(n, len(features))``."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.features):
            msg = (
                f"features of shape {x.shape} for a model of {len(self.features)} features; "
                "compute them with reliability_features"
            )
            raise ValueError(msg)
        n, n_trees = len(x), self.leaf.shape[0]
        out = np.full(n, self.base)
        if n == 0 or n_trees == 0:
            return out
        trees = np.arange(n_trees)[None, :]
        rows = np.arange(n)[:, None]
        node = np.zeros((n, n_trees), np.intp)
        for _ in range(self.depth):
            go_right = x[rows, self.feature[trees, node]] > self.threshold[trees, node]
            node = 2 * node + 1 + go_right
        out += self.leaf[trees, node - (self.leaf.shape[1] - 1)].sum(axis=1)
        return out

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Reliability (0 to 1, float32) of a feature matrix ``(n, len(features))``."""
        z = np.clip(self.log_odds(features), -50.0, 50.0)
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that :func:`load_reliability_model` reads."""
        return {
            "version": self.version,
            "kind": "boosted-trees",
            "features": list(self.features),
            "depth": self.depth,
            "base": float(self.base),
            "feature": self.feature.tolist(),
            "threshold": [[float(f"{v:.6g}") for v in row] for row in self.threshold],
            "leaf": [[float(f"{v:.6g}") for v in row] for row in self.leaf],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReliabilityModel:
        """A model from its :meth:`to_dict` form."""
        missing = {"version", "features", "base", "feature", "threshold", "leaf"} - set(d)
        if missing:
            msg = f"reliability model file lacks {sorted(missing)}; retrain it"
            raise ValueError(msg)
        n_inner = 2 ** int(d.get("depth", 0)) - 1
        return cls(
            version=str(d["version"]),
            features=tuple(d["features"]),
            base=float(d["base"]),
            feature=np.asarray(d["feature"], np.intp).reshape(-1, n_inner),
            threshold=np.asarray(d["threshold"], np.float64).reshape(-1, n_inner),
            leaf=np.asarray(d["leaf"], np.float64).reshape(-1, n_inner + 1),
            meta=dict(d.get("meta", {})),
        )


@functools.cache
def _packaged_model() -> ReliabilityModel:
    text = resources.files(__package__).joinpath(_DEFAULT_MODEL).read_text()
    return ReliabilityModel.from_dict(json.loads(text))


def load_reliability_model(path: str | os.PathLike[str] | None = None) -> ReliabilityModel:
    """The reliability model in ``path``, or the one shipped with the package (cached).

    Raises
    ------
    ValueError
        The file is not a model (missing keys, trees of the wrong shape, a version
        longer than the APDB column) or its features are not :data:`RELIABILITY_FEATURES`.
    """
    if path is None:
        model = _packaged_model()
    else:
        with open(path) as f:
            model = ReliabilityModel.from_dict(json.load(f))
    if model.features != RELIABILITY_FEATURES:
        msg = (
            f"reliability model {model.version!r} was trained on features {model.features}, "
            f"this apdask computes {RELIABILITY_FEATURES}; retrain it with "
            "apdask.tools.train_reliability"
        )
        raise ValueError(msg)
    return model


def _col(tab: Table, name: str, dtype: Any = np.float64) -> np.ndarray:
    col = tab[name]
    fill = np.nan if np.dtype(dtype).kind == "f" else False
    return np.asarray(np.ma.filled(np.ma.asarray(col), fill), dtype=dtype)


def _finite(a: np.ndarray, fill: float, lo: float, hi: float) -> np.ndarray:
    return np.clip(np.where(np.isfinite(a), a, fill), lo, hi)


def _table_features(tab: Table, fwhm: float) -> list[np.ndarray]:
    """The features of :data:`RELIABILITY_FEATURES` that come from the columns."""
    flux, err = _col(tab, "psfFlux"), _col(tab, "psfFluxErr")
    tf, tfe = _col(tab, "templateFlux"), _col(tab, "templateFluxErr")
    sf, sfe = _col(tab, "scienceFlux"), _col(tab, "scienceFluxErr")
    ixx, iyy, ixy = _col(tab, "ixx"), _col(tab, "iyy"), _col(tab, "ixy")
    pxx, pyy = _col(tab, "ixxPSF"), _col(tab, "iyyPSF")
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(flux / err)
        chi2 = _col(tab, "psfChi2") / np.maximum(_col(tab, "psfNdata"), 1.0)
        tsnr, ssnr = tf / tfe, sf / sfe
        change = np.abs(flux) / (np.abs(flux) + np.abs(np.where(np.isfinite(tf), tf, 0.0)))
        tr = ixx + iyy
        size = np.log10(tr / (pxx + pyy))
        ell = np.hypot(ixx - iyy, 2.0 * ixy) / tr
        ap = _col(tab, "apFlux") / flux
    edge = (
        _col(tab, "pixelFlags_edge", bool)
        | _col(tab, "pixelFlags_nodata", bool)
        | _col(tab, "psfFlux_flag_edge", bool)
        | _col(tab, "centroid_flag", bool)
    )
    return [
        _finite(np.log10(np.maximum(snr, 1e-3)), 0.0, -3.0, 5.0),
        _finite(np.log10(np.maximum(chi2, 1e-3)), 3.0, -3.0, 5.0),
        _finite(ap, -5.0, -5.0, 5.0),
        _finite(np.arcsinh(tsnr / 3.0), 0.0, -20.0, 20.0),
        _finite(np.arcsinh(ssnr / 3.0), 0.0, -20.0, 20.0),
        _finite(change, 1.0, 0.0, 1.0),
        _finite(size, -2.0, -2.0, 2.0),
        _finite(ell, 1.0, 0.0, 1.0),
        _finite(_col(tab, "bboxSize") / fwhm, 0.0, 0.0, 100.0),
        _col(tab, "isNegative", bool).astype(float),
        _col(tab, "isDipole", bool).astype(float),
        _col(tab, "pixelFlags_cr", bool).astype(float),
        edge.astype(float),
        _col(tab, "pixelFlags_saturated", bool).astype(float),
        _col(tab, "pixelFlags_bad", bool).astype(float),
    ]


def _stamps(
    difference: Exposure, x: np.ndarray, y: np.ndarray, half: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 2h+1, 2h+1)`` image stamps around the nearest pixels of ``(x, y)`` and their
    "usable" masks (off the image counts as masked)."""
    img = np.asarray(difference.image)
    ny, nx = img.shape
    ix = np.floor(np.where(np.isfinite(x), x, -1e6) + 0.5).astype(np.intp)
    iy = np.floor(np.where(np.isfinite(y), y, -1e6) + 0.5).astype(np.intp)
    off = np.arange(-half, half + 1)
    yy = iy[:, None, None] + off[None, :, None]
    xx = ix[:, None, None] + off[None, None, :]
    inside = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
    yc, xc = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
    stamp = img[yc, xc].astype(np.float64)
    ok = inside & ((np.asarray(difference.mask)[yc, xc] & _BAD_BITS) == 0) & np.isfinite(stamp)
    return np.where(ok, stamp, 0.0), ok


def _pixel_features(
    tab: Table, difference: Exposure, psf: np.ndarray, fwhm: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The features of :data:`RELIABILITY_FEATURES` that come from the difference pixels:
    ``opposite_core`` to ``masked_fraction``, and ``narrow_vs_psf`` to
    ``peak_over_fit``."""
    n = len(tab)
    half = int(np.clip(np.ceil(2.5 * fwhm), 2, 25))
    x, y = _col(tab, "x"), _col(tab, "y")
    stamp, ok = _stamps(difference, x, y, half)
    sign = np.where(_col(tab, "isNegative", bool), -1.0, 1.0)[:, None, None]
    d = stamp * sign
    off = np.arange(-half, half + 1)
    dx = off[None, None, :] - (x - np.floor(x + 0.5))[:, None, None]
    dy = off[None, :, None] - (y - np.floor(y + 0.5))[:, None, None]
    r = np.hypot(dx, dy)
    with np.errstate(divide="ignore", invalid="ignore"):
        core, wide = ok & (r <= fwhm), ok & (r <= 2.5 * fwhm)
        opp_core = (np.where(core, np.maximum(-d, 0.0), 0.0).sum((1, 2))
                    / np.where(core, np.maximum(d, 0.0), 0.0).sum((1, 2)))  # fmt: skip
        opp_wide = (np.where(wide, np.maximum(-d, 0.0), 0.0).sum((1, 2))
                    / np.where(wide, np.maximum(d, 0.0), 0.0).sum((1, 2)))  # fmt: skip
        c = slice(half - 1, half + 2)
        peak = np.where(ok[:, c, c], d[:, c, c], -np.inf).max((1, 2))
        peak = peak / (np.abs(_col(tab, "psfFlux")) * float(psf.max()))
        corr = _psf_correlation(d, ok & (r <= 2.0 * fwhm), psf, half)
        wide2 = r <= 2.0 * fwhm
        masked = (wide2 & ~ok).sum((1, 2)) / np.maximum(wide2.sum((1, 2)), 1)
        k = min(half, int(np.ceil(1.5 * fwhm)))  # the pixels within 1.5 FWHM, no more
        inner = slice(half - k, half + k + 1)
        di, ri = d[:, inner, inner], r[:, inner, inner]
        narrow, broad, central = _shape_contrast(di, ok[:, inner, inner] & (ri <= 1.5 * fwhm),
                                                 ri, fwhm)  # fmt: skip
    if n == 0:
        return [np.zeros(0)] * 5, [np.zeros(0)] * 3
    return [
        _finite(opp_core, 1.0, 0.0, 10.0),
        _finite(opp_wide, 1.0, 0.0, 10.0),
        _finite(peak, 0.0, -5.0, 20.0),
        _finite(corr, 0.0, -1.0, 1.0),
        _finite(masked, 1.0, 0.0, 1.0),
    ], [
        _finite(narrow, 0.0, -2.0, 2.0),
        _finite(broad, 0.0, -2.0, 2.0),
        _finite(central, 1.0, -5.0, 20.0),
    ]


def _sharpness(tab: Table, exposure: Exposure | None, band: str, default_psf: np.ndarray
               ) -> np.ndarray:  # fmt: skip
    """Brightest of the 3 x 3 pixels at each source, above the local median, over the
    PSF-fit flux of ``exposure`` (``band``: ``"science"`` or ``"template"``) times its
    PSF's peak: about 1 for a star, far more for a cosmic ray or hot pixel; 1 where the
    image is absent or the flux below 5 σ."""
    n = len(tab)
    flux, err = _col(tab, f"{band}Flux"), _col(tab, f"{band}FluxErr")
    if exposure is None:
        return np.ones(n)
    psf = np.asarray(exposure.psf if exposure.psf is not None else default_psf, np.float64)
    stamp, ok = _stamps(exposure, _col(tab, "x"), _col(tab, "y"), 3)
    ring = ok.copy()
    ring[:, 1:-1, 1:-1] = False
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-masked rings: NaN, filled
        bkg = np.nanmedian(np.where(ring, stamp, np.nan).reshape(n, -1), axis=1)
        c = np.where(ok[:, 2:5, 2:5], stamp[:, 2:5, 2:5], -np.inf).max((1, 2))
        ratio = (c - bkg) / (flux * float(psf.max()))
        ratio = np.where(np.abs(flux / err) >= 5.0, ratio, 1.0)
    return _finite(ratio, 1.0, -5.0, 20.0)


def _shape_contrast(
    d: np.ndarray, sel: np.ndarray, r: np.ndarray, fwhm: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How much sharper or broader than the PSF each difference stamp is.

    Pearson correlations of the pixels ``sel`` with circular Gaussians centred on the
    source (sub-pixel), of the PSF's width and of 0.5 and 1.6 times it: the narrow one
    minus the PSF's (> 0 for a cosmic ray, hot pixel or track), the broad one minus
    the PSF's (> 0 for an extended residual); and the brightest of the 3 x 3 central
    pixels over the flux of a PSF-width Gaussian fitted to ``sel`` times its peak
    fraction (about 1 for a point source, far more for a single sharp pixel).
    """
    sigma = fwhm / 2.3548
    r2 = r * r
    w = sel.astype(np.float64)
    nw = np.maximum(w.sum((1, 2)), 1.0)
    md = (d * w).sum((1, 2)) / nw
    a = (d - md[:, None, None]) * w
    aa = (a * a).sum((1, 2))
    corr = []
    for scale in (0.5, 1.0, 1.6):
        g = np.exp(-0.5 * r2 / (scale * sigma) ** 2)
        mg = (g * w).sum((1, 2)) / nw
        b = (g - mg[:, None, None]) * w
        corr.append((a * b).sum((1, 2)) / np.sqrt(aa * (b * b).sum((1, 2))))
    g = np.exp(-0.5 * r2 / sigma**2)
    amp = (d * g * w).sum((1, 2)) / (g * g * w).sum((1, 2))
    h = d.shape[1] // 2
    c = slice(h - 1, h + 2)
    peak = np.where(sel[:, c, c], d[:, c, c], -np.inf).max((1, 2))
    return corr[0] - corr[1], corr[2] - corr[1], peak / amp


def _psf_correlation(d: np.ndarray, sel: np.ndarray, psf: np.ndarray, half: int) -> np.ndarray:
    """Pearson correlation of each stamp with the PSF over the pixels ``sel``."""
    p = np.asarray(psf, np.float64)
    h = p.shape[0] // 2
    model = np.zeros((2 * half + 1, 2 * half + 1))
    k = min(h, half)
    inner, outer = slice(half - k, half + k + 1), slice(h - k, h + k + 1)
    model[inner, inner] = p[outer, outer]
    w = sel.astype(np.float64)
    nw = w.sum((1, 2))
    md = (d * w).sum((1, 2)) / nw
    mp = (model[None] * w).sum((1, 2)) / nw
    a = (d - md[:, None, None]) * w
    b = (model[None] - mp[:, None, None]) * w
    return (a * b).sum((1, 2)) / np.sqrt((a * a).sum((1, 2)) * (b * b).sum((1, 2)))


def reliability_features(
    sources: Table,
    difference: Exposure,
    science: Exposure | None = None,
    template: Exposure | None = None,
) -> np.ndarray:
    """The feature matrix ``(n, len(RELIABILITY_FEATURES))`` of measured DIASources.

    Parameters
    ----------
    sources : astropy.table.Table
        DIASources as :func:`~apdask.pipeline.measure.sources.measure_sources` measures
        them (official column names, ``x``/``y`` on the difference's pixel grid).
    difference : apdask.core.exposure.Exposure
        The difference image they were measured on, with its PSF.
    science, template : apdask.core.exposure.Exposure, optional
        The images it came from, on the same pixel grid (their sharpness at the
        sources); without them those features take their "star-like" value.

    Returns
    -------
    numpy.ndarray
        float64, finite: a missing measurement takes a fixed out-of-range value.
    """
    n = len(sources)
    if n == 0:
        return np.zeros((0, len(RELIABILITY_FEATURES)))
    if difference.psf is None:
        msg = "the difference image has no PSF; reliability features need one"
        raise ValueError(msg)
    psf = np.asarray(difference.psf, np.float64)
    fwhm = max(float(psf_fwhm(psf)), 1.0)
    pixels, shape = _pixel_features(sources, difference, psf, fwhm)
    cols = _table_features(sources, fwhm) + pixels
    cols += [_sharpness(sources, science, "science", psf),
             _sharpness(sources, template, "template", psf)]  # fmt: skip
    cols += shape
    return np.column_stack(cols).astype(np.float64)


def score_reliability(
    sources: Table,
    difference: Exposure,
    science: Exposure | None = None,
    template: Exposure | None = None,
    *,
    model: ReliabilityModel | None = None,
) -> Table:
    """Add ``reliability`` (float32, 0 to 1) and ``reliabilityVersion`` to ``sources``.

    Parameters
    ----------
    sources : astropy.table.Table
        Measured DIASources (see :func:`reliability_features`); changed in place.
    difference, science, template : apdask.core.exposure.Exposure
        As for :func:`reliability_features`.
    model : ReliabilityModel, optional
        Default: the model shipped with the package (:func:`load_reliability_model`).

    Returns
    -------
    astropy.table.Table
        ``sources``, with the two columns set.
    """
    model = load_reliability_model() if model is None else model
    scores = model.predict(reliability_features(sources, difference, science, template))
    sources["reliability"] = scores
    version = np.full(len(sources), model.version, dtype=f"U{_VERSION_LENGTH}")
    sources["reliabilityVersion"] = version
    return sources
