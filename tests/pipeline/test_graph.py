import pytest

from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.nextvisit import NextVisit
from tests.conftest import raise_if_dask_computes

MSG = {
    "instrument": "TestCam",
    "groupId": "g1",
    "visit": 1000,
    "position": [150.0, -30.0],
    "rotationAngle": 0.0,
    "filters": "r",
    "duration": 30.0,
    "nimages": 1,
    "detectors": ["T00", "T01"],
    "timestamp": 0.0,
}


def test_building_the_graph_computes_and_reads_nothing(tmp_path):
    nv = NextVisit.from_dict(MSG)
    missing = tmp_path / "does-not-exist"  # no I/O may happen while building
    with raise_if_dask_computes():
        graph = build_visit_graph(nv, repo=str(missing), timeout=5)
    keys = {str(k) for k in graph.__dask_graph__()}
    steps = ("prefetch", "fetch", "calibrate", "warp", "subtract", "detect", "associate",
             "package", "store", "publish", "report")  # fmt: skip
    for stage in steps:
        assert any(k.startswith(f"{stage}-1000-T00") for k in keys), stage
    assert any(k.startswith("gather-1000") for k in keys)
    assert not missing.exists()


def test_graph_rejects_bad_timeout(tmp_path):
    with pytest.raises(ValueError, match="--timeout"):
        build_visit_graph(NextVisit.from_dict(MSG), repo=str(tmp_path), timeout=-1)


def test_check_hook_runs_before_each_ccd_and_can_abandon_the_build(tmp_path):
    """The listener bounds the build time with ``check``: once per CCD, before it."""
    nv = NextVisit.from_dict(MSG)
    calls = []
    graph = build_visit_graph(nv, repo=str(tmp_path), timeout=5, check=lambda: calls.append(1))
    assert len(calls) == len(nv.detectors) == 2
    assert any(str(k).startswith("fetch-1000-T01") for k in graph.__dask_graph__())

    def stop_after_first():
        if calls:
            raise TimeoutError("over the bound")
        calls.append(1)

    calls.clear()
    with pytest.raises(TimeoutError, match="over the bound"):
        build_visit_graph(nv, repo=str(tmp_path), timeout=5, check=stop_after_first)
    assert calls == [1]


def test_each_ccds_tasks_prefer_one_worker_in_turn(tmp_path):
    """With ``workers``, every task of a CCD carries a loose restriction to one worker,
    the CCDs taking the workers in turn; without, no task is restricted."""
    nv = NextVisit.from_dict(MSG)
    graph = build_visit_graph(nv, repo=str(tmp_path), timeout=5, workers=["tcp://a", "tcp://b"])
    placed: dict[str, set] = {"T00": set(), "T01": set()}

    def value(ann, name, key):  # dask keeps merged layers' annotations per key
        v = ann.get(name)
        return v(key) if callable(v) else v

    for layer in graph.__dask_graph__().layers.values():
        ann = layer.annotations or {}
        for key in layer:
            for det in placed:
                if f"-1000-{det}" in str(key):
                    workers = value(ann, "workers", key)
                    loose = value(ann, "allow_other_workers", key)
                    placed[det].add((tuple(workers or ()), loose))
    assert placed["T00"] == {(("tcp://a",), True)}
    assert placed["T01"] == {(("tcp://b",), True)}
    plain = build_visit_graph(nv, repo=str(tmp_path), timeout=5)
    assert not any(layer.annotations for layer in plain.__dask_graph__().layers.values())
