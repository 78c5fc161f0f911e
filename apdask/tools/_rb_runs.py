"""The pipeline runs behind the reliability training set: simulated repositories and
real image pairs, with sources and artefacts planted (:mod:`apdask.tools._rb_examples`).

* :func:`simulated_examples`: a test-camera repository of either simulator; each
  CCD-visit is calibrated and warped by the visit graph's own tasks, planted, then
  given its PSF model and cosmic-ray mask, subtracted, detected and measured by
  ``science_psf_task``, ``subtract_task`` and ``detect_task``, the production steps.
* :func:`real_pair_examples`: a calibrated FITS pair through :func:`apdask.tools.diff.
  diff`, as is (the natural detections) and again with sources and artefacts planted.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from typing import Any

import dask
import numpy as np
from astropy.table import Table
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from apdask.config import PipelineConfig
from apdask.exceptions import ApdaskError
from apdask.io.foreign import read_exposure
from apdask.pipeline.graph import build_visit_graph
from apdask.pipeline.nextvisit import NextVisit
from apdask.pipeline.psf import estimate_psf_model, psf_fwhm
from apdask.pipeline.run import ensure_ppdb
from apdask.pipeline.steps import CcdFailure
from apdask.pipeline.tasks import detect_task, science_psf_task, subtract_task
from apdask.tools._rb_examples import (
    Examples,
    Planted,
    bright_peaks,
    examples_from,
    plant,
    quiet,
)
from apdask.tools.diff import diff
from apdask.tools.evaluate import load_truth
from apdask.tools.simulate import simulate_repo

__all__ = ["simulated_examples", "real_pair_examples", "pair_difference", "labels_from_repeats"]


def simulated_examples(
    engine: str,
    seed: int,
    workdir: str,
    *,
    split: str,
    n_visits: int = 3,
    conditions: dict[str, Any] | None = None,
    n_real: int = 6,
    n_artefact: int = 14,
) -> Examples:
    """Labelled DIASources of a simulated test-camera repository (both CCDs, every visit).

    Parameters
    ----------
    engine : {"apdask", "galsim"}
    seed : int
        Seed of the simulation; the planting seeds follow from it.
    workdir : str
        Where the repository is written (``<workdir>/sim-<engine>-<seed>``, replaced).
    split : str
        ``"train"`` or ``"test"``, recorded with the examples.
    n_visits : int
    conditions : dict, optional
        ``fwhm_range`` and ``template_fwhm`` of :func:`~apdask.tools.simulate.simulate_repo`.
    n_real, n_artefact : int
        Sources and artefacts planted per CCD-visit, besides the simulator's own.
    """
    root = os.path.join(workdir, f"sim-{engine}-{seed}")
    shutil.rmtree(root, ignore_errors=True)
    msgs = simulate_repo(
        "testcam", root, n_visits=n_visits, seed=seed, engine=engine, **(conditions or {})
    )
    ppdb = ensure_ppdb(root)
    cfg = PipelineConfig.resolve()
    parts = []
    for msg in msgs:
        nv = NextVisit.from_dict(msg)
        truth = load_truth(root, nv.visit)
        dsk = build_visit_graph(nv, repo=root, ppdb=ppdb, config=cfg).__dask_graph__()
        for name in nv.detectors:
            tag = f"{nv.visit}-{name}"
            keys = [f"astrometry-{tag}", f"warp-{tag}", f"header-{tag}"]
            cal, warped, header = quiet(dask.get, dsk, keys)
            if any(isinstance(r, CcdFailure) for r in (cal, warped, header)):
                continue
            det = nv.camera[name]
            plant_seed = seed * 1000 + nv.visit % 1000 * 10 + det.id
            parts.append(
                _simulated_ccd(
                    cal,
                    warped,
                    header,
                    det,
                    nv,
                    truth,
                    cfg,
                    plant_seed,
                    f"sim-{engine}",
                    split,
                    n_real,
                    n_artefact,
                )
            )
    shutil.rmtree(root, ignore_errors=True)
    return Examples.concat(parts)


def _simulated_ccd(
    cal, warped, header, det, nv, truth, cfg, seed, dataset, split, n_real, n_artefact
):
    """Plant one calibrated CCD, run the production subtraction and measurement, label."""
    sci = cal.exposure
    model = quiet(estimate_psf_model, sci)
    psf_src = sci.copy_with(psf=model.mean, psf_model=model)
    t = truth[np.asarray(truth["detector"]).astype(str) == det.name]
    px, py = sci.wcs.world_to_pixel_values(np.asarray(t["ra"]), np.asarray(t["dec"]))
    kind = np.asarray(t["kind"]).astype(str)
    change = np.asarray(t["flux"], float) - np.asarray(t["template_flux"], float)
    moving = np.isin(kind, ("transient", "variable")) & (change != 0)
    truth_reals = Planted.of(px[moving], py[moving], np.sign(change[moving]), "truth")
    ny, nx = sci.shape
    inside = (px > 0) & (px < nx - 1) & (py > 0) & (py < ny - 1)
    flux = np.asarray(t["template_flux"], float)
    star, host = inside & (kind == "star"), inside & np.isin(kind, ("star", "galaxy"))
    sci2, tpl2, planted = plant(
        sci,
        warped.exposure,
        Table({"x": px[star], "y": py[star], "flux": flux[star]}),
        seed=seed,
        n_real=n_real,
        n_artefact=n_artefact,
        psf_source=psf_src,
        hosts=Table({"x": px[host], "y": py[host], "flux": flux[host]}),
    )
    science = quiet(science_psf_task, dataclasses.replace(cal, exposure=sci2))
    sub = quiet(subtract_task, science, dataclasses.replace(warped, exposure=tpl2), cfg)
    if isinstance(sub, CcdFailure):
        return Examples.empty()
    meas = quiet(detect_task, sub, nv.visit, det, nv.filters, header, cfg)
    if isinstance(meas, CcdFailure):
        return Examples.empty()
    return examples_from(
        meas.sources,
        sub.difference,
        sub.science,
        sub.template,
        planted + truth_reals,
        dataset=dataset,
        split=split,
    )


def real_pair_examples(
    science: str,
    template: str,
    *,
    dataset: str,
    split: str,
    seeds: Sequence[int],
    n_real: int,
    n_artefact: int,
    known: Planted | None = None,
    naturals: bool = True,
    x_range: tuple[float, float] | None = None,
    science_options: dict[str, Any] | None = None,
    template_options: dict[str, Any] | None = None,
    base: Any = None,
) -> Examples:
    """Labelled DIASources of a real science/template pair on one pixel grid.

    Parameters
    ----------
    science, template : str
        Calibrated FITS images (:func:`apdask.io.foreign.read_exposure`).
    dataset, split : str
        Recorded with the examples.
    seeds : sequence of int
        One planted run per seed.
    n_real, n_artefact : int
        Sources and artefacts planted per run.
    known : Planted, optional
        What is known of the pair's own detections: real sources (signed), artefacts
        and ``"unknown"`` positions (see :func:`~apdask.tools._rb_examples.label_sources`).
        The real ones are labelled in the run without planted sources only (the planted runs
        would repeat them).
    naturals : bool
        Keep the pair's other detections, away from every real source, as bogus.
    x_range : tuple of float, optional
        Keep only DIASources with ``lo <= x < hi`` (a spatial hold-out).
    science_options, template_options : dict, optional
        Keyword arguments of ``read_exposure`` (``noise``, ``psf``...).
    base : apdask.tools.diff.DiffResult, optional
        The pair's :func:`~apdask.tools.diff.diff` without planted sources, if done.
    """
    sci0 = read_exposure(science, **(science_options or {}))
    tpl0 = read_exposure(template, **(template_options or {}))
    known = known if known is not None else Planted.of([], [], 0, "")
    base = base if base is not None else pair_difference(sci0, tpl0)
    if base is None:
        return Examples.empty()
    fwhm = float(psf_fwhm(np.asarray(base.science.psf, float)))
    parts = [_examples(base, known, dataset, split, naturals, x_range)]
    statics = bright_peaks(base.science, fwhm)
    hosts = bright_peaks(base.science, fwhm, nsigma=5.0)  # faint ones too, as in the sky
    for seed in seeds:
        sci2, tpl2, planted = plant(
            sci0,
            tpl0,
            statics,
            seed=seed,
            n_real=n_real,
            n_artefact=n_artefact,
            psf_source=base.science,
            template_psf=base.template.psf,
            variance=base.difference.variance,
            hosts=hosts,
        )
        try:
            run = quiet(diff, sci2, tpl2, enforce_qa=False)
        except ApdaskError:  # a planted run that cannot be subtracted is left out
            continue
        parts.append(
            _examples(run, planted + known.reals_unknown(), dataset, split, False, x_range)
        )
    return Examples.concat(parts)


def pair_difference(science: Any, template: Any) -> Any:
    """:func:`apdask.tools.diff.diff` of a pair (files or exposures), QA not enforced;
    None when the pair cannot be subtracted (e.g. too few stars for a kernel)."""
    try:
        return quiet(diff, science, template, enforce_qa=False)
    except ApdaskError:
        return None


def _examples(run, planted, dataset, split, naturals, x_range):
    keep = None
    if x_range is not None:
        x = np.asarray(run.sources["x"], float)
        keep = (x >= x_range[0]) & (x < x_range[1])
    return examples_from(
        run.sources,
        run.difference,
        run.science,
        run.template,
        planted,
        dataset=dataset,
        split=split,
        naturals=naturals,
        keep=keep,
    )


def labels_from_repeats(bases: dict[tuple[str, str], Any], first: str,
                        radius: float = 3.0) -> dict[tuple[str, str], Planted]:  # fmt: skip
    """What the detections of many pairs of single exposures of two epochs are, from how
    they repeat.

    ``bases`` maps ``(science, template)`` exposure names to their
    :func:`pair_difference` (or None), both ways round; ``first`` starts the names of the
    first epoch's exposures.  Detections within ``radius`` pixels of each other, over all
    pairs, are one place.  A place is

    * a **real** change (kind ``"variable"``) when it is found in at least 60 % of the
      pairs each way round, with the sign flipping with the roles, and is not a dipole
      nor at an edge;
    * a **residual** of a static source (``"star-residual"``, bogus) when at least 30 %
      of its detections are flagged ``isDipole``;
    * an artefact of **one exposure** (``"one-exposure"``, bogus: a cosmic ray or
      hot pixel in it) when every pair it is found in includes the same exposure;
    * ``"unknown"`` otherwise (no label).

    Returns
    -------
    dict
        Per pair, a :class:`Planted` of every place, signed for that pair's roles.
    """
    rows = [(pair, float(r["x"]), float(r["y"]), float(np.sign(r["psfFlux"])),
             bool(r["isDipole"]), bool(r["pixelFlags_edge"] or r["centroid_flag"]))
            for pair, res in bases.items() if res is not None
            for r in res.sources]  # fmt: skip
    out = {pair: Planted.of([], [], 0, "") for pair in bases}
    if not rows:
        return out
    xy = np.array([(r[1], r[2]) for r in rows])
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), (len(xy), len(xy)))
    _, place = connected_components(graph, directed=False)
    done = [p for p, r in bases.items() if r is not None]
    n_way = {w: sum(p[0].startswith(first) == w for p in done) for w in (True, False)}
    for c in np.unique(place):
        members = [rows[i] for i in np.flatnonzero(place == c)]
        x, y = np.mean([m[1] for m in members]), np.mean([m[2] for m in members])
        kind, sign = _place_kind(members, first, n_way)
        for pair in bases:
            s = sign if pair[0].startswith(first) else -sign
            out[pair] += Planted.of([x], [y], s, kind)
    return out


def _place_kind(members, first, n_way):
    """``(kind, sign in the pairs whose science is of the first epoch)`` of one place."""
    if np.mean([m[4] for m in members]) >= 0.3:
        return "star-residual", 0.0
    seen = {m[0] for m in members}
    if set.intersection(*(set(p) for p in seen)):
        return "one-exposure", 0.0
    way = {w: [m for m in members if m[0][0].startswith(first) == w] for w in (True, False)}
    found = {w: len({m[0] for m in way[w]}) / max(n_way[w], 1) for w in (True, False)}
    s_fwd = np.sign(np.sum([m[3] for m in way[True]]))
    s_rev = np.sign(np.sum([m[3] for m in way[False]]))
    edge = np.mean([m[5] for m in members]) >= 0.5  # at an edge: could be either
    if min(found.values()) >= 0.6 and s_fwd != 0 and s_fwd == -s_rev and not edge:
        return "variable", float(s_fwd)
    return "unknown", 0.0
