"""A worker lost mid-visit: the visit completes, and its PPDB rows and alerts are exactly
those of an undisturbed run (issue 17).

The worker is lost at the worst point: right after a CCD's PPDB transaction committed
and before its alerts are written (``tests/_worker_faults.py``, a worker preload whose
``transition`` hook acts before the worker can report the finished ``store`` task).
Dask reruns the lost tasks on another worker; the rerun ``store`` finds the CCD's rows
(checked inside its own transaction, under the SQLite write lock) and writes nothing,
and ``publish`` then writes the alerts.  The rerun ``prefetch`` reads the PPDB as it was
before the visit (``as_of``), so the rerun association and alerts match the first run.

Visit 1000 is processed undisturbed first, so visit 1001, the one disturbed, has a
history: associations to known DIAObjects, new object versions and forced photometry.
The reference is the same simulated repository processed locally with no fault.

Runnable alone: ``pytest tests/faults/test_lost_workers.py``; the SLURM cases need root
for ``.ci/setup-slurm.sh`` (the ``slurm`` fixture) and take about 30 s each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import dask
import pytest
import sqlalchemy
import yaml

from apdask.alerts.sinks import read_alerts
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import local_cluster, run_visit

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRELOAD = "tests._worker_faults"
VISIT = 1001  # the disturbed visit; 1000 is processed before it


def _nv(repo, visit):
    return NextVisit.from_json(os.path.join(repo, "visits", f"visit_{visit}.json"))


def _contents(repo):
    """What a visit leaves behind: every PPDB row that matters and visit 1001's alerts."""
    engine = sqlalchemy.create_engine(f"sqlite:///{os.path.join(repo, 'ppdb', 'apdb.db')}")
    queries = {
        "DiaSource": 'SELECT "diaSourceId", "diaObjectId", visit, detector FROM "DiaSource"',
        "DiaObject": 'SELECT "diaObjectId", "validityStartMjdTai", "validityEndMjdTai", '
        '"nDiaSources" FROM "DiaObject"',
        "DiaForcedSource": 'SELECT "diaObjectId", visit, detector FROM "DiaForcedSource"',
    }
    with engine.connect() as conn:
        rows = {name: sorted(map(tuple, conn.execute(sqlalchemy.text(q))))
                for name, q in queries.items()}  # fmt: skip
    engine.dispose()
    alerts = read_alerts(os.path.join(repo, "alerts", f"visit_{VISIT}"))
    rows["alerts"] = sorted(
        (a["diaSourceId"], a["diaSource"]["diaObjectId"], len(a.get("prvDiaSources") or []),
         len(a.get("prvDiaForcedSources") or []))
        for a in alerts
    )  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def undisturbed(sim_repo, tmp_path_factory):
    """PPDB rows and alerts of visits 1000 then 1001 processed locally with no fault."""
    root = str(tmp_path_factory.mktemp("undisturbed") / "repo")
    shutil.copytree(sim_repo["root"], root)
    for visit in (1000, VISIT):
        run_visit(_nv(root, visit), repo=root, timeout=30)
    out = _contents(root)
    assert len(out["alerts"]) > 0 and len(out["DiaForcedSource"]) > 0  # a visit with history
    assert len({r[0] for r in out["DiaSource"]}) == len(out["DiaSource"])
    return out


@pytest.fixture
def after_1000(repo):
    """The test's repository with visit 1000 processed, undisturbed."""
    run_visit(_nv(repo, 1000), repo=repo, timeout=30)
    return repo


def _check_identical(repo, undisturbed, mark, ccds):
    """The disturbed run left exactly the undisturbed rows and alerts; the fault happened
    after the CCD's PPDB commit, and that CCD's rerun found its rows stored."""
    with open(mark) as f:
        fault = json.load(f)
    assert fault["key"].startswith(f"store-{VISIT}-"), fault
    lost = fault["key"].rsplit("-", 1)[1]
    stored = {c["detector"]: c["stored"] for c in ccds}
    assert stored[lost] is False, stored  # the rerun's store found the committed rows
    assert all(stored[name] for name in stored if name != lost), stored
    got = _contents(repo)
    for name in ("DiaSource", "DiaObject", "DiaForcedSource", "alerts"):
        assert got[name] == undisturbed[name], name  # no duplicate, no missing row or alert
    return fault


def test_local_cluster_worker_sigkilled_after_its_ppdb_commit(after_1000, undisturbed, tmp_path,
                                                              monkeypatch):  # fmt: skip
    """A LocalCluster worker process SIGKILLed: its nanny restarts it, the lost tasks rerun."""
    mark = str(tmp_path / "fault.json")
    monkeypatch.setenv("APDASK_FAULT_MODE", "sigkill")
    monkeypatch.setenv("APDASK_FAULT_MARK", mark)
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the preload, in the spawned worker processes
    t0 = time.monotonic()
    with (
        dask.config.set({"distributed.worker.preload": [PRELOAD]}),
        local_cluster(n_workers=2) as client,
    ):
        report = run_visit(_nv(after_1000, VISIT), repo=after_1000, timeout=30, client=client,
                           result_timeout=240)  # fmt: skip
    fault = _check_identical(after_1000, undisturbed, mark, report["ccds"])
    assert report["n_alerts"] == len(undisturbed["alerts"])
    print(f"\nLocalCluster, SIGKILL after {fault['key']}: visit done in "
          f"{time.monotonic() - t0:.1f} s, {report['n_alerts']} alerts, identical")  # fmt: skip


