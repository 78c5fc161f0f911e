"""apdask.tools.plot: what each figure holds, and that no backend is ever selected."""

from __future__ import annotations

import io
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from astropy.nddata import CCDData
from astropy.table import Table

pytest.importorskip("matplotlib")

import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PatchCollection, PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from apdask.core.camera import get_camera  # noqa: E402
from apdask.tools import plot  # noqa: E402

ROOT = pathlib.Path(__file__).parents[2]


@pytest.fixture(autouse=True)
def _agg():
    """Agg for every test, set by the test (the library never sets one); figures closed."""
    before = matplotlib.get_backend()
    plt.switch_backend("agg")
    yield
    plt.close("all")
    plt.switch_backend(before)


def _image_axes(fig):
    return [ax for ax in fig.axes if ax.get_images()]


def _scatter_counts(ax):
    """Marker count of each labelled scatter collection of ``ax``."""
    return {
        c.get_label(): len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection)
    }


def _images(seed=3, shape=(40, 50)):
    rng = np.random.default_rng(seed)
    sci = rng.normal(100.0, 5.0, shape)
    tpl = rng.normal(100.0, 3.0, shape)
    return sci, tpl, sci - tpl


def _sources():
    return Table(
        {
            "x": [5.0, 10.0, 20.0, 30.0, 31.0, 45.0],
            "y": [5.0, 30.0, 15.0, 20.0, 21.0, 35.0],
            "psfFlux": [900.0, 400.0, -300.0, 500.0, -500.0, -80.0],
            "isNegative": [False, False, True, False, True, True],
            "isDipole": [False, False, False, True, True, False],
        }
    )


# --------------------------------------------------------------------------------------
# backend and optional dependency


def test_no_module_of_apdask_calls_matplotlib_use():
    offenders = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "apdask").rglob("*.py")
        if re.search(r"matplotlib\.use\(|\buse\(\s*['\"]agg", p.read_text(), re.I)
    ]
    assert offenders == []


def test_import_is_lazy_and_backend_is_left_alone():
    """In a fresh interpreter: no matplotlib on import; drawing keeps the chosen backend."""
    code = (
        "import sys, apdask.tools.plot as p\n"
        "assert 'matplotlib' not in sys.modules, 'imported eagerly'\n"
        "import matplotlib.pyplot as plt\n"
        "plt.switch_backend('svg')\n"
        "import numpy as np\n"
        "a = np.arange(64.0).reshape(8, 8)\n"
        "p.image_triplet(a, a, a); p.stage_timings({'warp': 1.0})\n"
        "from apdask.tools.evaluate import plot_evaluation\n"
        "import matplotlib\n"
        "print(matplotlib.get_backend())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    assert out.stdout.strip() == "svg"


def test_drawing_does_not_change_the_backend(tmp_path):
    from apdask.tools.evaluate import plot_evaluation

    plt.switch_backend("svg")
    sci, tpl, diff = _images()
    plot.image_triplet(sci, tpl, diff, _sources())
    plot.light_curve(_lc_table())
    plot.focal_plane({"T00": 1.0}, "testcam")
    plot.stage_timings({"warp": 1.0})
    res = {
        "completeness_bins": [{"n": 4, "snr_lo": 5.0, "snr_hi": 6.0, "completeness": 0.5}],
        "visit": 1,
        "n_transients_found": 2,
        "n_transients": 4,
        "flux_pull_sigma": 1.0,
        "flux_bias_median": 0.0,
        "noise_ratio": 1.0,
        "ccds": ["T00"],
        "false_positives_by_ccd": {},
        "false_positives_per_ccd": 0.0,
    }
    plot_evaluation(
        res, {"pull": [0.1, -0.2], "sep": [0.01, 0.02], "snr_meas": [30, 40]}, tmp_path / "e.png"
    )
    assert matplotlib.get_backend() == "svg"
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    with pytest.raises(ImportError, match=r"apdask\[notebook\]"):
        plot.stage_timings({"warp": 1.0})


def test_draws_into_a_given_figure_without_pyplot():
    fig = Figure()
    n = len(plt.get_fignums())
    assert plot.stage_timings({"warp": 1.0, "subtract": 2.0}, fig=fig) is fig
    assert len(plt.get_fignums()) == n


# --------------------------------------------------------------------------------------
# triplet


def test_triplet_shows_the_inputs_and_marks_each_kind():
    sci, tpl, diff = _images()
    fig = plot.image_triplet(sci, tpl, diff, _sources())
    axes = _image_axes(fig)
    assert len(axes) == 3 and len(fig.axes) == 3
    for ax, want in zip(axes, (sci, tpl, diff), strict=True):
        (im,) = ax.get_images()
        np.testing.assert_array_equal(im.get_array(), want)
        assert im.origin == "lower"
        # positive: rows 0, 1; negative: row 2 and 5; dipole: rows 3, 4
        assert _scatter_counts(ax) == {"positive": 2, "negative": 2, "dipole": 2}
    sc = {c.get_label(): c for c in axes[2].collections}
    np.testing.assert_array_equal(sc["dipole"].get_offsets(), [[30.0, 20.0], [31.0, 21.0]])
    assert axes[2].get_legend() is not None


def test_triplet_places_ra_dec_sources_with_the_wcs_of_ccddata():
    from astropy.wcs import WCS

    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, -30.0]
    w.wcs.crpix = [25.0, 20.0]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    sci, tpl, diff = (CCDData(a, unit="nJy", wcs=w) for a in _images())
    ra, dec = w.pixel_to_world_values([3.0, 17.0], [4.0, 9.0])
    src = [
        {"ra": ra[0], "dec": dec[0], "psfFlux": 10.0},
        {"ra": ra[1], "dec": dec[1], "psfFlux": -10.0},
    ]
    fig = plot.image_triplet(sci, tpl, diff, src, stretch="asinh")
    ax = _image_axes(fig)[2]
    np.testing.assert_array_equal(ax.get_images()[0].get_array(), diff.data)
    sc = {c.get_label(): c.get_offsets() for c in ax.collections}
    np.testing.assert_allclose(sc["positive"], [[3.0, 4.0]], atol=1e-6)
    np.testing.assert_allclose(sc["negative"], [[17.0, 9.0]], atol=1e-6)


