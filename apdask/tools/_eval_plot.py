"""The four-panel figure of :func:`apdask.tools.evaluate.evaluate_visit`.

Re-exported by :mod:`apdask.tools.evaluate`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_evaluation"]


def plot_evaluation(res: dict[str, Any], data: dict[str, Any], path: str) -> None:
    """Four-panel PNG: completeness, flux pulls, astrometry, false positives per CCD.

    Drawn on a bare :class:`matplotlib.figure.Figure`, which needs no backend: the
    caller's backend (a notebook's inline one, say) is left as it is.
    """
    try:
        # optional: matplotlib comes with the 'notebook' and 'test' extras
        from matplotlib.figure import Figure
    except ImportError as exc:
        msg = ("evaluate's plot needs matplotlib: pip install 'apdask[notebook]', "
               "or call evaluate_visit(..., plot=False)")  # fmt: skip
        raise ImportError(msg) from exc

    fig = Figure(figsize=(11, 8.5))
    ax = fig.subplots(2, 2)
    b = [x for x in res["completeness_bins"] if x["n"]]
    if b:
        mid = [np.sqrt(x["snr_lo"] * min(x["snr_hi"], 400)) for x in b]
        ax[0, 0].errorbar(mid, [x["completeness"] for x in b], fmt="o-",
                          yerr=[np.sqrt(max(x["completeness"] * (1 - x["completeness"]), 0.25 / x[
                              "n"]) / x["n"]) for x in b])  # fmt: skip
    ax[0, 0].axhline(0.95, color="g", ls="--", lw=0.8)
    ax[0, 0].axhline(0.5, color="g", ls=":", lw=0.8)
    ax[0, 0].axvline(7, color="g", ls="--", lw=0.8)
    ax[0, 0].axvline(5.5, color="g", ls=":", lw=0.8)
    ax[0, 0].set_xscale("log")
    ax[0, 0].set_xlabel("expected difference-image SNR")
    ax[0, 0].set_ylabel("completeness")
    ax[0, 0].set_ylim(-0.02, 1.05)
    ax[0, 0].set_title(f"visit {res['visit']}: {res['n_transients_found']}/"
                       f"{res['n_transients']} transients")  # fmt: skip
    pull = np.asarray(data["pull"], float)
    pull = pull[np.isfinite(pull)]
    if pull.size:
        ax[0, 1].hist(np.clip(pull, -6, 6), bins=30, range=(-6, 6), density=True, alpha=0.6)
        g = np.linspace(-6, 6, 200)
        ax[0, 1].plot(g, np.exp(-0.5 * g * g) / np.sqrt(2 * np.pi), "k-", lw=1)
    ax[0, 1].set_xlabel("flux pull (meas − true) / err")
    ax[0, 1].set_title(f"pull σ {res['flux_pull_sigma']!s:.5}, bias {res['flux_bias_median']!s:.6}")
    sep = np.asarray(data["sep"], float)
    snr = np.asarray(data["snr_meas"], float)
    if sep.size:
        ax[1, 0].loglog(np.abs(snr), np.maximum(sep, 1e-4), ".", alpha=0.6)
    ax[1, 0].axhline(0.05, color="g", ls="--", lw=0.8)
    ax[1, 0].axvline(20, color="g", ls="--", lw=0.8)
    ax[1, 0].set_xlabel("measured SNR")
    ax[1, 0].set_ylabel("position error (arcsec)")
    ax[1, 0].set_title(f"noise / propagated σ = {res['noise_ratio']:.3f}")
    ccds = res["ccds"]
    ax[1, 1].bar(range(len(ccds)), [res["false_positives_by_ccd"].get(c, 0) for c in ccds])
    ax[1, 1].set_xticks(range(len(ccds)))
    ax[1, 1].set_xticklabels(ccds, rotation=60, fontsize=7)
    ax[1, 1].axhline(1, color="g", ls="--", lw=0.8)
    ax[1, 1].set_title(f"false positives per CCD: {res['false_positives_per_ccd']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
