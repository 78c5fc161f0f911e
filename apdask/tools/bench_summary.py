"""The ``apdask bench`` summary picture: our stages against targets, peers and the floor.

:func:`measure_floors` times what no stage of a CCD can beat on this machine: one
forward + inverse real FFT of a padded full-size frame (``rfft2`` pair), one pass over
the image in memory (a copy of a float32 CCD) and reading a raw CCD file (a 4000 × 4072
int32 FITS, from the page cache, converted to float32).  :func:`write_summary` draws, from
an ``apdask bench`` result (:func:`apdask.tools.bench.run_benchmarks`), one PNG with up
to three panels, and a short HTML page with the PNG and the tables:

1. every figure that has a target, as the fraction of its budget used (≤ 1: met);
2. the peers benchmark (``bench_peers.py``), when it ran: apdask's time for each stage
   beside the peers' (log scale), with the rows a peer could not run listed by reason;
3. the floors beside apdask's per-stage times (from the peers and subtract reports).

The figure is drawn on a :class:`matplotlib.figure.Figure` with its own Agg canvas,
so it never changes pyplot's backend (notebooks keep showing their figures).
"""

from __future__ import annotations

import base64
import html
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["measure_floors", "summary_figure", "write_summary"]

CCD_SHAPE = (4000, 4072)  # an LSSTCam ITL CCD, (ny, nx)


def _median_time(fn: Any, repeat: int) -> float:
    fn()  # warm: caches, FFT plans, page cache
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def measure_floors(shape: tuple[int, int] = CCD_SHAPE, repeat: int = 3) -> dict[str, Any]:
    """Time the floors of one CCD on this machine (median of ``repeat`` after a warm run).

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the CCD.
    repeat : int
        Timed runs of each floor.

    Returns
    -------
    dict
        ``shape``, ``rfft2_pair_s`` (padded by 40 px to a fast length, all cores),
        ``memory_pass_s`` (``numpy.copyto`` of a float32 image), ``raw_read_s`` (an
        int32 FITS read and converted to float32) and ``load_avg``.
    """
    import scipy.fft as sfft
    from astropy.io import fits

    ny, nx = int(shape[0]), int(shape[1])
    rng = np.random.default_rng(0)
    img = rng.standard_normal((ny, nx), dtype=np.float32)
    dst = np.empty_like(img)
    fy = sfft.next_fast_len(ny + 40, real=True)
    fx = sfft.next_fast_len(nx + 40, real=True)
    w = os.cpu_count() or 1

    def fft_pair():
        sfft.irfft2(sfft.rfft2(img, s=(fy, fx), workers=w), s=(fy, fx), workers=w)

    out: dict[str, Any] = {"shape": [ny, nx], "padded_frame": [fy, fx]}
    out["rfft2_pair_s"] = round(_median_time(fft_pair, repeat), 4)
    out["memory_pass_s"] = round(_median_time(lambda: np.copyto(dst, img), repeat), 4)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "raw.fits"
        raw = (rng.integers(0, 2**17, (ny, nx))).astype(np.int32)
        fits.writeto(path, raw)

        def read():
            with fits.open(path, memmap=False) as h:
                np.asarray(h[0].data, np.float32)

        out["raw_read_s"] = round(_median_time(read, repeat), 4)
    out["load_avg"] = [round(v, 2) for v in os.getloadavg()]
    return out


def _budget(check: dict[str, Any]) -> float | None:
    if not check.get("target") or not isinstance(check.get("value"), int | float):
        return None
    op, target = check["target"].split()
    v, t = float(check["value"]), float(target)
    if v <= 0 and op == ">=":
        return None
    return v / t if op == "<=" else t / v


