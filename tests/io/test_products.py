"""Image data products (apdask.io.products): FITS that astropy reads back by itself."""

from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.nddata import CCDData, VarianceUncertainty

from apdask.config import PipelineConfig
from apdask.core.exposure import MASK, Exposure
from apdask.exceptions import ConfigurationError, ProductNotFoundError, ProductWriteError
from apdask.io import products
from apdask.io.products import describe, product_path, prune_products, read_product, write_product
from tests._pixels import gaussian_psf, make_wcs


def _exposure(shape=(64, 80), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(0.0, 30.0, shape).astype(np.float32)
    variance = np.full(shape, 900.0, np.float32)
    mask = np.zeros(shape, np.uint32)
    mask[3, 4] = MASK["SAT"]
    mask[10, 11] = MASK["DETECTED"]
    mask[20, 21] = MASK["DETECTED"] | MASK["CR"]
    meta = {"visit": 7, "detector": 3, "band": "r", "mjd": 60000.25, "exptime": 30.0}
    return Exposure(image, variance, mask, make_wcs(shape), gaussian_psf(3.0), meta)


def test_round_trip_keeps_pixels_wcs_variance_psf_and_mask_planes(tmp_path):
    exp = _exposure()
    path = write_product(tmp_path, "difference", exp, visit=7, detector="R22_S11")
    assert path == product_path(tmp_path, "difference", 7, "R22_S11")
    assert path.name == "difference_R22_S11.fits" and path.parent.name == "visit_7"
    ccd = read_product(tmp_path, "difference", 7, "R22_S11")
    np.testing.assert_array_equal(ccd.data, exp.image)
    assert isinstance(ccd.uncertainty, VarianceUncertainty)
    np.testing.assert_array_equal(ccd.uncertainty.array, exp.variance)
    np.testing.assert_allclose(ccd.psf, exp.psf, rtol=1e-6)
    assert str(ccd.unit) == "nJy"
    # the same sky position at the same pixel
    ra, dec = exp.wcs.pixel_to_world_values(40.3, 12.7)
    x, y = ccd.wcs.world_to_pixel_values(ra, dec)
    assert x == pytest.approx(40.3, abs=1e-6) and y == pytest.approx(12.7, abs=1e-6)
    # mask: pixels not to be trusted; a detection alone is not one of them
    assert ccd.mask[3, 4] and ccd.mask[20, 21] and not ccd.mask[10, 11]
    assert ccd.mask.sum() == 2
    np.testing.assert_array_equal(ccd.flags, exp.mask)
    assert ccd.meta["VISIT"] == 7 and ccd.meta["BAND"] == "r" and ccd.meta["MJD-AVG"] == 60000.25


@pytest.mark.parametrize("slab", [1000, 1 << 22])
def test_file_has_the_bytes_astropy_writes(tmp_path, monkeypatch, slab):
    """The slab-by-slab writer gives byte for byte the file of ``HDUList.writeto``: the
    same headers, big-endian data, each HDU padded to 2880 bytes (slabs of 1000 bytes:
    many per plane, the last one short; an odd shape: padding in every HDU)."""
    monkeypatch.setattr(products, "_SLAB_BYTES", slab)
    exp = _exposure(shape=(37, 53), seed=4)
    path = write_product(tmp_path, "difference", exp, visit=7, detector="R22_S11")
    expected = tmp_path / "astropy.fits"
    products._hdus(exp, "difference", "R22_S11").writeto(expected)
    assert path.read_bytes() == expected.read_bytes()
    assert path.stat().st_size % 2880 == 0


def test_astropy_reads_the_file_without_apdask(tmp_path):
    """CCDData.read (astropy's own reader) gets image, unit, WCS, variance and PSF."""
    exp = _exposure()
    path = write_product(tmp_path, "science", exp, visit=7, detector="T00")
    ccd = CCDData.read(path)
    np.testing.assert_array_equal(ccd.data, exp.image)
    assert str(ccd.unit) == "nJy" and ccd.wcs.has_celestial
    assert isinstance(ccd.uncertainty, VarianceUncertainty)
    assert ccd.psf is not None and ccd.psf.shape == exp.psf.shape
    assert ccd.mask.sum() == 3  # astropy: any plane set


def test_missing_product_names_what_the_visit_has(tmp_path):
    write_product(tmp_path, "difference", _exposure(), visit=7, detector="T00")
    with pytest.raises(ProductNotFoundError, match="this visit has difference_T00") as e:
        read_product(tmp_path, "template", 7, "T00")
    assert e.value.exit_code == 66
    with pytest.raises(ProductNotFoundError, match="this visit has none"):
        read_product(tmp_path, "difference", 8, "T00")


def test_unwritable_directory_is_a_clear_error_and_leaves_nothing(tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions: a file where the visit directory should be
        (tmp_path / "visit_7").write_text("not a directory")
    else:  # pragma: no cover - CI runs as root
        tmp_path.chmod(0o500)
    with pytest.raises(ProductWriteError, match="cannot write the difference image") as e:
        write_product(tmp_path, "difference", _exposure(), visit=7, detector="T00")
    assert e.value.exit_code == 73
    assert "products.kinds" in str(e.value)
    assert not list(tmp_path.rglob("*.fits")) and not list(tmp_path.rglob("*.tmp"))


def test_prune_keeps_the_newest_visits_and_the_one_being_written(tmp_path):
    for v in (5, 7, 9, 11):
        write_product(tmp_path, "difference", _exposure(), visit=v, detector="T00")
    assert prune_products(tmp_path, 2, protect=[5]) == [7]
    assert sorted(describe(tmp_path)) == [5, 9, 11]
    assert prune_products(tmp_path, 0) == []  # 0 keeps all


def test_products_config_is_checked():
    assert PipelineConfig.resolve().products.kinds == ("difference",)
    cfg = PipelineConfig.resolve(products={"kinds": ["science", "difference"], "keep_visits": 0})
    assert cfg.products.kinds == ("science", "difference") and cfg.products.keep_visits == 0
    assert PipelineConfig.resolve(products={"kinds": []}).products.kinds == ()
    with pytest.raises(ConfigurationError, match="choose from science, template, difference"):
        PipelineConfig.resolve(products={"kinds": ["diff"]})
    with pytest.raises(ConfigurationError, match="keep_visits"):
        PipelineConfig.resolve(products={"keep_visits": -1})
    assert cfg.products.root("/r") == "/r/products"
