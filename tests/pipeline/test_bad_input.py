"""Bad input (issue 6): non-finite and saturated pixels, partial or missing templates,
PSF failures.

Each case runs the real visit graph on a copy of the simulated test-camera repository
and checks the outcome: the mask planes on the right pixels, no DIASources there, the
error naming the CCD, and nothing written to the PPDB or the alert sink for a failed CCD.
"""

from __future__ import annotations

import logging
import os
import shutil

import dask
import numpy as np
import pytest
from astropy.io import fits

from apdask.alerts.sinks import read_alerts
from apdask.cli.common import partial_failure_code
from apdask.cli.main import main
from apdask.core.camera import get_camera
from apdask.core.exposure import MASK, mask_bits
from apdask.exceptions import NoTemplateCoverageError, ProductWriteError
from apdask.io.butler import Butler
from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.isr import isr_amp
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, run_visit
from apdask.ppdb import Ppdb

CAMERA = get_camera("testcam")
VISIT = 1000


@pytest.fixture
def visit_msg(sim_repo):
    return next(v for v in sim_repo["visits"] if v["visit"] == VISIT)


def _process(repo, msg, ccds=("T00",)):
    """Run the visit graph; the visit report and each CCD's subtraction stage result."""
    nv = NextVisit.from_dict(msg)
    graph = build_visit_graph(nv, repo=repo, ppdb=ensure_ppdb(repo), timeout=10, detectors=ccds)
    keys = [graph.key] + [f"subtract-{nv.visit}-{c}" for c in ccds]
    report, *subs = dask.threaded.get(dict(graph.__dask_graph__()), keys)
    return report, dict(zip(ccds, subs, strict=True))


def _ccd_alerts(repo, ccd):
    path = os.path.join(repo, "alerts", f"visit_{VISIT}", f"{VISIT}_{CAMERA[ccd].id}.avro")
    return [a["diaSource"] for a in read_alerts(path)] if os.path.exists(path) else []


def _positions(sources):
    return np.array([[s["x"], s["y"]] for s in sources]).reshape(-1, 2)


def _dilate(bad, r):
    from scipy import ndimage

    return ndimage.binary_dilation(bad, iterations=r)


@pytest.fixture(scope="module")
def baseline(sim_repo, tmp_path_factory):
    """Alert positions of CCD T00 of the unmodified visit."""
    root = str(tmp_path_factory.mktemp("bad_input_base") / "repo")
    shutil.copytree(sim_repo["root"], root)
    msg = next(v for v in sim_repo["visits"] if v["visit"] == VISIT)
    report, _ = _process(root, msg)
    assert report["ccds"][0]["n_alerts"] > 5
    return _positions(_ccd_alerts(root, "T00"))


def _all_in_baseline(pos, baseline, tol=3.0):
    """True where a DIASource lies within ``tol`` px of one of the clean run."""
    d = np.hypot(pos[:, None, 0] - baseline[None, :, 0], pos[:, None, 1] - baseline[None, :, 1])
    return d.min(axis=1) <= tol


def _rewrite_raw(repo, ccd, edit):
    """Rewrite a raw as float32 segments, ``edit(amp, segment)`` changing them in place."""
    path = os.path.join(repo, "raw", f"TestCam_{VISIT}_{ccd}_0.fits")
    with fits.open(path) as hdul:
        hdus = [hdul[0].copy()]
        for k, amp in enumerate(CAMERA[ccd].amplifiers):
            seg = np.asarray(hdul[k + 1].data, np.float32).copy()
            edit(amp, seg)
            hdus.append(fits.ImageHDU(seg, header=hdul[k + 1].header))
    fits.HDUList(hdus).writeto(path, overwrite=True)


