"""Tests of apdask.butler: templates, calibs, DRP objects, ingest."""

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from apdask.core.camera import get_camera
from apdask.exceptions import ConfigurationError
from apdask.io.butler import Butler, polygons_overlap


def _wcs(ra, dec, n=64, scale=0.2):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra, dec]
    w.wcs.crpix = [(n + 1) / 2, (n + 1) / 2]
    w.wcs.cdelt = [-scale / 3600, scale / 3600]
    w.pixel_shape = (n, n)
    return w


def test_polygons_overlap():
    a = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float) + [150, -30]
    assert polygons_overlap(a, a + [0.5, 0.5])
    assert not polygons_overlap(a, a + [2.0, 0.0])
    assert polygons_overlap(np.array([[359.5, 0], [0.5, 0], [0.5, 1], [359.5, 1]]),
                            np.array([[0.1, 0.1], [0.2, 0.1], [0.2, 0.2], [0.1, 0.2]]))  # fmt: skip
    assert not polygons_overlap(a, -a)  # other side of the sky


def test_templates_overlap_selection(tmp_path):
    b = Butler(tmp_path)
    img = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    psf = np.ones((3, 3)) / 9
    b.put_template("r", "near", img, img + 1, _wcs(150.0, -30.0), psf=psf)
    b.put_template("r", "far", img, img + 1, _wcs(160.0, -30.0))
    b.put_template("g", "near_g", img, img + 1, _wcs(150.0, -30.0))
    det = get_camera("testcam")[0]
    corners = det.footprint(150.0, -30.0)
    tiles = Butler(tmp_path).get_templates("r", corners)
    assert [t.tile_id for t in tiles] == ["near"]
    t = tiles[0]
    assert t.band == "r" and t.image.dtype == np.float32
    np.testing.assert_array_equal(t.image, img)
    np.testing.assert_array_equal(t.variance, img + 1)
    np.testing.assert_allclose(t.psf, psf)
    np.testing.assert_allclose(t.wcs.wcs.crval, [150.0, -30.0])
    assert t.wcs.pixel_shape == (64, 64)
    assert b.get_templates("i", corners) == []
    assert b.get_templates("r", det.footprint(200.0, 10.0)) == []


def test_template_codec_and_tiles_written_with_zstd_still_read(tmp_path):
    import zarr
    from zarr.codecs import ZstdCodec

    b = Butler(tmp_path)
    img = np.random.default_rng(1).normal(size=(64, 64)).astype(np.float32)
    b.put_template("r", "new", img, img + 5, _wcs(150.0, -30.0))
    arr = b._group["templates/r/new/image"]
    assert [c.to_dict()["name"] for c in arr.compressors] == ["blosc"]
    # a tile as repositories before the codec change hold it: zstd
    b.put_template("r", "old", img, img + 5, _wcs(150.0, -30.0))
    grp = b._group["templates/r/old"]
    for name, data in (("image", img), ("variance", img + 5)):
        attrs = dict(grp[name].attrs)
        a = grp.create_array(name, shape=data.shape, chunks=(64, 64), dtype="float32",
                             compressors=ZstdCodec(level=0), overwrite=True)  # fmt: skip
        a[...] = data
        a.attrs.update(attrs)
    assert isinstance(zarr.open_group(b.store)["templates/r/old/image"].compressors[0], ZstdCodec)
    tiles = Butler(tmp_path).get_templates("r", get_camera("testcam")[0].footprint(150.0, -30.0))
    assert sorted(t.tile_id for t in tiles) == ["new", "old"]
    for t in tiles:
        np.testing.assert_array_equal(t.image, img)
        np.testing.assert_array_equal(t.variance, img + 5)


