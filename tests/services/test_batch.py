"""Batch jobs on the operator's cluster: jobqueue.yaml first, failures that end, threads
from the allocation (issue 17).

The job-script tests need no scheduler (dask-jobqueue writes the scripts); the
``slurm`` tests run against the real single-node SLURM of ``.ci/setup-slurm.sh``.
HTCondor is not packaged for this platform: its job scripts are checked, not run.
"""

import json
import os
import subprocess
import sys
import time

import dask
import pytest
import yaml

from apdask._kernels.fused import allocated_cpus, inner_threads
from apdask.cli.main import main
from apdask.exceptions import ConfigurationError
from apdask.services.batch import jobqueue_cluster, slurm_array_script, slurm_memory

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# an operator's ~/.config/dask/jobqueue.yaml
OPERATOR_YAML = """
jobqueue:
  slurm:
    cores: 4
    memory: 12GB
    walltime: '02:00:00'
    queue: debug
    account: rubin
    job-extra-directives: ['--qos=alerts', '--constraint=fast']
    job-script-prologue: ['module load rubin-env']
  htcondor:
    cores: 4
    memory: 12GB
    disk: 5GB
    job-extra-directives: {'+MaxRuntime': 7200, 'accounting_group': 'rubin.ap'}
"""


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix.count(".") < 2:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.fixture
def operator_yaml():
    """The operator's jobqueue.yaml loaded into dask.config, as dask does at import."""
    pytest.importorskip("dask_jobqueue")  # its defaults first, as in a real session
    with dask.config.set(_flat(yaml.safe_load(OPERATOR_YAML))):
        yield


def _script(scheduler, tmp_path, **kw):
    cluster = jobqueue_cluster(scheduler, job_dir=str(tmp_path), scheduler_host="127.0.0.1", **kw)
    try:
        return cluster.job_script(), cluster.apdask_settings
    finally:
        cluster.close()


def test_slurm_worker_script_carries_the_operators_jobqueue_yaml(operator_yaml, tmp_path):
    script, settings = _script("slurm", tmp_path)
    for line in ("#SBATCH --mem=12G", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH -p debug", "#SBATCH -A rubin", "#SBATCH --qos=alerts",
                 "#SBATCH --constraint=fast", "module load rubin-env"):  # fmt: skip
        assert line in script.splitlines(), (line, script)
    assert "--nthreads 4" in script and "--host 127.0.0.1" in script
    assert f"{sys.executable} -m distributed.cli.dask_worker" in script
    assert settings["memory"] == ("12GB", "jobqueue")
    assert settings["processes"] == (1, "apdask")  # unset in the yaml: apdask's fallback


def test_htcondor_worker_script_carries_the_operators_jobqueue_yaml(operator_yaml, tmp_path):
    script, settings = _script("htcondor", tmp_path)
    lines = script.splitlines()
    for line in ("MY.DaskWorkerMemory = 12000000000", "MY.DaskWorkerCores = 4",
                 "MY.DaskWorkerDisk = 5000000000", "+MaxRuntime = 7200",
                 "accounting_group = rubin.ap"):  # fmt: skip
        assert line in lines, (line, script)
    assert "--nthreads 4" in script
    assert settings["disk"] == ("5GB", "jobqueue")


