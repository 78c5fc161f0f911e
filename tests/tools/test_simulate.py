"""Tests of apdask.simulate on the test camera."""

import filecmp
import json
import os
import time

import numpy as np
import pytest
from astropy.table import Table

from apdask.core.camera import get_camera, njy_per_electron
from apdask.io.butler import Butler
from apdask.io.raw import assembled_amp, raw_name, read_raw
from apdask.tools.simulate import simulate_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = tmp_path_factory.mktemp("sim") / "repo"
    t0 = time.perf_counter()
    msgs = simulate_repo("testcam", path, n_visits=2, seed=3)
    elapsed = time.perf_counter() - t0
    return path, msgs, elapsed


def test_fast_enough(repo):
    assert repo[2] < 5.0


def test_next_visit_messages(repo):
    path, msgs, _ = repo
    assert [m["visit"] for m in msgs] == [1000, 1001]
    on_disk = json.loads((path / "visits" / "visit_1001.json").read_text())
    assert on_disk == msgs[1]
    m = msgs[0]
    assert m["instrument"] == "TestCam" and m["detectors"] == ["T00", "T01"]
    assert m["filters"] == "r" and m["duration"] == 30.0 and m["coordinateSystem"] == "ICRS"
    ra, dec = m["position"]
    assert abs(ra - 150.0) < 0.01 and abs(dec + 30.0) < 0.01


def test_deterministic(repo, tmp_path):
    path, _, _ = repo
    other = tmp_path / "again"
    simulate_repo("testcam", other, n_visits=2, seed=3)
    for sub in ("raw", "truth", "visits"):
        names = sorted(os.listdir(path / sub))
        assert names == sorted(os.listdir(other / sub)) and names
        for n in names:
            assert filecmp.cmp(path / sub / n, other / sub / n, shallow=False), n
    third = tmp_path / "seed4"
    simulate_repo("testcam", third, n_visits=1, seed=4)
    n = raw_name("TestCam", 1000, "T00")
    assert not filecmp.cmp(path / "raw" / n, third / "raw" / n, shallow=False)


def _assembled_electrons(raw):
    det = raw.detector
    img = np.zeros(det.shape, np.float32)
    for seg, amp in zip(raw.amps, det.amplifiers, strict=True):
        s = seg.compute()
        level = np.median(s[amp.overscan_slice])
        img[amp.y0 : amp.y1, amp.x0 : amp.x1] = (assembled_amp(s, amp) - level) * amp.gain
    return img


def test_truth_and_transients(repo):
    path, msgs, _ = repo
    for m in msgs:
        truth = Table.read(path / "truth" / f"visit_{m['visit']}.ecsv")
        assert {"source_id", "kind", "detector", "ra", "dec", "x", "y", "flux",
                "template_flux"} <= set(truth.colnames)  # fmt: skip
        assert len(truth.meta["pointing_error_arcsec"]) == 2
        assert np.all(np.abs(truth.meta["pointing_error_arcsec"]) <= 1.0)
        tr = truth[truth["kind"] == "transient"]
        assert np.all(tr["template_flux"] == 0)
        for det in get_camera("testcam"):
            on = tr[tr["detector"] == det.name]
            assert len(on) >= 12
            assert np.all((on["x"] > 30) & (on["x"] < det.nx - 31))
            assert np.all((on["y"] > 30) & (on["y"] < det.ny - 31))
    # persistence: transients of the first visit are seen again
    t0 = Table.read(path / "truth" / "visit_1000.ecsv")
    t1 = Table.read(path / "truth" / "visit_1001.ecsv")
    ids0 = set(t0["source_id"][t0["kind"] == "transient"])
    ids1 = set(t1["source_id"][t1["kind"] == "transient"])
    assert ids0 < ids1
    assert {"star", "galaxy", "variable", "transient"} <= set(t0["kind"])


