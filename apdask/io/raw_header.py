"""A raw's header against the invocation that asked for it: the one check both chains use.

The alert chain (``apdask process-ccd``, ``process-visit``) and the calibration
chain (``apdask process-calib``) read a raw's primary header before touching its
pixels, and refuse an image of another CCD, filter, visit or image type with
:class:`~apdask.exceptions.HeaderMismatchError` (exit 65, docs/errors.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from apdask.exceptions import HeaderMismatchError

if TYPE_CHECKING:
    from apdask.core.camera import Detector
    from apdask.io.raw import RawMetadata

__all__ = ["check_raw_header"]


def check_raw_header(
    meta: RawMetadata,
    detector: Detector,
    band: str | None,
    visit: int | None = None,
    name: str | None = None,
    *,
    imgtype: str | None = None,
    intent: str | None = None,
    ccd_option: bool = False,
) -> RawMetadata:
    """Check a raw's header against the invocation; raise HeaderMismatchError if it differs.

    DETNAME, then IMGTYPE, FILTBAND and the visit are checked, each only where the
    invocation gives a value for it.

    Parameters
    ----------
    meta : apdask.io.raw.RawMetadata
        The raw's header, from :func:`apdask.io.raw.read_raw`.
    detector : apdask.core.camera.Detector
        The CCD that was asked for.
    band : str or None
        The filter that was given (``--filter``); None checks no band.
    visit : int, optional
        The visit the raw must belong to.
    name : str, optional
        The image's name in the messages; default its DETNAME.
    imgtype : str, optional
        The IMGTYPE the raw must have (e.g. ``"FLAT"``).
    intent : str, optional
        The ``--intent`` that asks for ``imgtype``, named in its message; default
        ``imgtype`` in lower case.
    ccd_option : bool, optional
        Name the CCD as the ``--ccd`` option that gave it (``apdask process-calib``),
        not as the CCD requested.

    Returns
    -------
    apdask.io.raw.RawMetadata
        ``meta``, checked.

    Raises
    ------
    HeaderMismatchError
        The header names another CCD, image type, filter or visit (exit 65); the
        message names both values and the fix.
    """
    name = name or meta.detector_name
    if meta.detector_name != detector.name:
        if ccd_option:
            asked = f"--ccd {detector.name} was given"
        else:
            asked = f"CCD {detector.name} was requested"
        msg = f"raw {name} has DETNAME={meta.detector_name} but {asked}; pass the image of that CCD"
        raise HeaderMismatchError(msg)
    if imgtype is not None and meta.imgtype != imgtype:
        intent = intent or imgtype.lower()
        msg = (
            f"raw {name} has IMGTYPE={meta.imgtype} but --intent {intent} was given; "
            f"pass --intent {meta.imgtype.lower()} or the right image"
        )
        raise HeaderMismatchError(msg)
    if band is not None and meta.band != band:
        msg = f"raw {name} has FILTBAND={meta.band} but --filter {band} was given"
        raise HeaderMismatchError(msg)
    if visit is not None and meta.visit != visit:
        msg = f"raw {name} belongs to visit {meta.visit}, expected {visit}"
        raise HeaderMismatchError(msg)
    return meta
