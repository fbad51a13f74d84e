"""The rules are isolated like sources: one that raises is a blind spot, the others still run;
no rule changes the window it judges."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest

from agent.codec import load_recording
from agent.config import DiagnoseConfig
from agent.diagnose import rules as rules_mod
from agent.diagnose.live import LiveDiagnosis
from agent.diagnose.report import report_json, report_text
from agent.diagnose.rules import RULES, run_rules
from agent.diagnose.window import build_window

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"


def window(name):
    with open(REC / f"{name}.json") as f:
        return build_window(load_recording(f))


def broken(w, cfg):
    raise KeyError("portal")


def test_a_failing_rule_is_a_blind_spot_and_the_others_still_run():
    w = window("loss-portal1")
    findings = run_rules(w, DiagnoseConfig(), rules=[broken, *RULES])
    assert "packet_loss" in {f.rule for f in findings}  # the rule after the broken one ran
    spot = [f for f in findings if f.subject == {"kind": "rule", "id": "broken"}]
    assert len(spot) == 1 and spot[0].rule == "blind_spots" and spot[0].severity == "info"
    assert spot[0].evidence == {"rule": "broken", "error": "KeyError: 'portal'"}
    doc = report_json(w, findings)
    assert any(f["subject"]["id"] == "broken" and "KeyError" in f["evidence"]["error"] for f in doc["findings"])
    assert "rule broken failed (KeyError: 'portal')" in report_text(w, findings)


def test_a_failing_rule_shows_in_the_live_findings(monkeypatch):
    with open(REC / "loss-portal1.json") as f:
        snaps = load_recording(f)
    monkeypatch.setattr(rules_mod, "RULES", [broken, *RULES])
    history = []
    live = LiveDiagnosis(lambda: history, DiagnoseConfig(window_seconds=60))
    for s in snaps:
        history.append(s)
        live.consume(s)
    by_rule = {(f.rule, f.subject["id"]) for f in live.current}
    assert ("blind_spots", "broken") in by_rule and any(r == "packet_loss" for r, _ in by_rule)


@pytest.mark.parametrize("name", ["healthy", "loss-portal1", "loss-both", "throttled", "offline-portal2"])
def test_no_rule_changes_the_window(name):
    w = window(name)
    before = copy.deepcopy(w)
    run_rules(w, DiagnoseConfig())
    assert w == before


def test_window_records_are_frozen():
    w = window("throttled")
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.disks[0].portal = "elsewhere"
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.conns[0].retrans = 0
    json.dumps(report_json(w, []))  # tuples still serialise