def test_a_visit_given_up_after_a_lost_worker_exits_75_and_a_rerun_completes_it(
    after_1000, undisturbed, tmp_path, monkeypatch, capsys
):
    """With ``allowed-failures`` 0 Dask gives up the task whose worker died: ``apdask
    process-visit`` exits 75 (``WorkerLostError``) in one line, the CCD's rows are
    committed without its alerts, and running the same command again completes the visit
    with contents identical to an undisturbed run."""
    from apdask.cli.main import main
    from apdask.pipeline.run import pending_detectors

    repo, mark = after_1000, str(tmp_path / "fault.json")
    monkeypatch.setenv("APDASK_FAULT_MODE", "sigkill")
    monkeypatch.setenv("APDASK_FAULT_MARK", mark)
    monkeypatch.setenv("PYTHONPATH", ROOT)
    argv = ["process-visit", "--next-visit", os.path.join(repo, "visits", f"visit_{VISIT}.json"),
            "--repo", repo, "--timeout", "30", "--json", "-"]  # fmt: skip
    with dask.config.set({"distributed.worker.preload": [PRELOAD],
                          "distributed.scheduler.allowed-failures": 0}):  # fmt: skip
        code = main(argv)
    err = capsys.readouterr().err
    with open(mark) as f:
        lost = json.load(f)["key"]
    assert code == 75, err[-2000:]
    assert f"apdask: error: visit {VISIT}: Dask workers died while running {lost}" in err
    assert "allowed-failures = 0" in err and "re-run it" in err and "Traceback" not in err
    nv = _nv(repo, VISIT)
    assert lost.rsplit("-", 1)[1] in pending_detectors(nv, os.path.join(repo, "ppdb", "apdb.yaml"),
                                                       f"file://{repo}/alerts")  # fmt: skip
    monkeypatch.delenv("APDASK_FAULT_MODE")
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    report = json.loads(capsys.readouterr().out)
    stored = {c["detector"]: c["stored"] for c in report["ccds"]}
    assert stored[lost.rsplit("-", 1)[1]] is False  # committed by the first run, not again
    got = _contents(repo)
    for name in ("DiaSource", "DiaObject", "DiaForcedSource", "alerts"):
        assert got[name] == undisturbed[name], name


@pytest.mark.service
@pytest.mark.parametrize("mode", ["scancel", "sigkill"])
def test_slurm_visit_survives_a_lost_worker_job(slurm, after_1000, undisturbed, tmp_path, mode):
    """``apdask submit --via jobqueue``, two worker jobs (adaptive, minimum 2): one job is
    cancelled with ``scancel`` (or its worker process SIGKILLed) right after its CCD's
    PPDB commit; the visit completes on the other worker with identical contents."""
    repo = after_1000
    mark = str(tmp_path / "fault.json")
    cfg = tmp_path / "dask"
    cfg.mkdir()
    (cfg / "jobqueue.yaml").write_text(yaml.safe_dump({
        "jobqueue": {"slurm": {"worker-extra-args": ["--preload", PRELOAD]}},
        "apdask": {"submit": {"adaptive": True, "minimum_jobs": 2, "wait_timeout_s": 240}},
    }))  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT, DASK_CONFIG=str(cfg), APDASK_FAULT_MODE=mode,
               APDASK_FAULT_MARK=mark)  # fmt: skip  # sbatch passes the environment on
    nv = os.path.join(repo, "visits", f"visit_{VISIT}.json")
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "apdask.cli", "submit", "--scheduler", "slurm", "--via",
         "jobqueue", "--next-visit", nv, "--repo", repo, "--mem", "2GB", "--scheduler-host",
         "127.0.0.1", "--timeout", "60"],
        capture_output=True, text=True, timeout=360, env=env, check=False,
    )  # fmt: skip
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert out["n_alerts"] == len(undisturbed["alerts"]), out
    fault = _check_identical(repo, undisturbed, mark, out["report"]["ccds"])
    assert fault["job"] and fault["job"].isdigit()
    if mode == "scancel":  # the job really was cancelled by SLURM (kept for MinJobAge, 300 s)
        state = subprocess.run(["scontrol", "show", "job", fault["job"]], capture_output=True,
                               text=True, check=False).stdout  # fmt: skip
        assert "JobState=CANCELLED" in state, state
    left = subprocess.run(["squeue", "-h", "-n", f"apdask-{VISIT}", "-o", "%i %T"],
                          capture_output=True, text=True, check=False).stdout  # fmt: skip
    assert all("RUNNING" not in line and "PENDING" not in line for line in left.splitlines())
    print(f"\nSLURM jobqueue, {mode} of job {fault['job']} after {fault['key']}: exit 0 in "
          f"{wall:.1f} s, {out['n_alerts']} alerts, PPDB and alerts identical")  # fmt: skip
