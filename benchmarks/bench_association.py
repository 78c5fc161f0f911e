"""Association speed: N DIASources against M DIAObjects (issue 5 target: 1e3 vs 1e5 ≤ 50 ms)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from astropy.table import Table

from apdask.pipeline.associate import associate

AS = 1 / 3600.0


def _catalogs(n_src, n_obj, seed=0):
    rng = np.random.default_rng(seed)
    ora, odec = rng.uniform(0, 1.0, n_obj), rng.uniform(0, 1.0, n_obj)
    objects = Table({"diaObjectId": np.arange(n_obj, dtype=np.int64), "ra": ora, "dec": odec})
    pick = rng.choice(n_obj, n_src, replace=False)
    sources = Table(
        {
            "ra": ora[pick] + rng.normal(0, 0.1 * AS, n_src),
            "dec": odec[pick] + rng.normal(0, 0.1 * AS, n_src),
        }
    )
    return sources, objects, pick


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sources", type=int, default=1000)
    p.add_argument("--objects", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=20)
    args = p.parse_args(argv)
    sources, objects, pick = _catalogs(args.sources, args.objects)
    associate(sources, objects, 1.0)  # warm up
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = associate(sources, objects, 1.0)
        times.append(time.perf_counter() - t0)
    report = {
        "sources": args.sources,
        "objects": args.objects,
        "median_ms": 1e3 * float(np.median(times)),
        "min_ms": 1e3 * float(np.min(times)),
        "correct_fraction": float(np.mean(out == pick)),
        "target_ms": 50.0,
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
