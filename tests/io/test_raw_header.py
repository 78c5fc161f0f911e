"""apdask.io.raw_header: the one raw-header check of the alert and calibration chains.

The messages here are the ones ``apdask process-ccd`` (CCD requested) and
``apdask process-calib`` (``--ccd`` given) print; ``tests/cli`` and
``tests/pipeline/test_calib.py`` check them end to end.
"""

import pytest

from apdask.core.camera import get_camera
from apdask.exceptions import HeaderMismatchError
from apdask.io.raw import RawMetadata
from apdask.io.raw_header import check_raw_header

CAMERA = get_camera("testcam")


def _meta(detector="T00", **kw):
    det = CAMERA[detector]
    args = dict(
        instrument="TestCam", detector_name=det.name, detector_id=det.id, visit=42,
        exposure_id=42, snap=0, mjd_begin=61000.0, mjd_end=61000.0 + 31 / 86400,
        exptime=30.0, darktime=31.0, band="r", ra=150.0, dec=-30.0, rotpa=0.0,
        imgtype="FLAT",
    )  # fmt: skip
    args.update(kw)
    return RawMetadata(**args)


def test_a_matching_header_is_returned():
    meta = _meta()
    got = check_raw_header(meta, CAMERA["T00"], "r", 42, "x.fits", imgtype="FLAT", intent="flat")
    assert got is meta


@pytest.mark.parametrize(
    ("meta", "kw", "message"),
    [
        (_meta("T01"), {}, "raw x.fits has DETNAME=T01 but CCD T00 was requested; "
                           "pass the image of that CCD"),
        (_meta("T01"), {"ccd_option": True}, "raw x.fits has DETNAME=T01 but --ccd T00 was "
                                             "given; pass the image of that CCD"),
        (_meta(imgtype="DARK"), {"imgtype": "FLAT", "intent": "flat"},
         "raw x.fits has IMGTYPE=DARK but --intent flat was given; pass --intent dark or the "
         "right image"),
        (_meta(band="g"), {}, "raw x.fits has FILTBAND=g but --filter r was given"),
        (_meta(visit=7), {"visit": 42}, "raw x.fits belongs to visit 7, expected 42"),
    ],
)  # fmt: skip
def test_each_mismatch_names_both_values_and_exits_65(meta, kw, message):
    with pytest.raises(HeaderMismatchError) as info:
        check_raw_header(meta, CAMERA["T00"], "r", name="x.fits", **kw)
    assert str(info.value) == message
    assert info.value.exit_code == 65


def test_checks_come_in_order_detector_imgtype_band_visit():
    """A raw wrong in everything is reported by its CCD first, then its image type, ..."""
    wrong = {"imgtype": "DARK", "band": "g", "visit": 7}
    cases = [
        (_meta("T01", **wrong), "DETNAME=T01"),
        (_meta(**wrong), "IMGTYPE=DARK"),
        (_meta(**{**wrong, "imgtype": "FLAT"}), "FILTBAND=g"),
        (_meta(visit=7), "belongs to visit 7"),
    ]
    for meta, first in cases:
        with pytest.raises(HeaderMismatchError, match=first):
            check_raw_header(meta, CAMERA["T00"], "r", visit=42, imgtype="FLAT")


def test_what_the_invocation_does_not_give_is_not_checked():
    meta = _meta(band="g", imgtype="DARK", visit=7)
    assert check_raw_header(meta, CAMERA["T00"], None) is meta
    with pytest.raises(HeaderMismatchError, match="raw T00 has FILTBAND=g"):  # name: DETNAME
        check_raw_header(meta, CAMERA["T00"], "r")
    with pytest.raises(HeaderMismatchError, match="--intent flat was given"):  # from imgtype
        check_raw_header(meta, CAMERA["T00"], None, imgtype="FLAT")
