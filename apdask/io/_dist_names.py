"""Image names at the distributor: what is safe, and which CCD a raw name belongs to.

Re-exported by :mod:`apdask.io.distributor`.
"""

from __future__ import annotations

import re

from apdask.core.camera import Camera, Detector
from apdask.exceptions import (
    HeaderMismatchError,
)

__all__ = ["NAME_PATTERN", "TOKEN_ENV", "check_image_for_ccd", "check_image_name"]

#: Environment variable holding the distributor's upload token (never in config files).
TOKEN_ENV = "APDASK_DISTRIBUTOR_TOKEN"

#: Image names the distributor accepts: no slashes, no leading dot, no traversal.
#: Match it with ``fullmatch`` (``\Z``, unlike ``$``, also refuses a trailing newline).
NAME_PATTERN = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")


def check_image_name(name: str) -> str:
    """Return ``name`` if it is a safe image file name, else raise ValueError."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        msg = (
            f"invalid image name {name!r}: use a plain file name of letters, digits, "
            "'.', '_' and '-' (no slashes or '..'), e.g. LSSTComCam_1000_R22_S11_0.fits"
        )
        raise ValueError(msg)
    return name


_RAW_NAME = re.compile(
    r"(?P<instrument>[A-Za-z0-9]+)_(?P<visit>\d+)_(?P<ccd>.+)_(?P<snap>\d+)\.fits"
)


def check_image_for_ccd(name: str, camera: Camera, detector: Detector) -> str:
    """Refuse an image name that, by the raw naming convention, belongs to another CCD.

    Names of the form ``{instrument}_{visit}_{ccd}_{snap}.fits`` (``rawio.raw_name``)
    are checked before waiting for the image, so a wrong name fails at once instead of
    after the timeout.  Other names are accepted; the raw header's DETNAME is checked
    after the fetch in any case.

    Parameters
    ----------
    name : str
        Image name given to ``--image``.
    camera : apdask.core.camera.Camera
    detector : apdask.core.camera.Detector
        The CCD being processed.

    Returns
    -------
    str
        ``name``.

    Raises
    ------
    HeaderMismatchError
        If the name names another CCD of the camera, or another instrument.
    ValueError
        If the name is not a safe image name.
    """
    check_image_name(name)
    m = _RAW_NAME.fullmatch(name)
    if m is None:
        return name
    ccd = m["ccd"]
    known = ccd in camera.names
    if known and ccd != detector.name:
        msg = (
            f"image name {name} is for CCD {ccd} but --ccd {detector.name} was given; pass "
            f"the image of {detector.name} (e.g. {m['instrument']}_{m['visit']}_"
            f"{detector.name}_{m['snap']}.fits)"
        )
        raise HeaderMismatchError(msg)
    if known and m["instrument"] != camera.name:
        msg = (
            f"image name {name} is for instrument {m['instrument']} but the repository's "
            f"camera is {camera.name}; pass an image of {camera.name}"
        )
        raise HeaderMismatchError(msg)
    return name