def test_transients_are_bright_pixels(repo):
    path, _, _ = repo
    truth = Table.read(path / "truth" / "visit_1001.ecsv")
    raw = read_raw(path / "raw" / raw_name("TestCam", 1001, "T01"))
    img = _assembled_electrons(raw)
    sky = np.median(img)
    noise = 1.4826 * np.median(np.abs(img - sky))
    tr = truth[(truth["kind"] == "transient") & (truth["detector"] == "T01")]
    bright = tr[tr["flux"] > np.median(tr["flux"])]
    assert len(bright) >= 5
    for r in bright:
        x, y = int(round(r["x"])), int(round(r["y"]))
        assert img[y - 1 : y + 2, x - 1 : x + 2].max() - sky > 3 * noise


def test_templates_cover_ccds(repo):
    path, msgs, _ = repo
    b = Butler(path)
    cam = get_camera("testcam")
    for m in msgs:
        for det in cam:
            corners = det.footprint(*m["position"], padding_arcsec=10.0)
            tiles = b.get_templates("r", corners)
            assert tiles
            for ra, dec in corners:
                assert any(
                    0 <= px < t.image.shape[1] - 0.5 and 0 <= py < t.image.shape[0] - 0.5
                    for t in tiles
                    for px, py in [t.wcs.world_to_pixel_values(ra, dec)]
                )
            assert all(t.psf is not None and abs(t.psf.sum() - 1) < 1e-5 for t in tiles)


def test_calibs(repo):
    path, msgs, _ = repo
    b = Butler(path)
    for det in get_camera("testcam"):
        bias = b.get_calib("bias", det.id, None, msgs[0]["mjd"])
        dark = b.get_calib("dark", det.id, None, msgs[0]["mjd"])
        flat = b.get_calib("flat", det.id, "r", msgs[1]["mjd"])
        assert bias.shape == dark.shape == flat.shape == det.shape
        assert abs(flat.mean() - 1) < 1e-4 and flat.min() > 0.95 and flat.max() < 1.05
        assert (dark > 10).any(axis=0).sum() == 1  # one hot column
        assert np.median(dark) == pytest.approx(0.002)
    assert len(b.get_drp_objects()) > 50


def test_asteroids_are_trails_in_the_pixels_and_the_truth(repo, tmp_path):
    """``asteroids=N``: N trailed sources per CCD in the science raw only, PSF ⊗
    segment, with their length and axis in the truth table; nothing else changes."""
    path, _, _ = repo
    other = tmp_path / "asteroids"
    simulate_repo("testcam", other, n_visits=2, seed=3, asteroids=3)
    truth = Table.read(other / "truth" / "visit_1000.ecsv")
    ast = truth[truth["kind"] == "asteroid"]
    assert len(ast) == 3 * len(get_camera("testcam"))
    scale = 0.2  # arcsec per pixel of the test camera
    assert np.all(
        (ast["trail_length"] > 5 * scale * 0.95) & (ast["trail_length"] < 30 * scale * 1.05)
    )
    assert np.all((ast["trail_angle"] >= 0) & (ast["trail_angle"] < 180))
    assert np.all(ast["template_flux"] == 0) and np.all(ast["flux"] > 0)
    # the other sources are those of the run without asteroids
    plain = Table.read(path / "truth" / "visit_1000.ecsv")
    rest = truth[truth["kind"] != "asteroid"]
    assert np.all(rest["source_id"] == plain["source_id"]) and np.all(rest["x"] == plain["x"])
    assert "trail_length" not in plain.colnames
    for det in get_camera("testcam"):
        with_ast = _assembled_electrons(
            read_raw(other / "raw" / raw_name("TestCam", 1000, det.name))
        )
        without = _assembled_electrons(read_raw(path / "raw" / raw_name("TestCam", 1000, det.name)))
        diff = with_ast - without  # the same noise draws: the trails and their extra noise
        for r in ast[ast["detector"] == det.name]:
            x, y = float(r["x"]), float(r["y"])
            h = 25
            cut = diff[int(y) - h : int(y) + h + 1, int(x) - h : int(x) + h + 1].astype(float)
            yy, xx = (
                np.mgrid[-h : h + 1, -h : h + 1] + np.array([int(y) - y, int(x) - x])[:, None, None]
            )
            k = r["flux"] / njy_per_electron("r", 30.0)
            assert cut.sum() == pytest.approx(k, rel=0.1)
            # second moments: the trail's axis and length (variance L²/12 + sigma² along it)
            ixx, iyy, ixy = (
                (cut * a * b).sum() / cut.sum() for a, b in ((xx, xx), (yy, yy), (xx, yy))
            )
            tr, det_ = ixx + iyy, np.sqrt((ixx - iyy) ** 2 + 4 * ixy**2)
            along, across = 0.5 * (tr + det_), 0.5 * (tr - det_)
            length_px = np.sqrt(12 * (along - across))
            assert length_px * scale == pytest.approx(r["trail_length"], rel=0.1)
        # away from the trails nothing changed
        far = np.ones(det.shape, bool)
        for r in ast[ast["detector"] == det.name]:
            far[
                max(int(r["y"]) - 30, 0) : int(r["y"]) + 31,
                max(int(r["x"]) - 30, 0) : int(r["x"]) + 31,
            ] = False
        assert np.all(diff[far] == 0)