def test_submit_jobqueue_dry_run_writes_the_operators_values(operator_yaml, repo, capsys):
    nv = os.path.join(repo, "visits", "visit_1000.json")
    assert main(["submit", "--scheduler", "slurm", "--via", "jobqueue", "--next-visit", nv,
                 "--repo", repo, "--dry-run", "--scheduler-host", "127.0.0.1"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    with open(out["job_file"]) as f:
        text = f.read()
    assert "--mem=12G" in text and "-t 02:00:00" in text and "--cpus-per-task=4" in text
    assert "--qos=alerts" in text
    assert out["settings"]["walltime"] == {"value": "02:00:00", "from": "jobqueue"}
    # the native route reads the same jobqueue.yaml
    assert main(["submit", "--scheduler", "slurm", "--next-visit", nv, "--repo", repo,
                 "--dry-run"]) == 0  # fmt: skip
    native = json.loads(capsys.readouterr().out)
    with open(native["job_file"]) as f:
        text = f.read().splitlines()
    for line in ("#SBATCH --mem=12G", "#SBATCH --time=02:00:00", "#SBATCH --cpus-per-task=4",
                 "#SBATCH --partition=debug", "#SBATCH --account=rubin",
                 "#SBATCH --qos=alerts", "module load rubin-env"):  # fmt: skip
        assert line in text, line


def test_an_explicit_value_wins_and_says_so(operator_yaml, tmp_path, caplog):
    script, settings = _script("slurm", tmp_path, memory="2GB")
    assert "#SBATCH --mem=2G" in script.splitlines()
    assert settings["memory"] == ("2GB", "argument")
    assert "overrides jobqueue.slurm.memory = 12GB" in caplog.text


def test_apdask_fallbacks_apply_only_where_the_yaml_is_silent(tmp_path):
    pytest.importorskip("dask_jobqueue")
    with dask.config.set({"jobqueue.slurm.memory": None, "jobqueue.slurm.cores": None}):
        script, settings = _script("slurm", tmp_path)
    assert "#SBATCH --mem=4G" in script.splitlines()  # apdask.submit.memory: 4GB
    assert settings["memory"] == ("4GB", "apdask") and settings["cores"] == (1, "apdask")


@pytest.mark.parametrize("memory", ["4GB", "4GiB", "2.5GB", "500MB", "12GB"])
def test_memory_units_are_the_same_on_both_routes(memory, tmp_path):
    from dask.utils import parse_bytes

    slurm_format_bytes_ceil = pytest.importorskip("dask_jobqueue.slurm").slurm_format_bytes_ceil

    from tests.services.test_submit import _commands, _nv

    assert slurm_memory(memory) == slurm_format_bytes_ceil(parse_bytes(memory))
    nv = _nv("LSSTComCam")
    native = slurm_array_script(nv, _commands(nv), "/r/jobs", memory=memory)
    script, _ = _script("slurm", tmp_path, memory=memory)
    assert f"#SBATCH --mem={slurm_memory(memory)}" in native.splitlines()
    assert f"#SBATCH --mem={slurm_memory(memory)}" in script.splitlines()


def test_unknown_interface_is_a_clear_configuration_error(repo, capsys, tmp_path):
    pytest.importorskip("dask_jobqueue")
    with dask.config.set({"jobqueue.slurm.interface": "ib0"}):
        with pytest.raises(ConfigurationError, match="'ib0', which this machine"):
            jobqueue_cluster("slurm", job_dir=str(tmp_path))
        nv = os.path.join(repo, "visits", "visit_1000.json")
        code = main(["submit", "--scheduler", "slurm", "--via", "jobqueue", "--next-visit", nv,
                     "--repo", repo, "--dry-run"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 78 and "jobqueue.slurm.interface is 'ib0'" in err and "lo" in err
    assert "Traceback" not in err


def test_bad_timeout_setting_names_the_key(repo, capsys):
    nv = os.path.join(repo, "visits", "visit_1000.json")
    with dask.config.set({"apdask.submit.worker_timeout_s": -1}):
        code = main(["submit", "--scheduler", "slurm", "--next-visit", nv, "--repo", repo,
                     "--dry-run"])  # fmt: skip
    assert code == 78 and "apdask.submit.worker_timeout_s must be > 0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# threads from the allocation


def test_inner_threads_follow_the_allocation_not_the_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # never consulted
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert allocated_cpus() == inner_threads() == 4
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert inner_threads() == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert inner_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert inner_threads() == 2
    with dask.config.set({"apdask.compute.inner_threads": 5}):
        assert inner_threads() == 5


def test_inner_threads_on_a_worker_share_its_cpus(monkeypatch):
    from distributed import Client, LocalCluster

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "8")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None
        ) as cluster,  # fmt: skip
        Client(cluster) as client,
    ):
        assert client.submit(inner_threads, pure=False).result() == 2  # 8 CPUs, 4 tasks at once
        assert inner_threads() == 8  # outside the worker: the whole allocation


_PROBE = """
import json, os, numba, numpy as np
from apdask._kernels.fused import above, inner_threads
above(np.ones((64, 64), np.float32), 0.5)  # a numba-parallel pass, threads set per call
print(json.dumps({"inner": inner_threads(), "numba": numba.get_num_threads(),
                  "cpu_count": os.cpu_count(), "slurm": os.environ.get("SLURM_CPUS_PER_TASK")}))
"""


@pytest.mark.service
@pytest.mark.parametrize("cpus", [1, 2])
def test_slurm_job_uses_the_threads_of_its_allocation(slurm, cpus):
    if cpus > (os.cpu_count() or 1):
        pytest.skip("the node has fewer CPUs")
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(
        ["srun", "-N1", "-n1", f"--cpus-per-task={cpus}", "--mem=1G", "-t", "5",
         sys.executable, "-c", _PROBE],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["slurm"] == str(cpus)
    assert got["inner"] == got["numba"] == cpus, got
    print(f"\n--cpus-per-task={cpus}: {got}")


# --------------------------------------------------------------------------------------
# failures that end: a refused submission, a worker that never starts


def _cli(args, timeout, **env):
    env = dict(os.environ, PYTHONPATH=ROOT, **env)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "apdask.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, check=False)  # fmt: skip
    return proc, time.monotonic() - t0


@pytest.mark.service
@pytest.mark.parametrize("via", ["native", "jobqueue"])
def test_impossible_request_exits_with_sbatchs_message(slurm, repo, via):
    nv = os.path.join(repo, "visits", "visit_1000.json")
    args = ["submit", "--scheduler", "slurm", "--via", via, "--next-visit", nv, "--repo", repo,
            "--mem", "100GB", "--scheduler-host", "127.0.0.1"]  # fmt: skip
    if via == "native":
        args.append("--wait")  # sbatch --wait used to hide the reason
    proc, wall = _cli(args, timeout=180)
    assert proc.returncode == 71, (proc.returncode, proc.stderr[-3000:])
    assert "Memory specification can not be satisfied" in proc.stderr
    assert proc.stderr.startswith("apdask: error:") and "Traceback" not in proc.stderr
    assert "Task exception was never retrieved" not in proc.stderr
    assert wall < 120
    print(f"\n{via}: exit 71 after {wall:.1f} s: {proc.stderr.strip()}")


@pytest.mark.service
def test_worker_that_never_starts_times_out(slurm, repo):
    nv = os.path.join(repo, "visits", "visit_1000.json")
    cfg = os.path.join(repo, "pend.yaml")  # the jobs pend (BeginTime) past the timeout
    with open(cfg, "w") as f:
        yaml.safe_dump({"jobqueue": {"slurm": {"job-extra-directives": ["--begin=now+1hour"]}},
                        "apdask": {"submit": {"worker_timeout_s": 8}}}, f)  # fmt: skip
    proc, wall = _cli(["submit", "--scheduler", "slurm", "--via", "jobqueue", "--next-visit", nv,
                       "--repo", repo, "--mem", "1GB", "--scheduler-host", "127.0.0.1"],
                      timeout=180, DASK_CONFIG=os.path.dirname(cfg))  # fmt: skip
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "no Dask worker job started within 8 s" in proc.stderr
    assert "BeginTime" in proc.stderr and "Traceback" not in proc.stderr
    assert wall < 120
    out = subprocess.run(["squeue", "-h", "-n", "apdask-1000", "-o", "%i"], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    assert out.strip() == "", f"jobs left behind: {out}"
    print(f"\nexit 75 after {wall:.1f} s: {proc.stderr.strip()}")


@pytest.mark.service
@pytest.mark.parametrize("via", ["native", "jobqueue"])
def test_visit_past_its_wait_timeout_ends_and_cancels_its_jobs(slurm, repo, via):
    nv = os.path.join(repo, "visits", "visit_1000.json")
    args = ["submit", "--scheduler", "slurm", "--via", via, "--next-visit", nv, "--repo", repo,
            "--mem", "1GB", "--scheduler-host", "127.0.0.1"]  # fmt: skip
    if via == "native":
        args.append("--wait")
    proc, wall = _cli(args, timeout=240, DASK_APDASK__SUBMIT__WAIT_TIMEOUT_S="3")
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "within 3 s (apdask.submit.wait_timeout_s" in proc.stderr
    assert "cancelled" in proc.stderr and "Traceback" not in proc.stderr
    time.sleep(2)
    left = subprocess.run(["squeue", "-h", "-n", "apdask-1000", "-o", "%i %T"],
                          capture_output=True, text=True, check=False).stdout  # fmt: skip
    assert all("RUNNING" not in line and "PENDING" not in line for line in left.splitlines())
    print(f"\n{via}: exit 75 after {wall:.1f} s: {proc.stderr.strip()}")


def test_sqlite_write_lock_times_out_with_a_contention_message(tmp_path):
    from apdask.exceptions import PpdbLockTimeoutError
    from apdask.ppdb.sql import sqlite_write_lock

    db = str(tmp_path / "apdb.db")
    t0 = time.monotonic()
    with sqlite_write_lock(db, "hold"):
        assert os.path.exists(db + ".lock")
        with (
            pytest.raises(PpdbLockTimeoutError, match="lock contention") as err,
            sqlite_write_lock(db, "store visit 1 detector 2", timeout=0.3),
        ):
            pass
    assert 0.3 <= time.monotonic() - t0 < 5
    assert "database server" not in str(err.value) and err.value.exit_code == 75
    with sqlite_write_lock(db, "again", timeout=0.3):  # released
        pass


def test_database_is_locked_names_contention_not_the_server():
    import sqlalchemy.exc

    from apdask.exceptions import PpdbLockTimeoutError
    from apdask.ppdb.setup import _retry

    def locked():
        raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("database is locked"))

    with (
        dask.config.set({"apdask.ppdb.retry_backoff_s": 0.001}),
        pytest.raises(PpdbLockTimeoutError, match="lock contention") as err,
    ):
        _retry(locked, "store visit 1 detector 18")
    assert "database server" not in str(err.value) and err.value.exit_code == 75


# --------------------------------------------------------------------------------------
# the warm pool (apdask listen --cluster slurm)


def _pool_jobs(name):
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True,
                         text=True, check=False).stdout  # fmt: skip
    return dict(line.split() for line in out.splitlines() if line.strip())


def _modules_loaded(dask_worker):
    """The warm-up plugin is registered, and with it the pixel stages are imported."""
    return "apdask-warm-kernels" in dask_worker.plugins and "apdask.pipeline.warm" in sys.modules


@pytest.mark.service
def test_warm_pool_keeps_its_minimum_after_a_job_is_cancelled(slurm, tmp_path):
    """Two warm jobs, each worker with the pipeline imported on joining; one job
    ``scancel``-ed: ``adapt()`` starts a new one; every job is cancelled on exit."""
    from apdask.services.batch import PoolSize, jobqueue_pool

    name = f"apdask-test-pool-{os.getpid()}"
    size = PoolSize.resolve(minimum_jobs=2, maximum_jobs=2, worker_timeout_s=120)
    with jobqueue_pool("slurm", job_dir=str(tmp_path), size=size, memory="1GB",
                       scheduler_host="127.0.0.1", job_name=name) as client:  # fmt: skip
        client.wait_for_workers(2, timeout=120)
        assert all(client.run(_modules_loaded).values())  # the warm-up plugin ran
        first = _pool_jobs(name)
        assert len(first) == 2 and set(first.values()) == {"RUNNING"}, first
        victim = min(first, key=int)
        subprocess.run(["scancel", victim], check=True, timeout=30)
        t0 = time.monotonic()
        while True:
            now = _pool_jobs(name)
            if victim not in now and len(client.scheduler_info(n_workers=-1)["workers"]) == 2:
                break
            assert time.monotonic() - t0 < 120, now
            time.sleep(0.5)
        replaced = time.monotonic() - t0
        assert len(now) == 2 and set(now) - set(first), now  # a new job, not the old one back
        assert all(client.run(_modules_loaded).values())
    left = _pool_jobs(name)  # cancelled: gone, or COMPLETING for a moment
    assert not {"RUNNING", "PENDING"} & set(left.values()), f"jobs left behind: {left}"
    print(f"\nwarm pool: job {victim} cancelled, back to 2 workers after {replaced:.1f} s")


@pytest.mark.service
def test_warm_pool_refused_exits_with_sbatchs_message(slurm, tmp_path):
    from apdask.exceptions import JobSubmissionError
    from apdask.services.batch import PoolSize, jobqueue_pool

    name = f"apdask-test-pool-{os.getpid()}"
    t0 = time.monotonic()
    with (
        pytest.raises(JobSubmissionError, match="Memory specification can not be satisfied"),
        jobqueue_pool("slurm", job_dir=str(tmp_path), size=PoolSize.resolve(1, 2, 60, 60),
                      memory="100GB", scheduler_host="127.0.0.1", job_name=name),
    ):  # fmt: skip
        pytest.fail("the pool started")
    assert time.monotonic() - t0 < 60
    assert not {"RUNNING", "PENDING"} & set(_pool_jobs(name).values())
