"""The live diagnosis judges the window's last intervals too (diagnose.recent_intervals, agent/diagnose/live.py
judge, agent/diagnose/rules.py run_rules(recent=...)): a fault that started inside the window is named as soon
as its last intervals show it, and a healthy host gets no finding the whole window alone would not give."""

import re
from pathlib import Path

import pytest

from agent.codec import read_recording
from agent.config import DiagnoseConfig
from agent.diagnose import rules as R
from agent.diagnose.live import LiveDiagnosis, judge
from agent.diagnose.rules import Finding

REC = Path(__file__).resolve().parents[1] / "fixtures" / "recordings"
LEAD = 6  # the four-VM recordings: 6 healthy snapshots, then the fault (make_recordings.py four)
P1, P2 = "198.18.1.2:3260", "198.18.2.2:3260"


def load(name):
    return read_recording(str(REC / f"{name}.json"))


def keys_per_cycle(snaps, **cfg):
    """The warning/critical cause keys of each cycle, as the agent judges its ring after each snapshot."""
    c = DiagnoseConfig(**cfg)
    out = []
    for i in range(1, len(snaps)):
        judged = judge(snaps[:i + 1], snaps[i].timestamp, c)
        out.append(set() if judged is None else {f.cause_key for f in judged[1] if f.severity != "info"})
    return out


def first_cycle(per_cycle, key):
    """The snapshot index of the first cycle whose findings hold ``key``."""
    return next(i + 1 for i, keys in enumerate(per_cycle) if key in keys)


@pytest.mark.parametrize("window", [10, 60])
def test_loss_toward_the_host_is_named_at_its_first_interval(window):
    """5% loss toward the host on portal 2 from the 7th snapshot (interval ~2.2 s): over a 60 s window the
    whole window names it only after four more intervals (the healthy lead-in dilutes the holes), over a
    10 s window after one more; its last two intervals name it at the first interval of the fault."""
    snaps = load("loss-tohost-portal2")
    key = f"packet_loss:portal:{P2}"
    whole = first_cycle(keys_per_cycle(snaps, window_seconds=window, recent_intervals=0), key)
    both = first_cycle(keys_per_cycle(snaps, window_seconds=window, recent_intervals=2), key)
    assert both == LEAD
    assert whole > both


def test_a_queue_on_the_path_is_named_an_interval_sooner():
    snaps = load("shaped-portal1")
    key = f"network_queueing:portal:{P1}"
    whole = first_cycle(keys_per_cycle(snaps, window_seconds=10, recent_intervals=0), key)
    both = first_cycle(keys_per_cycle(snaps, window_seconds=10, recent_intervals=2), key)
    assert (whole, both) == (LEAD + 2, LEAD + 1)  # the shaper's queue fills over the first interval


def test_a_finding_of_the_recent_intervals_says_so_and_becomes_the_windows():
    snaps = load("loss-tohost-portal2")
    cfg = DiagnoseConfig(window_seconds=10, recent_intervals=2)
    _w, findings, _s = judge(snaps[:LEAD + 1], snaps[LEAD].timestamp, cfg)
    f = next(f for f in findings if f.rule == "packet_loss")
    assert re.fullmatch(r"the last 2 interval\(s\) \(\d+ s\)", f.evidence["judged_over"])
    assert f.subject == {"kind": "portal", "id": P2} and f.scope == f"all VMs on portal {P2}"
    _w, findings, _s = judge(snaps[:LEAD + 3], snaps[LEAD + 2].timestamp, cfg)
    f = next(f for f in findings if f.rule == "packet_loss")
    assert "judged_over" not in f.evidence  # the whole window shows it now: its finding, the same cause key


@pytest.mark.parametrize("name,window", [("healthy", 60), ("healthy", 10), ("healthy-4vms", 60),
                                         ("healthy-4vms", 10), ("flap-portal2", 10), ("flap-portal2", 60),
                                         ("offline-portal1-4vms", 10), ("shaped-portal1", 60)])
