"""dm-multipath on the lab's kernel-initiator host (kvmslab-kh): the guest's own running kvmscope agent
(its /metrics, the documents it ships, `kvmscope diagnose` attached to it) and the doctor's what-if, held
to what the guest's multipathd, dmsetup, sysfs and O_DIRECT load say while the lab takes portals away.

The guest (tests/lab/kernelhost.py, `lab up --kernel-host`) has one LUN over both portals, multipathd's map
mpatha with one path per portal (failover groups), sessions with recovery_tmo 5 s and NOP-Out 5 s / 5 s,
no_path_retry 12 x polling_interval 5 s (60 s of queueing), a libvirt VM (kvmslab-kh-vm0) whose disk is the
map, and an O_DIRECT load on the map that logs every request that took 1 s or more (the stall it saw).
Its kvmscope agent runs every 15 s and writes what it ships (the Elasticsearch documents) to a JSON-lines
file (deploy/lab/kvmslab/kernelhost.py GUEST_SHIPPED). Faults are the lab's own: `lab target-offline
--portal N` drops the portal's packets at the storage host, so the guest's own TCP stack and iSCSI
initiator see a dead portal.

One kernel-host boot for this module (the module-scoped `kernel_host` fixture). Under TCG every kvmscope
command in the guest costs 30-100 s of Python start-up, so the tests run few of them: one `paths`, one
`doctor`, two `diagnose`.
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest

from agent.shipping.fields import flatten
from agent.sources.multipath import parse_dm_status
from tests.conftest import wait_for
from tests.lab.test_kernel_host import sessions_by_portal, stats_of

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module", autouse=True)
def lab_vms_flow_again_after(lab):
    """The lab's own VMs reach the same two portals through QEMU's libiscsi, and this module ends with both
    portals offline: their connections back off and reconnect late. The next lab module assumes their vda
    I/O flows (a full run once had test_lab find kvmslab-vm1's vda frozen right after this module, and the
    lifecycle test of test_probes_lab see no close on a connection that was already dead), so the module
    ends when every lab VM's vda completes requests again."""
    yield
    t0 = time.monotonic()
    w = None
    while time.monotonic() - t0 < 300:
        w = lab.window(3)
        if all(w["vms"][n]["vda"]["ops"] > 0 for n in lab.vm_names):
            say(f"\nlab VMs' vda I/O flowing again {time.monotonic() - t0:.0f} s after this module's last test")
            return
    raise AssertionError(f"lab VMs' vda I/O still stopped 300 s after both portals came back: "
                         f"{ {n: w['vms'][n]['vda']['ops'] for n in lab.vm_names} }")
# The guest agent without its eBPF collectors (tests/lab/test_kernel_host_bpf.py has them): under TCG their
# four bcc compiles hold the guest's one CPU for up to compile_timeout (600 s), and with them dmsetup missed
# even the multipath source's budget, every kvmscope command took minutes and the 60 s of queueing with no
# path could end before `diagnose` answered.
KERNEL_HOST_UP_ARGS = ("--kernel-host-probes", "off")

