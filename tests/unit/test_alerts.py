"""Alert rules: promtool check/test rules, runbook sections for every alert,
only exported metrics in expressions; the fleet scrape config passes
promtool check config."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml

from tests.conftest import ROOT
from tests.unit.test_dashboards import exported_names, metric_names

RULES = ROOT / "dashboards" / "prometheus" / "kvmscope-alerts.yml"
RULE_TESTS = sorted((ROOT / "dashboards" / "prometheus" / "tests").glob("*.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"
SCRAPE = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def promtool():
    p = shutil.which("promtool")
    if p is None:
        pytest.skip("promtool not installed (deploy/setup.sh installs Debian prometheus)")
    return p


def rules():
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout


def test_promtool_test_rules():
    assert RULE_TESTS
    r = subprocess.run([promtool(), "test", "rules", *[p.name for p in RULE_TESTS]], capture_output=True, text=True,
                       cwd=RULE_TESTS[0].parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_unit_tested():
    tested = set()
    for p in RULE_TESTS:
        for t in yaml.safe_load(p.read_text())["tests"]:
            tested |= {a["alertname"] for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    assert {r["alert"] for r in rules()} <= tested


def test_every_alert_has_summary_description_and_a_runbook_section():
    doc = RUNBOOKS.read_text()
    anchors = {line[3:].strip().lower() for line in doc.splitlines() if line.startswith("## ")}
    for r in rules():
        a = r["annotations"]
        assert a["summary"] and a["description"], r["alert"]
        assert "{{ $value" in a["description"] or "{{ $labels" in a["description"], r["alert"]
        url = a["runbook_url"]
        assert url == f"docs/runbooks.md#{r['alert'].lower()}", url
        assert r["alert"].lower() in anchors, f"no section '## {r['alert']}' in docs/runbooks.md"
        assert r["labels"]["severity"] in ("info", "warning", "critical")


def test_alert_expressions_only_use_exported_metrics():
    exported = exported_names()
    for r in rules():
        names = metric_names(r["expr"])
        assert names and names <= exported, f"{r['alert']}: {sorted(names - exported)}"


def test_fleet_scrape_config_passes_promtool(tmp_path):
    """The example with its /etc/prometheus paths moved under tmp_path (promtool checks files exist)."""
    text = SCRAPE.read_text().replace("/etc/prometheus/", f"{tmp_path}/")
    (tmp_path / "prometheus.yml").write_text(text)
    (tmp_path / "rules").mkdir()
    shutil.copy(RULES, tmp_path / "rules" / "kvmscope-alerts.yml")
    (tmp_path / "kvmscope").mkdir()
    for f in ("ca.crt", "client.crt", "client.key", "password"):
        (tmp_path / "kvmscope" / f).write_text("x\n")
    r = subprocess.run([promtool(), "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_file_sd_targets_example_is_valid():
    for p in (ROOT / "deploy" / "prometheus" / "targets").glob("*.json"):
        groups = json.loads(p.read_text())
        assert isinstance(groups, list) and groups
        for g in groups:
            assert set(g) <= {"targets", "labels"} and g["targets"]
            assert all(isinstance(t, str) and ":" in t for t in g["targets"])
            assert all(isinstance(v, str) for v in g.get("labels", {}).values())
