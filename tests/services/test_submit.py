"""Batch mode (DMTN-092 §2.1): one SLURM or HTCondor job per CCD.

The SLURM tests run against a real single-node SLURM that ``.ci/setup-slurm.sh``
installs and starts (the ``slurm`` fixture; CI runs as root, so they run there).
HTCondor is not packaged for this platform: its generated files are checked.
"""

import json
import os
import shlex
import shutil

import pytest

from apdask.cli.main import main
from apdask.pipeline.nextvisit import NextVisit
from apdask.services.batch import (
    ccd_command,
    htcondor_submit_file,
    slurm_array_script,
    submit_visit,
)

DMTN092 = ("--ccd", "--ra", "--dec", "--filter", "--exptime", "--distributor", "--image")


def _nv(instrument, detectors=None):
    from apdask.core.camera import get_camera

    names = detectors or get_camera(instrument).names
    return NextVisit.from_dict({"instrument": instrument, "groupId": "g7", "visit": 7,
                                "position": [150.0, -30.0], "filters": "r", "duration": 30.0,
                                "detectors": names})  # fmt: skip


def _commands(nv):
    kw = {"repo": "/r", "distributor": "http://dist:8080", "ppdb": "/r/apdb.yaml",
          "alerts": "file:///r/alerts", "timeout": 120}  # fmt: skip
    return {n: ccd_command(nv, n, **kw) for n in nv.detectors}


@pytest.mark.parametrize(("instrument", "n"), [("LSSTComCam", 9), ("LSSTCam", 189)])
def test_sbatch_script_has_one_array_task_per_ccd(instrument, n):
    nv = _nv(instrument)
    script = slurm_array_script(nv, _commands(nv), "/r/jobs", memory="4GiB", walltime="00:10:00")
    assert f"#SBATCH --array=0-{n - 1}" in script
    assert "#SBATCH --mem=4G" in script and "#SBATCH --time=00:10:00" in script  # as jobqueue
    cases = [line for line in script.splitlines() if ") CCD=" in line]
    assert len(cases) == n
    for i, (line, name) in enumerate(zip(cases, nv.detectors, strict=True)):
        argv = shlex.split(line.split("set -- ", 1)[1].rstrip(" ;"))
        assert line.startswith(f"  {i}) CCD={name};") and "process-ccd" in argv
        for flag in DMTN092:
            assert flag in argv
        assert argv[argv.index("--ccd") + 1] == name
        assert argv[argv.index("--image") + 1] == f"{nv.instrument}_7_{name}_0.fits"
        assert argv[argv.index("--distributor") + 1] == "http://dist:8080"


def test_htcondor_submit_file_queues_one_job_per_ccd():
    nv = _nv("LSSTComCam")
    text = htcondor_submit_file(nv, _commands(nv), "/r/jobs", memory="4GiB")
    assert "universe       = vanilla" in text and "request_memory = 4096" in text
    assert 'arguments      = "$(args)"' in text
    body = text.split("queue ccd, args from (\n", 1)[1].split("\n)", 1)[0].splitlines()
    assert [line.split()[0] for line in body] == list(nv.detectors)
    for line in body:
        args = line.split()[1:]
        assert args[0] == "process-ccd"
        for flag in DMTN092:
            assert flag in args


