"""The nextVisit message: strict types, finite numbers, a real detector list, clear errors."""

import json
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apdask.exceptions import (
    ApdaskError,
    CoordinateError,
    UnknownDetectorError,
    UnknownFilterError,
    UsageError,
)
from apdask.pipeline.nextvisit import NextVisit
from tests._nextvisit import PROPERTY_SETTINGS, TESTCAM_CCDS, VALID, bad_field, one_change


def test_next_visit_round_trip(tmp_path):
    p = tmp_path / "nv.json"
    p.write_text(json.dumps(VALID))
    nv = NextVisit.from_json(str(p))
    assert nv.visit == 1000 and nv.detectors == ("T00", "T01") and nv.ra == 150.0
    assert NextVisit.from_dict(nv.to_dict()) == nv
    assert nv.image_names("T01") == ["TestCam_1000_T01_0.fits"]


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        # booleans are not numbers, floats and strings are not integers
        ({"visit": True}, UsageError, ["'visit'", "true (a boolean, not a number)", "e.g."]),
        ({"visit": 1000.7}, UsageError, ["'visit'", "an integer", "1000.7"]),
        ({"visit": 1000.0}, UsageError, ["'visit'", "an integer", "1000.0"]),
        ({"visit": "1000"}, UsageError, ["'visit'", '"1000" (a string)']),
        ({"visit": -1}, UsageError, ["'visit'", "[0, 2**35)", "-1"]),
        ({"visit": 2**40}, UsageError, ["'visit'", "[0, 2**35)", str(2**40)]),
        ({"nimages": True}, UsageError, ["'nimages'", "boolean"]),
        ({"nimages": 3}, UsageError, ["'nimages'", "1 or 2"]),
        # a finite, positive exposure time
        ({"duration": float("inf")}, UsageError, ["'duration'", "finite", "Infinity"]),
        ({"duration": float("nan")}, UsageError, ["'duration'", "NaN"]),
        ({"duration": 0}, UsageError, ["'duration'", "> 0", "got 0"]),
        ({"duration": -30.0}, UsageError, ["'duration'", "-30.0", '"duration": 30.0']),
        ({"duration": "30"}, UsageError, ["'duration'", '"30" (a string)']),
        ({"duration": 10**400}, UsageError, ["'duration'", "finite"]),
        # a real detector list
        ({"detectors": []}, UsageError, ["'detectors'", "non-empty", "leave it out"]),
        ({"detectors": ["T00", "T00"]}, UsageError, ["'detectors'", '"T00" more than once']),
        ({"detectors": ["T00", "T01", "T00"]}, UsageError, ["lists 3 CCDs", "TestCam has 2"]),
        ({"detectors": "T00"}, UsageError, ["'detectors'", "a list", "(a string)"]),
        ({"detectors": [0]}, UsageError, ["'detectors'", "strings"]),
        ({"detectors": ["T07", "R22_S11"]}, UnknownDetectorError, ["CCD 'T07', 'R22_S11'", "T00"]),
        # the sky and the band
        ({"position": [float("nan"), 0.0]}, UsageError, ["'position'", "finite", "NaN"]),
        ({"position": [400.0, 0.0]}, CoordinateError, ["'position'", "RA in [0, 360)", "400.0"]),
        ({"position": [10.0, 95.0]}, CoordinateError, ["'position'", "Dec in [-90, 90]"]),
        ({"position": [10.0]}, UsageError, ["'position'", "two numbers"]),
        ({"position": ["10", "20"]}, UsageError, ["'position'", '"10" (a string)']),
        ({"filters": "q"}, UnknownFilterError, ["'filters'", "u g r i z y", '"q"']),
        ({"filters": ["r"]}, UsageError, ["'filters'", "a string"]),
        # the rest
        ({"instrument": "HSC"}, UnknownDetectorError, ["'instrument'", "LSSTCam", '"HSC"']),
        ({"groupId": 7}, UsageError, ["'groupId'", "a string"]),
        ({"groupId": "a\nb"}, UsageError, ["'groupId'", "printable"]),
        ({"groupId": "x" * 257}, UsageError, ["'groupId'", "at most 256"]),
        ({"rotationAngle": None}, UsageError, ["'rotationAngle'", "null"]),
        ({"mjd": float("inf")}, UsageError, ["'mjd'", "finite"]),
        ({"timestamp": "now"}, UsageError, ["'timestamp'", '"now"']),
        ({"coordinateSystem": "FK5"}, UsageError, ["'coordinateSystem'", "ICRS"]),
    ],
)  # fmt: skip
def test_bad_field_names_field_value_and_fix(change, error, words):
    with pytest.raises(error) as info:
        NextVisit.from_dict({**VALID, **change})
    text = str(info.value)
    assert info.value.exit_code == 64 and "\n" not in text and len(text) < 400
    for w in words:
        assert w in text
    assert "e.g." in text or "valid names" in text or "leave the field out" in text


