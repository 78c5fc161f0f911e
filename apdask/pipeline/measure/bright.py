"""Residual power around bright sources in the difference image, as S/N-map variance."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from apdask.core.stats import nanmedian_last
from apdask.pipeline.psf import psf_fwhm
from apdask.pipeline.stars import local_maxima, stamps_at

__all__ = ["bright_sources"]


def bright_sources(
    template: np.ndarray,
    variance: np.ndarray,
    psf_template: np.ndarray,
    psf_difference: np.ndarray,
    *,
    scale: float = 1.0,
    min_snr: float = 300.0,
) -> dict[str, np.ndarray]:
    """Bright sources of the template: their residual rings on the difference.

    A matching kernel of limited size with a Gaussian basis cannot follow PSF wings
    that are not Gaussian (Kolmogorov or Moffat): around a bright star the difference
    keeps a ring of ~1e-5 of the star's flux per pixel just beyond the kernel's
    reach, linear in the flux.  Above ~1e6 nJy it exceeds the detection threshold.
    :func:`matched_filter` measures that ring around these sources and treats it
    as systematic noise of its S/N map (see :func:`_bright_variance`).

    Parameters
    ----------
    template : numpy.ndarray
        Template on the difference's pixel grid (sky ~0, finite values).
    variance : numpy.ndarray
        Variance of the difference (nJy²).
    psf_template, psf_difference : numpy.ndarray
        PSF stamps (sum 1).
    scale : float, optional
        Photometric scale difference/template (science/template kernel sum).
    min_snr : float, optional
        Keep sources whose flux is at least this many times the PSF-flux noise of the
        difference: with the residual level of a Kolmogorov PSF, the rings of fainter
        ones stay below 0.2 σ of the S/N map.

    Returns
    -------
    dict
        ``x``, ``y`` (int pixel of the peak) and ``flux`` (nJy in difference units:
        the template flux within 3 FWHM, less the local annulus median, over the PSF
        fraction there), brightest first.
    """
    pd = np.asarray(psf_difference, float)
    pt = np.asarray(psf_template, float)
    v0 = float(np.median(variance[::8, ::8]))
    f_min = min_snr * np.sqrt(max(v0, 0.0) / float((pd * pd).sum()))
    none = {"x": np.zeros(0, int), "y": np.zeros(0, int), "flux": np.zeros(0)}
    # a source of flux f_min peaks at least at half the centred PSF peak
    thr = 0.5 * f_min / max(scale, 1e-12) * float(pt.max())
    rows = np.flatnonzero(np.fmax.reduce(template, axis=1) > thr)  # a few rows: cheap
    ys, xs = local_maxima(template[rows], thr)
    ys = rows[ys]
    if len(xs) == 0:
        return none
    # one peak per source: the brightest within 2 template FWHM
    fw_t = float(psf_fwhm(pt))
    order = np.argsort(-template[ys, xs])
    ys, xs = ys[order], xs[order]
    xy = np.column_stack([xs, ys])
    keep = np.ones(len(xs), bool)
    for i, nb in enumerate(cKDTree(xy).query_ball_point(xy, 2.0 * fw_t)):
        if keep[i]:
            keep[[j for j in nb if j > i]] = False
    ys, xs = ys[keep], xs[keep]
    r_ap = max(3.0 * fw_t, 6.0)
    h = int(np.ceil(r_ap + 6.0))
    rr = np.hypot(*np.mgrid[-h : h + 1, -h : h + 1])
    inner, ann = rr <= r_ap, (rr > r_ap + 2.0) & (rr <= r_ap + 6.0)
    ph = pt.shape[0] // 2
    frac = float(pt[np.hypot(*np.mgrid[-ph : ph + 1, -ph : ph + 1]) <= r_ap].sum() / pt.sum())
    st = stamps_at(template, xs, ys, h)
    bkg = nanmedian_last(st[:, ann])
    flux = np.nansum(st[:, inner] - bkg[:, None], axis=1) / frac * scale
    sel = np.flatnonzero(flux >= f_min)
    sel = sel[np.argsort(-flux[sel])]
    return {"x": xs[sel], "y": ys[sel], "flux": flux[sel]}


def _bright_variance(
    filt,
    vfilt,
    bad,
    sources,
    psf,
    *,
    r_max=48,
    step=2.0,
    max_stars=50,
    nsigma=2.0,
    floor=0.05,
    neighbours=10,
    max_local=200,
):
    """Residuals of bright sources as systematic noise of the S/N map (in place).

    Two terms, the score-image variance terms of Zackay, Ofek & Gal-Yam (2016):

    * **Rings.**  The matched-filter residual around the sources of
      :func:`bright_sources` is modelled as ``F · R(r)``: ``R`` in bins of ``step``
      pixels is the weighted median (weights ``F²``; variable stars and neighbours do
      not bias it) over the brightest ``max_stars`` sources of their annulus medians of
      ``filt / F``.  ``A(r)``, the part of ``|R|`` above ``nsigma`` errors, gives the
      variance ``(F · A(r))²``.
    * **Local residual power.**  The kernel's spatial model is least exact in parts of
      the CCD (a corner where the PSF is sharpest), and there the residuals of bright
      stars need not be round.  For each source (at most ``max_local``) the power of
      ``filt`` in each annulus above its noise, per ``F²``, is measured; each source
      then takes the weighted median (weights: inverse errors) of that of its
      ``neighbours`` nearest other sources, the part above ``nsigma`` errors, times
      its ``F²``.  Leaving the source itself out keeps its own signal (a variable
      star, a supernova near a galaxy's core) from hiding itself.

    Each is made non-increasing outwards and flat within one PSF FWHM.  The larger of
    the two, linear in ``r`` between the bins' centres and at least ``a(0) φ(r)^1.6``
    (``φ`` the matched filter's response to a centred point source, so that the S/N
    peak of a varying bright star stays on it), is added to ``vfilt`` around every
    source, out to where it drops below ``floor`` times the typical S/N-map noise.
    Sources with masked pixels within ``4 × step`` px are left out of both estimates.

    Returns
    -------
    numpy.ndarray
        ``A`` per bin (per nJy of source flux, in ``filt`` units).
    """
    edges = np.arange(0.0, float(r_max) + step, step)
    nbin = len(edges) - 1
    xs, ys, flux = (np.asarray(sources.get(k, ())) for k in ("x", "y", "flux"))
    if len(flux) == 0:
        return np.zeros(nbin)
    nea = 1.0 / float((np.asarray(psf, float) ** 2).sum())
    fwhm = psf_fwhm(psf)
    H = int(np.ceil(edges[-1]))
    r = np.hypot(*np.mgrid[-H : H + 1, -H : H + 1]).ravel()
    rbin = np.digitize(r, edges) - 1
    cnt = np.bincount(rbin[rbin < nbin], minlength=nbin)
    pix = np.argsort(rbin, kind="stable")[: cnt.sum()]  # stamp pixels grouped by bin
    # clean: no masked pixel within 4 steps (a stamp of that size is enough to tell)
    hc = int(np.ceil(4 * step))
    rc = np.hypot(*np.mgrid[-hc : hc + 1, -hc : hc + 1]).ravel() <= 4 * step
    near = stamps_at(bad, xs, ys, hc, True).reshape(len(xs), -1)[:, rc]
    clean = np.flatnonzero(~near.any(axis=1))[:max_local]
    if len(clean) == 0:
        return np.zeros(nbin)
    xc, yc = xs[clean], ys[clean]
    # the stamps' pixels within r_max, grouped by bin; NaN where masked or off the image
    b = stamps_at(bad, xc, yc, H, True).reshape(len(clean), -1)[:, pix]
    d = np.where(b, np.nan, stamps_at(filt, xc, yc, H).reshape(len(clean), -1)[:, pix])
    v = np.where(b, np.nan, stamps_at(vfilt, xc, yc, H).reshape(len(clean), -1)[:, pix])
    n, (sum_v, sum_d2) = _bin_sums(np.isfinite(d), (v, d * d), cnt)
    f = flux[clean][:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mv = sum_v / n
        # --- rings: annulus medians of the brightest (a median of n correlated pixels)
        use = slice(0, max_stars)
        val = nanmedian_last(_by_bin(d[use], cnt)) / f[use]
        err2 = (np.pi / 2) * mv[use] * np.minimum(1.0, nea / n[use]) / f[use] ** 2
        # --- local power: filt's correlation area is about twice the PSF's
        n_eff = np.maximum(n / (2.0 * nea), 1.0)
        pw = (sum_d2 / n - mv) / f**2
        pw_w = n_eff * f**4 / (2.0 * mv * mv)
    amp = _weighted_median_profile(val, np.where(n[use] >= 5, 1.0 / err2, 0.0), nsigma)
    amp[edges[:-1] < fwhm] = amp[0]  # flat within one FWHM
    pw_w = np.where((n >= 5) & np.isfinite(pw) & np.isfinite(pw_w), pw_w, 0.0)
    local = _local_power(xs, ys, clean, pw, pw_w, edges, fwhm, neighbours, nsigma)
    if not amp.any() and not local.any():
        return amp
    _add_variance(vfilt, xs, ys, flux, amp, local, psf, edges, float(r_max), floor)
    return amp


def _bin_sums(
    ok: np.ndarray, values: tuple[np.ndarray, ...], cnt: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per row and bin: the count of ``ok`` pixels and the sums of ``values`` over them.

    ``ok`` and ``values`` are ``(n, P)`` with their columns grouped by bin, ``cnt[k]``
    columns in bin ``k``.
    """
    full = cnt > 0
    starts = (np.cumsum(cnt) - cnt)[full]
    out = []
    for a in (ok, *values):
        s = np.zeros((len(ok), len(cnt)))
        s[:, full] = np.add.reduceat(np.where(ok, a, 0.0), starts, axis=1)
        out.append(s)
    return out[0], out[1:]


def _by_bin(a: np.ndarray, cnt: np.ndarray) -> np.ndarray:
    """``(n, nbin, max(cnt))`` from ``(n, P)`` columns grouped by bin (``cnt`` columns
    per bin), NaN-padded."""
    n = len(a)
    starts = np.cumsum(cnt) - cnt
    slot = np.arange(cnt.max())
    take = np.where(slot[None, :] < cnt[:, None], starts[:, None] + slot[None, :], a.shape[1])
    return np.concatenate([a, np.full((n, 1), np.nan)], axis=1)[:, take]


def _local_power(
    xs: np.ndarray,
    ys: np.ndarray,
    clean: np.ndarray,
    pw: np.ndarray,
    pw_w: np.ndarray,
    edges: np.ndarray,
    fwhm: float,
    neighbours: int,
    nsigma: float,
) -> np.ndarray:
    """Local residual power per source and bin: the weighted median of that of its
    ``neighbours`` nearest other clean sources, non-increasing outwards and flat
    within one FWHM (zeros with fewer than two clean sources)."""
    nbin = len(edges) - 1
    local = np.zeros((len(xs), nbin))
    m = len(clean)
    if m >= 2 and neighbours > 0:
        k = min(int(neighbours), m - 1)
        pts = np.column_stack([xs[clean], ys[clean]]).astype(float)
        tree = cKDTree(pts)
        _, nb = tree.query(np.column_stack([xs, ys]).astype(float), k=k + 1)
        nb = np.asarray(nb).reshape(len(xs), k + 1)
        own = np.full(len(xs), -1)
        own[clean] = np.arange(m)
        # leave the source itself out (the k nearest others)
        keep = nb != own[:, None]
        nb = np.array([row[kk][:k] for row, kk in zip(nb, keep, strict=True)])
        # (source, neighbour, bin): the weighted medians of all sources at once
        local = _weighted_median_profile(pw[nb], pw_w[nb], nsigma, signed=True)
        local = np.maximum.accumulate(local[:, ::-1], axis=1)[:, ::-1]
        core = edges[:-1] < fwhm
        local[:, core] = local[:, core].max(axis=1, keepdims=True)
    return local


def _add_variance(
    vfilt: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    flux: np.ndarray,
    amp: np.ndarray,
    local: np.ndarray,
    psf: np.ndarray,
    edges: np.ndarray,
    r_max: float,
    floor: float,
) -> None:
    """Add the larger of the ring and local terms around every source to ``vfilt``."""
    ny, nx = vfilt.shape
    s0 = float(np.sqrt(np.median(vfilt[::16, ::16])))
    # a floor a2(0)·φ(r)^1.6, φ the matched filter's response to a centred point
    # source: the S/N of a source at the centre (a variable star) then falls
    # outwards as φ^0.2 at least, and its peak stays there
    fine = np.arange(0.0, r_max + 0.5, 0.25)
    phi = _filter_profile(psf, fine) ** 1.6
    mid = 0.5 * (edges[:-1] + edges[1:])
    for i, (x, y, fl) in enumerate(zip(xs, ys, flux, strict=True)):
        a2 = np.maximum((fl * amp) ** 2, fl * fl * local[i])
        big = np.flatnonzero(a2 > (floor * s0) ** 2)
        if len(big) == 0:
            continue
        h = int(np.ceil(edges[big[-1] + 1]))
        y0, y1, x0, x1 = max(y - h, 0), min(y + h + 1, ny), max(x - h, 0), min(x + h + 1, nx)
        if y1 <= y0 or x1 <= x0:
            continue
        rr = np.hypot(np.arange(x0, x1)[None, :] - x, np.arange(y0, y1)[:, None] - y)
        # linear in r between the bins' centres: no steps in the S/N map at bin edges
        add = np.maximum(np.interp(rr, mid, a2, right=0.0), a2[0] * np.interp(rr, fine[:-1], phi))
        vfilt[y0:y1, x0:x1] += add.astype(np.float32)


def _filter_profile(psf, edges):
    """Matched-filter response to a centred point source (the PSF's autocorrelation,
    1 at the centre): its largest value in each radial bin ``edges[k] <= r < edges[k+1]``
    (0 beyond the stamp)."""
    p = np.asarray(psf, float)
    n = p.shape[0]
    f = np.fft.rfft2(p, s=(2 * n, 2 * n))
    ac = np.fft.fftshift(np.fft.irfft2(f * np.conj(f), s=(2 * n, 2 * n)))
    ac /= ac[n, n]
    r = np.hypot(*np.mgrid[-n:n, -n:n]).ravel()
    k = np.digitize(r, edges) - 1
    out = np.zeros(len(edges) - 1)
    sel = (k >= 0) & (k < len(out))
    np.maximum.at(out, k[sel], np.clip(ac.ravel()[sel], 0.0, None))
    return out


def _weighted_median_profile(val, w, nsigma, signed=False):
    """Per bin (last axis) weighted median over sources (the axis before), less ``nsigma``
    errors (``1.2533 / sqrt(Σ w)``): of ``|median|`` (``signed=False``, made
    non-increasing outwards) or of the median itself, 0 where not positive."""
    w = np.where(np.isfinite(val) & np.isfinite(w) & (w > 0), w, 0.0)
    val = np.where(w > 0, val, 0.0)
    ax = val.ndim - 2  # the sources' axis (leading axes: independent batches)
    o = np.argsort(val, axis=ax)
    vs, ws = np.take_along_axis(val, o, ax), np.take_along_axis(w, o, ax)
    cw = np.cumsum(ws, axis=ax)
    tot = np.take(cw, -1, axis=ax)
    k = np.argmax(cw >= 0.5 * np.expand_dims(tot, ax), axis=ax)
    prof = np.where(tot > 0, np.take_along_axis(vs, np.expand_dims(k, ax), ax).squeeze(ax), 0.0)
    err = np.where(tot > 0, 1.2533 / np.sqrt(np.where(tot > 0, tot, 1.0)), 0.0)
    if signed:
        return np.maximum(prof - nsigma * err, 0.0)
    amp = np.maximum(np.abs(prof) - nsigma * err, 0.0)
    return np.maximum.accumulate(amp[::-1])[::-1]  # non-increasing outwards
