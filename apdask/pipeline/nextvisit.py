"""The nextVisit message (DMTN-092 section 2.2) and the visit's time window.

Every field is checked strictly when a :class:`NextVisit` is built, whether from a
decoded message (:meth:`NextVisit.from_dict`) or in code: JSON types are not coerced
(``true`` is not the visit 1, ``1000.7`` is not the visit 1000, ``"30"`` is not a
duration), numbers must be finite, and the detector list must be a non-empty list of
distinct CCDs of the camera.  Each error is an :class:`~apdask.exceptions.ApdaskError`
(exit 64) that names the field, shows the bad value (shortened) and the fix.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from apdask import config
from apdask.core.camera import BANDS, get_camera
from apdask.core.ids import MAX_VISIT
from apdask.exceptions import (
    CoordinateError,
    UnknownDetectorError,
    UnknownFilterError,
    UsageError,
)
from apdask.io.raw import raw_name

__all__ = ["MAX_GROUP_ID_LENGTH", "NextVisit", "visit_time_window"]

#: Longest accepted ``groupId`` (characters); the listener remembers and logs them.
MAX_GROUP_ID_LENGTH = 256

_REQUIRED = ("instrument", "groupId", "visit", "position", "filters", "duration")


def _show(value: Any, width: int = 60) -> str:
    """``value`` as JSON, cut to ``width`` characters (a message may be 1 MiB)."""
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= width else text[: width - 1] + "…"


def _describe(value: Any) -> str:
    """The bad value and, where the JSON type is the problem, that type."""
    text = _show(value)
    if isinstance(value, bool):
        return f"{text} (a boolean, not a number)"
    if isinstance(value, str):
        return f"{text} (a string)"
    if value is None:
        return "null"
    return text


def _error(
    name: str, value: Any, expected: str, example: str, cls: type = UsageError, *, kind=True
) -> Any:
    """The error for field ``name``; ``kind``: say the value's JSON type where it misleads."""
    got = _describe(value) if kind else _show(value)
    msg = (
        f"nextVisit field {name!r} must be {expected}, got {got}; "
        f'e.g. "{name}": {example} (see docs/formats.md)'
    )
    return cls(msg)


