"""``apdask bench``: run the benchmark scripts and report the figures against targets.

Each script in ``benchmarks/`` is a standalone program that prints one JSON
report.  :func:`run_benchmarks` runs the selected ones in fresh interpreters
(one at a time, so they do not compete for the cores), keeps their reports and
extracts the figures that the issues set targets for.  Targets are reported,
not enforced: a missed target is a finding, not a crash.  ``--quick`` runs
small problem sizes for a smoke check; its figures are not comparable to the
targets and are marked so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apdask.exceptions import ConfigurationError

__all__ = ["BENCHMARKS", "Check", "Benchmark", "find_benchmark_dir", "run_benchmarks"]


@dataclass(frozen=True)
class Check:
    """One figure of a report and its target.

    Attributes
    ----------
    label : str
    path : tuple
        Keys / indices into the script's JSON report.
    op : str
        ``"<="`` or ``">="``, or ``""`` for a figure without a target.
    target : float or None
    unit : str
    reduce : callable, optional
        Applied to a list value (e.g. ``max`` of repeated runs).
    """

    label: str
    path: tuple
    op: str = ""
    target: float | None = None
    unit: str = ""
    reduce: Callable[[list[Any]], Any] | None = None

    def value(self, report: Any) -> Any:
        """The figure at :attr:`path` in a benchmark's JSON report (None if absent)."""
        v = report
        for k in self.path:
            try:
                v = v[k]
            except (KeyError, IndexError, TypeError):
                return None
        if self.reduce is not None and isinstance(v, list) and v:
            v = self.reduce(v)
        return v

    def met(self, value: Any) -> bool | None:
        """Whether ``value`` meets the target (None: no target, or not a number)."""
        if not self.op or self.target is None or not isinstance(value, int | float):
            return None
        return value <= self.target if self.op == "<=" else value >= self.target


@dataclass(frozen=True)
class Benchmark:
    """A script in ``benchmarks/``, its arguments for ``--quick`` and its checks.

    ``default=False``: a slow benchmark, run only when named (``--only``).
    ``timeout``: seconds for a full-size run, where it needs more than
    :func:`run_benchmarks`' ``timeout``.
    """

    script: str
    issue: int
    checks: tuple
    quick_args: tuple = ()
    args: tuple = field(default=())
    default: bool = True
    timeout: float | None = None


