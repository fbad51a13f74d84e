"""Incidents and outages on real recordings of the lab (tests/fixtures/recordings, make_recordings.py
flaps): a portal down 4 s (the lab's own record of the down period next to it, flap-portal2.lab.json)
is one outage and one incident with start, end and the stalled VMs; nothing on the faults that are not
outages; bounded memory; the incident on /metrics, in the API and as an ES document."""

import json
from pathlib import Path

from prometheus_client.exposition import generate_latest

from agent.api import handle
from agent.codec import load_recording
from agent.config import DiagnoseConfig
from agent.diagnose.incidents import IncidentTracker, incident_key, replay
from agent.diagnose.live import LiveDiagnosis
from agent.diagnose.rules import Finding
from agent.diagnose.timeline import build_timeline, find_outages, gap_bounds, zero_runs
from agent.exporters.collector import make_registry
from agent.exporters.registry import load_renderers
from agent.exporters.render_diagnosis import incidents_renderer
from agent.shipping.ecs import incident_doc
from agent.shipping.fields import DATASETS, all_fields, flatten
from tests.unit.test_ecs import _check_types

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"
PORTAL2 = "198.18.2.2:3260"


def snaps_of(name):
    with open(REC / f"{name}.json") as f:
        return load_recording(f)


def lab_flap(name):
    (period,) = json.loads((REC / f"{name}.lab.json").read_text())["flaps"]
    return period


def live_over(snaps, cfg=None, events=None):
    history = []
    live = LiveDiagnosis(lambda: history, cfg or DiagnoseConfig(),
                         on_incident=(lambda e, inc, s: events.append((e, inc))) if events is not None else None)
    for s in snaps:
        history.append(s)
        live.consume(s)
    return live


# -- the timeline and its outages ---------------------------------------------------------------------


def test_an_idle_portal_with_a_lost_keepalive_is_no_outage():
    """A portal with no busy disk and nothing in flight that moved no bytes for a while is quiet, not
    down, even when TCP retransmitted one segment (a lost NOP-Out) in that time."""
    from agent.diagnose.timeline import Timeline

    n = 6
    tl = Timeline(times=tuple(float(i * 5) for i in range(n + 1)),
                  disk_ops={"vm0/vda": (0,) * n}, disk_ms={"vm0/vda": (None,) * n},
                  disk_portal={"vm0/vda": PORTAL2},
                  portal_progress={PORTAL2: (96, 0, 0, 0, 48, 96)},
                  portal_retrans={PORTAL2: (0, 1, 0, 0, 0, 0)},
                  portal_backoff={PORTAL2: (0, 0, 1, 0, 0, 0, 0)},
                  portal_ack_age_ms={PORTAL2: (100,) * (n + 1)},
                  portal_unacked={PORTAL2: (0,) * (n + 1)})
    assert find_outages(tl) == []


