"""One configuration path: YAML defaults, dask.config, --set/--config, resolved once."""

from __future__ import annotations

import json
import os

import dask
import dask.config
import pytest

from apdask.cli import main
from apdask.config import ListenConfig, Locations, PipelineConfig
from apdask.exceptions import ConfigurationError, UsageError
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.run import ensure_ppdb, run_visit


def test_records_are_resolved_from_dask_config_and_frozen():
    with dask.config.set({"apdask.detection.threshold_sigma": 7.5,
                          "apdask.subtract.spatial_order": 0}):  # fmt: skip
        cfg = PipelineConfig.resolve()
    assert cfg.detection.threshold_sigma == 7.5
    assert cfg.subtract.spatial_order == 0
    assert PipelineConfig.resolve().detection.threshold_sigma == 5.0  # the default again
    with pytest.raises(AttributeError):
        cfg.detection.threshold_sigma = 3.0  # type: ignore[misc]
    assert cfg.flat()["apdask.detection.threshold_sigma"] == 7.5


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("apdask.detection.threshold_sigma", -1, "positive number"),
        ("apdask.detection.n_pixels", 2.5, "positive integer"),
        ("apdask.subtract.kernel_size", 20, "odd integer"),
        ("apdask.subtract.spatial_order", 7, "0, 1, 2 or 3"),
        ("apdask.cutouts.min_size", 200, "exceeds max_size"),
        ("apdask.detection.treshold_sigma", 5, "unknown configuration key"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(key, value, match):
    with dask.config.set({key: value}), pytest.raises(ConfigurationError, match=match) as err:
        PipelineConfig.resolve()
    assert key.rsplit(".", 1)[0] in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("apdask.listen.max_message_bytes", 0, "positive integer"),
        ("apdask.listen.max_message_bytes", 1.5, "positive integer"),
        ("apdask.listen.build_timeout_s", float("nan"), "positive number"),
        ("apdask.listen.build_timeout_s", True, "positive number"),
        ("apdask.listen.stop_grace_s", -1, "seconds >= 0"),
        ("apdask.listen.stop_grace_s", float("inf"), "seconds >= 0"),
        ("apdask.listen.offset", "middle", "latest or earliest"),
        ("apdask.listen.grace", 5, "unknown configuration key"),
    ],
)
def test_listen_settings_are_checked_when_the_listener_starts(key, value, match):
    with dask.config.set({key: value}), pytest.raises(ConfigurationError, match=match) as err:
        ListenConfig.resolve()
    assert "apdask.listen." in str(err.value)


def test_listen_settings_defaults_and_overrides():
    cfg = ListenConfig.resolve()
    assert (cfg.max_message_bytes, cfg.build_timeout_s, cfg.stop_grace_s) == (1 << 20, 60.0, 60.0)
    assert ListenConfig.resolve(stop_grace_s=0, offset=None).stop_grace_s == 0  # 0: at once
    with dask.config.set({"apdask.listen.stop_grace_s": 5}):
        assert ListenConfig.resolve().stop_grace_s == 5


def test_locations_one_rule_for_every_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = Locations.resolve("rel/repo")  # relative paths become absolute
    root = str(tmp_path / "rel" / "repo")
    assert loc.repo == root
    assert loc.ppdb == f"{root}/ppdb/apdb.yaml"
    assert loc.alerts == f"file://{root}/alerts"
    assert loc.distributor == f"file://{root}/raw"
    with dask.config.set({"apdask.repo": "cfg-repo", "apdask.alerts.sink": "kafka://h:1/t"}):
        loc = Locations.resolve()
    assert loc.repo == str(tmp_path / "cfg-repo")
    assert loc.alerts == f"kafka://h:1/t?spool_dir={tmp_path}/cfg-repo/alerts-spool"
    with pytest.raises(ConfigurationError, match="--repo"):
        Locations.resolve()
    for bad in (0, -3, float("nan"), "abc"):
        with pytest.raises(UsageError, match="--timeout"):
            Locations.resolve("r", timeout=bad)