def _blank_template(repo, msg, ccd, x_max, margin=30):
    """Set NaN every template pixel that lands on CCD ``ccd`` at ``x < x_max``."""
    det = CAMERA[ccd]
    ra, dec = msg["position"]
    wcs = det.predicted_wcs(ra, dec, msg["rotationAngle"])
    butler = Butler(repo)
    ny_ccd = det.shape[0]
    for tile in butler.get_templates(msg["filters"], det.footprint(ra, dec, 0.0)):
        yy, xx = np.mgrid[0 : tile.image.shape[0], 0 : tile.image.shape[1]]
        cx, cy = wcs.world_to_pixel_values(*tile.wcs.pixel_to_world_values(xx, yy))
        off = (cx > -margin) & (cx < x_max) & (cy > -margin) & (cy < ny_ccd + margin)
        image = np.where(off, np.float32(np.nan), tile.image)
        butler.put_template(msg["filters"], tile.tile_id, image, tile.variance, tile.wcs,
                            psf=tile.psf)  # fmt: skip


def _nothing_stored(repo, ccd):
    db = Ppdb.open(ensure_ppdb(repo))
    assert not db.contains_visit_detector(VISIT, CAMERA[ccd].id)
    assert _ccd_alerts(repo, ccd) == []
    assert not os.path.exists(
        os.path.join(repo, "alerts", f"visit_{VISIT}", f"{VISIT}_{CAMERA[ccd].id}.avro")
    )


# --------------------------------------------------------------------------------------
# ISR: NaN / inf pixels, calibrations with NaN, a saturated amplifier


def test_isr_masks_non_finite_raw_and_calib_pixels_and_a_saturated_amp():
    amp = next(a for a in CAMERA["T00"].amplifiers if not (a.flip_x or a.flip_y))
    rng = np.random.default_rng(3)
    raw = (1000.0 + rng.normal(0, 5, amp.raw_shape)).astype(np.float32)
    raw[amp.data_slice] += 600.0
    p = amp.prescan
    raw[10:20, p + 30 : p + 40] = np.nan
    raw[50, p + 7] = np.inf
    raw[60, :] = -np.inf  # a whole row, overscan included
    bias = np.zeros((amp.ny, amp.nx), np.float32)
    bias[100, 100] = np.nan
    flat = np.ones((amp.ny, amp.nx), np.float32)
    flat[120, 5] = np.inf
    dark = np.zeros((amp.ny, amp.nx), np.float32)
    dark[130, 9] = np.nan
    img, var, mask = isr_amp(raw, amp, bias, dark, flat, darktime=30.0)
    assert np.isfinite(img).all() and np.isfinite(var).all() and (var > 0).all()
    nodata = (mask & MASK["NO_DATA"]) != 0
    expect = np.zeros(nodata.shape, bool)
    expect[10:20, 30:40] = expect[50, 7] = expect[60, :] = True
    np.testing.assert_array_equal(nodata, expect)
    assert (img[expect] == 0).all()
    bad = (mask & MASK["BAD"]) != 0
    assert bad[100, 100] and bad[120, 5] and bad[130, 9] and bad.sum() == 3
    # overscan rows next to the non-finite row are unaffected
    assert abs(np.median(img[~expect]) - 600.0 * amp.gain) < 5 * amp.gain

    sat = np.full(amp.raw_shape, 1000.0, np.float32)
    sat[amp.data_slice] = amp.saturation + 100.0
    img, var, mask = isr_amp(sat, amp)
    assert (mask & mask_bits("SAT", "NO_DATA") == mask_bits("SAT", "NO_DATA")).all()
    assert (img == 0).all() and np.isfinite(var).all()


