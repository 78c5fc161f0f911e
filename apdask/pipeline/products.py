"""The CCD step that keeps its images: calibrated science, warped template, difference.

It runs after the CCD's alerts are published, so that writing up to three full-frame
images never delays an alert; the report waits for it.  Which images are kept, where
and for how many visits is ``apdask.products.*`` (docs/products.md).
"""

from __future__ import annotations

import time
from typing import Any

from apdask.config import PipelineConfig
from apdask.core.camera import Detector
from apdask.core.records import RawHeader, Subtraction
from apdask.exceptions import ProductWriteError
from apdask.io.products import prune_products, write_product
from apdask.pipeline.steps import CcdFailure

__all__ = ["save_products_task"]


def save_products_task(
    published: Any,
    sub: Subtraction | CcdFailure,
    header: RawHeader,
    detector: Detector,
    root: str,
    cfg: PipelineConfig,
) -> dict[str, Any] | CcdFailure:
    """Write the CCD's image products; ``{"paths": {kind: path}, "timings": ...}``.

    ``published`` is only an ordering edge: the images are written once the alerts
    are out, or once the CCD failed after its subtraction (a failed QA check, a PPDB
    error): the images of a failed CCD are the ones a person wants to look at.  A CCD
    that failed before it had a difference image has none.  Older visits beyond
    ``products.keep_visits`` are pruned.

    Returns
    -------
    dict or CcdFailure
        The paths and time taken, or a :class:`~apdask.pipeline.steps.CcdFailure`
        with :class:`~apdask.exceptions.ProductWriteError` (exit code 73) when a
        product could not be written.
    """
    del published  # ordering only
    if isinstance(sub, CcdFailure):
        return {"paths": {}, "timings": {}}
    t0 = time.time()
    kinds = cfg.products.kinds
    images = {"science": sub.science, "template": sub.template, "difference": sub.difference}
    try:
        paths = {
            kind: str(write_product(root, kind, images[kind], visit=header.visit,
                                    detector=detector.name))
            for kind in kinds
        }  # fmt: skip
    except ProductWriteError as err:
        return CcdFailure(err)
    if kinds:
        prune_products(root, cfg.products.keep_visits, protect=[header.visit])
    return {"paths": paths, "timings": {"products": time.time() - t0}}
