"""Alert packaging, serialisation and publishing benchmark (issue 4).

Packaging: realistic packets (a 12-month history of ``--n-prv`` DiaSources and
``--n-forced`` DiaForcedSources per object, a DiaObject, three ``--stamp``-pixel
FITS cutouts with image, variance, mask and PSF) built and serialised on one
core by

* ``apdask``: :class:`apdask.alerts.StampMaker` + :func:`apdask.package_alerts`
  (column-wise, the fast path),
* ``reference``: ``make_cutout`` (astropy FITS) + ``make_alert`` +
  ``fastavro.schemaless_writer``,
* ``lsst.alert.packet``: ``make_alert`` dicts serialised with ``Schema.serialize``.

Publishing: a visit of ``--publish`` alerts (default 40,000, Rubin's peak) in
``--ccds`` CCD batches through :class:`apdask.services.kafka.KafkaSink` to a local tansu
broker (or ``--bootstrap``), every alert acknowledged.

Prints one JSON report.  Not a unit test; run
``.venv/bin/python benchmarks/bench_alerts.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from _broker import tansu  # benchmarks/_broker.py (the script's own directory)
from astropy.wcs import WCS

from apdask import alerts
from apdask.alerts.avrovec import encode_long
from apdask.alerts.packets import EncodedAlert, encode_alert, package_alerts
from apdask.alerts.schema import _collect_named, load_schema
from apdask.alerts.sinks import sink_from_uri
from apdask.core.exposure import Exposure
from apdask.services import kafka

# The reference path (make_cutout + make_alert) is the tests' oracle (tests/oracles.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.oracles import make_alert, make_cutout  # noqa: E402

__all__ = ["main"]

RUBIN_PACKET_BYTES = 82_000


def _exposures(rng, shape):
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [150.0, 2.0]
    w.wcs.crpix = [shape[1] / 2, shape[0] / 2]
    w.wcs.cd = [[-5.55e-5, 0.0], [0.0, 5.55e-5]]
    psf = np.exp(-0.5 * (np.add.outer(np.arange(-10, 11) ** 2, np.arange(-10, 11) ** 2)) / 4)
    psf = (psf / psf.sum()).astype(np.float32)
    out = []
    for _ in range(3):  # difference, science, template
        img = rng.normal(0, 100, size=shape).astype(np.float32)
        var = (1e4 + 10 * np.abs(img)).astype(np.float32)  # sky + source noise
        mask = np.zeros(shape, np.uint32)
        mask[:, :5] = 1
        out.append(Exposure(img, var, mask, w, psf))
    return out


def _columns(schema, short, n, rng, **fixed):
    """Realistic-looking column dict for ``n`` rows of one record type."""
    named = {}
    _collect_named(schema.definition, named)
    cols = {}
    for f in named[short]["fields"]:
        t = f["type"]
        base = [x for x in t if x != "null"][0] if isinstance(t, list) else t
        if base in ("long", "int"):
            cols[f["name"]] = rng.integers(0, 10_000, n)
        elif base == "float":
            v = rng.normal(1000, 100, n).astype(np.float32)
            if isinstance(t, list):
                v[rng.random(n) < 0.1] = np.nan  # some nulls, as in real catalogs
            cols[f["name"]] = v
        elif base == "double":
            cols[f["name"]] = rng.normal(100, 10, n)
        elif base == "boolean":
            cols[f["name"]] = rng.random(n) < 0.05
        elif base == "string":
            cols[f["name"]] = np.array(["r"] * n)
    cols.update(fixed)
    return cols


def _ccd_inputs(schema, rng, n, n_prv, n_forced, shape, first_id):
    oid = np.arange(first_id, first_id + n, dtype=np.int64)
    sources = _columns(
        schema, "diaSource", n, rng,
        diaSourceId=oid * 10, diaObjectId=oid, visit=np.full(n, 2026112500123),
        detector=np.full(n, 94), x=rng.uniform(40, shape[1] - 40, n),
        y=rng.uniform(40, shape[0] - 40, n), bboxSize=np.full(n, 51),
        ra=rng.uniform(149.9, 150.1, n), dec=rng.uniform(1.9, 2.1, n),
    )  # fmt: skip
    hist = _columns(
        schema, "diaSource", n * n_prv, rng,
        diaSourceId=np.arange(n * n_prv) + first_id * 1000, diaObjectId=np.repeat(oid, n_prv),
    )  # fmt: skip
    forced = _columns(schema, "diaForcedSource", n * n_forced, rng,
                      diaObjectId=np.repeat(oid, n_forced))  # fmt: skip
    objects = _columns(schema, "diaObject", n, rng, diaObjectId=oid)
    return sources, hist, forced, objects


def _rows(cols, n):
    names = list(cols)
    lists = [np.asarray(cols[k]).tolist() for k in names]
    return [dict(zip(names, vals, strict=True)) for vals in zip(*lists, strict=True)][:n]


def _fast_package(schema, exposures, inputs, stamp):
    sources, hist, forced, objects = inputs
    makers = [alerts.StampMaker(e) for e in exposures]
    for m in makers:  # as apdask.visit does: one WCS call for every local WCS
        m.prepare(sources["x"], sources["y"])
    xs, ys = sources["x"].tolist(), sources["y"].tolist()
    cut = [tuple(m.stamp(x, y, stamp) for m in makers) for x, y in zip(xs, ys, strict=True)]
    return package_alerts(sources, hist, forced, objects, cut, schema=schema)


def bench_packaging(args, schema, rng):
    shape = (args.ccd_size, args.ccd_size)
    exposures = _exposures(rng, shape)
    n = args.n_alerts
    per_ccd = args.per_ccd
    batches = [
        _ccd_inputs(schema, rng, min(per_ccd, n - a), args.n_prv, args.n_forced, shape, 1 + a)
        for a in range(0, n, per_ccd)
    ]
    _fast_package(schema, exposures, _ccd_inputs(schema, rng, 20, 2, 2, shape, 10**7), args.stamp)
    # CCD by CCD, as the pipeline does: package, hand over, release
    t0 = time.process_time()
    w0 = time.perf_counter()
    first = None
    for inputs in batches:
        enc = _fast_package(schema, exposures, inputs, args.stamp)
        first = enc if first is None else first
        del enc
    cpu, wall = time.process_time() - t0, time.perf_counter() - w0
    # all at once, everything kept alive (memory growth: fresh pages for every body)
    t0 = time.process_time()
    kept = [_fast_package(schema, exposures, inputs, args.stamp) for inputs in batches]
    cpu_kept = time.process_time() - t0
    enc = [a for b in kept for a in b]
    inputs = batches[0]
    # breakdown: stamps only
    makers = [alerts.StampMaker(e) for e in exposures]
    t0 = time.process_time()
    for m in makers:
        m.prepare(inputs[0]["x"], inputs[0]["y"])
    for x, y in zip(inputs[0]["x"], inputs[0]["y"], strict=True):
        for m in makers:
            m.stamp(x, y, args.stamp)
    stamp_cpu = time.process_time() - t0
    n_first = len(inputs[0]["x"])

    # reference paths on a subset (they are slow)
    m = min(args.n_reference, n_first)
    src_rows = _rows(inputs[0], m)
    prv = {}
    for r in _rows(inputs[1], m * args.n_prv):
        prv.setdefault(r["diaObjectId"], []).append(r)
    frc = {}
    for r in _rows(inputs[2], m * args.n_forced):
        frc.setdefault(r["diaObjectId"], []).append(r)
    objs = {r["diaObjectId"]: r for r in _rows(inputs[3], m)}
    t0 = time.process_time()
    dicts = []
    ref_bodies = []
    for r in src_rows:
        cut = tuple(make_cutout(e, r["x"], r["y"], args.stamp) for e in exposures)
        oid = r["diaObjectId"]
        a = make_alert(r, prv.get(oid, []), frc.get(oid, []), objs.get(oid), cut, schema)
        dicts.append(a)
        ref_bodies.append(encode_alert(a, schema).body)
    ref_cpu = time.process_time() - t0
    assert ref_bodies == [e.body for e in enc[:m]], "fast path differs from the reference"
    t0 = time.process_time()
    for a in dicts:
        schema.serialize(a)
    lap_cpu = time.process_time() - t0
    t0 = time.process_time()
    for a in dicts:
        make_alert(a["diaSource"], a["prvDiaSources"], a["prvDiaForcedSources"],
                          a["diaObject"], (None, None, None), schema)  # fmt: skip
    make_alert_cpu = time.process_time() - t0

    sizes = np.array([len(e.body) + 5 for e in enc])
    compressed = {}
    sample = [e.body for e in enc[:200]]
    with contextlib.suppress(ImportError):
        import lz4.frame

        compressed["lz4"] = float(np.median([len(lz4.frame.compress(b)) for b in sample]))
    with contextlib.suppress(ImportError):
        import zstandard

        c = zstandard.ZstdCompressor(level=3)
        compressed["zstd"] = float(np.median([len(c.compress(b)) for b in sample]))
    import zlib

    compressed["deflate-1"] = float(np.median([len(zlib.compress(b, 1)) for b in sample]))
    stamp_bytes = len(makers[0].stamp(100, 100, args.stamp))
    return {
        "n_alerts": n,
        "n_prv_dia_sources": args.n_prv,
        "n_prv_dia_forced_sources": args.n_forced,
        "stamp_px": args.stamp,
        "alerts_per_ccd": per_ccd,
        "apdask_alerts_per_s_per_core": n / cpu,
        "apdask_wall_s": wall,
        "apdask_cpu_ms_per_alert": 1e3 * cpu / n,
        "apdask_all_kept_alerts_per_s_per_core": n / cpu_kept,
        "of_which_stamps_cpu_ms_per_alert": 1e3 * stamp_cpu / n_first,
        "reference_make_cutout_make_alert_fastavro_alerts_per_s": m / ref_cpu,
        "reference_n": m,
        "make_alert_only_ms_per_alert": 1e3 * make_alert_cpu / m,
        "lsst_alert_packet_serialize_alerts_per_s": m / lap_cpu,
        "lsst_alert_packet_serialize_ms_per_alert": 1e3 * lap_cpu / m,
        "speedup_vs_reference": (n / cpu) / (m / ref_cpu),
        "byte_identical_to_reference": True,
        "packet_bytes": {
            "min": int(sizes.min()),
            "p50": float(np.median(sizes)),
            "p95": float(np.percentile(sizes, 95)),
            "max": int(sizes.max()),
            "rubin_budget": RUBIN_PACKET_BYTES,
            "fraction_over_budget": float(np.mean(sizes > RUBIN_PACKET_BYTES)),
            "one_stamp": stamp_bytes,
            "median_compressed": compressed,
        },
    }, enc


_BROKER_PID = [None]


def _cpu_seconds(pid):
    """User + system CPU seconds of a process (Linux /proc), None if unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def _tansu():
    """The shared loopback broker (benchmarks/_broker.py); its pid for the CPU figures."""
    with tansu() as (pid, address):
        _BROKER_PID[0] = pid
        try:
            yield address
        finally:
            _BROKER_PID[0] = None