def _kinds_per_ccd(path, visit, kind):
    truth = Table.read(path / "truth" / f"visit_{visit}.ecsv")
    rows = truth[truth["kind"] == kind]
    return {d: int((rows["detector"] == d).sum()) for d in ("T00", "T01")}, rows


def test_transients_per_ccd_and_variable_fraction(repo, tmp_path):
    """``transients_per_ccd`` sets the density; ``variable_fraction`` the varying stars."""
    path = tmp_path / "dense"
    simulate_repo("testcam", path, n_visits=2, seed=3, transients_per_ccd=30,
                  variable_fraction=0.0)  # fmt: skip
    first, tr0 = _kinds_per_ccd(path, 1000, "transient")
    second, tr1 = _kinds_per_ccd(path, 1001, "transient")
    assert first == {"T00": 30, "T01": 30}  # default 12
    assert second == {"T00": 40, "T01": 40}  # the first visit's 30 and ceil(30 / 3) new
    assert set(tr0["source_id"]) < set(tr1["source_id"])
    for d in ("T00", "T01"):  # each visit's new transients are placed 12 px apart
        on = tr0[tr0["detector"] == d]
        sep = np.hypot(np.subtract.outer(on["x"], on["x"]), np.subtract.outer(on["y"], on["y"]))
        assert sep[~np.eye(len(on), dtype=bool)].min() > 12
    # no variable stars; the default run has some
    assert _kinds_per_ccd(path, 1000, "variable")[0] == {"T00": 0, "T01": 0}
    assert sum(_kinds_per_ccd(repo[0], 1000, "variable")[0].values()) > 0
    # the static sky is otherwise the same: same stars and galaxies at the same places
    stars, _ = _kinds_per_ccd(path, 1000, "star")
    default_stars, _ = _kinds_per_ccd(repo[0], 1000, "star")
    default_var, _ = _kinds_per_ccd(repo[0], 1000, "variable")
    assert stars == {d: default_stars[d] + default_var[d] for d in stars}
    # the transients are in the pixels
    raw = read_raw(path / "raw" / raw_name("TestCam", 1000, "T00"))
    img = _assembled_electrons(raw)
    sky = np.median(img)
    bright = tr0[(tr0["detector"] == "T00") & (tr0["flux"] > np.median(tr0["flux"]))]
    xy = [(int(round(r["x"])), int(round(r["y"]))) for r in bright]
    peaks = [img[y - 1 : y + 2, x - 1 : x + 2].max() - sky for x, y in xy]
    noise = 1.4826 * np.median(np.abs(img - sky))
    assert np.mean(np.array(peaks) > 3 * noise) > 0.9


def test_transient_and_variable_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="transients_per_ccd"):
        simulate_repo("testcam", tmp_path / "a", n_visits=1, transients_per_ccd=-1)
    with pytest.raises(ValueError, match="variable_fraction"):
        simulate_repo("testcam", tmp_path / "b", n_visits=1, variable_fraction=1.5)
