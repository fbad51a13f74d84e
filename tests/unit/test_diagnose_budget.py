"""The latency budget, RTT baselines and one finding per cause, on real recordings of the lab with four
VMs (two per portal, tests/fixtures/recordings/make_recordings.py four): each fault after a healthy
lead-in of 6 snapshots, the history the baselines are learnt from; the window is what follows."""

import json
from pathlib import Path

import pytest

from agent import health
from agent.codec import load_recording
from agent.config import DiagnoseConfig
from agent.diagnose.budget import disk_budget
from agent.diagnose.report import diagnose, report_json, report_text

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"
LEAD = 6  # snapshots of healthy lead-in before each fault
P1, P2 = "198.18.1.2:3260", "198.18.2.2:3260"
ON_P1, ON_P2 = ["kvmslab-vm0", "kvmslab-vm2"], ["kvmslab-vm1", "kvmslab-vm3"]


def load(name):
    with open(REC / f"{name}.json") as f:
        return load_recording(f)


def run(name, lead=LEAD):
    snaps = load(name)
    return diagnose(snaps[lead:], DiagnoseConfig(), history=snaps[:lead])


def problems(findings):
    return [f for f in findings if f.severity in ("critical", "warning")]


@pytest.mark.parametrize("name", ["shaped-portal1", "loss-tohost-portal2", "offline-portal1-4vms"])
def test_golden(name, golden):
    w, findings = run(name)
    golden(f"diagnose-{name}.txt", report_text(w, findings))
    golden(f"diagnose-{name}.json", json.dumps(report_json(w, findings), indent=2, sort_keys=True) + "\n")


def test_shaped_link_is_network_queueing_naming_exactly_that_portals_vms():
    """A rate-limited link (queueing, no loss): a network-path finding, not slow_target."""
    w, findings = run("shaped-portal1")
    (f,) = problems(findings)
    assert f.rule == "network_queueing" and f.subject == {"kind": "portal", "id": P1}
    assert f.evidence["vms"] == ON_P1 and f.scope == f"all VMs on portal {P1}"
    assert f.evidence["rtt_baseline_from"] == "history"
    assert f.evidence["rtt_inflation"] >= health.RTT_INFLATED_FACTOR and f.evidence["retransmits_lost"] == 0
    for disk, b in f.evidence["budget"].items():
        assert b["dominant"] == "network" and b["network_share_of_excess_pct"] >= 100 * health.NETWORK_SHARE
        # the arithmetic adds up: the layers make the guest-visible time
        assert sum(b["layers_ms"].values()) == pytest.approx(b["ms_per_request"], abs=0.01)
    assert not [x for x in findings if x.rule == "slow_target"]


def test_loss_toward_the_host_names_every_vm_on_the_portal():
    """Loss only target -> host: the host's retransmits do not show it (all DSACKed here), the holes in what
    it receives do; both VMs of the portal are named, neither of the other portal."""
    w, findings = run("loss-tohost-portal2")
    (f,) = problems(findings)
    assert f.rule == "packet_loss" and f.subject == {"kind": "portal", "id": P2}
    assert f.evidence["direction"] == "toward the host" and f.evidence["out_of_order_received"] > 0
    assert f.evidence["vms"] == ON_P2 and f.scope == f"all VMs on portal {P2}"
    p = w.portals[P2]
    assert p.real_retrans == 0 < p.retrans  # every host retransmit was a duplicate: not the signal
    assert health.lossy_toward_host(p.ooo_per_second, p.ooo_ratio)
    assert not health.lossy_toward_host(w.portals[P1].ooo_per_second, w.portals[P1].ooo_ratio)


def test_portal_offline_is_one_finding_with_all_its_vms():
    w, findings = run("offline-portal1-4vms")
    (f,) = problems(findings)
    assert f.rule == "path_down" and f.subject == {"kind": "portal", "id": P1} and f.severity == "critical"
    assert f.evidence["vms"] == ON_P1 and f.scope == f"all VMs on portal {P1}"
    assert f.cause_key == f"path_down:portal:{P1}"


