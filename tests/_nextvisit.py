"""nextVisit messages for property tests: a generator of one-field changes and an oracle.

The oracle (:func:`bad_field`) restates docs/formats.md's rules for each field on
its own, without calling the package's validation, so that a test compares two
independent readings of the rules.  The generator (:func:`one_change`) takes a valid
message and changes, adds or removes one field, so a rejected message has exactly one
field to name.
"""

from __future__ import annotations

import math

from hypothesis import strategies as st

#: Shared settings: deterministic (CI), no example database written into the tree.
PROPERTY_SETTINGS = {"deadline": None, "derandomize": True, "database": None}

VALID = {
    "instrument": "TestCam",
    "groupId": "g-1000",
    "visit": 1000,
    "position": [150.0, -30.0],
    "rotationAngle": 0.0,
    "filters": "r",
    "duration": 30.0,
    "nimages": 1,
    "detectors": ["T00", "T01"],
    "timestamp": 0.0,
    "mjd": 61000.1,
    "coordinateSystem": "ICRS",
}
REQUIRED = ("instrument", "groupId", "visit", "position", "filters", "duration")
TESTCAM_CCDS = ("T00", "T01")
CAMERA_NAMES = {"lsstcam", "comcam", "testcam", "lsstcomcam", "lsstcomcamsim"}

_json_leaf = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
#: Any JSON value (NaN and infinities too: Python's json writes and reads them).
json_values = st.recursive(
    _json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
#: Values that look almost right: the coercions a lax parser would accept.
near_misses = st.sampled_from(
    [True, False, 0, 1, -1, 1000.0, 1000.7, "1000", "30", "r", "T00", "ICRS", "", [], {},
     [150.0], [150.0, -30.0, 0.0], ["150", "-30"], [True, 0.0], [360.0, 0.0], [0.0, 90.5],
     ["T00", "T00"], ["T00", "T01", "T00"], ["T00"] * 3, ["t00"], [0, 1], 2**35, 2**35 - 1,
     10**400, float("inf"), float("nan"), -0.0, 1e-300, "TestCam", "testcam", "LSSTCam",
     "a\nb", "x" * 300, None]
)  # fmt: skip
detector_lists = st.lists(st.sampled_from(["T00", "T01", "T02", "R22_S11", "", " T00"]), max_size=4)


@st.composite
def one_change(draw):
    """A message with one field changed, added or removed: ``(message, field)``."""
    msg = dict(VALID)
    field = draw(st.sampled_from([*VALID, "extra"]))
    action = draw(st.sampled_from(["value", "near", "near", "drop"]))
    if action == "drop":
        msg.pop(field, None)
    elif field == "detectors" and draw(st.booleans()):
        msg[field] = draw(detector_lists)
    else:
        msg[field] = draw(json_values if action == "value" else near_misses)
    return msg, field


def _number(x):
    return isinstance(x, int | float) and not isinstance(x, bool) and _finite(x)


def _finite(x):
    try:
        return math.isfinite(x)
    except OverflowError:  # an int beyond float
        return False


def _integer(x):
    return isinstance(x, int) and not isinstance(x, bool)


def bad_field(msg):
    """The field a correct validator must reject in ``msg``, or None if ``msg`` is valid."""
    for key in REQUIRED:
        if key not in msg:
            return key
    if not isinstance(msg["instrument"], str) or msg["instrument"].lower() not in CAMERA_NAMES:
        return "instrument"
    if msg["instrument"].lower() != "testcam":  # another camera: TestCam's CCDs are unknown
        return "detectors" if msg.get("detectors") is not None else None
    g = msg["groupId"]
    if not isinstance(g, str) or not 0 < len(g) <= 256 or not g.isprintable():
        return "groupId"
    if not _integer(msg["visit"]) or not 0 <= msg["visit"] < 2**35:
        return "visit"
    pos = msg["position"]
    if not isinstance(pos, list) or len(pos) != 2 or not all(_number(p) for p in pos):
        return "position"
    if not (0 <= pos[0] < 360 and -90 <= pos[1] <= 90):
        return "position"
    if "rotationAngle" in msg and not _number(msg["rotationAngle"]):
        return "rotationAngle"
    if msg["filters"] not in ("u", "g", "r", "i", "z", "y"):
        return "filters"
    if not _number(msg["duration"]) or not msg["duration"] > 0:
        return "duration"
    if "nimages" in msg and (not _integer(msg["nimages"]) or msg["nimages"] not in (1, 2)):
        return "nimages"
    dets = msg.get("detectors")
    if dets is not None and (
        not isinstance(dets, list)
        or not dets
        or not all(isinstance(d, str) for d in dets)
        or len(set(dets)) != len(dets)
        or not set(dets) <= set(TESTCAM_CCDS)
    ):
        return "detectors"
    if "timestamp" in msg and not _number(msg["timestamp"]):
        return "timestamp"
    if msg.get("mjd") is not None and not _number(msg["mjd"]):
        return "mjd"
    if "coordinateSystem" in msg and msg["coordinateSystem"] != "ICRS":
        return "coordinateSystem"
    return None