def test_submit_htcondor_without_condor_writes_file_and_says_so(repo, capsys):
    nv_file = os.path.join(repo, "visits", "visit_1000.json")
    args = ["submit", "--scheduler", "htcondor", "--next-visit", nv_file, "--repo", repo]
    assert shutil.which("condor_submit") is None  # not packaged in Debian 12
    assert main(args) == 78
    err = capsys.readouterr().err
    assert "condor_submit is not on PATH" in err and "visit_1000.sub" in err
    assert main([*args, "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    with open(out["job_file"]) as f:
        assert f.read().count("process-ccd") == 2


def test_jobqueue_htcondor_worker_script(repo, capsys):
    nv_file = os.path.join(repo, "visits", "visit_1000.json")
    assert main(["submit", "--scheduler", "htcondor", "--via", "jobqueue", "--next-visit",
                 nv_file, "--repo", repo, "--mem", "2GB", "--dry-run"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    with open(out["job_file"]) as f:
        text = f.read()
    assert "MY.DaskWorkerMemory = 2000000000" in text and "MY.DaskWorkerCores = 1" in text
    assert "RequestMemory = floor(MY.DaskWorkerMemory / 1048576)" in text
    assert "distributed.cli.dask_worker" in text and "--nthreads 1" in text


def test_submit_rejects_unknown_ccd_before_writing(repo, capsys, tmp_path):
    with open(os.path.join(repo, "visits", "visit_1000.json")) as f:
        msg = json.load(f)
    msg["detectors"] = ["T00", "R22_S11"]
    bad = tmp_path / "nv.json"
    bad.write_text(json.dumps(msg))
    assert main(["submit", "--scheduler", "slurm", "--next-visit", str(bad),
                 "--repo", repo]) == 64  # fmt: skip
    err = capsys.readouterr().err
    assert "unknown CCD 'R22_S11'" in err and "T00" in err
    assert not os.path.exists(os.path.join(repo, "jobs"))


@pytest.fixture(scope="module")
def local_alerts(sim_repo, tmp_path_factory):
    """Alerts of visit 1000 processed locally: the reference for the batch runs."""
    from apdask.alerts.sinks import read_alerts
    from apdask.pipeline.run import run_visit

    root = tmp_path_factory.mktemp("local") / "repo"
    shutil.copytree(sim_repo["root"], root)
    nv = NextVisit.from_dict(sim_repo["visits"][0])
    report = run_visit(nv, repo=str(root), timeout=30)
    alerts = read_alerts(os.path.join(root, "alerts", "visit_1000"))
    assert len(alerts) == report["n_alerts"] > 0
    return sorted(a["diaSourceId"] for a in alerts)


@pytest.mark.service
def test_slurm_visit_gives_the_same_alerts_as_a_local_run(slurm, repo, local_alerts):
    from apdask.alerts.sinks import read_alerts

    nv = NextVisit.from_json(os.path.join(repo, "visits", "visit_1000.json"))
    out = submit_visit(nv, "slurm", repo=repo, memory="2GB", timeout=60, wait=True,
                       wait_timeout=300)  # fmt: skip
    assert out["n_jobs"] == 2 and out["failed"] == [], out
    assert out["job_id"].isdigit()
    assert out["n_alerts"] == len(local_alerts)
    ids = sorted(a["diaSourceId"] for a in read_alerts(os.path.join(repo, "alerts", "visit_1000")))
    assert ids == local_alerts
    print(f"\nSLURM (sbatch array, 2 CCD jobs): {out['wall_s']:.1f} s, {out['n_alerts']} alerts")


@pytest.mark.service
def test_slurm_via_jobqueue_gives_the_same_alerts(slurm, repo, local_alerts, capsys):
    nv_file = os.path.join(repo, "visits", "visit_1000.json")
    code = main(["submit", "--scheduler", "slurm", "--via", "jobqueue", "--next-visit", nv_file,
                 "--repo", repo, "--mem", "2GB", "--scheduler-host", "127.0.0.1",
                 "--timeout", "60"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n_alerts"] == len(local_alerts), out
    print(f"\nSLURM (dask-jobqueue, 2 worker jobs): {out['wall_s']:.1f} s")


@pytest.mark.service
def test_slurm_via_jobqueue_adaptive_gives_the_same_alerts(slurm, repo, local_alerts, capsys):
    import dask

    nv_file = os.path.join(repo, "visits", "visit_1000.json")
    with dask.config.set({"apdask.submit.adaptive": True, "apdask.submit.minimum_jobs": 1}):
        code = main(["submit", "--scheduler", "slurm", "--via", "jobqueue", "--next-visit",
                     nv_file, "--repo", repo, "--mem", "2GB", "--scheduler-host", "127.0.0.1",
                     "--timeout", "60"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["n_alerts"] == len(local_alerts), out
    assert out["adaptive"] == {"minimum_jobs": 1, "maximum_jobs": 2}
    print(f"\nSLURM (dask-jobqueue adaptive, 1..2 jobs): {out['wall_s']:.1f} s")
