"""``apdask demo`` (apdask.tools.demo): what a first-time user sees."""

from __future__ import annotations

import json

from apdask.tools.demo import run_demo


def test_demo_shows_progress_the_dashboard_and_a_strict_json_report(tmp_path, capsys):
    lines: list[str] = []
    report = run_demo(tmp_path / "demo", camera="testcam", n_visits=1, seed=3, workers=1,
                      out=lines.append)  # fmt: skip
    err = capsys.readouterr().err
    assert "simulate: raws 2/2 (CCD-visits)" in err
    assert "visit 1000 2/2 CCD T0" in err  # one plain line per CCD when not on a terminal
    assert any(line.startswith("Dask dashboard: http://") for line in lines)
    (visit,) = report["visits"]
    assert visit["alerts"] > 0 and visit["ccds_processed"] == 2
    assert f"  visit 1000: {visit['alerts']} alerts" in "\n".join(lines)

    def no_nan(name):
        raise AssertionError(f"not strict JSON: {name}")

    with open(report["report_path"]) as fh:
        saved = json.load(fh, parse_constant=no_nan)
    assert saved["visits"][0]["alerts"] == visit["alerts"]
    assert (tmp_path / "demo" / "products" / "visit_1000" / "difference_T00.fits").is_file()
