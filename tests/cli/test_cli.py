"""The apdask command: DMTN-092 invocation, bad input and exit codes."""

import json
import os
import shutil
from pathlib import Path

import pytest

from apdask.cli.main import main


def _ccd_args(repo, ccd="T00", ra="150.0", dec="-30.0", band="r", image=None, timeout="2"):
    image = image or f"TestCam_1000_{ccd}_0.fits"
    return [
        "process-ccd", "--ccd", ccd, "--ra", ra, "--dec", dec, "--filter", band,
        "--exptime", "30", "--distributor", f"file://{repo}/raw", "--image", image,
        "--repo", repo, "--timeout", timeout,
    ]  # fmt: skip


def _nothing_written(repo):
    alerts = os.path.join(repo, "alerts")
    files = [f for _, _, fs in os.walk(alerts) for f in fs] if os.path.isdir(alerts) else []
    assert files == []
    db = os.path.join(repo, "ppdb", "apdb.db")
    if os.path.exists(db):
        from apdask.ppdb import Ppdb

        counts = Ppdb.open(os.path.join(repo, "ppdb", "apdb.yaml")).apdb.tableRowCount()
        assert counts.get("DiaSource", 0) == 0 and counts.get("DiaObject", 0) == 0


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        ({"ccd": "R22_S11"}, 64, ["unknown CCD", "T00"]),
        ({"ra": "361"}, 64, ["RA", "[0, 360)"]),
        ({"dec": "-95"}, 64, ["Dec"]),
        ({"band": "H"}, 64, ["unknown filter", "--filter"]),
        ({"image": "TestCam_9999_T00_0.fits", "timeout": "0.5"}, 75, ["TestCam_9999_T00_0.fits"]),
        ({"image": "TestCam_1000_T01_0.fits"}, 65, ["CCD T01", "--ccd T00"]),  # before waiting
        ({"band": "g"}, 65, ["FILTBAND=r"]),
    ],
)
def test_process_ccd_bad_input(repo, capsys, kwargs, code, words):
    assert main(_ccd_args(repo, **kwargs)) == code
    err = capsys.readouterr().err
    assert err.startswith("apdask: error:") and err.count("\n") == 1
    for w in words:
        assert w in err
    _nothing_written(repo)


