"""Grafana dashboards: generated JSON up to date, Grafana 10+ shape, unique
panel ids, variables, and every metric a query names is one the agent exports
(the catalog that docs/metrics.md is generated from)."""

from __future__ import annotations

import json
import re

import pytest

from agent.exporters import catalog
from agent.exporters.registry import load_renderers
from dashboards.grafana import generate
from tests.conftest import ROOT

DIR = ROOT / "dashboards" / "grafana"
FILES = sorted(DIR.glob("*.json"))
PROMQL_WORDS = {
    "sum", "by", "rate", "increase", "topk", "max", "min", "count", "on", "group_left", "group_right", "histogram_quantile",
    "label_replace", "and", "or", "unless", "without", "ignoring", "label_values", "avg", "time", "timestamp",
}


def exported_names() -> set[str]:
    load_renderers()
    names = set()
    for n, d in catalog.CATALOG.items():
        names.add(n)
        if d.type == "histogram":
            names |= {n + "_bucket", n + "_sum", n + "_count"}
    return names | {"up"}


def metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "", no_strings)
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_labels)
    no_by = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", no_ranges)
    return {t for t in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", no_by)
            if t not in PROMQL_WORDS and (t.startswith("kvmscope_") or t == "up")}


def all_queries(dash: dict) -> list[str]:
    qs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    qs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return qs


def test_generated_files_are_up_to_date():
    assert {p.name for p in FILES} == set(generate.DASHBOARDS)
    for name, fn in generate.DASHBOARDS.items():
        assert (DIR / name).read_text() == generate.render(fn), f"{name} stale: python -m dashboards.grafana.generate"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_dashboard_shape(path):
    dash = json.loads(path.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"].startswith("kvmscope-") and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names[:2] == ["datasource", "host"]
    ds = dash["templating"]["list"][0]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert "kvmscope_build_info" in dash["templating"]["list"][1]["definition"]
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert '$host' in t["expr"], f"{p['title']}: query ignores the host variable: {t['expr']}"
    # panels do not overlap
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not (cells & mine), f"panel {p['title']} overlaps another"
        cells |= mine


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_queries_only_use_exported_metrics(path):
    exported = exported_names()
    dash = json.loads(path.read_text())
    used = set()
    for q in all_queries(dash):
        names = metric_names(q)
        assert names, f"no metric found in {q}"
        used |= names
    unknown = used - exported
    assert not unknown, f"{path.name} uses metrics the agent does not export: {sorted(unknown)}"


def test_metric_name_extraction():
    q = ('sum by (vm) (rate(kvmscope_vm_disk_time_seconds_total{host=~"$host",op!="flush"}[$__rate_interval]))'
         ' / on (vm) group_left () kvmscope_vm_running{vm="sum_by"}')
    assert metric_names(q) == {"kvmscope_vm_disk_time_seconds_total", "kvmscope_vm_running"}
