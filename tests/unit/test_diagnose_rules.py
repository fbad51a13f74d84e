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


def test_cause_key_is_rule_scope_kind_and_id_and_stable_across_windows():
    with open(REC / "loss-portal1.json") as f:
        snaps = load_recording(f)
    keys = []
    for part in (snaps[:4], snaps[3:]):
        keys.append({f.cause_key for f in run_rules(build_window(part), DiagnoseConfig()) if f.severity != "info"})
    assert keys[0] == keys[1] == {"packet_loss:portal:198.18.1.2:3260"}
    f = rules_mod.Finding("path_down", "warning", {"kind": "session", "id": 3}, "t", {}, "c", aspect="errors")
    assert f.cause_key == "path_down:session:3:errors" and f.as_dict()["cause_key"] == f.cause_key


def _f(rule, *effects, kind="portal", ident="p1"):
    return rules_mod.Finding(rule, "warning", {"kind": kind, "id": ident}, rule, {}, "c", explains=frozenset(effects))


def test_a_rule_of_lower_precedence_claims_the_effects_it_explains():
    """An outage rule registered by another module with a low precedence takes the retransmits of its
    connections: the packet_loss finding on the same connections goes, and is named by the winner."""
    conn, disk = ("conn", "a:1->b:3260"), ("disk", "vm0/vda")
    outage = _f("outage", conn, disk)
    loss = _f("packet_loss", conn)
    other = _f("packet_loss", ("conn", "c:1->d:3260"), ident="p2")
    kept = rules_mod.consolidate([(50, loss), (10, outage), (50, other)])
    assert kept == [outage, other]
    assert outage.evidence["explains_also"] == ["packet_loss:portal:p1"]
    # an effect not explained by the winner keeps the finding
    partly = _f("packet_loss", conn, ("conn", "e:1->b:3260"))
    assert partly in rules_mod.consolidate([(10, _f("outage", conn)), (50, partly)])
    # findings explaining nothing (blind spots, interface counters) are always kept
    spot = _f("blind_spots")
    assert spot in rules_mod.consolidate([(10, outage), (100, spot)])


def test_rule_registration_with_precedence_orders_the_rules(monkeypatch):
    monkeypatch.setattr(rules_mod, "RULES", list(RULES))

    def outage(w, cfg):
        return [_f("outage", *[("conn", c.four_tuple) for c in w.conns if c.portal == "198.18.1.2:3260"],
                   *[("disk", f"{d.vm}/{d.disk}") for d in w.disks if d.portal == "198.18.1.2:3260"])]

    rules_mod.rule(precedence=5)(outage)  # below the generic rules (path_outage is 10); rules_kernel has a 5 too
    assert rules_mod.precedence_of(outage) == 5
    assert rules_mod.RULES.index(outage) < rules_mod.RULES.index(rules_mod.path_down)
    assert all(rules_mod.precedence_of(r) <= 5 for r in rules_mod.RULES[:rules_mod.RULES.index(outage)])
    findings = run_rules(window("loss-portal1"), DiagnoseConfig())
    assert "packet_loss" not in {f.rule for f in findings}
    (o,) = [f for f in findings if f.rule == "outage"]
    assert o.evidence["explains_also"] == ["packet_loss:portal:198.18.1.2:3260"]