def test_bad_raw_pixels_are_masked_and_give_no_sources(sim_repo, repo, visit_msg, baseline):
    # assembled pixels: amplifier C01 (x, y < 256) is stored unflipped; C11 is the
    # top-right amplifier
    c01 = next(a for a in CAMERA["T00"].amplifiers if a.name == "C01")
    c11 = next(a for a in CAMERA["T00"].amplifiers if a.name == "C11")
    assert not (c01.flip_x or c01.flip_y) and (c01.x0, c01.y0) == (0, 0)

    def edit(amp, seg):
        p = amp.prescan
        if amp is c01:
            seg[100:120, p + 50 : p + 80] = np.nan
            seg[200, p + 150] = np.inf
            seg[30, :] = -np.inf
        elif amp is c11:
            seg[amp.data_slice] = amp.saturation + 100.0

    _rewrite_raw(repo, "T00", edit)
    report, subs = _process(repo, visit_msg)
    ccd = report["ccds"][0]
    assert "error" not in ccd and ccd["n_alerts"] > 0
    nonfinite = np.zeros(CAMERA["T00"].shape, bool)
    nonfinite[100:120, 50:80] = nonfinite[200, 150] = nonfinite[30, 0:256] = True
    sat_amp = np.zeros(nonfinite.shape, bool)
    sat_amp[c11.y0 : c11.y1, c11.x0 : c11.x1] = True
    sci, diff = subs["T00"].science, subs["T00"].difference
    np.testing.assert_array_equal((sci.mask & MASK["NO_DATA"]) != 0, nonfinite | sat_amp)
    assert ((sci.mask & MASK["SAT"]) != 0)[sat_amp].all()
    assert ((diff.mask & MASK["NO_DATA"]) != 0)[nonfinite | sat_amp].all()
    masked = nonfinite | sat_amp
    assert ((diff.mask & MASK["EDGE"]) != 0)[_dilate(masked, 3) & ~masked].all()
    for plane in (diff.image, diff.variance, sci.image, sci.variance):
        assert np.isfinite(plane).all()
    # no DIASource on or next to the masked pixels, none that the clean run did not have
    # (a real one cut by the EDGE band may move: it carries pixelFlags_edge)
    sources = _ccd_alerts(repo, "T00")
    pos = _positions(sources)
    ix, iy = np.rint(pos).astype(int).T
    assert not _dilate(masked, 5)[iy, ix].any()
    edge = np.array([s["pixelFlags_edge"] for s in sources])
    assert (_all_in_baseline(pos, baseline) | edge).all()


# --------------------------------------------------------------------------------------
# Templates: partial and no coverage


def test_partial_template_processes_only_the_covered_part(repo, visit_msg, baseline, caplog):
    _blank_template(repo, visit_msg, "T00", x_max=256)
    with caplog.at_level(logging.WARNING, logger="apdask.pipeline.tasks"):
        report, subs = _process(repo, visit_msg)
    ccd = report["ccds"][0]
    assert "error" not in ccd and report["failed"] == []
    assert ccd["template_partial"] is True
    assert 0.4 < ccd["template_coverage"] < 0.6
    assert any("T00" in r.getMessage() and "covers only" in r.getMessage() for r in caplog.records)
    tmpl, diff = subs["T00"].template, subs["T00"].difference
    uncovered = (tmpl.mask & MASK["NO_DATA"]) != 0
    assert uncovered[:, :240].all() and not uncovered[:, 270:].any()
    assert ((diff.mask & MASK["NO_DATA"]) != 0)[uncovered].all()
    assert (diff.image[uncovered] == 0).all()
    pos = _positions(_ccd_alerts(repo, "T00"))
    assert len(pos) == ccd["n_alerts"] > 0
    assert (pos[:, 0] > 256 + 5).all()  # not in the uncovered part nor on its EDGE
    # the covered part is searched as before: the same sources, no false ones
    assert _all_in_baseline(pos, baseline).all()
    assert _all_in_baseline(baseline[baseline[:, 0] > 300], pos).mean() >= 0.8
    assert abs(ccd["subtraction"]["noise_ratio"] - 1.0) < 0.1


def test_ccd_without_template_fails_alone(repo, visit_msg, capsys):
    _blank_template(repo, visit_msg, "T00", x_max=512 + 30)
    report = run_visit(NextVisit.from_dict(visit_msg), repo=repo, timeout=10)
    by = {c["detector"]: c for c in report["ccds"]}
    assert report["failed"] == ["T00"]
    t00, t01 = by["T00"], by["T01"]
    assert t00["error_type"] == "NoTemplateCoverageError" and t00["exit_code"] == 66
    assert "CCD T00" in t00["error"] and "ingest-template" in t00["error"]
    assert t00["n_alerts"] == 0 and not t00["stored"]
    _nothing_stored(repo, "T00")
    # the other CCD of the visit is processed, and only its rows are in the PPDB
    assert "error" not in t01 and t01["n_alerts"] > 0 and t01["template_partial"] is False
    assert len(_ccd_alerts(repo, "T01")) == t01["n_alerts"] == report["n_alerts"]
    counts = Ppdb.open(ensure_ppdb(repo)).apdb.tableRowCount()
    assert counts["DiaSource"] == t01["n_sources"]
    # process-visit prints this report, then exits with T00's code
    assert partial_failure_code(report) == 66
    assert "1 CCD(s) failed: T00" in capsys.readouterr().err
    assert partial_failure_code({"ccds": [t01]}) == 0
    ppdb_down = {"detector": "T01", "error": "PPDB failed to read DiaObjects: ..."}
    assert partial_failure_code({"ccds": [t01, ppdb_down]}) == 69  # PpdbError's code


