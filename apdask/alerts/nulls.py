"""Which alert fields may be null, when, and why: the one list (issue 16).

Every field of the schema is filled as Rubin fills it, or it is listed here with the
condition under which it is null and the reason.  ``docs/alerts.md`` ("Null fields")
carries :func:`null_fields_markdown` verbatim (a test checks), and the end-to-end test
checks every alert of a test-camera run with :func:`unexpected_nulls`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["NULL_FIELDS", "NullField", "null_fields_markdown", "unexpected_nulls"]

#: The bands of the per-band DiaObject fields (``{b}`` in a field name).
BANDS = ("u", "g", "r", "i", "z", "y")

#: Records of an alert: the packet itself and the record each of its parts holds.
_PARTS = {
    "diaSource": "diaSource",
    "prvDiaSources": "diaSource",
    "prvDiaForcedSources": "diaForcedSource",
    "diaObject": "diaObject",
}

_Pred = Callable[[Mapping[str, Any], str, Mapping[str, Any]], bool]


def _forced_in_band(rec: Mapping[str, Any], b: str, alert: Mapping[str, Any]) -> bool:
    return any(f.get("band") == b for f in alert.get("prvDiaForcedSources") or ())


#: Condition name -> (wording in the docs, test on the record, the band and the alert).
CONDITIONS: dict[str, tuple[str, _Pred]] = {
    "always": ("always", lambda rec, b, alert: True),
    "no dipole fit": (
        "`dipoleFitAttempted` is false, or the fit had too few pixels (`dipoleNdata` = 0)",
        lambda rec, b, alert: not rec.get("dipoleFitAttempted") or not rec.get("dipoleNdata"),
    ),
    "no trail fit": (
        "`trailNdata` = 0: not elongated (the major axis of the moments is under 1.2 x the"
        " PSF's), or the fit failed (`trail_flag`)",
        lambda rec, b, alert: not rec.get("trailNdata"),
    ),
    "band not observed": (
        "no DiaSource in band `{b}` (`{b}_psfFluxNdata` = 0)",
        lambda rec, b, alert: not rec.get(f"{b}_psfFluxNdata"),
    ),
    "fewer than 2 in band": (
        "fewer than 2 DiaSources in band `{b}`",
        lambda rec, b, alert: (rec.get(f"{b}_psfFluxNdata") or 0) < 2,
    ),
    "no forced photometry in band": (
        "no forced photometry of the object in band `{b}` yet (none in `prvDiaForcedSources`)",
        lambda rec, b, alert: not _forced_in_band(rec, b, alert),
    ),
}


@dataclass(frozen=True)
class NullField:
    """One field that may be null: record, field (``{b}``: every band), condition, reason."""

    record: str
    field: str
    when: str
    kind: str
    reason: str


_NO_SS = "no Solar System processing in apdask (no ssObject association, no orbits)"
_NO_TRAIL = "the trailed-source (Veres) model is fitted only to sources elongated beyond the PSF"

#: Every field that may be null, in the order of ``docs/alerts.md``.
NULL_FIELDS: tuple[NullField, ...] = (
    NullField("alert", "ssSource", "always", "n/a", _NO_SS),
    NullField("alert", "mpc_orbits", "always", "n/a", _NO_SS),
    NullField("alert", "observation_reason", "always", "n/a",
              "no scheduler input: apdask does not know why a visit was taken"),
    NullField("alert", "target_name", "always", "n/a",
              "no scheduler input: apdask does not know a visit's target"),
    NullField("diaSource", "ssObjectId", "always", "n/a", _NO_SS),
    NullField("diaSource", "parentDiaSourceId", "always", "n/a",
              "no deblending of difference-image footprints, so no DiaSource has a parent"),
    NullField("diaSource", "timeWithdrawnMjdTai", "always", "n/a",
              "set only when a record is withdrawn; alerts carry current records"),
    NullField("diaSource", "glint_trail", "always", "not yet",
              "no glint-trail finder runs over the visit's DiaSources"),
    *(NullField("diaSource", f, "no dipole fit", "n/a",
                "the dipole model is fitted only to sources with an opposite-sign lobe nearby")
      for f in ("dipoleMeanFlux", "dipoleMeanFluxErr", "dipoleFluxDiff", "dipoleFluxDiffErr",
                "dipoleLength", "dipoleAngle", "dipoleChi2")),
    *(NullField("diaSource", f, "no trail fit", "n/a", _NO_TRAIL)
      for f in ("trailFlux", "trailFluxErr", "trailRa", "trailRaErr", "trailDec",
                "trailDecErr", "trailLength", "trailLengthErr", "trailAngle",
                "trailAngleErr", "trailChi2")),
    NullField("diaSource", "trailAlgorithm", "always", "n/a",
              "the schema's keys name moment-based trail measurements (1 = SDSSShape, "
              "2 = HSMShape); the Veres model fitted here has none"),
    NullField("diaForcedSource", "timeWithdrawnMjdTai", "always", "n/a",
              "set only when a record is withdrawn; alerts carry current records"),
    NullField("diaObject", "ra_dec_Cov", "always", "not yet",
              "the covariance of the mean position is not aggregated yet"),
    *(NullField("diaObject", f"{{b}}_{f}", "band not observed", "n/a",
                "an aggregate over the band's DiaSources, which has none")
      for f in ("psfFluxMean", "psfFluxMeanErr", "psfFluxMin", "psfFluxMax", "psfFluxErrMean",
                "scienceFluxMean", "scienceFluxMeanErr")),
    *(NullField("diaObject", f"{{b}}_{f}", "fewer than 2 in band", "n/a",
                "a spread or a slope needs two DiaSources in the band")
      for f in ("psfFluxSigma", "psfFluxMaxSlope")),
    *(NullField("diaObject", f"{{b}}_{f}", "no forced photometry in band", "n/a",
                "an aggregate over the band's forced photometry, which has none yet")
      for f in ("fpFluxMean", "fpFluxMeanErr")),
)  # fmt: skip


def _entries() -> Iterator[tuple[str, str, str, NullField]]:
    """``(record, field, band, entry)`` with every ``{b}`` expanded."""
    for e in NULL_FIELDS:
        if "{b}" in e.field:
            for b in BANDS:
                yield e.record, e.field.format(b=b), b, e
        else:
            yield e.record, e.field, "", e


_LOOKUP = {(rec, f): (b, e) for rec, f, b, e in _entries()}


def unexpected_nulls(alert: Mapping[str, Any]) -> list[str]:
    """The null fields of an alert packet (a dict as fastavro reads it) not allowed by
    :data:`NULL_FIELDS`, as ``part.field`` (``prvDiaSources[2].psfLnL``...)."""
    out = []
    parts: list[tuple[str, str, Mapping[str, Any]]] = [("alert", "", alert)]
    for part, record in _PARTS.items():
        value = alert.get(part)
        if isinstance(value, list):
            parts += [(record, f"{part}[{k}].", r) for k, r in enumerate(value)]
        elif value is not None:
            parts.append((record, f"{part}.", value))
    for record, prefix, rec in parts:
        for name, value in rec.items():
            if value is not None:
                continue
            hit = _LOOKUP.get((record, name))
            if hit is None or not CONDITIONS[hit[1].when][1](rec, hit[0], alert):
                out.append(prefix + name)
    return out


def null_fields_markdown() -> str:
    """:data:`NULL_FIELDS` as the Markdown table of ``docs/alerts.md``."""
    lines = [
        "| record | field | null when | kind | reason |",
        "|---|---|---|---|---|",
    ]
    for e in NULL_FIELDS:
        when = CONDITIONS[e.when][0]
        lines.append(f"| `{e.record}` | `{e.field}` | {when} | {e.kind} | {e.reason} |")
    return "\n".join(lines) + "\n"
