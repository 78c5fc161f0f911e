"""The reliability training tool: boosted trees, ROC figures, planting and labelling.

``apdask/tools/train_reliability.py`` and the private modules it re-exports
(``_rb_boost.py``, ``_rb_examples.py``, ``_rb_runs.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from apdask.pipeline.measure.reliability import (
    RELIABILITY_FEATURES,
    load_reliability_model,
)
from apdask.tools import train_reliability
from apdask.tools.train_reliability import (
    BoostSettings,
    Planted,
    fit_boosted_trees,
    label_sources,
    plant,
    roc_curve,
    roc_summary,
)
from tests._pixels import exposure_from, gaussian_psf, make_wcs

K = len(RELIABILITY_FEATURES)


def test_boosted_trees_learn_an_interaction():
    """Real when features 0 and 1 are both positive (no single cut separates them)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, K))
    y = ((x[:, 0] > 0) & (x[:, 1] > 0)).astype(int)
    model = fit_boosted_trees(x[:2000], y[:2000], features=RELIABILITY_FEATURES, version="t",
                              settings=BoostSettings(n_trees=60, depth=2))  # fmt: skip
    r = roc_summary(model.predict(x[2000:]), y[2000:])
    assert r["auc"] > 0.97
    assert np.isin(model.feature[:10, 0], (0, 1)).all()  # the first roots split on the signal
    # the model's own trees, as stored, give what was fitted (JSON round trip included)
    back = type(model).from_dict(json.loads(json.dumps(model.to_dict())))
    np.testing.assert_allclose(back.predict(x), model.predict(x), atol=1e-5)


def test_boosted_trees_refuse_bad_input():
    x = np.zeros((10, K))
    with pytest.raises(ValueError, match="do not match"):
        fit_boosted_trees(x, np.zeros(9), features=RELIABILITY_FEATURES, version="t")
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        fit_boosted_trees(x, np.zeros(10), features=RELIABILITY_FEATURES, version="t")


def test_roc_figures_on_a_known_ranking():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0])
    fpr, tpr, thr = roc_curve(scores, labels)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    r = roc_summary(scores, labels, completeness=0.95)
    # all three reals kept at 0.6, which keeps one of five bogus
    assert r["threshold"] == pytest.approx(0.6) and r["completeness"] == 1.0
    assert r["bogus_rejected"] == pytest.approx(0.8)
    assert r["auc"] == pytest.approx(1 - 1 / 15)
    assert roc_summary(scores, np.ones(8))["auc"] is None


def _pair(shape=(200, 200), fwhm=4.0, sigma=10.0, seed=0):
    rng = np.random.default_rng(seed)
    w, psf = make_wcs(shape), gaussian_psf(fwhm)
    sci = exposure_from(rng.normal(0, sigma, shape), np.full(shape, sigma**2), wcs=w, psf=psf)
    tpl = exposure_from(np.zeros(shape), np.full(shape, 1.0), wcs=w, psf=psf)
    return sci, tpl


def test_plant_puts_the_flux_where_it_says():
    sci, tpl = _pair()
    statics = Table({"x": [100.0], "y": [100.0], "flux": [1e5]})
    sci2, tpl2, planted = plant(sci, tpl, statics, seed=3, n_real=8, n_artefact=6)
    added = np.asarray(sci2.image, float) - np.asarray(sci.image, float)
    removed = np.asarray(tpl2.image, float) - np.asarray(tpl.image, float)
    kinds = {"planted", "planted-negative", "dipole", "ring", "cosmic", "cosmic-template"}
    assert set(planted.kind) <= kinds and "cosmic-template" in planted.kind
    assert (planted.sign[planted.kind == "planted"] == 1).all()
    assert (planted.sign[planted.kind == "planted-negative"] == -1).all()
    checked = 0
    for x, y, k in zip(planted.x, planted.y, planted.kind, strict=True):
        others = np.hypot(planted.x - x, planted.y - y)
        if np.sort(others)[1] < 25:  # another planted thing in the box
            continue
        box = (slice(int(y) - 10, int(y) + 11), slice(int(x) - 10, int(x) + 11))
        checked += 1
        if k == "planted":
            assert added[box].sum() > 0 and abs(removed[box].sum()) < 1e-6
        elif k == "planted-negative":
            assert removed[box].sum() > 0 and abs(added[box].sum()) < 1e-6
        elif k in ("dipole", "ring"):  # at the static source, no net flux
            assert np.hypot(x - 100, y - 100) < 1 and abs(added[box].sum()) < 1e-3 * 1e5
        elif k == "cosmic":
            assert added[box].max() > 5 * 10 and np.abs(removed[box]).max() < 1e-6  # > 5 sigma
        else:  # a cosmic ray in the template (its noise: 1)
            assert removed[box].max() > 5 * 1 and np.abs(added[box]).max() < 1e-6
    assert checked >= 5
    assert sci2.psf is sci.psf and np.array_equal(sci2.mask, sci.mask)


