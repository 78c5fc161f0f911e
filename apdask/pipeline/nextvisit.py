"""The nextVisit message (DMTN-092 section 2.2) and the visit's time window."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from apdask import config
from apdask.core.camera import check_band, check_pointing, get_camera

__all__ = ["NextVisit", "visit_time_window"]


@dataclass(frozen=True)
class NextVisit:
    """A nextVisit event, after Rubin's prompt-processing message.

    Attributes
    ----------
    instrument : str
        Camera name (``LSSTCam``, ``LSSTComCam``, ``TestCam``).
    groupId : str
        Unique id of the visit group; duplicates are processed once.
    visit : int
        Visit (exposure) id.
    position : tuple of float
        Boresight ``(ra, dec)`` in degrees.
    rotationAngle : float
        Camera rotation angle on the sky, degrees.
    filters : str
        Band ``u g r i z y``.
    duration : float
        Anticipated exposure time per image, seconds.
    nimages : int
        Number of snaps (1 or 2).
    detectors : tuple of str
        CCD names to process.
    timestamp : float
        Unix time of the announcement.
    mjd : float or None
        Anticipated exposure start, MJD TAI (informational).
    coordinateSystem : str
        Only ``"ICRS"`` is supported.
    """

    instrument: str
    groupId: str
    visit: int
    position: tuple
    rotationAngle: float
    filters: str
    duration: float
    nimages: int = 1
    detectors: tuple = field(default_factory=tuple)
    timestamp: float = 0.0
    mjd: float | None = None
    coordinateSystem: str = "ICRS"

    def __post_init__(self):
        camera = get_camera(self.instrument)
        check_pointing(*self.position)
        check_band(self.filters)
        for name in self.detectors:
            camera[name]  # raises UnknownDetectorError with the valid names
        if self.nimages not in (1, 2):
            msg = f"nimages must be 1 or 2, got {self.nimages!r}"
            raise ValueError(msg)
        if not self.duration > 0:
            msg = f"duration must be > 0 s, got {self.duration!r}"
            raise ValueError(msg)
        if self.coordinateSystem != "ICRS":
            msg = f"coordinateSystem must be ICRS, got {self.coordinateSystem!r}"
            raise ValueError(msg)

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
    def from_dict(cls, d):
        """Build from a decoded JSON message; unknown keys are ignored."""
        required = ("instrument", "groupId", "visit", "position", "filters", "duration")
        missing = [k for k in required if k not in d]
        if missing:
            msg = f"nextVisit message lacks {', '.join(missing)}; see docs/formats.md"
            raise ValueError(msg)
        camera = get_camera(d["instrument"])
        detectors = d.get("detectors") or camera.names
        return cls(
            instrument=camera.name,
            groupId=str(d["groupId"]),
            visit=int(d["visit"]),
            position=(float(d["position"][0]), float(d["position"][1])),
            rotationAngle=float(d.get("rotationAngle", 0.0)),
            filters=str(d["filters"]),
            duration=float(d["duration"]),
            nimages=int(d.get("nimages", 1)),
            detectors=tuple(detectors),
            timestamp=float(d.get("timestamp", 0.0)),
            mjd=None if d.get("mjd") is None else float(d["mjd"]),
            coordinateSystem=d.get("coordinateSystem", "ICRS"),
        )

    @classmethod
    def from_json(cls, path_or_text):
        """Read a nextVisit message from a JSON file path or string."""
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(text) as f:
                text = f.read()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            msg = f"nextVisit message is not valid JSON: {e}"
            raise ValueError(msg) from None
        return cls.from_dict(d)

    def to_dict(self):
        d = asdict(self)
        d["position"] = list(self.position)
        d["detectors"] = list(self.detectors)
        return d

    def image_names(self, detector_name):
        """Raw image names of one CCD (one per snap), by the simulator's convention."""
        from apdask.io.raw import raw_name

        return [
            raw_name(self.instrument, self.visit, detector_name, s) for s in range(self.nimages)
        ]


def visit_time_window(mjd, months=None):
    """Start of the history window (MJD) for a visit at ``mjd``."""
    months = config.get("ppdb.history_months", months)
    return mjd - 30.4375 * months