def test_no_finding_the_whole_window_would_not_give_on_a_healthy_host(name, window):
    """Every cycle of the healthy recordings, and of the faulted ones' healthy lead-in: the same findings
    with and without the recent intervals (the four-VM lead-ins are "slow" by the absolute number alone
    while no baseline is learnt; the recent intervals are judged only once their history teaches one)."""
    snaps = load(name)
    healthy_cycles = len(snaps) - 1 if name.startswith("healthy") else LEAD - 1
    whole = keys_per_cycle(snaps, window_seconds=window, recent_intervals=0)[:healthy_cycles]
    both = keys_per_cycle(snaps, window_seconds=window, recent_intervals=2)[:healthy_cycles]
    assert both == whole
    if name == "healthy":
        assert both == [set()] * healthy_cycles


def test_live_diagnosis_names_it_with_the_recent_intervals():
    snaps = load("loss-tohost-portal2")
    ring, shipped = [], []
    live = LiveDiagnosis(lambda: ring, DiagnoseConfig(window_seconds=60), on_new=lambda f, s: shipped.append(f))
    for s in snaps[:LEAD + 1]:
        ring.append(s)
        live.consume(s)
    assert f"packet_loss:portal:{P2}" in {f.cause_key for f in live.current}
    assert [f.rule for f in shipped if f.rule == "packet_loss"] == ["packet_loss"]


# -- merging the two windows' findings (pure: rules that return what they are told) --------------------------


def finding(rule, ident, severity="warning", explains=(), kind="portal"):
    return Finding(rule=rule, severity=severity, subject={"kind": kind, "id": ident}, title=f"{rule} {ident}",
                   evidence={}, cause="", explains=frozenset(("disk", d) for d in explains))


class FakeWindow:
    def __init__(self, snapshots, seconds):
        self.snapshots, self.seconds, self.disks = snapshots, seconds, ()


def run(full, recent):
    """run_rules over a whole window (12 snapshots) and a recent one (3), each rule returning its part."""
    def make(name, prec):
        def r(w, cfg):
            return [f for f in (full if w.snapshots == 12 else recent) if f.rule == name]
        r.__name__, r.precedence = name, prec
        return r
    rules = [make("packet_loss", 50), make("slow_target", 80)]
    return R.run_rules(FakeWindow(12, 55.0), DiagnoseConfig(), rules=rules, recent=FakeWindow(3, 10.0))


def test_merge_one_finding_per_cause_key_the_more_severe():
    a = finding("packet_loss", P1, "warning", ["vm0/vda"])
    b = finding("packet_loss", P1, "critical", ["vm0/vda"])
    got = run([a], [b])
    assert got == [b] and b.evidence["judged_over"] == "the last 2 interval(s) (10 s)"
    c, d = finding("packet_loss", P1, "critical", ["vm0/vda"]), finding("packet_loss", P1, "warning", ["vm0/vda"])
    assert run([c], [d]) == [c] and "judged_over" not in c.evidence


def test_merge_across_windows_a_lower_precedence_or_the_wholes_regrouping_explains():
    whole = finding("slow_target", "lab-host", "warning", ["vm0/vda", "vm1/vda"], kind="host")
    lost = finding("packet_loss", P1, "warning", ["vm0/vda"])  # recent: the loss claims vm0 from slow_target...
    lun = finding("slow_target", "iqn/1", "warning", ["vm1/vda"], kind="lun")  # ...the whole's host holds vm1
    got = run([whole], [lost, lun])
    assert got == [lost, whole]  # the regrouping of the same rule on the recent intervals is dropped
    assert whole.evidence["explains_also"] == [lun.cause_key]


def test_merge_within_one_window_a_rule_does_not_explain_itself():
    host = finding("packet_loss", "lab-host", "warning", ["vm0/vda", "vm1/vda"], kind="host")
    portal = finding("packet_loss", P1, "warning", ["vm0/vda"])
    assert run([host, portal], []) == [portal, host]  # sorted by severity, rule, subject
    assert run([portal], [host]) == [portal, host]  # both: the recent one is wider
