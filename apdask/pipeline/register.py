"""Registration of a template onto the science image's pixel grid (``apdask diff``).

Foreign images (``apdask.io.foreign``) may come on another grid: the template is left
alone when the grids agree, else resampled with the pipeline's Lanczos-3 warp.
"""

from __future__ import annotations

import warnings

import numpy as np

from apdask import config
from apdask.core.exposure import MASK, Exposure, TemplateTile
from apdask.exceptions import NoOverlapError, NoTemplateCoverageError, PartialCoverageWarning
from apdask.pipeline.template import warp_template

__all__ = ["match_template", "same_grid"]


def same_grid(a: Exposure, b: Exposure, tol: float = 0.01) -> bool:
    """True when two exposures have the same shape and WCS to ``tol`` pixels."""
    if a.shape != b.shape:
        return False
    ny, nx = a.shape
    gx, gy = np.meshgrid(np.linspace(0, nx - 1, 5), np.linspace(0, ny - 1, 5))
    ra, dec = a.wcs.pixel_to_world_values(gx, gy)
    bx, by = b.wcs.world_to_pixel_values(ra, dec)
    return bool(np.nanmax(np.hypot(bx - gx, by - gy)) < tol)


def match_template(
    template: Exposure, science: Exposure, *, min_coverage: float | None = None
) -> Exposure:
    """The template on the science pixel grid.

    Left alone (``meta["resampled"] = False``) when the grids are the same; otherwise
    resampled with Lanczos-3 (:func:`apdask.templates.warp_template`), masked pixels
    becoming NO_DATA.  Template coverage below ``min_coverage`` (default
    ``apdask.subtract.qa.min_coverage``) gives a :class:`PartialCoverageWarning`; the
    uncovered part is masked NO_DATA either way.

    Raises
    ------
    NoOverlapError
        If the template has no data on any science pixel.
    """
    min_coverage = float(config.get("subtract.qa.min_coverage", min_coverage))
    if same_grid(template, science):
        meta = {**template.meta, "resampled": False}
        nodata = (template.mask & MASK["NO_DATA"]) != 0
        meta["coverage"] = float(1.0 - nodata.mean())
        out = template.copy_with(wcs=science.wcs, meta=meta)
    else:
        bad = template.mask != 0
        img = np.where(bad, np.nan, template.image).astype(np.float32)
        tile = TemplateTile(img, template.variance, template.wcs, template.meta.get("band", ""),
                            "template", template.psf)  # fmt: skip
        try:
            ny, nx = science.shape
            warped = warp_template([tile], science.wcs, (ny, nx), psf=template.psf)
        except NoTemplateCoverageError:
            msg = (
                f"the template ({template.meta.get('path', '?')}) does not overlap the science "
                f"image ({science.meta.get('path', '?')}); give a template of the same field"
            )
            raise NoOverlapError(msg) from None
        meta = {**template.meta, "resampled": True, "coverage": warped.meta["coverage"]}
        out = warped.copy_with(meta=meta)
    if out.meta["coverage"] <= 0.0:
        raise NoOverlapError("the template has no data on the science image")
    if out.meta["coverage"] < min_coverage:
        warnings.warn(
            f"the template covers only {100 * out.meta['coverage']:.1f}% of the science image "
            f"(apdask.subtract.qa.min_coverage = {min_coverage}); the rest is masked NO_DATA "
            "and not searched",
            PartialCoverageWarning,
            stacklevel=2,
        )
    return out