def _uniquify(pool, k):
    """Alerts of CCD ``k``: the pool's bodies with fresh diaSourceIds (distinct messages)."""
    out = []
    base = k * 100_000
    for a in pool:
        sid = base + a.diaSourceId
        rest = a.body[len(encode_long(a.diaSourceId)) :]
        frame = b"".join((a.frame[:5], encode_long(sid), rest))
        out.append(EncodedAlert._framed(sid, a.diaObjectId + base, frame))
    return out


def bench_publish(args, schema, pool, bootstrap, compression):
    topic = f"bench-{uuid.uuid4().hex[:8]}"
    kafka.ensure_topic(bootstrap, topic, partitions=args.partitions)
    per_ccd = -(-args.publish // args.ccds)
    # distinct pools per CCD so compression cannot profit from repeated messages
    n_pools = max(1, len(pool) // per_ccd)
    ccd_batches = []
    left = args.publish
    for k in range(args.ccds):
        start = (k % n_pools) * per_ccd
        batch = _uniquify(pool[start : start + min(per_ccd, left)], k)
        ccd_batches.append(batch)
        left -= len(batch)
        if left <= 0:
            break
    n = sum(len(b) for b in ccd_batches)
    nbytes = sum(len(a.body) + 5 for b in ccd_batches for a in b)
    spool = tempfile.mkdtemp(prefix="bench-spool-")
    uri = f"kafka://{bootstrap}/{topic}?spool_dir={spool}&compression={compression}"
    if args.batch_bytes:
        uri += f"&batch_bytes={args.batch_bytes}"
    # One producer shared by the threads (thread-safe); each write waits for its own CCD.
    sinks = [sink_from_uri(uri, schema=schema)]
    for s in sinks:
        s.producer()  # connect before the clock starts, as a warm worker would be
    results = []

    def run(i):
        return sinks[0].write(2026112500123, i, ccd_batches[i])

    broker0 = _cpu_seconds(_BROKER_PID[0])
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    if args.threads == 1:
        results = [run(i) for i in range(len(ccd_batches))]
    else:
        with ThreadPoolExecutor(args.threads) as ex:
            results = list(ex.map(run, range(len(ccd_batches))))
    wall = time.perf_counter() - t0
    producer_cpu = time.process_time() - cpu0
    broker1 = _cpu_seconds(_BROKER_PID[0])
    batch_bytes = sinks[0]._config()["batch.size"]
    for s in sinks:
        s.close()
    delivered = sum(r.delivered for r in results)
    spooled = sum(r.spooled for r in results)
    return {
        "compression": compression,
        "alerts": n,
        "ccds": len(ccd_batches),
        "threads": args.threads,
        "partitions": args.partitions,
        "topic_max_message_bytes": sinks[0].topic_limit,
        "batch_bytes": batch_bytes,
        "delivered": delivered,
        "spooled": spooled,
        "all_acknowledged": delivered == n and spooled == 0,
        "seconds": wall,
        "alerts_per_s": n / wall,
        "MB_per_s": nbytes / wall / 1e6,
        "MB": nbytes / 1e6,
        "producer_process_cpu_s": producer_cpu,
        "broker_cpu_s": None if broker0 is None else broker1 - broker0,
        "target_s": 20.0,
        "meets_target": wall <= 20.0 and delivered == n,
    }


def main(argv=None):
    """Run the benchmark and print a JSON report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-alerts", type=int, default=2120, help="alerts packaged (fast path)")
    p.add_argument("--per-ccd", type=int, default=212, help="alerts per CCD (40,000 / 189)")
    p.add_argument("--n-reference", type=int, default=200, help="alerts through the slow paths")
    p.add_argument("--n-prv", type=int, default=25, help="prvDiaSources per alert")
    p.add_argument("--n-forced", type=int, default=25, help="prvDiaForcedSources per alert")
    p.add_argument("--stamp", type=int, default=51, help="cutout side, px")
    p.add_argument("--ccd-size", type=int, default=2048, help="exposure side, px")
    p.add_argument("--publish", type=int, default=40_000, help="alerts in the published visit")
    p.add_argument("--ccds", type=int, default=189, help="CCD batches of the visit")
    p.add_argument("--threads", type=int, default=2, help="concurrent CCD sinks")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--compression", default="lz4", help="comma list, e.g. lz4,zstd,none")
    p.add_argument("--batch-bytes", type=int, help="producer batch bound (default: config)")
    p.add_argument("--bootstrap", help="HOST:PORT of a broker (default: start tansu)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    schema = load_schema()
    rng = np.random.default_rng(args.seed)
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "load_avg": os.getloadavg(),
        },  # fmt: skip
        "schema_id": int(schema.get_schema_id()),
    }
    report["packaging"], enc = bench_packaging(args, schema, rng)
    if args.publish > 0:
        with contextlib.ExitStack() as stack:
            bootstrap = args.bootstrap or stack.enter_context(_tansu())
            report["publish"] = [
                bench_publish(args, schema, enc, bootstrap, c) for c in args.compression.split(",")
            ]
    report["machine"]["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
