"""The pipeline on images rendered by an independent simulator (GalSim).

``apdask simulate --engine galsim`` draws the same scene as our own engine (same
static sky, transients, pointings, calibs, raw format, truth table) with GalSim: a
Kolmogorov PSF whose FWHM and shear vary across the CCD, Sersic galaxies and
GalSim's Poisson noise.  One test-camera visit goes through the real pipeline and is
compared with the GalSim truth.  Known gaps to the issue-6 targets are strict xfails
with the measured numbers (docs/simulation.md).
"""

import filecmp
import json
import os

import numpy as np
import pytest

galsim = pytest.importorskip("galsim")

from apdask.cli.main import main  # noqa: E402
from apdask.io.butler import Butler  # noqa: E402
from apdask.pipeline.nextvisit import NextVisit  # noqa: E402
from apdask.pipeline.run import run_visit  # noqa: E402
from apdask.tools.evaluate import evaluate_visit, load_truth, match_truth  # noqa: E402
from apdask.tools.simulate import simulate_repo  # noqa: E402
from apdask.tools.simulate_galsim import render_science, template_psf_image  # noqa: E402

SEED = 11


@pytest.fixture(scope="module")
def galsim_visit(tmp_path_factory):
    """One GalSim test-camera visit (via the CLI), processed and evaluated."""
    repo = str(tmp_path_factory.mktemp("galsim") / "repo")
    args = ["simulate", "--camera", "testcam", "--repo", repo, "--visits", "1",
            "--seed", str(SEED), "--engine", "galsim"]  # fmt: skip
    assert main(args) == 0
    with open(os.path.join(repo, "visits", "visit_1000.json")) as f:
        msg = json.load(f)
    report = run_visit(NextVisit.from_dict(msg), repo=repo, timeout=60)
    res = evaluate_visit(repo, 1000, plot=False)
    return {"repo": repo, "report": report, "eval": res, "msg": msg}


def _sources(repo):
    from apdask.alerts.sinks import read_alerts

    return [a["diaSource"] for a in read_alerts(f"{repo}/alerts/visit_1000")]


def test_render_science_puts_the_drawn_flux_at_the_truth_position():
    shape = (160, 200)
    cat = {"extended": np.array([True]), "gal_a": np.array([3.0]), "gal_b": np.array([1.5]),
           "gal_theta": np.array([0.5]), "sersic_n": np.array([1.0])}  # fmt: skip
    calib = {"flat": np.ones(shape, np.float32), "dark": np.zeros(shape, np.float32)}
    x, y, flux = np.array([60.2, 140.7]), np.array([70.6, 90.3]), np.array([1e7, 1e7])
    img, drawn = render_science(cat, x, y, flux, shape, (0.9, 1.1), 0.0, calib, 0.0, (1, 2))
    assert img.dtype == np.float32 and img.shape == shape
    # the galaxy's Sersic wings are cut by its stamp; the transient's stamp holds 99.9 %
    assert 0.98 < drawn[0] / 1e7 < 1.0 and 0.998 < drawn[1] / 1e7 < 1.0
    assert abs(img.sum() / drawn.sum() - 1) < 1e-3  # Poisson noise on 2e7 e-
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(2):
        w = img * ((np.abs(xx - x[k]) < 30) & (np.abs(yy - y[k]) < 30))
        assert abs((w * xx).sum() / w.sum() - x[k]) < 0.01
        assert abs((w * yy).sum() / w.sum() - y[k]) < 0.01


def test_repository_is_rendered_by_galsim(galsim_visit):
    repo = galsim_visit["repo"]
    with open(os.path.join(repo, "truth", "simulation.json")) as f:
        meta = json.load(f)
    assert meta["engine"] == "galsim" and meta["psf"] == "kolmogorov"
    # Template PSF: a Kolmogorov (much more peaked and wing-heavy than a Gaussian).
    psf = template_psf_image(meta["template_fwhm"])
    box = [(149.9, -30.1), (150.1, -30.1), (150.1, -29.9), (149.9, -29.9)]
    tiles = Butler(repo).get_templates("r", box)
    assert tiles and np.allclose(tiles[0].psf, psf, atol=1e-6)
    r = np.hypot(*np.mgrid[-10:11, -10:11])
    assert psf[r > 6].sum() > 0.01  # a Gaussian of FWHM 0.7″ has 1e-10 there
    # Truth: each transient's flux is what GalSim drew, 99.9 % of the model flux.
    tr = load_truth(repo, 1000)
    tr = tr[tr["kind"] == "transient"]
    assert len(tr) >= 20 and np.all(tr["template_flux"] == 0)