BENCHMARKS = {
    "association": Benchmark(
        "bench_association.py", 5,
        (Check("associate 1,000 vs 100,000", ("median_ms",), "<=", 50.0, "ms"),
         Check("correct assignments", ("correct_fraction",))),
        quick_args=("--repeat", "3"),
    ),
    "ppdb": Benchmark(
        "bench_ppdb.py", 5,
        (Check("PostgreSQL read+associate+write per CCD",  # results: sqlite, postgresql
               ("results", 1, "total_s", "median"), "<=", 0.5, "s"),
         Check("PostgreSQL region read per CCD", ("results", 1, "read_s", "median"), unit="s"),
         Check("SQLite read+associate+write per CCD", ("results", 0, "total_s", "median"),
               unit="s")),
        quick_args=("--objects", "5000", "--sources", "50000", "--drp", "5000", "--visits", "3"),
    ),
    "alerts": Benchmark(
        "bench_alerts.py", 4,
        (Check("packaging + serialisation", ("packaging", "apdask_alerts_per_s_per_core"),
               ">=", 2000.0, "alerts/s/core"),
         Check("Schema.serialize (lsst.alert.packet)",
               ("packaging", "lsst_alert_packet_serialize_alerts_per_s"), unit="alerts/s"),
         Check("packet size p50 (Rubin: 82 KB)", ("packaging", "packet_bytes", "p50"),
               unit="bytes"),
         Check("publish 40,000 alerts, all acknowledged", ("publish", 0, "seconds"),
               "<=", 20.0, "s"),
         Check("publish rate", ("publish", 0, "MB_per_s"), unit="MB/s")),
        quick_args=("--publish", "4000", "--n-reference", "20"),
    ),
    "subtract": Benchmark(
        "bench_subtract.py", 6,
        (Check("subtraction to DIASource table with cutouts",
               ("total_subtract_to_table_s",), "<=", 1.5, "s"),
         Check("subtraction (difference image) / rfft2 pair", ("subtract_over_fft_pair",),
               "<=", 3.0, "x"),
         Check("  with bright-source list and aperture correction",
               ("subtract_with_bright_sources_and_apcorr_s",), unit="s"),
         Check("subtraction with a constant kernel / rfft2 pair",
               ("subtract_constant_kernel_over_fft_pair",), unit="x"),
         Check("peak RSS", ("max_rss_GB",), "<=", 2.0, "GB")),
        quick_args=("--repeat", "1", "--nx", "2048", "--ny", "2048", "--no-sourcefinder"),
    ),
    "distributor": Benchmark(
        "bench_distributor.py", 3,
        (Check("timeout overshoot (worst)", ("timeout_overshoot_s",), "<=", 1.0, "s", max),),
        quick_args=("--reps", "1"),
    ),
    "trail": Benchmark(  # the Veres fit on injected trails (PSF FWHM 4 px, 5-30 px long)
        "bench_trail.py", 16,
        (Check("trail length error, robust sigma (S/N 82)",
               ("injected", "snr_82", "length_rel", "robust_sigma"), "<=", 0.05),
         Check("trail angle error, robust sigma (S/N 82)",
               ("injected", "snr_82", "angle_deg", "robust_sigma"), "<=", 3.0, "deg"),
         Check("trail flux error, median (S/N 82)",
               ("injected", "snr_82", "flux_rel", "median"), unit=""),
         Check("fit per trail (image made too)",
               ("injected", "snr_82", "ms_per_trail_with_image"), unit="ms")),
        quick_args=("--n", "20"),
    ),
    "reliability": Benchmark(
        "bench_reliability.py", 16,
        (Check("real/bogus score per source, features included (2,000 per CCD)",
               ("ms_per_source", -1, "features_and_model"), "<=", 0.1, "ms"),),
        quick_args=("--sizes", "200", "--repeat", "2"),
    ),
    "cluster": Benchmark(  # SLURM only (root, .ci/setup-slurm.sh): cost figures, no target
        "bench_cluster.py", 17,
        (Check("warm pool, last visit count: wall", ("cost", -1, "warm_pool", "wall_s"),
               unit="s"),
         Check("one cluster per visit, same visits: wall",
               ("cost", -1, "per_visit_cluster", "wall_s"), unit="s")),
        quick_args=("--visits", "1", "--latency-visits", "1"),
        default=False,
    ),
    "ccd": Benchmark(  # ~4 min: simulation, 2 x 6 full-size CCDs, batch runs
        "bench_ccd.py", 18,
        (Check("registration -> alerts written, median", ("latency_s", "median"),
               "<=", 1.5, "s"),
         Check("registration -> alerts written, p95", ("latency_s", "p95"), unit="s"),
         Check("registration -> alerts acknowledged (tansu)",
               ("latency_kafka_s", "median"), "<=", 1.5, "s"),
         Check("core-seconds per CCD, prefetch included", ("core_s_per_ccd", "median"),
               "<=", 3.0, "s"),
         Check("peak RSS", ("peak_rss_GB",), "<=", 2.0, "GB"),
         Check("batch process-ccd wall", ("startup", "batch_process_ccd", "wall_s"), unit="s"),
         Check("  same, numba cache empty",
               ("startup", "batch_process_ccd_numba_cold", "wall_s"), unit="s")),
        quick_args=("--camera", "testcam", "--detector", "T00", "--arrivals", "1",
                    "--warmup", "0", "--no-cold-compile"),
        default=False,
    ),
    "visit": Benchmark(  # a 189-CCD LSSTCam visit, 1 and 2 workers: ~45 min on 2 free cores
        "bench_visit.py", 18,
        (Check("189-CCD visit wall, 2 workers (extrapolated if fewer CCDs)",
               ("visit_189_2_workers", "wall_s"), "<=", 300.0, "s"),
         Check("  core-seconds per CCD", ("visit_189_2_workers", "core_s_per_ccd"), unit="s"),
         Check("  with a core per worker", ("visit_189_2_workers", "wall_s_cores_free"),
               unit="s"),
         Check("  extrapolated from fewer CCDs", ("visit_189_2_workers", "extrapolated")),
         Check("peak memory, whole process tree", ("peak_rss_GB",), "<=", 8.0, "GB"),
         Check("189-CCD visit wall, 1 worker", ("visit_189", 0, "wall_s"), unit="s")),
        args=("--workers", "1,2", "--warmup", "0"),
        quick_args=("--ccds", "2", "--workers", "2", "--warmup", "0"),
        default=False,
        timeout=3 * 3600.0,
    ),
    "realpairs": Benchmark(  # ~10 min on 2 cores: real DECam/NIRCam pairs, apdask vs sfft
        "bench_realpairs.py", 14,
        (Check("DECam single pair: apdask diff",
               ("pairs", "DECam DEC-OBS04a - DEC-OBS18a", "apdask", "seconds"), unit="s"),
         Check("  sfft (numpy) / apdask",
               ("pairs", "DECam DEC-OBS04a - DEC-OBS18a", "sfft", "seconds_over_apdask"),
               unit="x"),
         Check("NIRCam pair: apdask diff",
               ("pairs", "NIRCam F200W (WebbPSF, noise maps)", "apdask", "seconds"), unit="s"),
         Check("  sfft (numpy) / apdask",
               ("pairs", "NIRCam F200W (WebbPSF, noise maps)", "sfft", "seconds_over_apdask"),
               unit="x"),
         Check("NIRCam |S/N| > 5 pixels: apdask",
               ("pairs", "NIRCam F200W (WebbPSF, noise maps)", "apdask",
                "n_pixels_abs_snr_above_5"), unit="px"),
         Check("NIRCam |S/N| > 5 pixels: SFFT's stored difference",
               ("pairs", "NIRCam F200W (WebbPSF, noise maps)", "sfft_stored",
                "n_pixels_abs_snr_above_5"), unit="px")),
        quick_args=("--repeat", "1", "--no-sfft", "--only", "DEC-OBS04a"),
        default=False,
    ),
    "peers": Benchmark(  # minutes at full size (SFFT alone ~2 min): SWarp, SExtractor, ...
        "bench_peers.py", 18,
        (Check("SWarp / apdask warp", ("rows", "SWarp", "ratio_to_apdask"), unit="x"),
         Check("PSFEx (with its catalogue) / apdask PSF model",
               ("rows", "PSFEx", "ratio_to_apdask"), unit="x"),
         Check("ZOGY (zogyp) / apdask subtract", ("rows", "ZOGY", "ratio_to_apdask"), unit="x"),
         Check("SFFT (numpy) / apdask subtract", ("rows", "SFFT", "ratio_to_apdask"), unit="x"),
         Check("Source Extractor / apdask detect+measure",
               ("rows", "Source Extractor", "ratio_to_apdask"), unit="x"),
         Check("apdask: transients found", ("rows", "apdask detect+measure", "quality",
                                            "transients_matched"), unit="found"),
         Check("Source Extractor: transients found", ("rows", "Source Extractor", "quality",
                                                      "transients_matched"), unit="found")),
        quick_args=("--nx", "1024", "--ny", "1024", "--transients", "30", "--no-sfft"),
        default=False,
    ),
}  # fmt: skip


