"""The scripts of ``docs/examples/`` run, and the generated docs references cover the code.

``independent_reader.py`` reads a topic that ``apdask process-ccd`` filled from the
simulated test-camera repository (``tests/conftest.py``), in a process of its own, as a
broker's engineer would run it.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import uuid

import pytest

from apdask.cli.main import main

ROOT = pathlib.Path(__file__).parents[1]
EXAMPLES = ROOT / "docs" / "examples"


@pytest.mark.service
def test_independent_reader_decodes_a_processed_ccd(repo, kafka_broker, capsys):
    from apdask.services import kafka
    from tests.cli.test_cli import _ccd_args

    topic = f"alerts-{uuid.uuid4().hex[:8]}"
    assert kafka.ensure_topic(kafka_broker, topic, partitions=2)
    capsys.readouterr()
    assert main([*_ccd_args(repo), "--alerts", f"kafka://{kafka_broker}/{topic}"]) == 0
    report = json.loads(capsys.readouterr().out)
    ccd = report["ccds"][0] if "ccds" in report else report
    n = ccd["n_alerts"]
    assert n > 0 and ccd["alerts_delivered"] == n
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "independent_reader.py"), kafka_broker, topic],
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    assert out["messages"] == out["distinct_diaSourceIds"] == n
    assert out["fits_cutouts"] == 3 * n
    assert out["n_problems"] == 0 and out["problems"] == []
    assert len(out["schema_ids"]) == 1


def test_every_example_is_tested():
    """A new script in docs/examples/ needs a test here."""
    tested = {"independent_reader.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_config_reference_covers_every_key():
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        from apdask_config_yaml import config_entries
    finally:
        sys.path.remove(str(ROOT / "docs" / "_ext"))
    from apdask.config import DEFAULTS

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    entries = {key: (value, comment) for key, value, comment, group in
               config_entries(ROOT / "apdask" / "apdask.yaml") if not group}  # fmt: skip
    assert {k: v for k, (v, _) in entries.items()} == dict(leaves(DEFAULTS))
    assert entries["apdask.distributor.timeout"][1].startswith("seconds that get() blocks")
    assert entries["apdask.submit.walltime"] == ("00:30:00", "(f) per job")
