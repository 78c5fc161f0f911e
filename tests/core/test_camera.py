import numpy as np
import pytest
from astropy.coordinates import SkyCoord

from apdask.core.camera import check_band, check_pointing, get_camera, njy_per_electron
from apdask.exceptions import CoordinateError, UnknownDetectorError, UnknownFilterError


def test_lsstcam_has_189_science_ccds_in_rubin_order():
    cam = get_camera("lsstcam")
    assert len(cam) == 189
    assert cam["R22_S11"].id == 94
    assert cam[0].name == "R01_S00"
    assert cam[188].name == "R43_S22"
    assert len({d.name for d in cam}) == 189
    assert cam["R01_S00"].shape == (4000, 4072)  # ITL
    assert cam["R22_S11"].shape == (4004, 4096)  # e2v


def test_comcam_and_testcam():
    cc = get_camera("comcam")
    assert cc.names == [f"R22_S{r}{c}" for r in range(3) for c in range(3)]
    tc = get_camera("testcam")
    assert len(tc) == 2 and tc[0].shape == (512, 512) and len(tc[0].amplifiers) == 4


@pytest.mark.parametrize("name", ["lsstcam", "comcam", "testcam"])
def test_amplifiers_tile_the_detector(name):
    for det in get_camera(name).detectors[:3]:
        cover = np.zeros(det.shape, dtype=int)
        for a in det.amplifiers:
            cover[a.y0 : a.y1, a.x0 : a.x1] += 1
            assert a.raw_shape == (a.ny, a.prescan + a.nx + a.overscan)
        assert (cover == 1).all()
        if name != "testcam":
            assert len(det.amplifiers) == 16 and det.amp_chunks[0] == (det.ny // 2,) * 2


def test_predicted_wcs_places_boresight_and_scale():
    cam = get_camera("lsstcam")
    det = cam["R22_S11"]  # centred on the boresight
    w = det.predicted_wcs(150.0, -30.0, 0.0)
    ra, dec = w.pixel_to_world_values((det.nx - 1) / 2, (det.ny - 1) / 2)
    assert abs(ra - 150.0) < 1e-9 and abs(dec + 30.0) < 1e-9
    a = SkyCoord(*w.pixel_to_world_values(0, 0), unit="deg")
    b = SkyCoord(*w.pixel_to_world_values(1000, 0), unit="deg")
    assert a.separation(b).arcsec == pytest.approx(200.0, rel=1e-4)
    # North is +y at rotation 0, east is -x.
    r0, d0 = w.pixel_to_world_values(2000, 2000)
    r1, d1 = w.pixel_to_world_values(2000, 2100)
    r2, _ = w.pixel_to_world_values(2100, 2000)
    assert d1 > d0 and r2 < r0


def test_neighbouring_ccds_abut_on_the_sky():
    cam = get_camera("comcam")
    left, right = cam["R22_S10"], cam["R22_S11"]
    wl, wr = left.predicted_wcs(10, 5), right.predicted_wcs(10, 5)
    # The right edge of S10 and the left edge of S11 are one slot gap apart (42.25 mm).
    pl = SkyCoord(*wl.pixel_to_world_values(left.nx - 1, 2000), unit="deg")
    pr = SkyCoord(*wr.pixel_to_world_values(0, 2000), unit="deg")
    gap_px = 4225 - 4072 + 1
    assert pl.separation(pr).arcsec == pytest.approx(0.2 * gap_px, rel=1e-3)


def test_footprint_padding_and_rotation():
    det = get_camera("testcam")[0]
    f0 = det.footprint(200.0, 10.0)
    f1 = det.footprint(200.0, 10.0, padding_arcsec=20.0)
    c0 = SkyCoord(f0[:, 0], f0[:, 1], unit="deg")
    c1 = SkyCoord(f1[:, 0], f1[:, 1], unit="deg")
    assert c0[0].separation(c0[2]).arcsec == pytest.approx(512 * 0.2 * 2**0.5, rel=1e-3)
    assert c1[0].separation(c1[2]).arcsec == pytest.approx((512 * 0.2 + 40) * 2**0.5, rel=1e-3)
    f90 = det.footprint(200.0, 10.0, rotpa=90.0)
    assert not np.allclose(f90, f0)


def test_bad_input_messages():
    cam = get_camera("comcam")
    with pytest.raises(UnknownDetectorError, match="R99_S99.*R22_S00"):
        cam["R99_S99"]
    with pytest.raises(UnknownDetectorError, match="unknown camera"):
        get_camera("hsc")
    with pytest.raises(UnknownFilterError, match="--filter"):
        check_band("H")
    with pytest.raises(CoordinateError, match="RA"):
        check_pointing(361, 0)
    with pytest.raises(CoordinateError, match="Dec"):
        check_pointing(10, -91)
    with pytest.raises(CoordinateError):
        check_pointing("abc", 0)


def test_photometric_calibration():
    # 1 e-/s at the zero point magnitude: 10**(-0.4*(zp-31.4)) nJy.
    assert njy_per_electron("r", 1.0) == pytest.approx(10 ** (-0.4 * (28.36 - 31.4)))
    assert njy_per_electron("r", 30.0) == pytest.approx(njy_per_electron("r", 1.0) / 30)
    with pytest.raises(ValueError, match="exposure time"):
        njy_per_electron("r", 0)