def test_gap_estimates_inside_the_intervals():
    times = (0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    series = (100, 50, 0, 0, 25)  # 100/s, stops half-way through interval 1, resumes 3/4 into interval 4
    assert zero_runs(series) == [(2, 3)]
    assert gap_bounds(times, series, 2, 3) == (1.5, 4.75)
    assert gap_bounds(times, (100, 50, 0, 0, 0), 2, 4) == (1.5, None)  # still silent at the end
    assert gap_bounds(times, (0, 0, 10, 100, 100), 0, 1)[0] == 0.0  # silent since the first snapshot


def test_a_flap_of_portal_2_is_one_outage_with_the_labs_start():
    snaps = snaps_of("flap-portal2")
    lab = lab_flap("flap-portal2")
    (o,) = find_outages(build_timeline(snaps, snaps[-1].paths))
    assert o.portal == PORTAL2 and o.recovered and not o.since_window_start
    assert abs(o.start - lab["start"]) < 0.3, (o.start, lab["start"])  # from the freshest ACK's age
    # the host sees the path back at the first retransmission that gets through after the lab's end:
    # up to one RTO later (backoff 4: 3.2 s), never before it
    assert lab["end"] - 0.3 <= o.end <= lab["end"] + 4.0, (o.end, lab["end"])
    assert o.max_backoff >= 2 and o.retransmits > 0
    assert {s.vm for s in o.stalls} == {"kvmslab-vm1", "kvmslab-vm3"}  # both VMs on portal 2, no other
    for s in o.stalls:
        assert abs(s.stalled_s - (o.end - o.start)) < 1.2, s


def test_no_outage_where_there_is_none_and_an_ongoing_one_offline():
    for name in ("healthy", "loss-portal1", "loss-both", "throttled"):
        snaps = snaps_of(name)
        assert find_outages(build_timeline(snaps, snaps[-1].paths)) == [], name
    snaps = snaps_of("offline-portal2")
    (o,) = find_outages(build_timeline(snaps, snaps[-1].paths))
    assert o.portal == PORTAL2 and not o.recovered and o.since_window_start


# -- incidents ----------------------------------------------------------------------------------------


def test_a_flap_is_one_path_incident_with_start_end_and_stalled_vms():
    events = []
    snaps = snaps_of("flap-portal2")
    lab = lab_flap("flap-portal2")
    live = live_over(snaps, events=events)
    (inc,) = live.incidents.incidents()  # one: no packet loss nor slow target after it (path_outage claims them)
    assert inc["key"] == f"path_down:portal:{PORTAL2}"
    assert inc["state"] == "resolved" and inc["severity"] == "critical" and inc["portal"] == PORTAL2
    assert abs(inc["start"] - lab["start"]) < 0.3
    assert lab["end"] - 0.3 <= inc["end"] <= lab["end"] + 4.0
    assert abs(inc["duration_seconds"] - (inc["end"] - inc["start"])) < 0.01
    assert inc["stalled_vms"] == ["kvmslab-vm1", "kvmslab-vm3"]
    assert all(d["stalled_s"] > 0.8 * inc["duration_seconds"] for d in inc["disks"].values())
    assert "kvmslab-vm0" not in inc["vms"] and "kvmslab-vm2" not in inc["vms"]
    assert inc["summary"].startswith("resolved ") and "VMs kvmslab-vm1, kvmslab-vm3 stalled" in inc["summary"]
    assert inc["title"].startswith(f"path to portal {PORTAL2} down ~") and "recovered" in inc["title"]
    mine = [(e, i["state"]) for e, i in events if i["id"] == inc["id"]]
    assert mine == [("opened", "open"), ("resolved", "resolved")]  # each once, in that order
    assert live.incidents.open_incidents() == []


def test_replay_over_a_recording_gives_the_same_incident():
    snaps = snaps_of("flap-portal2")
    live = live_over(snaps)
    a = [i for i in live.incidents.incidents() if i["key"].startswith("path_down:")]
    b = [i for i in replay(snaps, DiagnoseConfig()) if i["key"].startswith("path_down:")]
    assert [(i["start"], i["end"], i["stalled_vms"]) for i in a] == [(i["start"], i["end"], i["stalled_vms"])
                                                                      for i in b]


def test_the_outage_rule_reports_the_flap_alone():
    """diagnose over the whole recording: one path_outage for portal 2 with the lab's times, instead of
    nothing (the window's means hide it) or a slow target (the requests that waited)."""
    from agent.diagnose.report import diagnose

    snaps = snaps_of("flap-portal2")
    lab = lab_flap("flap-portal2")
    _w, findings = diagnose(snaps, DiagnoseConfig())
    (f,) = [f for f in findings if f.severity != "info"]
    assert (f.rule, f.subject, f.scope) == ("path_outage", {"kind": "portal", "id": PORTAL2},
                                            f"all VMs on portal {PORTAL2}")
    assert abs(f.evidence["start"] - lab["start"]) < 0.3 and lab["end"] - 0.3 <= f.evidence["end"] <= lab["end"] + 4
    assert set(f.evidence["stalled_disks"]) == {"kvmslab-vm1/vda", "kvmslab-vm3/vda"}
    assert f.title.startswith(f"path to portal {PORTAL2} down ~6.6 s from 04:53:00.515 to ")
    assert f.title.endswith("UTC, recovered; VMs kvmslab-vm1, kvmslab-vm3 stalled 6.6 s")
    # the same over the 10 s around it (what `diagnose --window 10s` sees): still the outage, not loss
    around = [s for s in snaps if lab["start"] - 3 <= s.timestamp <= lab["end"] + 5]
    _w, findings = diagnose(around, DiagnoseConfig())
    assert [f.rule for f in findings if f.severity != "info"] == ["path_outage"]


def test_an_outage_still_going_on_is_path_downs():
    from agent.diagnose.report import diagnose

    _w, findings = diagnose(snaps_of("offline-portal2"), DiagnoseConfig())
    assert "path_outage" not in {f.rule for f in findings}


def test_healthy_recording_has_no_incident():
    assert live_over(snaps_of("healthy")).incidents.incidents() == []


def _finding(rule="packet_loss", portal="198.18.1.2:3260", severity="warning"):
    return Finding(rule=rule, severity=severity, subject={"kind": "portal", "id": portal}, title=f"{rule} on {portal}",
                   evidence={}, cause="")


def test_windowed_finding_opens_and_resolves_and_flicker_reopens():
    snaps = snaps_of("healthy")
    tr = IncidentTracker(reopen_seconds=5.0)
    t = [s.timestamp for s in snaps]
    assert tr.update([_finding()], snaps[:2])[0][0] == "opened"
    tr.update([_finding()], snaps[:3])
    ev = tr.update([], snaps[:4])
    assert [e for e, _ in ev] == ["resolved"] and ev[0][1]["end"] == round(t[2], 3)
    assert tr.update([_finding()], snaps[:5]) == []  # back within reopen_seconds: the same incident goes on
    assert len(tr.incidents()) == 1 and tr.open_incidents()[0].start == t[1]
    tr.update([], snaps[:6])
    (inc,) = tr.incidents()
    assert inc["state"] == "resolved" and inc["cycles"] == 3


def test_path_findings_of_one_portal_are_one_incident_key():
    by_disk = Finding(rule="path_down", severity="critical", subject={"kind": "disk", "id": "vm1/vda"}, title="x",
                      evidence={"portal": PORTAL2}, cause="")
    by_portal = _finding("path_outage", PORTAL2)
    assert incident_key(by_disk) == incident_key(by_portal) == f"path_down:portal:{PORTAL2}"
    assert incident_key(_finding()) == "packet_loss:portal:198.18.1.2:3260"


def test_memory_is_bounded():
    snaps = snaps_of("healthy")
    tr = IncidentTracker(max_open=3, max_kept=4)
    tr.update([_finding(portal=f"10.0.0.{i}:3260") for i in range(10)], snaps[:2])
    assert len(tr.open_incidents()) == 3 and tr.dropped == 7
    for k in range(3, 12):
        tr.update([_finding(portal=f"10.0.1.{k}:3260")], snaps[:k % len(snaps) + 2])
    assert len(tr.incidents()) <= 4 + 3


# -- outputs -----------------------------------------------------------------------------------------


def _mid_flap_live():
    """The live diagnosis stopped while portal 2 is down (an open incident)."""
    snaps = snaps_of("flap-portal2")
    lab = lab_flap("flap-portal2")
    upto = [s for s in snaps if s.timestamp <= lab["end"] + 0.5]
    return live_over(upto), upto


def test_open_incident_on_metrics():
    live, snaps = _mid_flap_live()
    (inc,) = live.incidents.open_incidents()
    renderers = load_renderers().with_snapshot(incidents_renderer(live.incidents))
    text = generate_latest(make_registry(lambda: snaps[-1], renderers=renderers)).decode()
    assert "kvmscope_incidents_open 1.0" in text
    head = (f'kvmscope_incident_start_timestamp_seconds{{cause="path_down:portal:{PORTAL2}",rule="path_down",'
            f'severity="critical"}} ')
    (line,) = [ln for ln in text.splitlines() if ln.startswith(head)]
    assert float(line[len(head):]) == inc.start
    assert "kvmscope_incidents_opened_total 1.0" in text


def test_api_serves_incidents_of_a_window():
    live = live_over(snaps_of("flap-portal2"))
    code, body, _ = handle("/api/v1/incidents", "", lambda: [], incidents=live.incidents.incidents)
    assert code == 200 and json.loads(body)["incidents"] == live.incidents.incidents()
    code, body, _ = handle("/api/v1/incidents", "seconds=60", lambda: [], incidents=live.incidents.incidents)
    assert code == 200 and json.loads(body) == {"incidents": []}  # the recording is from the past
    assert handle("/api/v1/incidents", "seconds=x", lambda: [], incidents=live.incidents.incidents)[0] == 400
    assert handle("/api/v1/incidents", "", lambda: [])[0] == 404  # no live diagnosis, no incidents


def test_incident_documents_are_mapped():
    live = live_over(snaps_of("flap-portal2"))
    inc = next(i for i in live.incidents.incidents() if i["key"].startswith("path_down:"))
    _id, stream, doc = incident_doc(inc, "resolved", "default")
    assert stream == "logs-kvmscope.incidents-default"
    _check_types(flatten(doc), all_fields(DATASETS["incidents"]))
    assert doc["event"]["duration"] == int(round(inc["duration_seconds"] * 1e9))
    assert doc["kvmscope"]["incident"]["stalled_vms"] == ["kvmslab-vm1", "kvmslab-vm3"]
    opened = incident_doc(dict(inc, state="open"), "opened", "default")
    assert opened[0] != _id and "end" not in opened[2]["event"]
    assert opened[2]["kvmscope"]["incident"]["id"] == doc["kvmscope"]["incident"]["id"]


def test_api_serves_the_live_findings_with_their_vms():
    live = live_over(snaps_of("loss-portal1"))
    code, body, _ = handle("/api/v1/findings", "", lambda: [], findings=live.served)
    served = json.loads(body)
    assert code == 200 and served["seq"] == snaps_of("loss-portal1")[-1].seq
    (f,) = [f for f in served["findings"] if f["severity"] != "info"]
    assert f["rule"] == "packet_loss" and f["vms"] == ["kvmslab-vm0"] and f["disks"] == ["kvmslab-vm0/vda"]
    assert handle("/api/v1/findings", "", lambda: [])[0] == 404


def test_scoreboard_judges_cause_scope_vms_and_healthy_vms():
    from benchmarks.scoreboard import SCENARIOS, judge

    sc = next(s for s in SCENARIOS if s.name == "flap-portal2")
    outage = {"rule": "path_outage", "severity": "warning", "subject": {"kind": "portal", "id": PORTAL2},
              "scope": f"all VMs on portal {PORTAL2}", "vms": ["kvmslab-vm1", "kvmslab-vm3"], "evidence": {}}
    assert judge(sc, {"findings": [outage]})["ok"]
    # a path_down while it is still down is not the flap's verdict (it is about an ended outage)
    assert not judge(sc, {"findings": [dict(outage, rule="path_down")]})["ok"]
    blame = {"rule": "slow_target", "severity": "warning", "subject": {"kind": "disk", "id": "kvmslab-vm0/vda"},
             "scope": "one VM", "vms": ["kvmslab-vm0"], "evidence": {}}
    j = judge(sc, {"findings": [outage, blame]})
    assert not j["ok"] and not j["healthy"] and j["cause"] and j["vms"]
    healthy = next(s for s in SCENARIOS if s.name == "healthy")
    assert judge(healthy, {"findings": []})["ok"] and not judge(healthy, {"findings": [blame]})["ok"]


def test_one_incident_whatever_the_live_window():
    """A live window of 10 s (the scoreboard's) sees the flap's silence leave it while the interval after
    it (the requests that waited, completing) stays: that aftermath is no second incident."""
    lab = lab_flap("flap-portal2")
    for seconds in (4, 8, 10, 60):
        live = live_over(snaps_of("flap-portal2"), DiagnoseConfig(window_seconds=seconds))
        (inc,) = live.incidents.incidents()
        assert inc["key"] == f"path_down:portal:{PORTAL2}", seconds
        assert lab["end"] - lab["start"] < inc["duration_seconds"] < lab["end"] - lab["start"] + 4, seconds


def test_the_flap_is_seen_at_longer_agent_intervals_whatever_the_phase():
    """Every 2nd..5th snapshot of the recording (an agent interval of 2.2 to 5.5 s, every phase): the
    silence (6.6 s) seldom fills a whole interval, a snapshot inside it still shows it (RTO backoff,
    nothing acked for seconds), with the same start."""
    snaps = snaps_of("flap-portal2")
    lab = lab_flap("flap-portal2")
    for step in (2, 3, 4, 5):
        for offset in range(step):
            sub = snaps[offset::step]
            (o,) = find_outages(build_timeline(sub, sub[-1].paths))
            assert o.portal == PORTAL2 and abs(o.start - lab["start"]) < 0.3, (step, offset)
            assert lab["end"] - 0.3 <= o.end <= lab["end"] + 4.5, (step, offset, o.end - lab["end"])
            assert {s.vm for s in o.stalls} == {"kvmslab-vm1", "kvmslab-vm3"}
            live = live_over(sub, DiagnoseConfig(window_seconds=60))
            assert [i["key"] for i in live.incidents.incidents()] == [f"path_down:portal:{PORTAL2}"], (step, offset)
    for name in ("healthy", "loss-portal1", "loss-both", "throttled"):
        for step in (2, 3):
            sub = snaps_of(name)[::step]
            assert find_outages(build_timeline(sub, sub[-1].paths)) == [], (name, step)
