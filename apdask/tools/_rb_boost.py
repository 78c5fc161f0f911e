"""Gradient-boosted regression trees on the log-odds, and ROC figures (numpy only).

The trainer behind :mod:`apdask.tools.train_reliability`: histogram splits on
per-feature quantile bins, complete binary trees of a fixed depth (a node that cannot
split passes every source left), Newton leaf values with an L2 penalty.  It returns an
:class:`apdask.pipeline.measure.reliability.ReliabilityModel`, which evaluates the same
trees at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from apdask.pipeline.measure.reliability import ReliabilityModel

__all__ = ["BoostSettings", "fit_boosted_trees", "roc_curve", "roc_summary"]


@dataclass(frozen=True)
class BoostSettings:
    """Settings of :func:`fit_boosted_trees`.

    Attributes
    ----------
    n_trees, depth : int
        Number and depth of the trees.
    learning_rate : float
        Shrinkage of every tree's leaf values.
    l2 : float
        L2 penalty on the leaf values (in hessian units).
    min_leaf : float
        Smallest hessian sum (about ``p (1 - p)`` per source) a child may have.
    n_bins : int
        Quantile bins per feature for the split search.
    subsample : float
        Fraction of the sources each tree is grown on (seeded).
    seed : int
    """

    n_trees: int = 200
    depth: int = 3
    learning_rate: float = 0.1
    l2: float = 1.0
    min_leaf: float = 2.0
    n_bins: int = 48
    subsample: float = 0.8
    seed: int = 0


def _bin_edges(x: np.ndarray, n_bins: int) -> list[np.ndarray]:
    """Split candidates per feature: midpoints between distinct quantiles."""
    edges = []
    for j in range(x.shape[1]):
        q = np.unique(np.quantile(x[:, j], np.linspace(0, 1, n_bins + 1)))
        edges.append(0.5 * (q[:-1] + q[1:]) if len(q) > 1 else np.zeros(0))
    return edges


def _best_split(
    codes: np.ndarray, g: np.ndarray, h: np.ndarray, n_edges: np.ndarray, s: BoostSettings
) -> tuple[int, int, float]:
    """Best (feature, edge index, gain) for the sources of one node; gain 0: no split."""
    k = codes.shape[1]
    width = int(n_edges.max()) + 1
    flat = (codes + np.arange(k) * width).ravel()
    gh = np.bincount(flat, np.repeat(g, k), minlength=k * width).reshape(k, width)
    hh = np.bincount(flat, np.repeat(h, k), minlength=k * width).reshape(k, width)
    gl, hl = np.cumsum(gh, 1)[:, :-1], np.cumsum(hh, 1)[:, :-1]
    gt, ht = g.sum(), h.sum()
    gr, hr = gt - gl, ht - hl
    gain = gl**2 / (hl + s.l2) + gr**2 / (hr + s.l2) - gt**2 / (ht + s.l2)
    valid = (hl >= s.min_leaf) & (hr >= s.min_leaf)
    valid &= np.arange(width - 1)[None, :] < n_edges[:, None]
    gain = np.where(valid, gain, 0.0)
    j, b = np.unravel_index(int(np.argmax(gain)), gain.shape)
    return int(j), int(b), float(gain[j, b])


def _grow_tree(
    codes: np.ndarray,
    edges: list[np.ndarray],
    g: np.ndarray,
    h: np.ndarray,
    s: BoostSettings,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One complete tree: ``(feature, threshold, leaf)`` arrays."""
    n_inner = 2**s.depth - 1
    feature = np.zeros(n_inner, np.intp)
    threshold = np.full(n_inner, np.inf)
    n_edges = np.array([len(e) for e in edges])
    members = [np.arange(len(g))]
    for level in range(s.depth):
        nxt = []
        for i, idx in enumerate(members):
            node = 2**level - 1 + i
            j, b, gain = (
                (0, 0, 0.0) if len(idx) < 2 else _best_split(codes[idx], g[idx], h[idx], n_edges, s)
            )
            if gain > 0:
                feature[node], threshold[node] = j, edges[j][b]
                right = codes[idx, j] > b
                nxt += [idx[~right], idx[right]]
            else:
                nxt += [idx, idx[:0]]
        members = nxt
    leaf = np.array([-g[i].sum() / (h[i].sum() + s.l2) for i in members]) * s.learning_rate
    return feature, threshold, leaf