def test_triplet_without_sources_and_with_nan_pixels():
    sci, tpl, diff = _images()
    diff[:5] = np.nan
    fig = plot.image_triplet(sci, tpl, diff)
    assert all(_scatter_counts(ax) == {} for ax in fig.axes)


def test_triplet_checks_shapes_and_stretch():
    sci, tpl, diff = _images()
    with pytest.raises(ValueError, match="one shape"):
        plot.image_triplet(sci, tpl[:-1], diff)
    with pytest.raises(ValueError, match="stretch must be"):
        plot.image_triplet(sci, tpl, diff, stretch="log")
    with pytest.raises(ValueError, match="ra and dec with a WCS"):
        plot.image_triplet(sci, tpl, diff, [{"ra": 1.0, "dec": 2.0}])


# --------------------------------------------------------------------------------------
# alert cutouts


def _fits_bytes(arr):
    buf = io.BytesIO()
    CCDData(arr, unit="nJy").write(buf, format="fits")
    return buf.getvalue()


def test_alert_cutouts_show_the_three_fits_stamps():
    sci, tpl, diff = (a[:30, :30] for a in _images())
    alert = {
        "diaSourceId": 42,
        "diaSource": {"psfFlux": 1234.0, "snr": 12.5},
        "cutoutScience": _fits_bytes(sci),
        "cutoutTemplate": _fits_bytes(tpl),
        "cutoutDifference": _fits_bytes(diff),
    }
    fig = plot.alert_cutouts(alert)
    axes = _image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["science", "template", "difference"]
    for ax, want in zip(axes, (sci, tpl, diff), strict=True):
        np.testing.assert_allclose(ax.get_images()[0].get_array(), want)
    assert "42" in fig._suptitle.get_text() and "12.5" in fig._suptitle.get_text()


def test_alert_without_a_template_cutout():
    sci, _, diff = _images()
    alert = {
        "diaSourceId": 1,
        "cutoutScience": _fits_bytes(sci),
        "cutoutTemplate": None,
        "cutoutDifference": _fits_bytes(diff),
    }
    fig = plot.alert_cutouts(alert)
    assert len(fig.axes) == 3 and len(_image_axes(fig)) == 2
    assert any(t.get_text() == "no cutout" for t in fig.axes[1].texts)
    with pytest.raises(TypeError, match="decoded packet dict"):
        plot.alert_cutouts(b"\x00")


# --------------------------------------------------------------------------------------
# light curve


def _lc_table():
    return Table(
        {
            "diaObjectId": [7] * 6,
            "midpointMjdTai": [60000.1, 60001.2, 60002.3, 60003.1, 60004.0, 60005.5],
            "psfFlux": [1000.0, 2000.0, -50.0, 3631.0, 800.0, 1500.0],
            "psfFluxErr": [50.0, 60.0, 40.0, 70.0, 45.0, 55.0],
            "band": ["g", "r", "r", "i", "g", "r"],
        }
    )