def find_benchmark_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The ``benchmarks/`` directory: ``path``, else the source checkout's, else ``./benchmarks``.

    Raises
    ------
    ConfigurationError
        If no directory with the benchmark scripts is found.
    """
    candidates = (
        [Path(path)]
        if path
        else [
            Path(__file__).resolve().parents[2] / "benchmarks",  # apdask/tools/bench.py
            Path.cwd() / "benchmarks",
        ]
    )
    for c in candidates:
        if (c / BENCHMARKS["association"].script).is_file():
            return c
    msg = (
        f"no benchmarks/ directory with the bench_*.py scripts at "
        f"{', '.join(map(str, candidates))}; run from an apdask source checkout or pass --dir"
    )
    raise ConfigurationError(msg)


def _json_report(text):
    """The JSON object a script printed (from its first line that starts with ``{``)."""
    i = 0 if text.startswith("{") else text.find("\n{")
    if i < 0:
        return None
    return json.loads(text[i:].lstrip("\n"))


def run_benchmarks(
    names: Sequence[str] | None = None,
    quick: bool = False,
    bench_dir: str | os.PathLike[str] | None = None,
    timeout: float = 1800.0,
    floors: bool = True,
) -> dict[str, Any]:
    """Run benchmark scripts; return a report with each script's JSON and the checks.

    Parameters
    ----------
    names : list of str, optional
        Keys of :data:`BENCHMARKS`; default all but the slow ones (``default=False``).
    quick : bool
        Small problem sizes (smoke check; figures not comparable to targets).
    bench_dir : str or os.PathLike, optional
    timeout : float
        Seconds per script (a benchmark's own ``timeout``, if longer, for a full run).
    floors : bool
        Also time the floors of one CCD on this machine
        (:func:`apdask.tools.bench_summary.measure_floors`), before the scripts.

    Returns
    -------
    dict
        ``machine``, ``quick``, ``floors`` (when measured) and, per benchmark,
        ``seconds``, ``returncode``, ``report`` (the script's JSON or None),
        ``stderr_tail`` and ``checks`` (label, value, unit, target, met).
    """
    names = [n for n, b in BENCHMARKS.items() if b.default] if not names else list(names)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        msg = f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}"
        raise ConfigurationError(msg)
    bench_dir = find_benchmark_dir(bench_dir)
    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "load_avg_start": os.getloadavg(),
        },
        "quick": bool(quick),
        "benchmarks": {},
    }
    if floors:
        from apdask.tools.bench_summary import measure_floors

        out["floors"] = measure_floors()
    for name in names:
        b = BENCHMARKS[name]
        cmd = [sys.executable, str(bench_dir / b.script), *(b.quick_args if quick else b.args)]
        limit = timeout if quick or b.timeout is None else max(timeout, b.timeout)
        t0 = time.perf_counter()
        stdout: str | bytes
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as err:
            rc, stdout, stderr = None, err.stdout or "", f"timed out after {limit} s"
        try:
            report = _json_report(stdout if isinstance(stdout, str) else stdout.decode())
        except json.JSONDecodeError:
            report = None
        checks = []
        for c in b.checks:
            v = c.value(report) if report is not None else None
            checks.append(
                {
                    "label": c.label,
                    "value": v,
                    "unit": c.unit,
                    "target": None if not c.op else f"{c.op} {c.target:g}",
                    "met": None if quick else c.met(v),
                }
            )
        out["benchmarks"][name] = {
            "issue": b.issue,
            "command": " ".join(cmd),
            "seconds": round(time.perf_counter() - t0, 1),
            "returncode": rc,
            "report": report,
            "stderr_tail": (stderr or "")[-2000:] if rc != 0 else "",
            "checks": checks,
        }
    out["machine"]["load_avg_end"] = os.getloadavg()
    return out


def format_summary(result: dict[str, Any]) -> str:
    """Plain-text table of the checks of :func:`run_benchmarks`' result."""
    lines = [f"{'benchmark':<12} {'figure':<44} {'value':>12} {'target':>12}  met"]
    for name, b in result["benchmarks"].items():
        if b["returncode"] != 0:
            lines.append(f"{name:<12} FAILED (exit {b['returncode']}): {b['stderr_tail'][-200:]}")
            continue
        for c in b["checks"]:
            v = c["value"]
            vs = "n/a" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))
            met = {True: "yes", False: "NO", None: "-"}[c["met"]]
            lines.append(
                f"{name:<12} {c['label'][:44]:<44} {vs + ' ' + c['unit']:>12} "
                f"{c['target'] or '':>12}  {met}"
            )
    if result["quick"]:
        lines.append("(--quick: small problem sizes; figures are not comparable to the targets)")
    return "\n".join(lines)