def test_detectors_left_out_or_null_mean_every_ccd():
    absent = NextVisit.from_dict({k: v for k, v in VALID.items() if k != "detectors"})
    null = NextVisit.from_dict({**VALID, "detectors": None})
    assert absent.detectors == null.detectors == TESTCAM_CCDS
    assert NextVisit.from_dict({**VALID, "detectors": ["T01"]}).detectors == ("T01",)


def test_values_are_normalised_to_plain_types():
    import numpy as np

    nv = NextVisit(instrument="testcam", groupId="g", visit=np.int64(7),
                   position=(1, np.float32(2)), rotationAngle=0, filters="r",
                   duration=np.float64(15), detectors=["T00"])  # fmt: skip
    assert type(nv.visit) is int and type(nv.duration) is float and nv.instrument == "TestCam"
    assert nv.position == (1.0, 2.0) and type(nv.position[1]) is float and nv.detectors == ("T00",)
    with pytest.raises(UsageError, match="'visit'"):
        NextVisit(instrument="TestCam", groupId="g", visit=True, position=(1, 2), rotationAngle=0,
                  filters="r", duration=15.0)  # fmt: skip


def test_a_huge_detector_list_is_rejected_before_any_per_ccd_work():
    """20 000 repeated names once kept the listener busy for minutes (issue 19)."""
    t0 = time.perf_counter()
    with pytest.raises(UsageError, match="lists 20000 CCDs, but TestCam has 2"):
        NextVisit.from_dict({**VALID, "detectors": ["T00"] * 20_000})
    assert time.perf_counter() - t0 < 0.5


def test_from_json_errors_are_usage_errors(tmp_path):
    bad_utf8 = tmp_path / "latin1.json"
    bad_utf8.write_bytes(b'{"groupId": "\xe9"}')
    cases = [
        ("{not json", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),  # deeper than the recursion limit
        ('{"visit": ' + "1" * 5000 + "}", "not valid JSON"),  # beyond int-from-string digits
        ("[1, 2]", "a nextVisit is a JSON object, got [1, 2]"),
        (str(tmp_path), "Is a directory"),
        (str(tmp_path / "absent.json"), "no nextVisit file"),
        (str(bad_utf8), "not UTF-8"),
        ("x\0y", "cannot read the nextVisit file"),
    ]
    for text, words in cases:
        with pytest.raises(UsageError, match=words.replace("[", r"\[")):
            NextVisit.from_json(text)
    with pytest.raises(UsageError, match="lacks visit"):
        NextVisit.from_dict({k: v for k, v in VALID.items() if k != "visit"})


@settings(max_examples=300, **PROPERTY_SETTINGS)
@given(one_change())
def test_property_validation_agrees_with_the_documented_rules(case):
    """Any one-field change: accepted exactly when the rules (tests/_nextvisit.py) allow it;
    a rejection is an ApdaskError (exit 64) naming the field, never another exception."""
    msg, _ = case
    expected = bad_field(msg)
    try:
        nv = NextVisit.from_dict(msg)
    except ApdaskError as exc:
        assert expected is not None, f"valid message rejected: {exc}"
        assert exc.exit_code == 64 and expected in str(exc)
        return
    assert expected is None, f"accepted a bad {expected!r}: {msg[expected]!r}"
    assert type(nv.visit) is int and 0 <= nv.visit < 2**35
    assert math.isfinite(nv.duration) and nv.duration > 0
    assert nv.detectors and len(set(nv.detectors)) == len(nv.detectors)
    assert set(nv.detectors) <= set(TESTCAM_CCDS)
    assert NextVisit.from_dict(json.loads(json.dumps(nv.to_dict()))) == nv


@settings(max_examples=150, **PROPERTY_SETTINGS)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_property_any_text_is_a_nextvisit_or_a_usage_error(text):
    """``from_json`` on arbitrary JSON-like text: an ApdaskError, never another exception
    (text not starting with ``{`` or ``[`` would be opened as a path: not fuzzed here)."""
    for start in ("{", "[", ' {"visit": '):
        with pytest.raises(ApdaskError) as info:
            NextVisit.from_json(start + text)
        assert info.value.exit_code == 64