def test_process_ccd_corrupt_raw(repo, capsys):
    src = os.path.join(repo, "raw", "TestCam_1000_T00_0.fits")
    with open(src, "rb") as fh:
        data = fh.read()
    with open(os.path.join(repo, "raw", "broken.fits"), "wb") as fh:
        fh.write(data[: len(data) // 3])
    assert main(_ccd_args(repo, image="broken.fits")) == 65
    assert "broken.fits" in capsys.readouterr().err
    _nothing_written(repo)


def test_process_ccd_unknown_repo(tmp_path, capsys):
    assert main(_ccd_args(str(tmp_path / "nowhere"))) == 78
    assert "simulate" in capsys.readouterr().err


def test_process_ccd_writes_alerts_and_validate(repo, capsys):
    assert main(_ccd_args(repo)) == 0
    capsys.readouterr()
    assert os.path.exists(os.path.join(repo, "alerts", "visit_1000", "1000_0.avro"))
    assert main(["alerts", "validate", f"file://{repo}/alerts"]) == 0
    out = capsys.readouterr().out
    assert '"problems": []' in out
    assert main(["alerts", "tail", f"{repo}/alerts"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines and all("diaSourceId=" in line for line in lines)


def test_simulate_and_ingest_commands(tmp_path, capsys):
    repo = str(tmp_path / "r")
    assert main(["simulate", "--camera", "testcam", "--repo", repo, "--visits", "1"]) == 0
    assert os.path.exists(os.path.join(repo, "visits", "visit_1000.json"))
    # A corrupt FITS cannot be ingested as a template.
    bad = tmp_path / "bad.fits"
    bad.write_bytes(b"not fits at all")
    assert main(["butler", "ingest-template", str(bad), "--filter", "r", "--repo", repo]) == 65
    err = capsys.readouterr().err
    assert "simulate: raws 2/2 (CCD-visits)" in err  # progress on stderr
    # Issue 15: an existing repository is replaced only with --overwrite, and whole.
    stray = os.path.join(repo, "alerts", "old.avro")
    os.makedirs(os.path.dirname(stray))
    Path(stray).write_bytes(b"x")
    args = ["simulate", "--camera", "testcam", "--repo", repo, "--visits", "1", "--seed", "3"]
    assert main(args) == 64
    assert "pass --overwrite to replace it whole" in capsys.readouterr().err
    assert os.path.exists(stray)
    assert main([*args, "--overwrite"]) == 0
    assert not os.path.exists(stray)
    assert os.path.exists(os.path.join(repo, "visits", "visit_1000.json"))
    # a directory that is not a repository is never removed
    other = tmp_path / "mine"
    other.mkdir()
    (other / "thesis.tex").write_text("keep me")
    assert main(["simulate", "--camera", "testcam", "--repo", str(other), "--overwrite"]) == 64
    assert "not an apdask repository" in capsys.readouterr().err
    assert (other / "thesis.tex").read_text() == "keep me"
    shutil.rmtree(repo)


def test_simulate_asteroids_option(tmp_path, capsys):
    """``--asteroids N``: N trailed sources per CCD in the truth; a negative N is refused."""
    from astropy.table import Table

    repo = str(tmp_path / "r")
    args = ["simulate", "--camera", "testcam", "--repo", repo, "--visits", "1"]
    assert main([*args, "--asteroids", "-1"]) == 64
    assert "--asteroids" in capsys.readouterr().err
    assert main([*args, "--asteroids", "2"]) == 0
    truth = Table.read(os.path.join(repo, "truth", "visit_1000.ecsv"))
    ast = truth[truth["kind"] == "asteroid"]
    assert len(ast) == 4 and set(ast["detector"]) == {"T00", "T01"}
    assert {"trail_length", "trail_angle"} <= set(truth.colnames)


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [("--transients-per-ccd", "-1", "--transients-per-ccd must be >= 0"),
     ("--variable-fraction", "1.5", "--variable-fraction must be in [0, 1]"),
     ("--variable-fraction", "nan", "--variable-fraction must be in [0, 1]")],
)  # fmt: skip
def test_simulate_density_options_are_checked(tmp_path, capsys, option, value, words):
    repo = tmp_path / "never-made"
    argv = ["simulate", "--camera", "testcam", "--repo", str(repo), option, value]
    assert main(argv) == 64
    assert words in capsys.readouterr().err
    assert not repo.exists()


def test_process_ccd_exits_non_zero_when_its_ppdb_store_fails(repo, tmp_path, capsys):
    """A read-only PPDB: the history reads, the store fails; exit 69, nothing written.

    It used to exit 0 with ``stored: false`` (issue 19).  SQLite's own read-only mode
    (``mode=ro``) stands in for a read-only file, which root would ignore.
    """
    from apdask.ppdb import create_ppdb

    cfg = create_ppdb(f"sqlite:///{tmp_path / 'ro.db'}", str(tmp_path / "apdb.yaml"))
    text = Path(cfg).read_text()
    assert "mode=rw" in text
    Path(cfg).write_text(text.replace("mode=rw", "mode=ro"))
    rc = main([*_ccd_args(repo), "--ppdb", cfg])
    captured = capsys.readouterr()

    def no_nan(name):
        raise AssertionError(f"the report is not strict JSON: {name}")

    report = json.loads(captured.out, parse_constant=no_nan)
    (ccd,) = report["ccds"]
    assert "readonly database" in ccd["error"]
    assert not ccd["stored"] and ccd["n_alerts"] == 0
    assert rc == 69, captured.err  # PpdbError's documented code
    assert "1 CCD(s) failed: T00" in captured.err
    _nothing_written(repo)


def test_every_option_has_help_and_the_version_is_shown(capsys):
    """Issue 15: no option without help text; `apdask --version`."""
    import argparse

    from apdask.cli.parser import build_parser

    missing = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not action.help and action.dest != "help":
                missing.append(f"{' '.join(path)} {action.dest}")

    walk(build_parser(), ["apdask"])
    assert missing == []
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("apdask ")


def test_alerts_tail_lines_and_a_closed_pipe(repo):
    """`alerts tail | head` ends quietly; lines carry band, MJD and rounded fluxes."""
    import subprocess
    import sys

    assert main(_ccd_args(repo)) == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "apdask.cli", "alerts", "tail", os.path.join(repo, "alerts")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    first = proc.stdout.readline().decode()
    proc.stdout.close()  # the reader leaves, as `head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    # the reader gone before the first line: every write fails with EPIPE
    early = subprocess.Popen(
        [sys.executable, "-m", "apdask.cli", "alerts", "tail", os.path.join(repo, "alerts")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    early.stdout.close()
    err = early.stderr.read().decode()
    assert early.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert " band=r " in first and " mjd=" in first and " nJy " in first
    flux = first.split("psfFlux=")[1].split("±")[0]
    assert len(flux.split(".")[1]) == 1  # one decimal, not 15


def test_process_visit_shows_progress_a_table_and_writes_the_reports(repo, tmp_path, capsys):
    """Issue 15: the dashboard link and per-CCD lines on stderr, a short table on stdout,
    the full report as strict JSON in <repo>/reports, and a Dask performance report."""
    msg = os.path.join(repo, "visits", "visit_1000.json")
    html = tmp_path / "perf.html"
    rc = main(["process-visit", "--next-visit", msg, "--repo", repo, "--workers", "1",
               "--report", str(html)])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "apdask: Dask dashboard: http://" in err
    assert err.count("visit 1000 ") == 2 and "visit 1000 2/2 CCD T0" in err
    lines = out.splitlines()
    assert lines[0].startswith("visit 1000  2 CCDs processed, 0 already done,")
    assert lines[1].split() == ["CCD", "sources", "alerts", "stored", "latency_s", "QA", "error"]
    path = os.path.join(repo, "reports", "visit_1000.json")
    assert f"full report (JSON): {path}" in out

    def no_nan(name):
        raise AssertionError(f"not strict JSON: {name}")

    report = json.loads(Path(path).read_text(), parse_constant=no_nan)
    for line, ccd in zip(lines[2:4], report["ccds"], strict=True):
        assert line.split()[:3] == [ccd["detector"], str(ccd["n_sources"]), str(ccd["n_alerts"])]
    assert html.stat().st_size > 10_000 and b"bokeh" in html.read_bytes()[:200_000].lower()


def test_relative_paths_work_and_nothing_is_written_beside_the_repository(
    tmp_path, monkeypatch, capsys
):
    """Issue 19: a relative --repo, --next-visit and --alerts from another directory; every
    file lands in the repository (no stray apdb.yaml, report or scratch file in the
    working directory or in $HOME)."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["simulate", "--camera", "testcam", "--repo", "r", "--visits", "1"]) == 0
    rc = main(["process-visit", "--next-visit", "r/visits/visit_1000.json", "--repo", "r",
               "--alerts", "file://r/alerts", "--workers", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert sorted(os.listdir(work)) == ["r"]
    assert sorted(os.listdir(work / "r")) == [
        "alerts", "butler.zarr", "ppdb", "products", "raw", "reports", "truth", "visits"
    ]  # fmt: skip
    assert os.listdir(home) == []
    assert list((work / "r" / "alerts" / "visit_1000").glob("*.avro"))
    assert f"full report (JSON): {work / 'r' / 'reports' / 'visit_1000.json'}" in out