def test_calib_validity(tmp_path):
    cam = get_camera("testcam")
    det = cam[1]
    b = Butler(tmp_path, camera="testcam")
    b.put_calib("bias", 1, np.zeros(det.shape), valid_from=0, valid_to=100)
    b.put_calib("bias", 1, np.ones(det.shape), valid_from=100, valid_to=200)
    b.put_calib("flat", 1, np.full(det.shape, 2.0), band="r")
    assert b.get_calib("bias", 1, None, 50).max() == 0
    assert b.get_calib("bias", 1, "r", 150).min() == 1
    assert b.get_calib("flat", 1, "r", 150)[0, 0] == 2.0
    lazy = b.get_calib_lazy("bias", 1, None, 150)
    assert lazy.chunks == det.amp_chunks
    with pytest.raises(ConfigurationError, match="ingest-calib") as exc:
        b.get_calib("bias", 1, None, 250)
    assert "bias" in str(exc.value) and "250" in str(exc.value)
    with pytest.raises(ConfigurationError, match="band"):
        b.get_calib("flat", 1, "g", 150)
    with pytest.raises(ConfigurationError, match="needs a band"):
        b.put_calib("flat", 1, np.ones(det.shape))
    with pytest.raises(ConfigurationError, match="shape"):
        b.put_calib("dark", 1, np.ones((10, 10)))


def test_drp_round_trip(tmp_path):
    b = Butler(tmp_path)
    assert len(b.get_drp_objects()) == 0
    t = Table(
        {
            "objectId": np.array([1, 2, 3], np.int64),
            "ra": [150.0, 150.001, 170.0],
            "dec": [-30.0, -30.001, -30.0],
            "r_flux": [1e3, 2e3, 3e3],
            "extendedness": [0.0, 1.0, 0.0],
        }
    )
    b.put_drp_objects(t)
    out = Butler(tmp_path).get_drp_objects()
    assert list(out["objectId"]) == [1, 2, 3] and out["objectId"].dtype == np.int64
    np.testing.assert_allclose(out["r_flux"], t["r_flux"])
    sub = b.get_drp_objects(get_camera("testcam")[0].footprint(150.0, -30.0, padding_arcsec=60))
    assert set(sub["objectId"]) == {1, 2}


def test_ingest_template(tmp_path):
    w = _wcs(150.0, -30.0, n=50)
    rng = np.random.default_rng(0)
    data = rng.normal(0, 3.0, (50, 50)).astype(np.float32)
    hdr = w.to_header()
    hdr["BUNIT"] = "uJy"
    fits.PrimaryHDU(data, header=hdr).writeto(tmp_path / "coadd.fits")
    b = Butler(tmp_path / "repo")
    tile_id = b.ingest_template(tmp_path / "coadd.fits", "r")
    assert tile_id == "coadd"
    (t,) = b.get_templates("r", get_camera("testcam")[0].footprint(150.0, -30.0))
    np.testing.assert_allclose(t.image, data * 1e3, rtol=1e-6)
    assert np.allclose(t.variance, (3e3) ** 2, rtol=0.3)


def test_ingest_template_with_variance_extension(tmp_path):
    w = _wcs(150.0, -30.0, n=20)
    data = np.ones((20, 20), np.float32)
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(data, header=w.to_header(), name="IMAGE"),
            fits.ImageHDU(np.full((20, 20), 4.0, np.float32), name="VARIANCE"),
        ]
    )
    hdul.writeto(tmp_path / "t.fits")
    b = Butler(tmp_path / "repo")
    b.ingest_template(tmp_path / "t.fits", "g", tile_id="x1")
    (t,) = b.get_templates("g", np.array([[150.01, -30.01], [149.99, -30.01], [150, -29.99]]))
    assert t.tile_id == "x1" and np.all(t.variance == 4.0)


def test_ingest_rejects_fits_without_wcs(tmp_path):
    fits.PrimaryHDU(np.zeros((10, 10), np.float32)).writeto(tmp_path / "nowcs.fits")
    with pytest.raises(ConfigurationError, match="celestial WCS"):
        Butler(tmp_path / "repo").ingest_template(tmp_path / "nowcs.fits", "r")


def test_ingest_calib(tmp_path):
    det = get_camera("testcam")[0]
    fits.PrimaryHDU(np.full(det.shape, 0.5, np.float32)).writeto(tmp_path / "dark.fits")
    b = Butler(tmp_path / "repo", camera="testcam")
    b.ingest_calib(tmp_path / "dark.fits", "dark", 0, valid_from=10, valid_to=20)
    assert b.get_calib("dark", 0, None, 15).mean() == 0.5
