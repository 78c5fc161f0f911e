"""The raw-calibration pipeline (DMTN-092 §2.3): verify one bias, dark, flat or CBP frame.

It is started at startIntegration with the image's *intent*, the CCD, any filter in
place, the anticipated exposure time, the distributor and the image name; there is
no nextVisit.  Everything else comes from the headers.  :func:`process_calib`

1. fetches the raw through the distributor (blocking, with the usual timeout) and
   checks its header against the invocation (DETNAME, IMGTYPE, FILTBAND);
2. runs ISR as far as the intent allows (:func:`apdask.isr.isr_arrays`):

   ======== ================================== ==========================
   intent   ISR steps                          frame units
   ======== ================================== ==========================
   bias     overscan, gain                     electrons
   dark     overscan, gain, bias; ÷ DARKTIME   electrons per second
   flat/cbp overscan, gain, bias, dark         normalised (median ratio 1)
   ======== ================================== ==========================

3. compares the frame with the current master calibration of the same kind
   (:meth:`apdask.butler.Butler.get_calib`) and computes per-amplifier metrics;
4. gives a pass/fail verdict against thresholds from ``apdask.calib.*``;
5. writes a JSON report into the Butler repository
   (``<repo>/calib-reports/<intent>/<instrument>_<exposure>_<ccd>.json``) and
   publishes it to a metrics sink: ``file://PATH`` (JSON Lines, the default
   ``<repo>/calib-reports/metrics.jsonl``) or ``kafka://HOST:PORT/TOPIC``.

The metrics are defined in ``docs/operations.md``.
"""

from apdask.pipeline.calib.frames import INTENTS, amp_metrics, calib_frame
from apdask.pipeline.calib.metrics import MetricsDeliveryError, publish_metrics
from apdask.pipeline.calib.verify import process_calib

__all__ = [
    "INTENTS",
    "MetricsDeliveryError",
    "amp_metrics",
    "process_calib",
    "publish_metrics",
    "calib_frame",
]
