"""Trimming oversize alerts for :class:`apdask.services.kafka.KafkaSink`.

An alert larger than the producer's message limit gets its cutouts cropped, then
dropped, step by step until it fits; the steps taken are recorded with it.
"""

from __future__ import annotations

import io

from astropy.io import fits

from apdask.alerts.packets import encode_alert

__all__ = ["CUTOUTS", "trim_alert"]


def _crop_stamp(stamp, size):
    """Crop a FITS stamp (all 2-D HDUs of the image's shape) to the central ``size``."""
    with fits.open(io.BytesIO(stamp)) as hdul:
        shape = hdul[0].data.shape
        if shape[0] <= size:
            return stamp
        off = (shape[0] - size) // 2
        out = []
        for hdu in hdul:
            data = hdu.data
            hdr = hdu.header.copy()
            if data is not None and data.shape == shape:
                data = data[off : off + size, off : off + size]
                for key in ("CRPIX1", "CRPIX2"):
                    if key in hdr:
                        hdr[key] = hdr[key] - off
                for key in ("CUTMINX", "CUTMINY"):
                    if key in hdr:
                        hdr[key] = hdr[key] + off
            if isinstance(hdu, fits.PrimaryHDU):
                out.append(fits.PrimaryHDU(data, header=hdr))
            else:
                out.append(fits.ImageHDU(data, header=hdr, name=hdu.name))
        buf = io.BytesIO()
        fits.HDUList(out).writeto(buf)
        return buf.getvalue()


CUTOUTS = ("cutoutDifference", "cutoutScience", "cutoutTemplate")


def trim_alert(alert, limit, schema):
    """Return a trimmed copy of an :class:`EncodedAlert` whose body fits ``limit``.

    Steps, cumulative, stopping at the first that fits: crop the stamps to 63 px,
    to 31 px, drop the template cutout, drop the science cutout, drop the
    difference cutout.  Returns None if the alert is still too large.
    """
    rec = alert.decode(schema)
    steps = []
    plan = [("crop", 63), ("crop", 31)] + [("drop", k) for k in reversed(CUTOUTS)]
    for kind, arg in plan:
        if kind == "crop":
            changed = False
            for k in CUTOUTS:
                if rec.get(k) is not None:
                    new = _crop_stamp(rec[k], arg)
                    changed |= new is not rec[k]
                    rec[k] = new
            if not changed:
                continue
            steps.append(f"cutouts cropped to {arg} px")
        else:
            if rec.get(arg) is None:
                continue
            rec[arg] = None
            steps.append(f"{arg} dropped")
        enc = encode_alert(rec, schema)
        if len(enc.body) <= limit:
            enc.diaObjectId = alert.diaObjectId
            enc.trimmed = "; ".join(steps)
            return enc
    return None