def fit_boosted_trees(
    x: np.ndarray,
    y: np.ndarray,
    *,
    features: Sequence[str],
    version: str,
    weights: np.ndarray | None = None,
    settings: BoostSettings | None = None,
    meta: dict[str, Any] | None = None,
) -> ReliabilityModel:
    """Fit boosted trees to labels ``y`` (1 real, 0 bogus) by the logistic loss.

    Parameters
    ----------
    x : numpy.ndarray
        ``(n, k)`` finite features.
    y : numpy.ndarray
        ``(n,)`` labels, 0 or 1.
    features : sequence of str
        The ``k`` feature names, stored with the model.
    version : str
        ``reliabilityVersion`` of the model.
    weights : numpy.ndarray, optional
        Per-source weights (e.g. to balance classes or data sources).
    settings : BoostSettings, optional
    meta : dict, optional
        Stored in the model.

    Returns
    -------
    apdask.pipeline.measure.reliability.ReliabilityModel
    """
    s = settings or BoostSettings()
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or len(x) != len(y) or x.shape[1] != len(features):
        msg = f"features {x.shape} and labels {y.shape} do not match {len(features)} names"
        raise ValueError(msg)
    if not np.isfinite(x).all() or not np.isin(y, (0, 1)).all():
        msg = "features must be finite and labels 0 or 1"
        raise ValueError(msg)
    w = np.ones(len(y)) if weights is None else np.asarray(weights, np.float64)
    edges = _bin_edges(x, s.n_bins)
    codes = np.column_stack(
        [np.searchsorted(e, x[:, j], side="left") for j, e in enumerate(edges)]
    ).astype(np.intp)
    p0 = float(np.clip(np.average(y, weights=w), 1e-6, 1 - 1e-6))
    base = float(np.log(p0 / (1 - p0)))
    z = np.full(len(y), base)
    rng = np.random.default_rng(s.seed)
    trees = []
    for _ in range(s.n_trees):
        p = 1.0 / (1.0 + np.exp(-z))
        g, h = w * (p - y), w * np.maximum(p * (1 - p), 1e-12)
        take = rng.random(len(y)) < s.subsample
        tree = _grow_tree(codes[take], edges, g[take], h[take], s)
        trees.append(tree)
        part = ReliabilityModel(
            version, tuple(features), 0.0, tree[0][None], tree[1][None], tree[2][None], {}
        )
        z += part.log_odds(x)
    return ReliabilityModel(
        version=version,
        features=tuple(features),
        base=base,
        feature=np.array([t[0] for t in trees]),
        threshold=np.array([t[1] for t in trees]),
        leaf=np.array([t[2] for t in trees]),
        meta=dict(meta or {}),
    )


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of ``scores`` (higher: more real) against ``labels`` (1 real).

    Returns
    -------
    fpr, tpr, thresholds : numpy.ndarray
        Bogus kept and real kept for "score >= threshold", thresholds decreasing; the
        first point is (0, 0) at +inf.
    """
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(y)[last]
    fp = np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(y.sum(), 1)]
    fpr = np.r_[0.0, fp / max((~y).sum(), 1)]
    return fpr, tpr, np.r_[np.inf, s[last]]


def roc_summary(scores: np.ndarray, labels: np.ndarray, completeness: float = 0.95) -> dict:
    """AUC, and the bogus rejected at ``completeness`` of the real sources kept.

    Returns
    -------
    dict
        ``n_real``, ``n_bogus``, ``auc``, ``threshold`` (the highest score cut keeping
        at least ``completeness`` of the real), ``completeness`` (kept at that cut) and
        ``bogus_rejected`` (fraction of bogus below it).
    """
    fpr, tpr, thr = roc_curve(scores, labels)
    y = np.asarray(labels).astype(bool)
    out: dict[str, Any] = {"n_real": int(y.sum()), "n_bogus": int((~y).sum())}
    if not y.any() or y.all():
        return {**out, "auc": None, "threshold": None, "completeness": None, "bogus_rejected": None}
    k = int(np.argmax(tpr >= completeness))
    return {
        **out,
        "auc": float(np.trapezoid(tpr, fpr)),
        "threshold": float(thr[k]),
        "completeness": float(tpr[k]),
        "bogus_rejected": float(1.0 - fpr[k]),
    }
