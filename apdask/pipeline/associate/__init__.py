"""Association of DiaSources with DiaObjects and DiaObject aggregates.

As in Rubin's ``ap_association``: candidate pairs within the matching radius come
from a ``cKDTree`` on unit vectors, and the assignment is an optimal bipartite
matching on a χ² cost (squared separation over the summed positional
variances), solved per connected component of the candidate graph so that it
stays fast for 1e5 objects (:mod:`.matching`).  :func:`update_objects` recomputes
the DPDD aggregates of every touched DiaObject from its full source history,
including ``{b}_fpFluxMean`` from the forced-photometry history plus this visit's
forced sources (:mod:`.objects`).  :func:`associate_ccd` chains both for one CCD
and records each new DiaObject's nearest DRP Objects (``DiaObject_To_Object_Match``
rows, :mod:`.drp`).
"""

from apdask.core.camera import BANDS
from apdask.pipeline.associate.ccd import associate_ccd
from apdask.pipeline.associate.drp import drp_matches, nearest_drp_objects
from apdask.pipeline.associate.matching import associate
from apdask.pipeline.associate.objects import update_objects

__all__ = [
    "associate",
    "update_objects",
    "associate_ccd",
    "nearest_drp_objects",
    "drp_matches",
    "BANDS",
]
