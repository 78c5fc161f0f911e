"""Tests of apdask.alerts.nulls: the one list of fields that may be null."""

from __future__ import annotations

import re
from pathlib import Path

from apdask.alerts.nulls import BANDS, NULL_FIELDS, null_fields_markdown, unexpected_nulls
from apdask.alerts.schema import load_schema

DOC = Path(__file__).resolve().parents[2] / "docs" / "alerts.md"


def _record_fields():
    """Field names of the alert and of each record type, from the official schema."""
    definition = load_schema().definition
    out = {"alert": {f["name"] for f in definition["fields"]}}
    for f in definition["fields"]:
        types = f["type"] if isinstance(f["type"], list) else [f["type"]]
        for t in types:
            if isinstance(t, dict) and t.get("type") == "array":
                t = t["items"]
            if isinstance(t, dict) and t.get("type") == "record":
                out[t["name"].rsplit(".", 1)[-1]] = {g["name"] for g in t["fields"]}
    return out


def test_docs_carry_the_list_verbatim():
    text = DOC.read_text()
    m = re.search(r"<!-- null-fields:[^>]*-->\n(.*?)<!-- /null-fields -->", text, re.S)
    assert m, "docs/alerts.md lost its null-fields block"
    assert m.group(1) == null_fields_markdown(), (
        "docs/alerts.md and apdask.alerts.nulls.NULL_FIELDS differ; paste "
        "null_fields_markdown() between the null-fields markers"
    )


def test_every_listed_field_is_a_nullable_schema_field():
    fields = _record_fields()
    for e in NULL_FIELDS:
        names = [e.field.format(b=b) for b in BANDS] if "{b}" in e.field else [e.field]
        for name in names:
            assert name in fields[e.record], (e.record, name)


def test_unexpected_nulls_names_an_unlisted_null_and_honours_conditions():
    source = {"psfFlux": 1.0, "psfLnL": None, "ssObjectId": None,
              "dipoleFitAttempted": False, "dipoleNdata": 0, "dipoleLength": None}  # fmt: skip
    obj = {"g_psfFluxNdata": 0, "g_psfFluxMean": None,
           "r_psfFluxNdata": 3, "r_psfFluxMean": None}  # fmt: skip
    alert = {"diaSource": source, "diaObject": obj, "prvDiaSources": [dict(source)],
             "prvDiaForcedSources": [], "ssSource": None}  # fmt: skip
    got = unexpected_nulls(alert)
    assert sorted(got) == ["diaObject.r_psfFluxMean", "diaSource.psfLnL", "prvDiaSources[0].psfLnL"]
    # a dipole that was fitted must carry its values
    alert["diaSource"] = dict(source, psfLnL=0.0, dipoleFitAttempted=True, dipoleNdata=40)
    assert "diaSource.dipoleLength" in unexpected_nulls(alert)
    # trail fields: null only where no trail was fitted (trailNdata = 0)
    alert["diaSource"] = dict(source, psfLnL=0.0, trailNdata=0, trailLength=None)
    assert "diaSource.trailLength" not in unexpected_nulls(alert)
    alert["diaSource"] = dict(source, psfLnL=0.0, trailNdata=300, trailLength=None)
    assert "diaSource.trailLength" in unexpected_nulls(alert)
