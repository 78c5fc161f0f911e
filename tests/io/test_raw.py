"""Tests of apdask.rawio: round trip, flips, validation, shutter model, laziness."""

import os

import numpy as np
import pytest
from astropy.io import fits

from apdask.core.camera import get_camera
from apdask.exceptions import RawFormatError
from apdask.io.raw import (
    RawMetadata,
    assembled_amp,
    effective_exptime,
    overscan,
    raw_name,
    read_raw,
    read_segment,
    write_raw,
)


def _meta(det, **kw):
    args = dict(
        instrument="TestCam", detector_name=det.name, detector_id=det.id, visit=42,
        exposure_id=42, snap=0, mjd_begin=61000.0, mjd_end=61000.0 + 31 / 86400,
        exptime=30.0, darktime=31.0, band="r", ra=150.0, dec=-30.0, rotpa=0.0,
        imgtype="SCIENCE",
        shutter={"open_begin": 0.0, "open_end": 1.0, "close_begin": 30.2, "close_end": 31.0},
    )  # fmt: skip
    args.update(kw)
    return RawMetadata(**args)


def _write(tmp_path, det):
    """Write a raw whose assembled data is a known ramp; return path and assembled image."""
    assembled = (np.arange(det.ny * det.nx) % 9973).reshape(det.shape).astype(np.int32)
    segs = []
    for amp in det.amplifiers:
        seg = np.full(amp.raw_shape, 15000 + amp.index, np.int32)
        data = assembled[amp.y0 : amp.y1, amp.x0 : amp.x1]
        if amp.flip_y:
            data = data[::-1, :]
        if amp.flip_x:
            data = data[:, ::-1]
        seg[amp.data_slice] = data
        segs.append(seg)
    path = tmp_path / raw_name("TestCam", 42, det.name)
    write_raw(path, det, segs, _meta(det))
    return path, assembled


@pytest.fixture
def det():
    return get_camera("testcam")["T01"]


def test_raw_name():
    assert raw_name("LSSTComCam", 1000, "R22_S11") == "LSSTComCam_1000_R22_S11_0.fits"
    assert raw_name("TestCam", 7, "T00", snap=1) == "TestCam_7_T00_1.fits"


def test_round_trip_and_flips(tmp_path, det):
    path, assembled = _write(tmp_path, det)
    raw = read_raw(path)
    assert raw.detector is det
    assert raw.meta.visit == 42 and raw.meta.band == "r" and raw.meta.detector_name == "T01"
    assert raw.meta.shutter["close_end"] == 31.0
    assert len(raw.amps) == len(det.amplifiers)
    assert any(a.flip_x for a in det.amplifiers) and any(a.flip_y for a in det.amplifiers)
    rebuilt = np.zeros(det.shape, np.float32)
    for seg, amp in zip(raw.amps, det.amplifiers, strict=True):
        assert seg.shape == amp.raw_shape and seg.dtype == np.float32
        s = seg.compute()
        rebuilt[amp.y0 : amp.y1, amp.x0 : amp.x1] = assembled_amp(s, amp)
        assert np.all(overscan(s, amp) == 15000 + amp.index)
    np.testing.assert_array_equal(rebuilt, assembled)


def test_headers(tmp_path, det):
    path, _ = _write(tmp_path, det)
    with fits.open(path) as hdul:
        h = hdul[0].header
        assert h["TIMESYS"] == "TAI" and h["INSTRUME"] == "TestCam"
        assert h["DATE-BEG"].startswith("2025-")
        flipped = next(a for a in det.amplifiers if a.flip_x and a.flip_y)
        eh = hdul[flipped.name].header
        assert eh["DETSEC"] == f"[{flipped.x1}:{flipped.x0 + 1},{flipped.y1}:{flipped.y0 + 1}]"
        assert eh["DATASEC"] == f"[{flipped.prescan + 1}:{flipped.prescan + flipped.nx},1:256]"
        assert eh["GAIN"] == flipped.gain