def test_no_template_at_all_is_a_clear_error(repo, visit_msg, capsys):
    shutil.rmtree(os.path.join(repo, "butler.zarr", "templates", visit_msg["filters"]))
    with pytest.raises(NoTemplateCoverageError, match="CCD T00.*also failed: T01"):
        run_visit(NextVisit.from_dict(visit_msg), repo=repo, timeout=10)
    for ccd in ("T00", "T01"):
        _nothing_stored(repo, ccd)
    counts = Ppdb.open(ensure_ppdb(repo)).apdb.tableRowCount()
    assert counts.get("DiaSource", 0) == 0 and counts.get("DiaObject", 0) == 0
    # the command exits with the documented code and one line naming the CCD
    args = _process_t00_args(repo, visit_msg)
    capsys.readouterr()
    assert main(args) == 66
    err = capsys.readouterr().err
    assert err.startswith("apdask: error: CCD T00, visit 1000: no r-band template")
    assert err.count("\n") == 1
    _nothing_stored(repo, "T00")


def _process_t00_args(repo, visit_msg):
    """``apdask process-ccd`` arguments for CCD T00 of the test visit."""
    return [
        "process-ccd", "--ccd", "T00", "--ra", str(visit_msg["position"][0]),
        "--dec", str(visit_msg["position"][1]), "--filter", "r", "--exptime", "30",
        "--distributor", f"file://{repo}/raw", "--image", f"TestCam_{VISIT}_T00_0.fits",
        "--repo", repo, "--timeout", "5",
    ]  # fmt: skip


# --------------------------------------------------------------------------------------
# PSF


def test_psf_failure_names_the_ccd_and_the_reason(repo, visit_msg, capsys):
    rng = np.random.default_rng(5)

    def edit(amp, seg):  # sky and noise only: no star to build a PSF from
        data = seg[amp.data_slice]
        seg[amp.data_slice] = np.median(data) + rng.normal(0, 20, data.shape)

    _rewrite_raw(repo, "T00", edit)
    args = _process_t00_args(repo, visit_msg)
    assert main(args) == 70
    err = capsys.readouterr().err
    assert err.startswith("apdask: error: CCD T00, visit 1000: science image: PSF estimation")
    assert "only 0 bright isolated unmasked stars (need 5;" in err and err.count("\n") == 1
    _nothing_stored(repo, "T00")


# --------------------------------------------------------------------------------------
# Image products


def test_unwritable_products_fail_the_ccd_after_its_alerts(repo, visit_msg):
    """A difference image that cannot be written is not a silent loss: the CCD fails with
    exit code 73 (ProductWriteError), after its alerts and PPDB rows went out."""
    blocker = os.path.join(repo, "products-blocked")
    with open(blocker, "w") as fh:
        fh.write("a file where the products directory should be")
    with (
        dask.config.set({"apdask.products.dir": blocker}),
        pytest.raises(ProductWriteError, match="cannot write the difference image") as e,
    ):
        run_visit(NextVisit.from_dict(visit_msg), repo=repo, timeout=10)
    assert e.value.exit_code == 73 and "also failed: T01 (ProductWriteError)" in str(e.value)
    # the alerts and PPDB rows went out before the images were written
    counts = Ppdb.open(ensure_ppdb(repo)).apdb.tableRowCount()
    n_alerts = sum(len(_ccd_alerts(repo, ccd)) for ccd in ("T00", "T01"))
    assert n_alerts > 0 and counts["DiaSource"] == n_alerts