def test_same_seed_same_bytes(galsim_visit, tmp_path):
    other = tmp_path / "again"
    simulate_repo("testcam", other, n_visits=1, seed=SEED, engine="galsim")
    repo = galsim_visit["repo"]
    for sub in ("raw", "truth"):
        names = sorted(n for n in os.listdir(other / sub) if n.endswith((".fits", ".ecsv")))
        assert names
        for n in names:
            assert filecmp.cmp(os.path.join(repo, sub, n), other / sub / n, shallow=False), n


def test_every_ccd_processed_with_white_difference_noise(galsim_visit):
    ccds = galsim_visit["report"]["ccds"]
    assert len(ccds) == 2 and not galsim_visit["report"]["failed"]
    for c in ccds:
        assert c["astrometry"]["ok"] and c["astrometry"]["rms_arcsec"] < 0.06
        assert 0.95 < c["subtraction"]["noise_ratio"] < 1.05, c["subtraction"]
    # evaluate: robust σ of difference-cutout pixels / propagated σ
    assert 0.93 < galsim_visit["eval"]["noise_ratio"] < 1.10, galsim_visit["eval"]["noise"]


def test_transients_recovered_at_right_positions(galsim_visit):
    res = galsim_visit["eval"]
    m = match_truth(load_truth(galsim_visit["repo"], 1000), _sources(galsim_visit["repo"]))
    assert m["n_truth"] >= 20
    assert m["fraction"] >= 0.9, m
    assert np.max(m["sep_arcsec"]) < 0.3, m["sep_arcsec"]
    assert res["completeness_snr_ge_7"] >= 0.95
    assert res["astrometric_error_median_arcsec_snr_gt_20"] <= 0.05


def _isolated(truth, matched, radius_arcsec=3.0):
    """True where no static source brighter than the transient lies within the radius."""
    static = truth[np.asarray(truth["kind"]).astype(str) != "transient"]
    out = np.ones(len(matched), bool)
    for k, row in enumerate(matched):
        d = np.hypot((static["ra"] - row["ra"]) * np.cos(np.deg2rad(row["dec"])),
                     static["dec"] - row["dec"]) * 3600  # fmt: skip
        out[k] = not np.any(np.asarray(static["template_flux"])[d < radius_arcsec] > row["flux"])
    return out


def test_isolated_bright_transient_fluxes_within_10_percent(galsim_visit):
    truth = load_truth(galsim_visit["repo"], 1000)
    m = match_truth(truth, _sources(galsim_visit["repo"]))
    snr = m["flux_meas"] / m["flux_err"]
    rel = m["flux_meas"] / m["flux_true"] - 1
    iso = _isolated(truth, m["truth"])
    # SNR > 40: every one within 10 % (measured: -7 % .. +4 %, median -1 %)
    bright = iso & (snr > 40)
    assert bright.sum() >= 6
    assert np.all(np.abs(rel[bright]) < 0.10), rel[bright]
    # SNR > 20: the median within 5 % (single ones at SNR 20-30 reach +-13 %: see docs)
    assert abs(np.median(rel[iso & (snr > 20)])) < 0.05, rel[iso & (snr > 20)]


def test_false_positives_bounded(galsim_visit):
    res = galsim_visit["eval"]
    # nearly all sit on the subtraction residuals of static sources (measured: 4 and 6
    # per CCD on the two seed-11 skies); target <= 1 is the strict xfail below
    classes = res["false_positives_by_class"]
    assert classes.get("empty_sky", 0) <= res["n_ccd"], classes
    assert res["false_positives_per_ccd"] <= 8, classes


@pytest.mark.xfail(
    strict=True,
    reason="known gap (issue 6, docs/simulation.md): on a 512x512 CCD the kernel, fitted "
    "on few stamps, leaves a 5% quadrupole at a bright star near the CCD edge (3 false "
    "positives per CCD; the rings of bright stars' Kolmogorov wings are no longer detected)",
)
def test_at_most_one_false_positive_per_ccd(galsim_visit):
    assert galsim_visit["eval"]["false_positives_per_ccd"] <= 1.0