def test_effective_exptime_and_midpoint(tmp_path, det):
    path, _ = _write(tmp_path, det)
    meta = read_raw(path).meta
    assert effective_exptime(meta) == pytest.approx(30.6 - 0.5)
    assert meta.mjd_mid == pytest.approx(61000.0 + 0.5 * (0.5 + 30.6) / 86400)


def test_graph_does_not_read_pixels(tmp_path, det, monkeypatch):
    path, _ = _write(tmp_path, det)
    calls = []
    import apdask.io.raw as rawio

    orig = rawio._read_amp
    monkeypatch.setattr(rawio, "_read_amp", lambda *a: calls.append(a) or orig(*a))
    raw = read_raw(path)
    total = sum(a.sum() for a in raw.amps)  # graph only
    assert calls == []
    assert float(total.compute()) > 0
    assert len(calls) == len(det.amplifiers)
    # no pixel data embedded in the graph
    graph = dict(raw.amps[0].__dask_graph__())
    assert not any(isinstance(v, np.ndarray) and v.size > 100 for v in graph.values())


def test_read_segment_equals_astropy(tmp_path, det):
    path, _ = _write(tmp_path, det)
    raw = read_raw(path)
    assert len(raw.segments) == len(det.amplifiers)
    with fits.open(path) as hdul:
        for amp, seg in zip(det.amplifiers, raw.segments, strict=True):
            assert seg.index == amp.index + 1 and seg.shape == amp.raw_shape
            got = read_segment(path, seg)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, hdul[seg.index].data.astype(np.float32))


def test_read_segment_scaled_extension_left_to_astropy(tmp_path, det):
    path, _ = _write(tmp_path, det)
    with fits.open(path, mode="update") as hdul:
        hdul[1].header["BZERO"] = 10.0
    raw = read_raw(path)
    assert raw.segments[0] is None and raw.segments[1] is not None


def test_read_segment_truncated(tmp_path, det):
    path, _ = _write(tmp_path, det)
    last = read_raw(path).segments[-1]
    with open(path, "r+b") as f:
        f.truncate(last.offset + 100)
    with pytest.raises(RawFormatError, match="truncated"):
        read_segment(path, last)


def test_missing_file(tmp_path):
    with pytest.raises(RawFormatError, match="does not exist"):
        read_raw(tmp_path / "nope.fits")


def test_not_fits(tmp_path):
    p = tmp_path / "junk.fits"
    p.write_text("this is not FITS")
    with pytest.raises(RawFormatError, match="not a readable FITS"):
        read_raw(p)


def test_truncated_file(tmp_path, det):
    path, _ = _write(tmp_path, det)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(RawFormatError):
        read_raw(path)


def test_missing_keyword(tmp_path, det):
    path, _ = _write(tmp_path, det)
    with fits.open(path, mode="update") as hdul:
        del hdul[0].header["FILTBAND"]
    with pytest.raises(RawFormatError, match="FILTBAND"):
        read_raw(path)


def test_unknown_detector_and_instrument(tmp_path, det):
    path, _ = _write(tmp_path, det)
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["DETNAME"] = "R99_S99"
    with pytest.raises(RawFormatError, match="DETNAME"):
        read_raw(path)
    path, _ = _write(tmp_path, det)
    with fits.open(path, mode="update") as hdul:
        hdul[0].header["INSTRUME"] = "HSC"
    with pytest.raises(RawFormatError, match="INSTRUME"):
        read_raw(path)


def test_wrong_geometry(tmp_path, det):
    path, _ = _write(tmp_path, det)
    with pytest.raises(RawFormatError, match="amplifiers"):
        read_raw(path, camera=_FakeCamera(get_camera("comcam")[0], det))


class _FakeCamera:
    def __init__(self, other, det):
        self.other, self.det = other, det

    def __getitem__(self, key):
        from dataclasses import replace

        return replace(self.other, name=self.det.name, id=self.det.id)