def _integer(name: str, value: Any, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _error(name, value, "an integer", example)
    return int(value)


def _real(name: str, value: Any, example: str, expected: str = "a finite number") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _error(name, value, expected, example)
    try:
        out = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise _error(name, value, expected, example) from None
    if not math.isfinite(out):
        raise _error(name, value, expected, example)
    return out


def _text(name: str, value: Any, example: str) -> str:
    if not isinstance(value, str):
        raise _error(name, value, "a string", example)
    return value


def _position(value: Any) -> tuple[float, float]:
    example = "[150.1, -30.5]"
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _error("position", value, "a list [ra, dec] of two numbers in degrees", example)
    ra = _real("position", value[0], example, "[ra, dec] of finite numbers in degrees")
    dec = _real("position", value[1], example, "[ra, dec] of finite numbers in degrees")
    if not 0.0 <= ra < 360.0:
        raise _error("position", value, "[ra, dec] with RA in [0, 360)", example, CoordinateError)
    if not -90.0 <= dec <= 90.0:
        expected = "[ra, dec] with Dec in [-90, 90]"
        raise _error("position", value, expected, example, CoordinateError)
    return ra, dec


def _detectors(value: Any, camera: Any) -> tuple[str, ...]:
    """The CCD names, checked: a non-empty list of distinct names the camera has."""
    if value is None:  # not given: every CCD of the camera
        return tuple(camera.names)
    example = f'["{camera.names[0]}"]'
    if not isinstance(value, list | tuple):
        raise _error("detectors", value, "a list of CCD names", example)
    if not value:
        raise _error("detectors", value, "a non-empty list (leave it out for every CCD)", example)
    if len(value) > len(camera):  # checked first: a message may list 100 000 names
        msg = (
            f"nextVisit field 'detectors' lists {len(value)} CCDs, but {camera.name} has "
            f"{len(camera)}; list each CCD at most once, or leave the field out for all"
        )
        raise UsageError(msg)
    seen: set[str] = set()
    for name in value:
        if not isinstance(name, str):
            raise _error("detectors", name, "a list of CCD names (strings)", example)
        if name in seen:
            msg = (
                f"nextVisit field 'detectors' lists {_show(name, 30)} more than once; "
                f"list each CCD once, e.g. {example}"
            )
            raise UsageError(msg)
        seen.add(name)
    known = set(camera.names)
    unknown = [n for n in value if n not in known]
    if unknown:
        hint = ", ".join(camera.names[:3]) + (", ..." if len(camera) > 3 else "")
        names = ", ".join(repr(n if len(n) <= 30 else n[:29] + "…") for n in unknown[:3])
        msg = (
            f"nextVisit field 'detectors' names unknown CCD {names}"
            f"{' ...' if len(unknown) > 3 else ''} for camera {camera.name}; "
            f"valid names are like {hint}"
        )
        raise UnknownDetectorError(msg)
    return tuple(value)


def _camera(value: Any) -> Any:
    name = _text("instrument", value, '"LSSTCam"')
    try:
        return get_camera(name)
    except UnknownDetectorError:
        expected = "a known camera: LSSTCam, LSSTComCam or TestCam"
        raise _error("instrument", name, expected, '"LSSTCam"', UnknownDetectorError) from None


def _group_id(value: Any) -> str:
    group = _text("groupId", value, '"1000"')
    if not group or len(group) > MAX_GROUP_ID_LENGTH or not group.isprintable():
        expected = f"a non-empty printable string of at most {MAX_GROUP_ID_LENGTH} characters"
        raise _error("groupId", value, expected, '"1000"')
    return group


@dataclass(frozen=True)
class NextVisit:
    """A nextVisit event, after Rubin's prompt-processing message.

    Building one checks every field (see the module docstring); numbers are stored as
    plain ``int``/``float``, ``position`` and ``detectors`` as tuples, and
    ``instrument`` as the camera's canonical name.

    Attributes
    ----------
    instrument : str
        Camera name (``LSSTCam``, ``LSSTComCam``, ``TestCam``).
    groupId : str
        Unique id of the visit group (printable, at most
        :data:`MAX_GROUP_ID_LENGTH` characters); duplicates are processed once.
    visit : int
        Visit (exposure) id, ``0 <= visit < 2**35`` (the id layout, docs/formats.md).
    position : tuple of float
        Boresight ``(ra, dec)`` in degrees, RA in [0, 360), Dec in [-90, 90].
    rotationAngle : float
        Camera rotation angle on the sky, degrees.
    filters : str
        Band ``u g r i z y``.
    duration : float
        Anticipated exposure time per image, seconds: finite and > 0.
    nimages : int
        Number of snaps (1 or 2).
    detectors : tuple of str or None
        CCD names to process: distinct, known to the camera, not empty; None (the
        default) means every CCD of the camera.
    timestamp : float
        Unix time of the announcement.
    mjd : float or None
        Anticipated exposure start, MJD TAI (informational).
    coordinateSystem : str
        Only ``"ICRS"`` is supported.

    Raises
    ------
    apdask.exceptions.UsageError
        A field of the wrong JSON type, a non-finite or out-of-range number, an empty
        or repeated detector list.
    apdask.exceptions.UnknownDetectorError
        An unknown camera or CCD.
    apdask.exceptions.UnknownFilterError, apdask.exceptions.CoordinateError
        A band outside ``u g r i z y``; RA or Dec out of range.
    """

    instrument: str
    groupId: str
    visit: int
    position: tuple
    rotationAngle: float
    filters: str
    duration: float
    nimages: int = 1
    detectors: tuple = None  # type: ignore[assignment]  # None: every CCD; a tuple after init
    timestamp: float = 0.0
    mjd: float | None = None
    coordinateSystem: str = "ICRS"

    def __post_init__(self):
        camera = _camera(self.instrument)
        visit = _integer("visit", self.visit, "1000")
        if not 0 <= visit < MAX_VISIT:
            raise _error("visit", visit, "in [0, 2**35) (the id layout)", "1000", kind=False)
        filters = _text("filters", self.filters, '"r"')
        if filters not in BANDS:
            expected = f"one of {' '.join(BANDS)}"
            raise _error("filters", filters, expected, '"r"', UnknownFilterError, kind=False)
        duration = _real("duration", self.duration, "30.0", "a finite number of seconds > 0")
        if not duration > 0:
            expected = "a finite number of seconds > 0"
            raise _error("duration", self.duration, expected, "30.0", kind=False)
        nimages = _integer("nimages", self.nimages, "1")
        if nimages not in (1, 2):
            raise _error("nimages", nimages, "1 or 2 (snaps per visit)", "1", kind=False)
        if self.coordinateSystem != "ICRS":
            raise _error("coordinateSystem", self.coordinateSystem, '"ICRS"', '"ICRS"')
        mjd = None if self.mjd is None else _real("mjd", self.mjd, "61000.1", "a finite MJD")
        values = {
            "instrument": camera.name,
            "groupId": _group_id(self.groupId),
            "visit": visit,
            "position": _position(self.position),
            "rotationAngle": _real("rotationAngle", self.rotationAngle, "0.0"),
            "filters": filters,
            "duration": duration,
            "nimages": nimages,
            "detectors": _detectors(self.detectors, camera),
            "timestamp": _real("timestamp", self.timestamp, "1763691803.0"),
            "mjd": mjd,
        }
        for key, value in values.items():  # normalised: plain Python types, tuples
            object.__setattr__(self, key, value)

    @property
    def camera(self):
        """The :class:`~apdask.core.camera.Camera` of this visit."""
        return get_camera(self.instrument)

    @property
    def ra(self):
        return float(self.position[0])

    @property
    def dec(self):
        return float(self.position[1])

    @classmethod
    def from_dict(cls, d: Any) -> NextVisit:
        """Build from a decoded JSON message; unknown keys are ignored.

        ``detectors`` left out (or ``null``) means every CCD of the camera;
        ``rotationAngle``, ``nimages``, ``timestamp``, ``mjd`` and ``coordinateSystem``
        take their defaults when left out.

        Raises
        ------
        apdask.exceptions.ApdaskError
            As for the class: not an object, a missing field, or a bad value.
        """
        if not isinstance(d, Mapping):
            msg = f"a nextVisit is a JSON object, got {_describe(d)}; see docs/formats.md"
            raise UsageError(msg)
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            msg = f"nextVisit message lacks {', '.join(missing)}; see docs/formats.md"
            raise UsageError(msg)
        optional = ("nimages", "detectors", "timestamp", "mjd", "coordinateSystem")
        fields: dict[str, Any] = {k: d[k] for k in _REQUIRED}
        fields.update({k: d[k] for k in optional if k in d})
        fields["rotationAngle"] = d.get("rotationAngle", 0.0)
        return cls(**fields)  # the values are checked, not coerced, in __post_init__

    @classmethod
    def from_json(cls, path_or_text: Any) -> NextVisit:
        """Read a nextVisit message from a JSON file path or string.

        Raises
        ------
        apdask.exceptions.UsageError
            The file cannot be read, is not UTF-8 or not JSON; or as for :meth:`from_dict`.
        """
        text = str(path_or_text)
        if text.lstrip()[:1] not in ("{", "["):  # a path, else JSON text
            path = _show(text, 120)
            try:
                with open(text, encoding="utf-8") as f:
                    text = f.read()
            except FileNotFoundError:
                msg = f"no nextVisit file {path}; pass --next-visit FILE.json (docs/formats.md)"
                raise UsageError(msg) from None
            except (OSError, ValueError) as e:  # a directory; not UTF-8; a NUL in the name
                reason = (
                    (e.strerror or str(e))
                    if isinstance(e, OSError)
                    else f"not UTF-8 JSON text ({e})"
                )
                msg = f"cannot read the nextVisit file {path}: {reason}; pass a JSON file"
                raise UsageError(msg) from None
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, 4300+ digit ints, nesting
            msg = f"nextVisit message is not valid JSON: {_show(str(e), 120)}"
            raise UsageError(msg) from None
        return cls.from_dict(d)

    def to_dict(self):
        d = asdict(self)
        d["position"] = list(self.position)
        d["detectors"] = list(self.detectors or ())
        return d

    def image_names(self, detector_name):
        """Raw image names of one CCD (one per snap), by the simulator's convention."""
        return [
            raw_name(self.instrument, self.visit, detector_name, s) for s in range(self.nimages)
        ]


def visit_time_window(mjd, months=None):
    """Start of the history window (MJD) for a visit at ``mjd``."""
    months = config.get("ppdb.history_months", months)
    return mjd - 30.4375 * months