def test_cli_set_and_config_file_with_sources(tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "site.yaml"
    cfg.write_text("apdask:\n  association:\n    radius_arcsec: 0.8\n")
    monkeypatch.setenv("DASK_APDASK__CUTOUTS__MAX_SIZE", "90")
    dask.config.refresh()  # as a new process would: the environment is read at start
    try:
        rc = main(["--config", str(cfg), "--set", "detection.threshold_sigma=6",
                   "config", "show", "--json"])  # fmt: skip
        shown = json.loads(capsys.readouterr().out)
    finally:
        monkeypatch.delenv("DASK_APDASK__CUTOUTS__MAX_SIZE")
        dask.config.refresh()
    assert rc == 0
    assert shown["apdask.detection.threshold_sigma"] == {"value": 6, "source": "--set"}
    assert shown["apdask.association.radius_arcsec"]["value"] == 0.8
    assert shown["apdask.association.radius_arcsec"]["source"] == f"--config {cfg}"
    assert shown["apdask.cutouts.max_size"]["source"] == "env DASK_APDASK__CUTOUTS__MAX_SIZE"
    assert shown["apdask.detection.n_pixels"] == {"value": 5, "source": "default (apdask.yaml)"}


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--set", "detection.treshold=6", "config", "show"], 78, "unknown setting"),
        (["--set", "noequals", "config", "show"], 64, "KEY=VALUE"),
        (["--set", "detection.threshold_sigma=-1", "config", "show"], 78, "positive number"),
        (["--set", "listen.stop_grace_s=-5", "config", "show"], 78, "listen.stop_grace_s"),
        (["--config", "/nonexistent.yaml", "config", "show"], 78, "cannot read --config"),
    ],
)
def test_cli_bad_settings_exit_with_a_fix(argv, code, message, capsys):
    try:
        assert main(argv) == code
    finally:
        dask.config.refresh()
    assert message in capsys.readouterr().err


def test_process_visit_takes_the_repository_from_configuration(sim_repo, tmp_path, capsys):
    """`process-visit` without --repo used to crash with a TypeError (issue 13)."""
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"apdask:\n  repo: {sim_repo['root']}\n")
    msg = os.path.join(sim_repo["root"], "visits", "visit_1000.json")
    try:
        rc = main(["--config", str(cfg), "process-visit", "--next-visit", msg,
                   "--ppdb", str(tmp_path / "none.yaml"), "--workers", "1"])  # fmt: skip
    finally:
        dask.config.refresh()
    err = capsys.readouterr().err
    assert rc == 69, err  # the PPDB config is missing: a clean PpdbError, not a TypeError
    assert "TypeError" not in err


@pytest.mark.service
def test_a_setting_made_after_the_cluster_started_reaches_the_workers(repo):
    """The driver's value, not the worker's own dask.config, decides (issue 13).

    The workers are separate processes started before the setting; a task that read
    dask.config on the worker would see the default threshold (5) and find sources.
    """
    from distributed import Client, LocalCluster

    nv = NextVisit.from_json(os.path.join(repo, "visits", "visit_1000.json"))
    ppdb = ensure_ppdb(repo)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,  # fmt: skip
        Client(cluster) as client,
    ):
        worker_value = client.run(lambda: dask.config.get("apdask.detection.threshold_sigma"))
        assert list(worker_value.values()) == [5.0]
        with dask.config.set({"apdask.detection.threshold_sigma": 1e6}):
            report = run_visit(nv, repo=repo, ppdb=ppdb, client=client, detectors=["T00"],
                               timeout=60)  # fmt: skip
        worker_value = client.run(lambda: dask.config.get("apdask.detection.threshold_sigma"))
    assert list(worker_value.values()) == [5.0]  # the worker's own config never changed
    (ccd,) = report["ccds"]
    assert "error" not in ccd, ccd
    assert ccd["n_sources"] == 0  # nothing is 10^6 sigma: the driver's threshold was used
    assert ccd["stored"]
