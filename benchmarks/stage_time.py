"""Time one per-CCD stage alone on the real inputs of a full-size CCD (a profiling aid).

Not a benchmark of ``apdask bench``: a tool to measure one stage before and after a
change, back to back, as ``docs/performance.md`` did.  Two steps::

    python benchmarks/stage_time.py capture REPO STAGES.pkl     # once: run the last visit
    python benchmarks/stage_time.py time STAGES.pkl STAGE [N]   # N timed calls (default 5)

``capture`` runs the repository's last visit (``apdask simulate``; raws read from
``REPO/raw``, a throw-away PPDB and sink) on the threaded scheduler and pickles the
results of the tasks ``prefetch, prewarp, calibrate, astrometry, warp, psf, subtract,
detect`` (about 1.2 GB for a 4k CCD).  ``time`` calls one stage's task function
on them ``N + 1`` times in this process and prints the median wall and CPU seconds of
the last ``N`` (CPU: all threads of the process, numba's included).  STAGE is one of
``prewarp, astrometry, warp, psf, subtract, detect``.  The allocator policy is the
pipeline's (:func:`apdask.core.memory.keep_freed_memory`), so new frames do not pay
first-touch page faults the pipeline does not pay.  ``STAGE_OUT=FILE`` pickles the
last result, to compare outputs before and after a change.
"""

from __future__ import annotations

import glob
import os
import pickle
import sys
import tempfile
import time

import numpy as np
from dask.callbacks import Callback
from dask.utils import key_split

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from apdask.config import PipelineConfig  # noqa: E402
from apdask.core.memory import keep_freed_memory  # noqa: E402
from apdask.pipeline import tasks  # noqa: E402
from apdask.pipeline.nextvisit import NextVisit  # noqa: E402

KEPT = ("prefetch", "prewarp", "calibrate", "astrometry", "warp", "psf", "subtract", "detect")


def capture(repo: str, out: str) -> None:
    """Run the last visit of ``repo`` and pickle its tasks' results (and the visit)."""
    from apdask.pipeline.run import run_visit
    from apdask.ppdb import create_ppdb

    path = sorted(glob.glob(os.path.join(repo, "visits", "*.json")))[-1]
    nv = NextVisit.from_json(path)
    kept: dict[str, object] = {}

    class Grab(Callback):
        def _posttask(self, key, result, dsk, state, id):
            if key_split(key) in KEPT:
                kept[key_split(key)] = result

    tmp = tempfile.mkdtemp(prefix="stage-time-")
    ppdb = create_ppdb(f"sqlite:///{tmp}/apdb.sqlite3", f"{tmp}/apdb.yaml")
    with Grab():
        run_visit(nv, repo=repo, ppdb=ppdb, alerts=f"{tmp}/alerts",
                  distributor=os.path.join(repo, "raw"), timeout=10.0, replace=True)  # fmt: skip
    kept["visit"] = nv.to_dict()
    kept["repo"] = os.path.abspath(repo)
    with open(out, "wb") as f:
        pickle.dump(kept, f, protocol=5)
    print(f"{out}: {', '.join(k for k in KEPT if k in kept)}")


def _call(stage: str, s: dict, cfg: PipelineConfig):
    nv = NextVisit.from_dict(s["visit"])
    det = nv.camera[nv.detectors[0]]
    science = s["calibrate"].exposure

    class Header:  # the header fields the tasks read
        mjd, exptime = science.meta["mjd"], science.meta["exptime"]
        ra, dec, rotpa = nv.ra, nv.dec, nv.rotationAngle

    def plain(fn):
        return getattr(fn, "__wrapped__", fn)  # without the per-CCD failure wrapper

    calls = {
        "prewarp": lambda: plain(tasks.prewarp_task)(
            s["repo"], det, nv.filters, nv.ra, nv.dec, nv.rotationAngle, cfg
        ),
        "astrometry": lambda: tasks.astrometry_task(s["calibrate"], s["prefetch"]),
        "warp": lambda: plain(tasks.warp_task)(
            s["astrometry"], s["prewarp"], s["repo"], det, Header, cfg
        ),
        "psf": lambda: plain(tasks.science_psf_task)(s["calibrate"]),
        "subtract": lambda: plain(tasks.subtract_task)(s["psf"], s["warp"], cfg),
        "detect": lambda: plain(tasks.detect_task)(
            s["subtract"], nv.visit, det, nv.filters, Header, cfg
        ),
    }
    if stage not in calls:
        raise SystemExit(f"unknown stage {stage!r}; choose from {', '.join(calls)}")
    return calls[stage]


def time_stage(path: str, stage: str, n: int) -> None:
    """Print the median wall and CPU seconds of ``n`` calls of ``stage``."""
    keep_freed_memory(enabled=None)
    with open(path, "rb") as f:
        s = pickle.load(f)
    job = _call(stage, s, PipelineConfig.resolve())
    walls, cpus = [], []
    for i in range(n + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        result = job()
        if i:  # the first call loads what is cached on first use
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    print(f"{stage}: wall median {np.median(walls):.3f} s (min {min(walls):.3f}), "
          f"CPU median {np.median(cpus):.3f} s (min {min(cpus):.3f}), n={n}")  # fmt: skip
    if os.environ.get("STAGE_OUT"):
        with open(os.environ["STAGE_OUT"], "wb") as f:
            pickle.dump(result, f, protocol=5)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "capture":
        capture(sys.argv[2], sys.argv[3])
    elif len(sys.argv) >= 4 and sys.argv[1] == "time":
        time_stage(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) > 4 else 5)
    else:
        raise SystemExit(__doc__)
