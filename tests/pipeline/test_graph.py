import json

import pytest

from apdask.exceptions import CoordinateError, UnknownDetectorError, UnknownFilterError
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


def test_next_visit_round_trip(tmp_path):
    p = tmp_path / "nv.json"
    p.write_text(json.dumps(MSG))
    nv = NextVisit.from_json(str(p))
    assert nv.visit == 1000 and nv.detectors == ("T00", "T01") and nv.ra == 150.0
    assert NextVisit.from_dict(nv.to_dict()) == nv
    assert nv.image_names("T01") == ["TestCam_1000_T01_0.fits"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"detectors": ["T07"]}, UnknownDetectorError, "T07"),
        ({"filters": "q"}, UnknownFilterError, "filter"),
        ({"position": [400.0, 0.0]}, CoordinateError, "RA"),
        ({"position": [10.0, 95.0]}, CoordinateError, "Dec"),
        ({"nimages": 3}, ValueError, "nimages"),
    ],
)
def test_next_visit_rejects_bad_messages(change, error, match):
    with pytest.raises(error, match=match):
        NextVisit.from_dict({**MSG, **change})


def test_next_visit_malformed_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        NextVisit.from_json("{not json")
    with pytest.raises(ValueError, match="lacks visit"):
        NextVisit.from_dict({k: v for k, v in MSG.items() if k != "visit"})


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
