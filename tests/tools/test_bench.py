"""``apdask bench``: runs the scripts in benchmarks/ and reports figures against targets."""

import json

from apdask.cli.main import main
from apdask.tools.bench import BENCHMARKS, find_benchmark_dir


def test_every_benchmark_script_exists():
    d = find_benchmark_dir()
    assert sorted(p.name for p in d.glob("bench_*.py")) == sorted(
        b.script for b in BENCHMARKS.values()
    )


def test_bench_association_report(tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["bench", "--only", "association", "--quick", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    b = report["benchmarks"]["association"]
    assert b["returncode"] == 0 and b["report"]["objects"] == 100_000
    speed, correct = b["checks"]
    assert speed["target"] == "<= 50" and 0 < speed["value"] < 5_000
    assert speed["met"] is None  # --quick figures are not judged
    assert correct["value"] == 1.0  # the optimal assignment recovers every planted match
    assert "associate 1,000 vs 100,000" in capsys.readouterr().out


def test_unknown_benchmark_is_a_usage_error(tmp_path, capsys):
    assert main(["bench", "--only", "nosuch", "--out", str(tmp_path / "r.json")]) == 78
    assert "unknown benchmark" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