def test_healthy_against_its_baseline_is_not_slow():
    """On the loaded lab machine every iSCSI disk runs at 5-6.5 ms healthy: over the absolute slow_ms,
    not over 3 x its own baseline; the absolute number alone decides without history."""
    snaps = load("healthy-4vms")
    w, findings = diagnose(snaps[3:], DiagnoseConfig(), history=snaps[:3])
    assert problems(findings) == []
    assert all(d.baseline_ms is not None for d in w.disks if d.disk == "vda")
    _, alone = diagnose(snaps[3:], DiagnoseConfig())
    assert {f.rule for f in problems(alone)} == {"slow_target"}


def test_throttled_target_with_a_healthy_history_stays_slow_target():
    """The throttled target's RTT grows too (it acknowledges commands only with their late responses): with
    the pre-fault baseline that is a large inflation, but an erratic one (variance above the RTT), so the
    budget leaves it to the target, not to a queue on the path."""
    throttled, healthy = load("throttled"), load("healthy")
    w, findings = diagnose(throttled, DiagnoseConfig(), history=healthy)
    assert {f.rule for f in problems(findings)} == {"slow_target"}
    b = disk_budget(next(d for d in w.disks if d.vm == "kvmslab-vm0" and d.disk == "vda"), w)
    assert b.rtt_inflation > health.RTT_INFLATED_FACTOR and b.rttvar_ms > b.rtt_ms and b.dominant == "target"


def test_every_slow_disk_is_in_a_finding():
    """No slow disk left unexplained, in every recording: a rule names it or slow_unexplained does."""
    for name, lead in (("shaped-portal1", LEAD), ("loss-tohost-portal2", LEAD), ("offline-portal1-4vms", LEAD),
                       ("healthy-4vms", 0), ("throttled", 0), ("loss-both", 0), ("loss-portal1", 0)):
        w, findings = run(name, lead)
        explained = {e for f in findings for e in f.explains}
        for d in w.disks:
            if health.slow(d.mean_ms, d.ops, baseline_ms=d.baseline_ms):
                assert ("disk", f"{d.vm}/{d.disk}") in explained, (name, d)


def test_slow_unexplained_lists_what_was_ruled_out():
    from agent.diagnose.rules import Finding, slow_unexplained

    w, findings = run("shaped-portal1")
    # without the rules' findings, every slow disk is unexplained: each says why the causes were ruled out
    out = slow_unexplained(w, DiagnoseConfig(), [f for f in findings if f.rule == "blind_spots"])
    assert {f.subject["id"] for f in out} == {"kvmslab-vm0/vda", "kvmslab-vm2/vda"}
    f = out[0]
    assert isinstance(f, Finding) and f.rule == "slow_unexplained" and "cause not determined" in f.title
    assert any(r.startswith("packet loss on") for r in f.evidence["ruled_out"])
    assert f.evidence["budget"]["dominant"] == "network"


def test_rtt_baseline_is_per_portal_and_survives_a_reconnect():
    """Reset-safe: the window's connections are new ones (another local port, counters from 0), the
    portal's baseline learnt from the old connections still holds."""
    from dataclasses import replace

    snaps = load("shaped-portal1")
    history, window = snaps[:LEAD], snaps[LEAD:]

    def reconnected(s):
        conns = s.data["storage_tcp"]
        moved = tuple(replace(c, sport=c.sport + 1, inode=c.inode + 1) for c in conns.connections)
        return replace(s, data=dict(s.data, storage_tcp=replace(conns, connections=moved)))

    w_same, _ = diagnose(window, DiagnoseConfig(), history=history)
    w_new, findings = diagnose([reconnected(s) for s in window], DiagnoseConfig(), history=history)
    assert w_new.portals[P1].rtt_baseline_ms == w_same.portals[P1].rtt_baseline_ms
    assert w_new.portals[P1].rtt_baseline_source == "history"
    assert not set(w_new.portals[P1].connections) & set(w_same.portals[P1].connections)
    assert any(f.rule == "network_queueing" for f in findings)