PORTAL1, PORTAL2 = "198.18.1.2:3260", "198.18.2.2:3260"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def series(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for line in text.splitlines():
        m = re.fullmatch(name + r"(?:\{(.*)\})? (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            out.append((labels, float(m.group(2))))
    return out


def metrics(kh) -> str:
    """The guest agent's /metrics ("" while it starts: under TCG it listens 1-2 min after the guest is ready)."""
    try:
        return kh.metrics()
    except OSError:
        return ""


def path_up(text: str) -> dict[str, tuple[str, float]]:
    """sdX -> (portal label, kvmscope_multipath_path_up)."""
    return {lab["path"]: (lab["portal"], v) for lab, v in series(text, "kvmscope_multipath_path_up")}


def kernel_view(text: str, n: int = 2) -> str | None:
    """The /metrics text when its multipath source had the kernel's view (dmsetup table and status: the
    paths' failure counts are there) of ``n`` paths, else None (a cycle on multipathd's view alone)."""
    return text if len(series(text, "kvmscope_multipath_path_failures_total")) == n else None


def one(text: str, name: str, **labels) -> float:
    got = [v for lab, v in series(text, name) if all(lab.get(k) == w for k, w in labels.items())]
    assert len(got) == 1, (name, labels, series(text, name))
    return got[0]


def multipathd_paths(kh) -> dict[str, tuple[str, str, str]]:
    """sdX -> (dm_st, chk_st, dev_st) as multipathd shows them."""
    out = kh.run("multipathd", "show", "paths", "raw", "format", "%d %t %T %o")
    return {w[0]: tuple(w[1:4]) for w in (line.split() for line in out.splitlines()) if len(w) >= 4}


def load_pid(kh) -> int:
    return int(kh.read("/run/kvmslab-load.pid").strip())


def guest_cli(kh, *args, timeout: float = 300) -> dict:
    """A kvmscope command in the guest, attached to its running agent (not --standalone); JSON output."""
    from tests.lab.kernelhost import GUEST_CONFIG

    exe = kh.kvmscope_exe()
    t0 = time.monotonic()
    res = kh.exec(exe, "-c", GUEST_CONFIG, *args, check=False, timeout=timeout)
    assert res["rc"] in (0, 3), res  # 3: problems found, still a full report
    say(f"guest `kvmscope {' '.join(args)}` took {time.monotonic() - t0:.0f} s")
    return json.loads(res["stdout"])


def shipped(kh, *actions: str) -> list[dict]:
    """The documents the guest agent shipped (its file output, both generations) whose event.action is one of
    ``actions``, flattened, oldest first."""
    import tests.lab.kernelhost  # noqa: F401  (puts deploy/lab on sys.path)
    from kvmslab.kernelhost import GUEST_SHIPPED

    pats = " ".join(f"-e '\"{a}\"'" for a in actions)
    out = kh.sh(f"cat {GUEST_SHIPPED}.1 {GUEST_SHIPPED} 2>/dev/null | grep -h {pats}", check=False)
    docs = [flatten(json.loads(line)) for line in out.splitlines() if line.strip()]
    return [d for d in docs if d.get("event.action") in actions]


def whatif(kh) -> dict[str, dict]:
    """The doctor's what-if of each portal failing, by portal (the doctor collects in-process: --standalone)."""
    from tests.lab.kernelhost import GUEST_CONFIG

    t0 = time.monotonic()
    out = kh.exec(kh.kvmscope_exe(), "-c", GUEST_CONFIG, "--standalone", "doctor", "--json",
                  "--check", "multipath_whatif", check=False, timeout=300)
    assert out["rc"] in (0, 3), out
    say(f"guest `kvmscope doctor --check multipath_whatif` took {time.monotonic() - t0:.0f} s")
    res = json.loads(out["stdout"])
    mine = {r["values"].get("portal"): r for r in res["results"] if r["check"] == "multipath_whatif"}
    assert set(mine) == {PORTAL1, PORTAL2} and all(r["subject"] == f"{kh.map} if {p} fails" for p, r in mine.items()), \
        (mine, out["stderr"][-2000:])
    return mine


def mentions(finding: dict, text: str) -> bool:
    return text in json.dumps(finding)


def test_both_paths_active_as_multipathd_and_dmsetup_show(kernel_host):
    """The agent's view of the healthy map equals multipathd's and the kernel's; the join of the VM's disk
    gives each leg its path state (it was null whenever the source had missed its 2 s per command)."""
    kh = kernel_host
    t0 = time.monotonic()
    m = wait_for(lambda: (lambda t: t if len(path_up(t)) == 2 and kernel_view(t) else None)(metrics(kh)), 420,
                 "both paths in the guest agent's /metrics", step=3)
    say(f"\nguest /metrics with both paths {time.monotonic() - t0:.0f} s after the kernel host was up")
    mpd = multipathd_paths(kh)
    assert sorted(v[0] for v in mpd.values()) == ["active", "active"], mpd
    status = kh.run("dmsetup", "status", "--target", "multipath")
    devno = {sd: kh.read(f"/sys/block/{sd}/dev").strip() for sd in mpd}
    assert sorted(re.findall(r"\b(\d+:\d+) ([AF]) ", status)) == sorted((d, "A") for d in devno.values()), status
    up = path_up(m)
    assert {sd: v for sd, (_p, v) in up.items()} == {sd: 1.0 for sd in mpd}
    assert sorted(p for p, _v in up.values()) == [PORTAL1, PORTAL2]
    assert one(m, "kvmscope_collector_success", collector="multipath") == 1.0
    assert one(m, "kvmscope_multipath_map_active_paths", map=kh.map) == 2.0
    assert one(m, "kvmscope_multipath_map_queue_if_no_path", map=kh.map) == 1.0
    assert one(m, "kvmscope_multipath_map_no_path_retry_checks", map=kh.map) == 12.0
    assert one(m, "kvmscope_multipath_map_queueing", map=kh.map) == 0.0
    for sd in mpd:
        assert one(m, "kvmscope_multipath_path_checker_state", path=sd, state="ready") == 1.0
    # the join in the running agent: VM disk -> dm -> each leg with its map state
    legs = guest_cli(kh, "paths", "--json")
    mine = sorted((p["scsi_device"], p["portal"], p["path_state"], p["checker_state"]) for p in legs
                  if p["vm"] == kh.vm)
    assert mine == sorted((sd, up[sd][0], "active", "ready") for sd in mpd), legs
    say(f"dmsetup status: {status.strip()}\nmultipathd: {mpd}")


def test_portal1_offline_failover_reported_and_predicted(kernel_host, lab):
    """Portal 1 offline: its session fails, the kernel fails its path, the load runs on portal 2 after one
    stall; /metrics, the shipped events and `diagnose` say so naming the VM, and of portal 2 only that it
    carries the load; the doctor's what-if (before the fault) matches the stall the load measured.
    Portal 1 back: the session logs in again, the path is reinstated, in /metrics and as an event."""
    kh = kernel_host
    by_portal = sessions_by_portal(kh)
    sid1, sid2 = by_portal[PORTAL1], by_portal[PORTAL2]
    # path_grouping_policy failover: I/O goes to the current path group only (portal 1's sda after boot)
    [st] = parse_dm_status(kh.run("dmsetup", "status", "--target", "multipath")).values()
    assert st["current_group"] == 1 and [g["state"] for g in st["groups"]] == ["active", "enabled"], st
    preds = whatif(kh)
    pred = preds[PORTAL1]
    assert pred["status"] == "ok" and pred["values"]["outcome"] == "failover", pred
    # portal 2's path is the standby group: losing it stalls nothing
    assert preds[PORTAL2]["values"]["outcome"] == "no_stall" and preds[PORTAL2]["values"]["stall_s"] == 0, preds
    assert kh.vm in pred["values"]["vms"] and pred["values"]["remaining"], pred
    lo, hi = pred["values"]["stall_range_s"]
    interval = pred["values"]["detect_s"][1] - pred["values"]["detect_s"][0]  # noop_out_interval
    m0 = wait_for(lambda: kernel_view(metrics(kh)), 60, "a cycle with the kernel's view of both paths", step=3)
    up0 = path_up(m0)
    sd1 = next(sd for sd, (portal, _v) in up0.items() if portal == PORTAL1)
    sd2 = next(sd for sd, (portal, _v) in up0.items() if portal == PORTAL2)
    assert pred["values"]["paths"] == [sd1] and pred["values"]["remaining"] == [sd2], pred
    fails2 = one(m0, "kvmscope_multipath_path_failures_total", path=sd2)
    pid = load_pid(kh)
    stalls0 = len(kh.stalls())
    pdus2 = stats_of(kh, sid2)["scsicmd_pdus"]
    failed0 = len(shipped(kh, "multipath-path-failed"))
    reinstated0 = len(shipped(kh, "multipath-path-reinstated"))
    t_off = time.time()
    lab.run("target-offline", "--portal", 1)
    try:
        m = wait_for(lambda: (lambda t: t if path_up(t).get(sd1, ("", 1.0))[1] == 0.0 and kernel_view(t) else None)(
                     metrics(kh)), 120,
                     f"kvmscope_multipath_path_up{{path={sd1}}} 0", step=2)
        t_metric = time.time()
        # the metrics: portal 1's path and session down, portal 2's up and untouched
        assert path_up(m)[sd2] == (PORTAL2, 1.0)
        assert one(m, "kvmscope_multipath_map_active_paths", map=kh.map) == 1.0
        assert one(m, "kvmscope_multipath_map_queueing", map=kh.map) == 0.0
        assert one(m, "kvmscope_multipath_path_failures_total", path=sd2) == fails2
        assert one(m, "kvmscope_iscsi_session_up", portal=PORTAL1) == 0.0
        assert one(m, "kvmscope_iscsi_session_up", portal=PORTAL2) == 1.0
        assert multipathd_paths(kh)[sd1][0] == "failed" and multipathd_paths(kh)[sd2][0] == "active"
        assert kh.read(f"/sys/class/iscsi_session/session{sid1}/state").strip() != "LOGGED_IN"
        assert kh.read(f"/sys/class/iscsi_session/session{sid2}/state").strip() == "LOGGED_IN"
        # the load goes on through portal 2 after one stall, with no I/O error
        wait_for(lambda: kh.stalls()[stalls0:], 60, "the load's stall record", step=2)
        _t, n0, _e = kh.load_counters()
        time.sleep(3)
        _t, n1, errs = kh.load_counters()
        assert n1 > n0 and errs == 0, (n0, n1, errs)
        assert stats_of(kh, sid2)["scsicmd_pdus"] > pdus2  # the load's commands now go to portal 2
        worst = max(s[2] for s in kh.stalls()[stalls0:])
        say(f"\nportal 1 offline: predicted stall {lo}-{hi} s, measured {worst:.1f} s; kvmscope path_up 0 "
            f"{t_metric - t_off:.1f} s after the fault; then {(n1 - n0) / 3:.0f} ops/s on {sd2}")
        assert lo - interval <= worst <= hi + interval, (worst, lo, hi, interval)
        # the events the agent shipped: portal 1's path failed, naming the VM; nothing about portal 2's
        ev = wait_for(lambda: shipped(kh, "multipath-path-failed")[failed0:] or None, 60,
                      "the shipped multipath-path-failed event", step=3)
        assert [(e["kvmscope.multipath.path"], e["kvmscope.portal"], e["kvmscope.multipath.active_paths"])
                for e in ev] == [(sd1, PORTAL1, 1)], ev
        assert kh.vm in ev[0]["kvmscope.vm.name"] and kh.vm in ev[0]["message"], ev
        # diagnose, attached to the agent: one failover finding naming the VM and the load on the map
        rep = guest_cli(kh, "diagnose", "--window", "60s", "--json")
        findings = rep["findings"]
        fo = [f for f in findings if f["rule"] == "multipath_failover"]
        assert len(fo) == 1 and fo[0]["severity"] == "warning", findings
        f = fo[0]
        assert f"path {sd1} via {PORTAL1} failed" in f["title"] and kh.vm in f["title"], f["title"]
        assert f"kept running on {sd2} via {PORTAL2}" in f["title"] and f"{PORTAL2} carries the load" in f["cause"], f
        assert f"(pid {pid})" in f["title"], f["title"]
        assert not [x for x in findings if x["severity"] == "critical"], findings
        assert not [x for x in findings if x is not f and mentions(x, PORTAL2)], findings
        say(f"diagnose: {f['title']}")
    finally:
        lab.run("target-online", "--portal", 1)
    t_on = time.time()
    wait_for(lambda: path_up(metrics(kh)).get(sd1, ("", 0.0))[1] == 1.0, 120, f"{sd1} reinstated in /metrics",
             step=2)
    t_back = time.time()
    assert kh.read(f"/sys/class/iscsi_session/session{sid1}/state").strip() == "LOGGED_IN"
    assert multipathd_paths(kh)[sd1][0] == "active"
    ev = wait_for(lambda: shipped(kh, "multipath-path-reinstated")[reinstated0:] or None, 60,
                  "the shipped multipath-path-reinstated event", step=3)
    assert [(e["kvmscope.multipath.path"], e["kvmscope.portal"], e["kvmscope.multipath.active_paths"])
            for e in ev] == [(sd1, PORTAL1, 2)], ev
    say(f"portal 1 online: {sd1} reinstated in /metrics after {t_back - t_on:.1f} s; event: {ev[-1]['message']}")


def test_both_portals_offline_queueing_names_the_hung_workload(kernel_host, lab):
    """Both portals offline with queue_if_no_path: the map queues, the agent says so (metric, event) and
    `diagnose` has one critical finding naming the VM and the load that hang."""
    kh = kernel_host
    pid = load_pid(kh)
    n_nopath = len(shipped(kh, "multipath-map-no-path"))
    lab.run("target-offline", "--portal", 1)
    lab.run("target-offline", "--portal", 2)
    t_off = time.time()
    try:
        wait_for(lambda: [v for _l, v in series(metrics(kh), "kvmscope_multipath_map_queueing")] == [1.0], 90,
                 "kvmscope_multipath_map_queueing 1", step=2)
        t_q = time.time()
        # within no_path_retry's 60 s of queueing: diagnose while the map holds the I/O
        rep = guest_cli(kh, "diagnose", "--window", "30s", "--json")
        crit = [f for f in rep["findings"] if f["rule"] == "multipath_all_paths_down"]
        assert len(crit) == 1 and crit[0]["severity"] == "critical", rep["findings"]
        title = crit[0]["title"]
        assert "I/O is queued" in title and kh.vm in title and f"(pid {pid})" in title, title
        ev = wait_for(lambda: shipped(kh, "multipath-map-no-path")[n_nopath:] or None, 60,
                      "the shipped multipath-map-no-path event", step=3)
        assert len(ev) == 1 and ev[0]["kvmscope.multipath.queueing"] is True and kh.vm in ev[0]["message"], ev
        say(f"\nboth portals offline: queueing in /metrics {t_q - t_off:.1f} s after the fault; finding "
            f"{time.time() - t_off:.1f} s after: {title}")
    finally:
        lab.run("target-online", "--portal", 1)
        lab.run("target-online", "--portal", 2)
    # the paths' return is test_portal1_offline_failover_reported_and_predicted's; the kernel host stops next