def test_light_curve_has_one_point_per_row_with_errors():
    t = _lc_table()
    fig = plot.light_curve(t)
    ax = fig.axes[0]
    containers = {c.get_label(): c for c in ax.containers}
    assert sorted(containers) == ["g", "i", "r"]
    assert sum(len(c.lines[0].get_xdata()) for c in containers.values()) == len(t)
    r = containers["r"]
    sel = t["band"] == "r"
    np.testing.assert_array_equal(r.lines[0].get_xdata(), t["midpointMjdTai"][sel])
    np.testing.assert_array_equal(r.lines[0].get_ydata(), t["psfFlux"][sel])
    (bars,) = r.lines[2]  # the y error bars: segments from flux - err to flux + err
    lo_hi = np.array([seg[:, 1] for seg in bars.get_segments()])
    np.testing.assert_allclose(lo_hi[:, 1] - lo_hi[:, 0], 2 * t["psfFluxErr"][sel])
    assert ax.get_title() == "diaObjectId 7"
    assert ax.get_ylabel() == "psfFlux (nJy)"
    (sec,) = [c for c in ax.child_axes if c.get_ylabel() == "AB magnitude"]
    ticks = sec.get_yticks()
    assert len(ticks) and np.all(ticks > 20) and np.all(ticks < 35)


def test_magnitude_conversion():
    assert plot.njy_to_mag(3631e9) == pytest.approx(0.0, abs=1e-3)  # 3631 Jy is AB 0
    assert plot.njy_to_mag(1.0) == pytest.approx(31.4)
    assert np.isnan(plot.njy_to_mag(-5.0))
    np.testing.assert_allclose(plot.mag_to_njy(plot.njy_to_mag([10.0, 1e5])), [10.0, 1e5])


def test_light_curve_needs_its_columns():
    with pytest.raises(ValueError, match="psfFluxErr"):
        plot.light_curve(Table({"midpointMjdTai": [1.0], "psfFlux": [1.0], "band": ["r"]}))


def test_light_curve_into_a_given_axes():
    fig, (a, b) = plt.subplots(1, 2)
    assert plot.light_curve(_lc_table(), ax=b) is fig
    assert not a.containers and len(b.containers) == 3


# --------------------------------------------------------------------------------------
# focal plane


def test_focal_plane_colours_each_ccd_by_its_value():
    cam = get_camera("lsstcam")
    values = {d.name: float(d.id) for d in cam if d.name.startswith("R22")}
    values["R01_S00"] = np.nan
    fig = plot.focal_plane(values, "lsstcam", label="alerts")
    ax = fig.axes[0]
    on, off = [c for c in ax.collections if isinstance(c, PatchCollection)]
    assert len(on.get_paths()) == 10 and len(off.get_paths()) == len(cam) - 10
    arr = on.get_array()
    assert arr.mask.sum() == 1  # the NaN
    assert sorted(arr.compressed().tolist()) == sorted(v for v in values.values() if v == v)
    assert fig.axes[1].get_ylabel() == "alerts"  # the colour bar


def test_focal_plane_of_the_test_camera_by_id_places_the_ccds():
    cam = get_camera("testcam")
    fig = plot.focal_plane({0: 3, 1: 5}, cam)
    ax = fig.axes[0]
    on = ax.collections[0]
    assert on.get_array().tolist() == [3.0, 5.0]
    for path, det in zip(on.get_paths(), cam, strict=True):  # paths are in focal-plane mm
        corners = path.vertices[:4]
        np.testing.assert_allclose(corners.mean(axis=0), [det.fp_x, det.fp_y], atol=1e-9)
        np.testing.assert_allclose(np.ptp(corners, axis=0), [5.12, 5.12], atol=1e-9)
    assert [t.get_text().split("\n")[0] for t in ax.texts] == ["T00", "T01"]


def test_focal_plane_unknown_detector():
    with pytest.raises(ValueError, match="unknown detector 'R99'"):
        plot.focal_plane({"R99": 1.0}, "testcam")


# --------------------------------------------------------------------------------------
# stage timings


def _bars(ax):
    return [p for p in ax.patches if p.get_width() is not None]


