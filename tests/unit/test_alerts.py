"""Alert rules: promtool check/test rules, runbook sections for every alert,
only exported metrics in expressions; the fleet scrape config passes
promtool check config."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from agent import health
from agent.durations import parse_duration
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


# -- the alert rules use the health model's numbers (agent/health.py) ------------------------
def _rule(name):
    return next(r for r in rules() if r["alert"] == name)


def _one(pattern, expr, what):
    m = re.findall(pattern, " ".join(expr.split()))
    assert len(m) == 1, f"{what}: expected one match of {pattern!r} in {expr!r}, got {m}"
    return m[0]


def _secs(duration):
    return parse_duration(duration)


@pytest.mark.parametrize("name, rate_re, ratio_re", [
    ("KvmscopeStorageConnectionRetransmits",
     r"rate\(kvmscope_storage_connection_retransmitted_segments_total\[(\w+)\]\) (>=?) ([\d.]+)",
     r'rate\(kvmscope_storage_connection_bytes_total\{direction="sent"\}\[(\w+)\]\) \) (>=?) ([\d.]+)'),
    ("KvmscopeStoragePortalRetransmits",
     r'rate\(kvmscope_tcp_retransmits_total\{remote_address!="other"\}\[(\w+)\]\) \) (>=?) ([\d.]+)',
     r'rate\(kvmscope_storage_connection_bytes_total\{direction="sent"\}\[(\w+)\]\)\) \) (>=?) ([\d.]+)'),
])
def test_loss_alerts_use_the_health_model(name, rate_re, ratio_re):
    r = _rule(name)
    rng, op, rate = _one(rate_re, r["expr"], "retransmit rate")
    assert (op, float(rate), _secs(rng)) == (">=", health.LOSS_MIN_RETRANS_PER_S, _secs(health.ALERT_LOSS_RANGE))
    rng, op, ratio = _one(ratio_re, r["expr"], "retransmitted/sent bytes")
    assert (op, float(ratio), _secs(rng)) == (">=", health.LOSS_MIN_RATIO, _secs(health.ALERT_LOSS_RANGE))
    assert _secs(r["for"]) == _secs(health.ALERT_LOSS_FOR)
    # the description states the same numbers
    d = r["annotations"]["description"]
    assert f"at least {health.LOSS_MIN_RETRANS_PER_S:g}/s" in d and f"{health.LOSS_MIN_RATIO * 100:g}% of the bytes" in d


def test_latency_alert_uses_the_health_model():
    r = _rule("KvmscopeVmDiskLatencyHigh")
    op, mean_s = _one(r"rate\(kvmscope_vm_disk_requests_total\{op!=\"flush\"\}\[5m\]\)\) \) (>=?) ([\d.]+)",
                      r["expr"], "mean latency")
    assert (op, float(mean_s) * 1000) == (">", health.CRITICAL_MS)
    rng, op, ops = _one(r"increase\(kvmscope_vm_disk_requests_total\{op!=\"flush\"\}\[(\w+)\]\)\) (>=?) (\d+)",
                        r["expr"], "minimum requests")
    assert (op, int(ops), _secs(rng)) == (">=", health.MIN_OPS, _secs(health.ALERT_SLOW_RANGE))
    assert set(re.findall(r"\[(\w+)\]", r["expr"])) == {health.ALERT_SLOW_RANGE}
    assert _secs(r["for"]) == _secs(health.ALERT_SLOW_FOR)
    d = r["annotations"]["description"]
    assert f"threshold {health.CRITICAL_MS:g}ms, over at least {health.MIN_OPS} requests" in d


def test_the_comparison_finds_a_changed_number():
    expr = _rule("KvmscopeStorageConnectionRetransmits")["expr"].replace(">= 0.01", ">= 0.02")
    _, _, ratio = _one(r'direction="sent"\}\[(\w+)\]\) \) (>=?) ([\d.]+)', expr, "ratio")
    assert float(ratio) != health.LOSS_MIN_RATIO
