"""Train the real/bogus ``reliability`` model and report its ROC on held-out data.

Run it from a checkout (it reads ``../shared/realdata``, see that README)::

    python -m apdask.tools.train_reliability --workdir /tmp/rb

It builds labelled DIASources (:mod:`apdask.tools._rb_examples`) from four sources,
each split into training and held-out parts that share no image:

==============  ==========================================  ===========================
dataset         training                                    held out
==============  ==========================================  ===========================
``sim-apdask``  test-camera repositories (4 visits, 2       seeds 101-103
                CCDs), seeds 1-8
``sim-galsim``  the same rendered by GalSim, seeds 1-6      seeds 101-103
``decam``       science a-c x reference a-c, both ways,     science d-e x reference d-e,
                planting seeds 1-8                          planting seeds 101-108
``nircam``      sources at x < 450 (planting seeds 0-5)     x >= 450 (seeds 100-105)
==============  ==========================================  ===========================

The simulated repositories cycle through three observing conditions (the default,
science sharper than the template, a broad and strongly varying PSF).  Each
CCD-visit or image pair gets real sources and artefacts planted (a dozen or so); the
DECam pairs' own detections are labelled by how they repeat over the 50 pairs of
single exposures (:func:`~apdask.tools._rb_runs.labels_from_repeats`).

It then fits boosted trees (:mod:`apdask.tools._rb_boost`, every dataset and class given
the same total weight) on the training part, and writes the model JSON (by default the
one the package ships, ``apdask/pipeline/measure/reliability_v2.json``), a JSON report
with the held-out ROC figures per dataset and kind and the inference cost, the ROC
figure (PNG) and the examples (``<workdir>/examples.ecsv``).  Everything is seeded: the
same command gives the same model.  ``--quick`` runs a small version (one seed or pair
of each) for tests.  About 10 minutes on two cores at load 13-15.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from astropy.table import Table
from astropy.wcs import WCS

from apdask.core.exposure import Exposure
from apdask.pipeline.measure.detection import detect_sources
from apdask.pipeline.measure.reliability import (
    RELIABILITY_FEATURES,
    ReliabilityModel,
    reliability_features,
)
from apdask.pipeline.measure.sources import measure_sources
from apdask.tools._rb_boost import BoostSettings, fit_boosted_trees, roc_curve, roc_summary
from apdask.tools._rb_examples import Examples, Planted, label_sources, plant, realdata_root
from apdask.tools._rb_runs import (
    labels_from_repeats,
    pair_difference,
    real_pair_examples,
    simulated_examples,
)

__all__ = [
    "VERSION",
    "BoostSettings",
    "Examples",
    "Planted",
    "build_examples",
    "evaluate",
    "fit_boosted_trees",
    "inference_cost",
    "label_sources",
    "labels_from_repeats",
    "main",
    "plant",
    "plot_roc",
    "roc_curve",
    "roc_summary",
    "run",
    "train",
]

#: ``reliabilityVersion`` of the model this script trains (the APDB column holds 7).
VERSION = "apdrb-2"
#: Simulated conditions, cycled over the seeds: the default, science sharper than the
#: template, and a broad, strongly varying PSF.
_CONDITIONS: tuple[dict[str, Any], ...] = (
    {},
    {"fwhm_range": (0.6, 0.75), "template_fwhm": 0.9},
    {"fwhm_range": (1.1, 1.5), "template_fwhm": 0.7},
)
_NIRCAM_SCI = "jw02561001002-02561-o001_t003_nircam_clear-f200w_i2d_stamp"
_NIRCAM_TPL = "jw01324001001-01324-o001_t001_nircam_clear-f200w_i2d_stamp"
_NIRCAM_SPLIT_X = 450.0


def _plan(quick: bool) -> dict[str, Any]:
    """Seeds, image pairs and planting counts of every dataset and split."""
    if quick:
        return {
            "sim": {"apdask": ([1], [101]), "galsim": ([1], [101])},
            "decam": ([("a", "a")], [("d", "d")], [1], [101]),
            "nircam": ([0], [100]),
            "visits": 2,
        }
    train_pairs = [(s, t) for s in "abc" for t in "abc"]
    test_pairs = [(s, t) for s in "de" for t in "de"]
    return {
        "sim": {
            "apdask": (list(range(1, 9)), [101, 102, 103]),
            "galsim": (list(range(1, 7)), [101, 102, 103]),
        },
        "decam": (train_pairs, test_pairs, list(range(1, 9)), list(range(101, 109))),
        "nircam": (list(range(6)), list(range(100, 106))),
        "visits": 4,
    }


def build_examples(
    workdir: str,
    *,
    quick: bool = False,
    realdata: str | None = None,
    log: Callable[[str], object] = print,
) -> Examples:
    """Every labelled DIASource of :func:`_plan`, training and held-out.

    ``realdata`` defaults to ``../shared/realdata`` next to the checkout; without it
    the real-pixel datasets are left out (and the report says so).
    """
    plan = _plan(quick)
    parts = []
    for engine, (train_seeds, test_seeds) in plan["sim"].items():
        for split, seeds in (("train", train_seeds), ("test", test_seeds)):
            for seed in seeds:
                t0 = time.perf_counter()
                cond = _CONDITIONS[seed % len(_CONDITIONS)]
                ex = simulated_examples(
                    engine, seed, workdir, split=split, n_visits=plan["visits"], conditions=cond
                )
                log(
                    f"sim-{engine} seed {seed} ({split}): {len(ex.label)} examples, "
                    f"{time.perf_counter() - t0:.0f} s"
                )
                parts.append(ex)
    root = realdata or realdata_root()
    if os.path.isdir(os.path.join(root, "decam-sfft")):
        parts += _decam(os.path.join(root, "decam-sfft"), plan["decam"], log)
    if os.path.isdir(os.path.join(root, "nircam-a2744")):
        parts += _nircam(os.path.join(root, "nircam-a2744"), plan["nircam"], log)
    return Examples.concat(parts)


def _decam(root: str, plan: tuple, log) -> list[Examples]:
    """DECam pairs both ways; their own detections labelled by how they repeat over all
    25 x 2 pairs of single exposures (:func:`~apdask.tools._rb_runs.labels_from_repeats`)."""
    train_pairs, test_pairs, train_seeds, test_seeds = plan
    path = {e: os.path.join(root, f"DEC-OBS{e}.mini.fits") for a in ("04", "18") for e in
            (a + c for c in "abcde")}  # fmt: skip
    names = [(f"04{s}", f"18{t}") for s in "abcde" for t in "abcde"]
    names += [(t, s) for s, t in names]
    bases = {p: pair_difference(path[p[0]], path[p[1]]) for p in names}
    known = labels_from_repeats(bases, first="04")
    kinds = Counter(str(k) for p in known.values() for k in p.kind)
    log(f"decam: {sum(b is not None for b in bases.values())} of {len(bases)} pairs subtracted; "
        f"places of their own detections (x 50 pairs): {dict(kinds)}")  # fmt: skip
    parts = []
    for split, pairs, seeds in (("train", train_pairs, train_seeds),
                                ("test", test_pairs, test_seeds)):  # fmt: skip
        n = 0
        for s, t in pairs:
            for pair in ((f"04{s}", f"18{t}"), (f"18{s}", f"04{t}")):
                ex = real_pair_examples(
                    path[pair[0]], path[pair[1]], dataset="decam", split=split,
                    seeds=[x * 10 + ord(s) for x in seeds], n_real=6, n_artefact=8,
                    known=known[pair], base=bases[pair],
                )  # fmt: skip
                n += len(ex.label)
                parts.append(ex)
        log(f"decam ({split}): {n} examples")
    return parts


def _nircam(root: str, plan: tuple, log) -> list[Examples]:
    """The NIRCam pair, split in x; its own detections are unlabelled (no truth)."""
    parts = []
    opts: dict[str, dict[str, Any]] = {
        "science_options": {
            "noise": os.path.join(root, f"{_NIRCAM_SCI}.noise.fits"),
            "psf": os.path.join(root, f"{_NIRCAM_SCI}.WebbPSF.fits"),
        },
        "template_options": {
            "noise": os.path.join(root, f"{_NIRCAM_TPL}.noise.fits"),
            "psf": os.path.join(root, f"{_NIRCAM_TPL}.WebbPSF.fits"),
        },
    }
    for split, seeds, xr in (
        ("train", plan[0], (-np.inf, _NIRCAM_SPLIT_X)),
        ("test", plan[1], (_NIRCAM_SPLIT_X, np.inf)),
    ):
        ex = real_pair_examples(
            os.path.join(root, f"{_NIRCAM_SCI}.fits"),
            os.path.join(root, f"{_NIRCAM_TPL}.fits"),
            dataset="nircam",
            split=split,
            seeds=seeds,
            n_real=30,
            n_artefact=30,
            naturals=False,
            x_range=xr,
            science_options=opts["science_options"],
            template_options=opts["template_options"],
        )
        log(f"nircam ({split}): {len(ex.label)} examples")
        parts.append(ex)
    return parts


def _weights(ex: Examples) -> np.ndarray:
    """Every (dataset, label) cell the same total weight; the mean weight is 1."""
    w = np.zeros(len(ex.label))
    cells = {(d, lab) for d, lab in zip(ex.dataset, ex.label, strict=True)}
    for d, lab in cells:
        sel = (ex.dataset == d) & (ex.label == lab)
        w[sel] = 1.0 / sel.sum()
    return w * len(w) / w.sum()


def train(
    ex: Examples, settings: BoostSettings | None = None, meta: dict[str, Any] | None = None
) -> ReliabilityModel:
    """Fit the model on the ``"train"`` examples."""
    tr = ex.select(ex.split == "train")
    return fit_boosted_trees(
        tr.features,
        tr.label,
        features=RELIABILITY_FEATURES,
        version=VERSION,
        weights=_weights(tr),
        settings=settings,
        meta=meta,
    )


def evaluate(model: ReliabilityModel, ex: Examples) -> dict[str, Any]:
    """Held-out ROC figures per dataset, pooled, and per bogus kind at the pooled cut."""
    te = ex.select(ex.split == "test")
    score = model.predict(te.features)
    out: dict[str, Any] = {"pooled": roc_summary(score, te.label)}
    for d in sorted(set(te.dataset)):
        sel = te.dataset == d
        out[d] = roc_summary(score[sel], te.label[sel])
    cut = out["pooled"]["threshold"]
    kinds: dict[str, Any] = {}
    for k in sorted(set(te.kind)):
        sel = te.kind == k
        kinds[k] = {
            "n": int(sel.sum()),
            "label": int(te.label[sel][0]),
            "kept_at_pooled_cut": float(np.mean(score[sel] >= cut)) if cut else None,
        }
    out["kinds"] = kinds
    return out


def inference_cost(model: ReliabilityModel, n: int = 2000, repeats: int = 5) -> dict[str, Any]:
    """Seconds per source of the model alone, and of the features plus the model, for
    ``n`` point sources measured on a synthetic difference image (best of ``repeats``)."""
    tab, difference = _synthetic_sources(n, np.random.default_rng(0))
    feats = reliability_features(tab, difference)
    t_model = min(_timed(model.predict, feats) for _ in range(repeats))
    t_all = min(
        _timed(lambda: model.predict(reliability_features(tab, difference))) for _ in range(repeats)
    )
    return {
        "n_sources": len(tab),
        "model_s_per_source": t_model / max(len(tab), 1),
        "features_and_model_s_per_source": t_all / max(len(tab), 1),
    }


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def _synthetic_sources(n: int, rng: np.random.Generator) -> tuple[Table, Exposure]:
    """A noisy difference image with ``n`` point sources on a grid, measured."""
    side = int(np.ceil(np.sqrt(n)))
    yy, xx = np.mgrid[-7:8, -7:8]
    psf = np.exp(-0.5 * (xx**2 + yy**2) / 2.0**2)
    psf /= psf.sum()
    img = rng.normal(0, 10, (40 * side, 40 * side))
    for k in range(n):
        cy, cx = 20 + 40 * (k // side), 20 + 40 * (k % side)
        img[cy - 7 : cy + 8, cx - 7 : cx + 8] += 3000 * psf * (1 if k % 3 else -1)
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.cdelt = [-5.55e-5, 5.55e-5]
    e = Exposure(
        img.astype(np.float32),
        np.full(img.shape, 100, np.float32),
        np.zeros(img.shape, np.uint32),
        w,
        psf.astype(np.float32),
    )
    tab = measure_sources(
        e, None, None, detect_sources(e), visit=1, detector=0, band="r", mjd=60000.0
    )
    return tab, e


def plot_roc(model: ReliabilityModel, ex: Examples, path: str, summary: dict[str, Any]) -> None:
    """The held-out ROC curves, one per dataset and pooled, as a small PNG."""
    try:
        # optional: matplotlib comes with the 'notebook' and 'test' extras
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - the test extra has matplotlib
        msg = "the ROC figure needs matplotlib: pip install 'apdask[notebook]'"
        raise ImportError(msg) from e
    te = ex.select(ex.split == "test")
    score = model.predict(te.features)
    fig = Figure(figsize=(5.0, 3.8), dpi=90)
    ax = fig.add_subplot()
    for d in [*sorted(set(te.dataset)), "pooled"]:
        r = summary[d]
        if r["auc"] is None:  # one class only
            continue
        sel = np.ones(len(te.label), bool) if d == "pooled" else te.dataset == d
        fpr, tpr, _ = roc_curve(score[sel], te.label[sel])
        ax.plot(
            np.maximum(fpr, 1e-3),
            tpr,
            lw=2.2 if d == "pooled" else 1.2,
            color="k" if d == "pooled" else None,
            label=f"{d}: AUC {r['auc']:.3f}; {r['bogus_rejected']:.0%} of bogus out at 95%",
        )
    ax.axhline(0.95, color="0.5", ls=":", lw=1)
    ax.axvline(0.10, color="0.5", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlim(1e-3, 1.0)
    ax.set_ylim(0.5, 1.005)
    ax.set_xlabel("bogus kept (false-positive rate)")
    ax.set_ylabel("real kept (completeness)")
    ax.set_title(f"reliability {model.version}: held-out ROC", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def run(
    workdir: str,
    model_path: str,
    report_path: str,
    figure_path: str | None,
    *,
    quick: bool = False,
    realdata: str | None = None,
    log: Callable[[str], object] = print,
) -> dict[str, Any]:
    """Build the examples, train, evaluate, and write the model, report and figure."""
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    ex = build_examples(workdir, quick=quick, realdata=realdata, log=log)
    t1 = time.perf_counter()
    counts = {}
    for d in sorted(set(ex.dataset)):
        for sp in ("train", "test"):
            sel = (ex.dataset == d) & (ex.split == sp)
            counts[f"{d}/{sp}"] = {
                "real": int((sel & (ex.label == 1)).sum()),
                "bogus": int((sel & (ex.label == 0)).sum()),
            }
    settings = BoostSettings(n_trees=30 if quick else 200)
    meta = {
        "trained_by": "python -m apdask.tools.train_reliability",
        "quick": quick,
        "examples": counts,
        "settings": settings.__dict__,
    }
    model = train(ex, settings, meta)
    t2 = time.perf_counter()
    summary = evaluate(model, ex)
    model.meta["held_out"] = {k: v for k, v in summary.items() if k != "kinds"}
    report = {
        "version": model.version,
        "examples": counts,
        "held_out": summary,
        "inference": inference_cost(model),
        "seconds": {"examples": t1 - t0, "training": t2 - t1},
    }
    with open(model_path, "w") as f:
        json.dump(model.to_dict(), f, separators=(",", ":"))
        f.write("\n")
    with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
    if figure_path:
        plot_roc(model, ex, figure_path, summary)
    ex.to_table().write(os.path.join(workdir, "examples.ecsv"), overwrite=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apdask.tools.train_reliability``: see the module docstring."""
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(
        prog="python -m apdask.tools.train_reliability", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--workdir", required=True, help="scratch directory (repositories)")
    p.add_argument(
        "--model",
        default=os.path.join(here, "..", "pipeline", "measure", "reliability_v2.json"),
        help="model JSON to write (default: the one the package ships)",
    )
    p.add_argument("--report", help="JSON report (default <workdir>/reliability.json)")
    p.add_argument("--figure", help="ROC figure PNG (default <workdir>/reliability_roc.png)")
    p.add_argument("--realdata", help="the realdata folder (default ../shared/realdata)")
    p.add_argument("--quick", action="store_true", help="one seed or pair of each dataset")
    a = p.parse_args(argv)
    report = run(
        a.workdir,
        os.path.normpath(a.model),
        a.report or os.path.join(a.workdir, "reliability.json"),
        a.figure or os.path.join(a.workdir, "reliability_roc.png"),
        quick=a.quick,
        realdata=a.realdata,
    )
    print(json.dumps(report["held_out"], indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
