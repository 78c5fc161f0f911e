"""Trailed-source fit accuracy and cost (issue 16).

``injected``: ``--n`` trails of 5-30 px at random angles, PSF FWHM 4 px, on noisy
images, fitted by :func:`apdask.pipeline.measure.trail.fit_trail` at two total
fluxes (point-source S/N about 410 and 82); median and scatter of the relative
length and flux errors and of the angle error (degrees), the pulls, and point
sources' fitted lengths.  ``pipeline`` (``--pipeline``): a test-camera repository
with ``--asteroids`` per CCD and visit (seed 11, two visits), processed by
``run_visit``; each asteroid's alert is matched by ``trailRa``/``trailDec`` and
compared with the truth.

Prints one JSON report.  Not a unit test; run
``.venv/bin/python benchmarks/bench_trail.py [--pipeline]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.pipeline.test_trail import NOISE, SIGMA, _angle_error, _fit  # noqa: E402


def _stats(a: np.ndarray) -> dict[str, float]:
    med = float(np.median(a))
    return {"median": med, "robust_sigma": float(1.4826 * np.median(np.abs(a - med))),
            "std": float(np.std(a))}  # fmt: skip


def injected(n: int) -> dict[str, object]:
    """Fits of ``n`` injected trails at two fluxes, and of ``n // 4`` point sources."""
    out: dict[str, object] = {}
    for flux in (25000.0, 5000.0):
        rng = np.random.default_rng(7)
        dl, da, df, pl, pf, ts = [], [], [], [], [], []
        for k in range(n):
            length, angle = rng.uniform(5, 30), rng.uniform(-90, 90)
            t0 = time.perf_counter()
            fit = _fit(length, angle, flux, seed=5000 + k)
            ts.append(time.perf_counter() - t0)
            dl.append(fit["length"] / length - 1)
            da.append(_angle_error(fit["theta"], angle))
            df.append(fit["flux"] / flux - 1)
            pl.append((fit["length"] - length) / fit["length_err"])
            pf.append((fit["flux"] - flux) / fit["flux_err"])
        snr = flux / (NOISE * np.sqrt(4 * np.pi * SIGMA**2))
        out[f"snr_{snr:.0f}"] = {
            "length_rel": _stats(np.array(dl)), "angle_deg": _stats(np.array(da)),
            "flux_rel": _stats(np.array(df)), "pull_std_length": float(np.std(pl)),
            "pull_std_flux": float(np.std(pf)),
            "ms_per_trail_with_image": 1e3 * float(np.median(ts)),
        }  # fmt: skip
    pts = [_fit(0.0, 0.0, 25000.0, seed=9000 + s) for s in range(max(n // 4, 1))]
    lengths = np.array([p["length"] for p in pts])
    out["point_sources"] = {
        "length_px_median": float(np.median(lengths)),
        "length_px_p95": float(np.percentile(lengths, 95)),
        "dchi2_zero_length_max": float(max(p["dchi2_point"] for p in pts)),
    }
    return out


def pipeline(asteroids: int) -> dict[str, object]:
    """The simulator's asteroids through ``run_visit``, matched to their alerts."""
    from astropy.table import Table

    from apdask.alerts.sinks import read_alerts
    from apdask.pipeline.nextvisit import NextVisit
    from apdask.pipeline.run import run_visit
    from apdask.tools.simulate import simulate_repo

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "repo")
        visits = simulate_repo("testcam", root, n_visits=2, seed=11, asteroids=asteroids)
        for v in visits:
            run_visit(NextVisit.from_dict(v), repo=root, timeout=10)
            truth = Table.read(f"{root}/truth/visit_{v['visit']}.ecsv")
            src = [a["diaSource"] for a in read_alerts(f"{root}/alerts/visit_{v['visit']}")]
            fitted = [bool(s["trailNdata"]) for s in src]
            ra = np.array(
                [s["trailRa"] if f else s["ra"] for s, f in zip(src, fitted, strict=True)]
            )
            dec = np.array(
                [s["trailDec"] if f else s["dec"] for s, f in zip(src, fitted, strict=True)]
            )
            for r in truth[truth["kind"] == "asteroid"]:
                d = np.hypot((ra - r["ra"]) * np.cos(np.deg2rad(r["dec"])), dec - r["dec"])
                k = int(np.argmin(d)) if len(d) else -1
                if k < 0 or d[k] * 3600 > 1.0:
                    rows.append((r["trail_length"], r["trail_angle"], r["flux"], *[np.nan] * 4))
                    continue
                s = src[k]
                rows.append((r["trail_length"], r["trail_angle"], r["flux"],
                             s["trailLength"] if fitted[k] else np.nan,
                             s["trailAngle"] if fitted[k] else np.nan,
                             s["trailFlux"] if fitted[k] else np.nan,
                             s["psfFlux"] / s["psfFluxErr"]))  # fmt: skip
    a = np.array(rows, float)
    ok = np.isfinite(a[:, 3])
    hi = ok & (a[:, 6] > 30)
    return {
        "asteroids": len(a), "fitted": int(ok.sum()),
        "detected_not_fitted": int((~ok & np.isfinite(a[:, 6])).sum()),
        "length_rel": _stats(a[ok, 3] / a[ok, 0] - 1),
        "angle_deg": _stats((a[ok, 4] - a[ok, 1] + 90) % 180 - 90),
        "flux_rel": _stats(a[ok, 5] / a[ok, 2] - 1),
        "psf_snr_over_30": {"n": int(hi.sum()), "length_rel": _stats(a[hi, 3] / a[hi, 0] - 1),
                            "flux_rel": _stats(a[hi, 5] / a[hi, 2] - 1)},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="injected trails per flux")
    ap.add_argument("--pipeline", action="store_true", help="also the simulator's asteroids")
    ap.add_argument("--asteroids", type=int, default=12, help="asteroids per CCD and visit")
    args = ap.parse_args()
    report: dict[str, object] = {"injected": injected(args.n), "load": os.getloadavg()[0]}
    if args.pipeline:
        report["pipeline"] = pipeline(args.asteroids)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