def _peer_rows(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    b = result.get("benchmarks", {}).get("peers") or {}
    rep = b.get("report") or {}
    return rep.get("rows") or {}


def _our_stage_seconds(result: dict[str, Any]) -> dict[str, float]:
    """apdask's per-stage times in the result: the peers rows, else the subtract report."""
    out = {}
    for name, row in _peer_rows(result).items():
        if name.startswith("apdask") and isinstance(row.get("seconds"), int | float):
            out[f"{row['stage']} (peers pair)"] = float(row["seconds"])
    sub = (result.get("benchmarks", {}).get("subtract") or {}).get("report") or {}
    labels = {
        "subtract_s": "subtraction (subtract bench)",
        "detect_s": "detection (subtract bench)",
        "measure_s": "measurement (subtract bench)",
        "total_subtract_to_table_s": "subtraction → table (subtract bench)",
    }
    for key, label in labels.items():
        if isinstance(sub.get(key), int | float):
            out[label] = float(sub[key])
    return out


def summary_figure(result: dict[str, Any]) -> Any:
    """The summary picture of an ``apdask bench`` result (a matplotlib Figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    judged = [(f"{name}: {c['label']}", u, c)
              for name, b in result.get("benchmarks", {}).items() for c in b.get("checks", [])
              if (u := _budget(c)) is not None]  # fmt: skip
    rows = _peer_rows(result)
    floors = result.get("floors") or {}
    ours = _our_stage_seconds(result)
    panels = ["targets"] + (["peers"] if rows else []) + (["floors"] if floors else [])
    heights = {"targets": max(len(judged), 1) * 0.35 + 1.0,
               "peers": max(len(rows), 1) * 0.35 + 1.2,
               "floors": (len(ours) + 3) * 0.35 + 1.0}  # fmt: skip
    fig = Figure(figsize=(10, sum(heights[p] for p in panels) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, height_ratios=[heights[p] for p in panels], squeeze=False)
    quick = " (--quick: small sizes, not judged)" if result.get("quick") else ""
    load = result.get("machine", {}).get("load_avg_start")
    load_s = f", load {load[0]:.1f}" if load else ""
    fig.suptitle(f"apdask bench on {result.get('machine', {}).get('cpus', '?')} cores"
                 f"{load_s}{quick}", fontsize=11)  # fmt: skip
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        if panel == "targets":
            _draw_targets(ax, judged)
        elif panel == "peers":
            _draw_peers(ax, rows)
        else:
            _draw_floors(ax, floors, ours)
    fig.tight_layout()
    return fig


def _draw_targets(ax, judged):
    if not judged:
        ax.text(0.5, 0.5, "no figure with a target in this report", ha="center", va="center")
        ax.set_axis_off()
        return
    labels, used, checks = zip(*judged, strict=True)
    y = np.arange(len(judged))
    ax.barh(y, used, color=["tab:green" if u <= 1 else "tab:red" for u in used])
    for yi, u, c in zip(y, used, checks, strict=True):
        ax.text(u, yi, f" {c['value']:.4g} {c['unit']} (target {c['target']})", va="center",
                fontsize=7)  # fmt: skip
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(y, [lab[:60] for lab in labels], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, max(2.0, max(used) * 1.6))
    ax.set_xlabel("fraction of the target used (≤ 1: met)")
    ax.set_title("against the targets", fontsize=9, loc="left")


def _draw_peers(ax, rows):
    ok = [(n, r) for n, r in rows.items() if isinstance(r.get("seconds"), int | float)]
    missing = [(n, r["status"]) for n, r in rows.items() if r.get("status") != "ok"]
    y = np.arange(len(ok))
    secs = [float(r["seconds"]) for _, r in ok]
    colours = ["tab:blue" if n.startswith("apdask") else "tab:orange" for n, _ in ok]
    ax.barh(y, secs, color=colours)
    for yi, (_, r) in zip(y, ok, strict=True):
        ratio = r.get("ratio_to_apdask")
        txt = f" {r['seconds']:.3g} s" + (f" ({ratio:g}× apdask)" if ratio else "")
        ax.text(float(r["seconds"]), yi, txt, va="center", fontsize=7)
    names = [f"{r['stage']}: {n}" + (f" ({r['pair_shape'][0]}² pair)" if r.get("pair_shape")
                                     else "") for n, r in ok]  # fmt: skip
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    if secs:
        ax.set_xlim(min(secs) / 2, max(secs) * 10)
    ax.set_xlabel("seconds on the same pair (log scale); blue apdask, orange peers")
    ax.set_title("against peers (bench_peers.py)", fontsize=9, loc="left")
    if missing:
        note = "; ".join(f"{n}: {s[:60]}" for n, s in missing)
        ax.text(0.0, -0.35, "not run: " + note, transform=ax.transAxes, fontsize=6, va="top",
                wrap=True)  # fmt: skip


def _draw_floors(ax, floors, ours):
    items = [("floor: rfft2 pair", floors.get("rfft2_pair_s")),
             ("floor: memory pass", floors.get("memory_pass_s")),
             ("floor: read the raw file", floors.get("raw_read_s"))]  # fmt: skip
    items = [(k, float(v)) for k, v in items if isinstance(v, int | float)]
    items += list(ours.items())
    y = np.arange(len(items))
    secs = [max(v, 1e-4) for _, v in items]
    fft = floors.get("rfft2_pair_s")
    ax.barh(y, secs, color=["0.5" if k.startswith("floor") else "tab:blue" for k, _ in items])
    for yi, (k, v) in zip(y, items, strict=True):
        rel = f" ({v / fft:.1f}× rfft2 pair)" if fft and not k.startswith("floor") else ""
        ax.text(max(v, 1e-4), yi, f" {v:.3g} s{rel}", va="center", fontsize=7)
    ax.set_yticks(y, [k for k, _ in items], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlim(min(secs) / 2, max(secs) * 10)
    shape = floors.get("shape")
    ax.set_xlabel(f"seconds (log scale); floors for a {shape[0]} × {shape[1]} CCD"
                  if shape else "seconds (log scale)")  # fmt: skip
    ax.set_title("against the floor", fontsize=9, loc="left")


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _html(result: dict[str, Any], png: bytes) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>apdask bench</title>",
             "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}"
             "</style></head><body><h1>apdask bench</h1>",
             f"<p>machine: {e(str(result.get('machine', {})))}"
             f"{' — --quick: small sizes, not judged' if result.get('quick') else ''}</p>",
             f"<img alt='summary' src='data:image/png;base64,{base64.b64encode(png).decode()}'>",
             "<h2>Targets</h2><table><tr><th>benchmark</th><th>figure</th><th>value</th>"
             "<th>target</th><th>met</th></tr>"]  # fmt: skip
    for name, b in result.get("benchmarks", {}).items():
        for c in b.get("checks", []):
            v = c.get("value")
            vs = f"{v:.4g}" if isinstance(v, float) else str(v)
            met = {True: "yes", False: "NO", None: "-"}[c["met"]]
            cells = [name, c["label"], f"{vs} {c['unit']}", c["target"] or "", met]
            parts.append("<tr>" + "".join(f"<td>{e(x)}</td>" for x in cells) + "</tr>")
    parts.append("</table>")
    rows = _peer_rows(result)
    if rows:
        parts.append("<h2>Peers</h2><table><tr><th>stage</th><th>tool</th><th>seconds</th>"
                     "<th>× apdask</th><th>quality</th><th>status</th></tr>")  # fmt: skip
        for r in rows.values():
            cells = [r["stage"], r["tool"], r.get("seconds", ""), r.get("ratio_to_apdask", ""),
                     r.get("quality", ""), r["status"]]  # fmt: skip
            parts.append("<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in cells) + "</tr>")
        parts.append("</table>")
    floors = result.get("floors")
    if floors:
        parts.append("<h2>Floors</h2><table>")
        parts += [f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>" for k, v in floors.items()]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_summary(
    result: dict[str, Any], png_path: str | os.PathLike[str], html_path: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Write the summary PNG and the HTML page (which embeds it) of an ``apdask bench`` result.

    Parameters
    ----------
    result : dict
        As returned by :func:`apdask.tools.bench.run_benchmarks` (``floors`` optional).
    png_path, html_path : str or os.PathLike

    Returns
    -------
    tuple of pathlib.Path
        The two paths written.
    """
    png = _png_bytes(summary_figure(result))
    png_path, html_path = Path(png_path), Path(html_path)
    png_path.write_bytes(png)
    html_path.write_text(_html(result, png), encoding="utf-8")
    return png_path, html_path