def test_stage_timings_of_a_dict_one_bar_per_stage():
    t = {"prefetch_butler": 0.5, "calibrate": 1.25, "psf+subtract": 3.0}
    fig = plot.stage_timings(t)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert len(bars) == 3
    assert [b.get_width() for b in bars] == list(t.values())
    assert [lab.get_text() for lab in ax.get_yticklabels()] == list(t)


def test_stage_timings_of_a_visit_report_stack_stages_per_ccd():
    report = {
        "visit": 1000,
        "ccds": [
            {"detector": "T00", "timings": {"calibrate": 1.0, "warp": 2.0, "detect+measure": 0.5}},
            {"detector": "T01", "timings": {"calibrate": 1.5, "warp": 1.0}},
            {"detector": "T02", "error": "no template", "timings": {}},
        ],
    }
    fig = plot.stage_timings(report)
    ax = fig.axes[0]
    bars = _bars(ax)
    assert len(bars) == 2 * 3  # two CCDs with timings × three stages
    assert [lab.get_text() for lab in ax.get_yticklabels()] == ["T00", "T01"]
    ends = {}
    for b in bars:
        y = round(b.get_y() + b.get_height() / 2)
        ends[y] = max(ends.get(y, 0.0), b.get_x() + b.get_width())
    assert ends == {0: pytest.approx(3.5), 1: pytest.approx(2.5)}
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "calibrate",
        "warp",
        "detect+measure",
    ]
    assert "1000" in ax.get_title()


def test_stage_timings_of_one_ccd_report():
    fig = plot.stage_timings({"detector": "T00", "timings": {"warp": 2.0, "calibrate": 1.0}})
    assert len(_bars(fig.axes[0])) == 2
    assert fig.axes[0].get_title() == "T00: 3.0 s"
    with pytest.raises(TypeError, match="timings must be a dict"):
        plot.stage_timings([1.0, 2.0])


# --------------------------------------------------------------------------------------
# task stream


def _stream_records():
    """Two worker threads: T00's chain on one, T01's on the other, one transfer."""

    def rec(key, thread, start, stop, action="compute", w="tcp://127.0.0.1:4001"):
        return {"key": key, "worker": w, "thread": thread,
                "startstops": ({"action": action, "start": start, "stop": stop},)}  # fmt: skip

    return [
        rec("calibrate-1000-T00", 11, 100.0, 101.0),
        rec("calibrate-1000-T01", 12, 100.5, 102.0),
        rec("subtract-1000-T00", 11, 101.0, 103.5),
        rec(("isr_amp-" + "0f" * 16, 0), 12, 102.0, 102.5),  # a dask array chunk
        rec("subtract-1000-T01", 11, 103.5, 104.0, action="transfer"),
        rec("store-1000-T00", 11, 104.0, 104.25, w="tcp://127.0.0.1:4002"),  # another worker
    ]


def test_task_stream_one_row_per_thread_one_bar_per_task_by_stage():
    fig = plot.task_stream(_stream_records())
    ax = fig.axes[0]
    bars = {c.get_label(): c for c in ax.containers}
    assert list(bars) == ["calibrate", "subtract", "isr_amp", "store", "transfer"]  # by start
    extents = {
        name: [(b.get_x(), b.get_width(), b.get_y() + b.get_height() / 2) for b in c]
        for name, c in bars.items()
    }
    # (start since the first start, duration, row): thread 11 is row 0, thread 12 row 1
    assert extents["calibrate"] == [(0.0, 1.0, 0.0), (0.5, 1.5, 1.0)]
    assert extents["subtract"] == [(1.0, 2.5, 0.0)]
    assert extents["isr_amp"] == [(2.0, 0.5, 1.0)]
    assert extents["transfer"] == [(3.5, 0.5, 0.0)]
    assert extents["store"] == [(4.0, 0.25, 2.0)]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        "worker 0, thread 0",
        "worker 0, thread 1",
        "worker 1, thread 0",
    ]
    assert ax.get_title() == "task stream: 6 tasks on 3 threads"
    with pytest.raises(TypeError, match="list of task-stream dicts"):
        plot.task_stream({"calibrate": 1.0})


def test_figures_render_to_png():
    sci, tpl, diff = _images()
    for fig in (
        plot.image_triplet(sci, tpl, diff, _sources()),
        plot.light_curve(_lc_table()),
        plot.focal_plane({"T00": 1.0, "T01": 2.0}, "testcam"),
        plot.stage_timings({"warp": 1.0}),
        plot.task_stream(_stream_records()),
    ):
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert buf.getvalue()[:4] == b"\x89PNG"
