"""dashboards/kibana/*.ndjson: importable saved objects whose every field is in the index templates."""

from __future__ import annotations

import json
import re
from pathlib import Path

from agent.shipping.fields import DATASETS, all_fields

ROOT = Path(__file__).resolve().parents[2]
KQL_FIELD = re.compile(r"([A-Za-z@_][\w.@]*)\s*(?::|<=|>=|<|>)")


def load_objects() -> list[dict]:
    out = []
    for p in sorted((ROOT / "dashboards" / "kibana").glob("*.ndjson")):
        for line in p.read_text().splitlines():
            if line.strip():
                out.append(json.loads(line))
    return out


def referenced_fields(objs) -> list[tuple[str, str, str]]:
    """(saved object title, data view title, field) for every field a saved search uses."""
    views = {o["id"]: o["attributes"]["title"] for o in objs if o["type"] == "index-pattern"}
    out = []
    for o in objs:
        if o["type"] != "search":
            continue
        a = o["attributes"]
        ref = next(r for r in o["references"] if r["name"] == "kibanaSavedObjectMeta.searchSourceJSON.index")
        view = views[ref["id"]]
        src = json.loads(a["kibanaSavedObjectMeta"]["searchSourceJSON"])
        fields = list(a["columns"]) + [s[0] for s in a["sort"]] + KQL_FIELD.findall(src["query"]["query"])
        out.extend((a["title"], view, f) for f in fields)
    return out


def dataset_of(view_title: str):
    return next(d for d in DATASETS.values() if view_title == f"{d.stream_prefix}-*")


def test_objects_are_well_formed_and_references_resolve():
    objs = load_objects()
    ids = {(o["type"], o["id"]) for o in objs}
    assert len(ids) == len(objs)
    for o in objs:
        for r in o.get("references", []):
            assert (r["type"], r["id"]) in ids, f"{o['id']} references missing {r}"
    titles = {o["attributes"]["title"] for o in objs if o["type"] == "search"}
    assert {"retransmits on storage connections", "iSCSI session state changes", "diagnosis findings",
            "slow VM disks"} <= titles
    dash = [o for o in objs if o["type"] == "dashboard"]
    assert len(dash) == 1 and len(json.loads(dash[0]["attributes"]["panelsJSON"])) == len(titles)
    for o in objs:
        if o["type"] == "index-pattern":
            dataset_of(o["attributes"]["title"])  # every data view is one of ours


def test_every_referenced_field_is_in_the_template_of_its_data_view():
    refs = referenced_fields(load_objects())
    assert len(refs) > 20
    for title, view, field in refs:
        assert field in all_fields(dataset_of(view)), f"{title!r}: {field} is not mapped for {view}"
