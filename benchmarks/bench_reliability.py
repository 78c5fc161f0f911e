"""Real/bogus ``reliability`` inference cost per DIASource (issue 16 target: <= 0.1 ms).

Measures, for CCDs of N point sources measured by the pipeline on a synthetic
difference image, the cost per source of the shipped model alone and of the features
plus the model (what ``measure_sources`` adds), best of ``--repeat``.
"""

from __future__ import annotations

import argparse
import json
import os

from apdask.pipeline.measure.reliability import load_reliability_model
from apdask.tools.train_reliability import inference_cost


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", default="20,200,2000", help="sources per CCD, comma-separated")
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args(argv)
    model = load_reliability_model()
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        r = inference_cost(model, n=n, repeats=args.repeat)
        rows.append({k: (1e3 * v if k.endswith("_per_source") else v) for k, v in r.items()})
    report = {
        "model": model.version,
        "n_trees": int(model.leaf.shape[0]),
        "depth": model.depth,
        "ms_per_source": [
            {
                "n_sources": r["n_sources"],
                "model": r["model_s_per_source"],
                "features_and_model": r["features_and_model_s_per_source"],
            }
            for r in rows
        ],  # fmt: skip
        "target_ms_per_source": 0.1,
        "load_average": list(os.getloadavg()),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