def test_labels_follow_what_was_planted():
    planted = Planted.of([50, 150], [50, 50], [1, -1], ["planted", "planted-negative"])
    planted += Planted.of([100], [150], 0, "dipole")
    src = Table({"x": [50.5, 150.2, 150.0, 101.0, 20.0, 57.0],
                 "y": [50.3, 50.1, 49.0, 150.5, 180.0, 50.0],
                 "isNegative": [False, True, False, False, False, False]})  # fmt: skip
    label, kind = label_sources(src, planted, fwhm=4.0)
    # real; real (negative); wrong sign near a real: left out; the dipole; far from
    # everything: natural bogus; 7 px (< 2.5 FWHM) from a real: left out
    assert label.tolist() == [1, 1, -1, 0, 0, -1]
    assert kind.tolist() == ["planted", "planted-negative", "", "dipole", "natural", ""]
    label, _ = label_sources(src, planted, fwhm=4.0, naturals=False)
    assert label[4] == -1


@pytest.mark.slow
def test_quick_training_run_writes_a_loadable_model(tmp_path):
    """The whole tool, small (one seed or pair of each dataset; about a minute)."""
    model_path = tmp_path / "model.json"
    report = train_reliability.run(str(tmp_path / "work"), str(model_path),
                                   str(tmp_path / "report.json"), str(tmp_path / "roc.png"),
                                   quick=True, log=lambda *_: None)  # fmt: skip
    model = load_reliability_model(model_path)
    assert model.version == train_reliability.VERSION
    assert {"sim-apdask/train", "sim-galsim/test"} <= set(report["examples"])
    assert report["held_out"]["sim-apdask"]["auc"] > 0.8
    assert (tmp_path / "roc.png").stat().st_size > 5000
    assert report["inference"]["model_s_per_source"] > 0


def test_labels_from_repeated_pairs_of_single_exposures():
    """Two exposures per epoch (A1, A2 then B1, B2), all pairs both ways round."""
    from types import SimpleNamespace

    from apdask.tools.train_reliability import labels_from_repeats

    fwd = [("A1", "B1"), ("A1", "B2"), ("A2", "B1"), ("A2", "B2")]
    pairs = fwd + [(t, s) for s, t in fwd]
    rows = {p: [] for p in pairs}
    for p in pairs:  # a change between the epochs: in every pair, sign flips with roles
        rows[p].append((10.0, 10.0, 1.0 if p in fwd else -1.0, False, False))
        rows[p].append((50.0, 50.0, 1.0, True, False))  # a star's dipole lobe
        if "A1" in p:  # a cosmic ray in A1: only where A1 is used
            rows[p].append((80.0, 80.0, 1.0 if p[0] == "A1" else -1.0, False, False))
    rows[("A2", "B1")].append((30.0, 30.0, 1.0, False, False))  # once: unknown
    rows[("B2", "A1")].append((30.5, 30.0, -1.0, False, False))
    bases = {p: SimpleNamespace(sources=Table(rows=r, names=("x", "y", "psfFlux", "isDipole",
                                                              "pixelFlags_edge")))
             for p, r in rows.items()}  # fmt: skip
    for b in bases.values():
        b.sources["centroid_flag"] = False
    bases[("A2", "A1")] = None  # a pair that could not be subtracted
    out = labels_from_repeats(bases, first="A")
    got = {(round(x), round(y)): (k, s) for x, y, k, s in
           zip(out[("A1", "B1")].x, out[("A1", "B1")].y, out[("A1", "B1")].kind,
               out[("A1", "B1")].sign, strict=True)}  # fmt: skip
    assert got == {(10, 10): ("variable", 1.0), (50, 50): ("star-residual", 0.0),
                   (80, 80): ("one-exposure", 0.0), (30, 30): ("unknown", 0.0)}  # fmt: skip
    back = out[("B1", "A1")]
    assert back.sign[np.flatnonzero(back.kind == "variable")[0]] == -1.0


DECAM = Path(__file__).resolve().parents[3] / "shared" / "realdata" / "decam-sfft"


@pytest.mark.skipif(
    not (DECAM / "DEC-OBS04d.mini.fits").exists(),
    reason=f"real DECam data not found at {DECAM} (see the project's shared/realdata/README.md)",
)
def test_shipped_model_on_a_held_out_decam_pair():
    """Real DECam pixels never seen in training (science d, reference e), with sources
    and artefacts planted by two of the held-out seeds, subtracted and measured by the
    pipeline: at the shipped model's DECam cut (95 % completeness on the held-out set)
    the planted sources are kept and the artefacts rejected."""
    from apdask.tools._rb_runs import real_pair_examples

    model = load_reliability_model()
    cut = model.meta["held_out"]["decam"]["threshold"]
    ex = real_pair_examples(str(DECAM / "DEC-OBS04d.mini.fits"),
                            str(DECAM / "DEC-OBS18e.mini.fits"), dataset="decam",
                            split="test", seeds=[1110, 1120], n_real=6, n_artefact=8,
                            naturals=False)  # fmt: skip
    score = model.predict(ex.features)
    real, bogus = score[ex.label == 1], score[ex.label == 0]
    assert len(real) >= 8 and len(bogus) >= 8
    assert np.mean(real >= cut) >= 0.8, sorted(real)
    assert np.mean(bogus < cut) >= 0.8, sorted(bogus)
    assert roc_summary(score, ex.label)["auc"] > 0.9
