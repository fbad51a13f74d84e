"""The kernel-initiator host kvmslab-kh (`lab up --kernel-host`): open-iscsi
logged in through both portals, dm-multipath over the two sessions, and
kvmscope's iscsi_kernel leg measured against what the guest's own iscsiadm,
multipathd and sysfs say (read by the test, through the guest agent).

Faults are the lab's own (`lab target-offline`, `lab loss`), acting on the
guest's TCP stack: its segments are routed through the portal veths.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.lab

PORTAL1, PORTAL2 = "198.18.1.2:3260", "198.18.2.2:3260"


def sessions_by_portal(kh) -> dict[str, int]:
    out = {}
    for line in kh.run("iscsiadm", "-m", "session").splitlines():
        m = re.match(r"tcp: \[(\d+)\] (\S+),\d+ (\S+)", line)
        if m:
            assert m.group(3) == kh.iqn, line
            out[m.group(2)] = int(m.group(1))
    return out


def paths(kh) -> dict[str, dict]:
    """multipathd's paths of the map: {sdX: {dm_state, checker, dev_state, hcil}}."""
    out = {}
    text = kh.run("multipathd", "show", "paths", "raw", "format", "%d %m %t %T %o %i")
    for line in text.splitlines():
        dev, m, dm, chk, st, hcil = line.split()
        if m == kh.map:
            out[dev] = {"dm_state": dm, "checker": chk, "dev_state": st, "hcil": hcil}
    return out


def session_disk(kh, sid: int) -> str:
    """sdX of a session's LUN 1, from sysfs."""
    return kh.sh(f"ls /sys/class/iscsi_session/session{sid}/device/target*/*:1/block/").strip()


def p3_blocks(text: str) -> dict[int, dict]:
    """`iscsiadm -m session -P 3` -> {sid: {field: value}} (the fields the test compares)."""
    out, cur = {}, None
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"SID: (\d+)", line)
        if m:
            cur = out.setdefault(int(m.group(1)), {"disks": {}})
            continue
        if cur is None:
            continue
        m = re.match(r"Attached scsi disk (\S+)\s+State: (\S+)", line)
        if m:
            cur["disks"][m.group(1)] = m.group(2)
            continue
        m = re.match(r"scsi(\d+) Channel (\d+) Id (\d+) Lun: (\d+)", line)
        if m:
            cur.setdefault("hctls", []).append(":".join(str(int(x)) for x in m.groups()))
            continue
        for key in ("iSCSI Session State", "iSCSI Connection State", "Recovery Timeout",
                    "Iface Initiatorname", "Iface IPaddress", "Host Number"):
            if line.startswith(key + ":"):
                cur[key] = line.split(":", 1)[1].strip().split("\t")[0].strip()
    return out


def stats_of(kh, sid: int) -> dict[str, int]:
    text = kh.run("iscsiadm", "-m", "session", "-r", str(sid), "-s")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\s+([a-z_0-9]+): (\d+)$", text, re.M)}


def test_up_both_sessions_logged_in_both_paths_active(kernel_host, lab):
    kh = kernel_host
    print(f"\nkernel host up in {kh.up_seconds:.1f}s, steps (guest uptime s): "
          f"{kh.record.get('boot_marks')}")
    by_portal = sessions_by_portal(kh)
    assert set(by_portal) == {PORTAL1, PORTAL2}, by_portal
    for portal, sid in by_portal.items():
        assert kh.read(f"/sys/class/iscsi_session/session{sid}/state").strip() == "LOGGED_IN"
    p3 = p3_blocks(kh.run("iscsiadm", "-m", "session", "-P", "3"))
    for sid in by_portal.values():
        assert p3[sid]["iSCSI Session State"] == "LOGGED_IN", p3
        assert p3[sid]["iSCSI Connection State"] == "LOGGED IN", p3
    ps = paths(kh)
    assert len(ps) == 2 and all(p["dm_state"] == "active" and p["checker"] == "ready"
                                for p in ps.values()), ps
    assert {session_disk(kh, sid) for sid in by_portal.values()} == set(ps)
    # the kernel's own view of the map: two paths, both Active
    status = kh.run("dmsetup", "status", kh.map)
    assert status.split()[2] == "multipath", status
    assert sorted(re.findall(r"\b(\d+:\d+) ([AF]) ", status)) == \
        sorted((kh.read(f"/sys/block/{sd}/dev").strip(), "A") for sd in ps), status
    # the load flows on the map
    t0, n0, e0 = kh.load_counters()
    time.sleep(3)
    t1, n1, e1 = kh.load_counters()
    assert n1 > n0 and e1 == e0 == 0, (n0, n1, e0, e1)
    print(f"load on /dev/mapper/{kh.map}: {(n1 - n0) / (t1 - t0):.0f} ops/s")
    # the guest's own TCP stack on both portals, no NAT: the target sees the guest's addresses
    ss_guest = kh.run("ss", "-tn", "state", "established", "( dport = :3260 )")
    assert re.search(r"198\.18\.11\.2:\d+\s+198\.18\.1\.2:3260", ss_guest), ss_guest
    assert re.search(r"198\.18\.12\.2:\d+\s+198\.18\.2\.2:3260", ss_guest), ss_guest
    ss_target = subprocess.run(["ip", "netns", "exec", "kvmslab-stor", "ss", "-tn", "state", "established",
                                "( sport = :3260 )"], capture_output=True, text=True).stdout
    assert re.search(r"198\.18\.1\.2:3260\s+198\.18\.11\.2:\d+", ss_target), ss_target
    assert re.search(r"198\.18\.2\.2:3260\s+198\.18\.12\.2:\d+", ss_target), ss_target
    # lab status --json reports the guest, its sessions and its paths
    st = lab.status_json(interval=0.5)
    rec = st["kernel_hosts"][0]
    assert rec["running"] and rec["agent"] and st["up"]
    assert {s["portal"] for s in rec["sessions"]} == {PORTAL1, PORTAL2}
    assert {p["dev"] for p in rec["paths"]} == set(ps)
    assert all(p["dm_state"] == "active" for p in rec["paths"])


def test_committed_capture_agrees_with_the_live_guest(kernel_host, tmp_path):
    """tests/fixtures/hosts/kernel-initiator-real (what the unit tests hold their
    fixture builders to) has the live guest's files, links and value forms.
    KVMSCOPE_RECAPTURE=1 rewrites it from the live guest first."""
    from tests.lab.capture import DEST, capture
    from tests.unit.test_real_captures import form, tree

    if os.environ.get("KVMSCOPE_RECAPTURE"):
        print("\nrecaptured:", capture(kernel_host, DEST))
    summary = capture(kernel_host, tmp_path / "live")
    live, committed = tree(tmp_path / "live" / "sys"), tree(DEST / "sys")
    assert set(live) == set(committed), (sorted(set(live) - set(committed))[:20],
                                         sorted(set(committed) - set(live))[:20])
    differ = {p: (committed[p][1].strip(), v.strip()) for p, (k, v) in live.items()
              if committed[p][0] != k or (k == "link" and committed[p][1] != v)
              or (k == "file" and form(committed[p][1]) != form(v))}
    assert not differ, differ
    names = sorted(os.listdir(tmp_path / "live" / "cmd"))
    assert names == sorted(os.listdir(DEST / "cmd")), names
    print(f"\nlive capture: {summary}")


def test_iscsi_kernel_matches_iscsiadm_and_sysfs(kernel_host):
    """kvmscope's iscsi_kernel (in the guest, collected now) against the guest's
    iscsiadm -P 3, iscsiadm -s (read before and after) and sysfs."""
    kh = kernel_host
    by_portal = sessions_by_portal(kh)
    before = {sid: stats_of(kh, sid) for sid in by_portal.values()}
    t0 = time.monotonic()
    mine = {s["sid"]: s for s in kh.kvmscope("sessions", "--json")}
    took = time.monotonic() - t0
    after = {sid: stats_of(kh, sid) for sid in by_portal.values()}
    p3 = p3_blocks(kh.run("iscsiadm", "-m", "session", "-P", "3"))
    print(f"\nkvmscope sessions --json in the guest took {took:.1f}s")
    assert set(mine) == set(by_portal.values()), mine.keys()
    for portal, sid in by_portal.items():
        s = mine[sid]
        base = f"/sys/class/iscsi_session/session{sid}"
        assert s["target"] == kh.iqn == kh.read(f"{base}/targetname").strip()
        assert s["state"] == kh.read(f"{base}/state").strip() == p3[sid]["iSCSI Session State"]
        assert s["tpgt"] == int(kh.read(f"{base}/tpgt"))
        assert s["recovery_tmo"] == int(kh.read(f"{base}/recovery_tmo")) == int(p3[sid]["Recovery Timeout"])
        assert s["initiator"] == p3[sid]["Iface Initiatorname"]
        assert s["host"] == f"host{p3[sid]['Host Number']}"
        # its one connection
        (c,) = s["connections"]
        cdir = f"/sys/class/iscsi_connection/connection{sid}:0"
        assert c["cid"] == f"{sid}:0"
        assert f"{c['persistent_address']}:{c['persistent_port']}" == portal
        assert c["address"] == kh.read(f"{cdir}/address").strip()
        for key in ("port", "local_port", "persistent_port", "ping_tmo", "recv_tmo"):
            assert c[key] == int(kh.read(f"{cdir}/{key}")), key
        # the guest's socket on that local port goes to that portal
        ss = kh.run("ss", "-tnH", "state", "established", f"( sport = :{c['local_port']} )")
        assert portal in ss, ss
        # its SCSI disks: LUN 0 (controller, no block device) and LUN 1 = sdX under the map
        disks = {d["lun"]: d for d in s["disks"]}
        sd = session_disk(kh, sid)
        d1 = disks[1]
        assert d1["name"] == sd and p3[sid]["disks"].get(sd) == d1["state"]
        assert d1["hctl"] in p3[sid]["hctls"]
        dev = f"/sys/class/scsi_device/{d1['hctl']}/device"
        assert d1["state"] == kh.read(f"{dev}/state").strip() == "running"
        assert d1["devno"] == kh.read(f"/sys/block/{sd}/dev").strip()
        assert d1["ioerr_cnt"] == int(kh.read(f"{dev}/ioerr_cnt").strip(), 16)
        assert d1["iotmo_cnt"] == int(kh.read(f"{dev}/iotmo_cnt").strip(), 16)
        dm = kh.run("ls", f"/sys/block/{sd}/holders").split()
        assert d1["holders"] == dm and d1["holder_names"] == [kh.map]
        # counters: between the two iscsiadm reads; the ones that do not move, equal
        st = s["stats"]
        assert st is not None, s.get("stats_error")
        assert set(st) >= set(before[sid]), set(before[sid]) - set(st)
        for key, v0 in before[sid].items():
            assert v0 <= st[key] <= after[sid][key], (sid, key, v0, st[key], after[sid][key])
            if v0 == after[sid][key]:
                assert st[key] == v0, key
        assert st["scsicmd_pdus"] > 0 and st["txdata_octets"] > 0


def test_portal1_offline_fails_over_to_portal2(kernel_host, lab):
    """Portal 1 stops answering: session 1 leaves LOGGED_IN, multipath fails its
    path, the load goes on through portal 2 after one stall; online: reinstated."""
    kh = kernel_host
    by_portal = sessions_by_portal(kh)
    sid1, sid2 = by_portal[PORTAL1], by_portal[PORTAL2]
    sd1, sd2 = session_disk(kh, sid1), session_disk(kh, sid2)
    stalls0 = len(kh.stalls())
    rx2_0 = stats_of(kh, sid2)["scsicmd_pdus"]
    t_off = time.time()
    lab.run("target-offline", "--portal", 1)
    try:
        wait_for(lambda: kh.read(f"/sys/class/iscsi_session/session{sid1}/state").strip() != "LOGGED_IN",
                 60, "session 1 to leave LOGGED_IN")
        t_state = time.time()
        wait_for(lambda: paths(kh)[sd1]["dm_state"] == "failed", 60, "multipath to fail sda's path")
        t_failed = time.time()
        ps = paths(kh)
        assert ps[sd2]["dm_state"] == "active" and ps[sd2]["checker"] == "ready", ps
        assert kh.read(f"/sys/class/iscsi_session/session{sid2}/state").strip() == "LOGGED_IN"
        # the load continues through portal 2
        _, n0, _ = kh.load_counters()
        time.sleep(4)
        _, n1, errs = kh.load_counters()
        assert n1 - n0 > 20, (n0, n1)
        assert errs == 0
        assert stats_of(kh, sid2)["scsicmd_pdus"] > rx2_0
        stalls = kh.stalls()[stalls0:]
        assert stalls, "the failover caused no stall of 1 s or more"
        worst = max(s[2] for s in stalls)
        print(f"\nportal 1 offline: session {sid1} left LOGGED_IN after {t_state - t_off:.1f}s, "
              f"path {sd1} failed after {t_failed - t_off:.1f}s, load stalled {worst:.1f}s "
              f"(stalls {[round(s[2], 1) for s in stalls]}), then {(n1 - n0) / 4:.0f} ops/s on portal 2")
        assert worst < 60
    finally:
        lab.run("target-online", "--portal", 1)
    wait_for(lambda: kh.read(f"/sys/class/iscsi_session/session{sid1}/state").strip() == "LOGGED_IN",
             90, "session 1 to log in again")
    wait_for(lambda: paths(kh)[sd1]["dm_state"] == "active", 60, "multipath to reinstate the path")
    print(f"portal 1 online: path reinstated {time.time() - t_off:.1f}s after the outage began")


def test_loss_on_portal1_retransmits_agree_with_tcpretrans(kernel_host, lab):
    """5% loss on portal 1: the guest's kvmscope counts retransmits to portal 1
    (eBPF, tcp:tcp_retransmit_skb) as bcc's kprobe-based tcpretrans does, within 5%."""
    kh = kernel_host
    kh.sh("(/usr/sbin/tcpretrans-bpfcc > /tmp/tcpretrans.out 2>/tmp/tcpretrans.err & echo $! > /tmp/tcpretrans.pid)")
    try:
        wait_for(lambda: "LADDR" in kh.read("/tmp/tcpretrans.out"), 180, "tcpretrans to attach")

        def retrans_metric():
            text = kh.metrics()
            out = {}
            for line in text.splitlines():
                m = re.match(r'kvmscope_tcp_retransmits_total\{remote_address="([^"]+)",remote_port="3260"\} (\S+)', line)
                if m:
                    out[m.group(1)] = float(m.group(2))
            return out

        def settled():
            a = retrans_metric()
            time.sleep(6)
            b = retrans_metric()
            return b if a == b and "198.18.1.2" in b else None

        m0 = wait_for(settled, 120, "the guest agent's retransmit counters to settle")
        lines0 = len(kh.read("/tmp/tcpretrans.out").splitlines())
        lab.run("loss", 5, "--portal", 1)
        time.sleep(25)
        lab.run("loss", 0)
        m1 = wait_for(settled, 120, "the counters to settle after the loss")
        out = kh.read("/tmp/tcpretrans.out").splitlines()[lines0:]
    finally:
        kh.sh("kill -INT $(cat /tmp/tcpretrans.pid)", check=False)
    bcc = {"198.18.1.2": 0, "198.18.2.2": 0}
    for line in out:
        m = re.search(r"(198\.18\.1[12]\.2):\d+\s+\S+\s+(198\.18\.[12]\.2):3260", line)
        if m:
            bcc[m.group(2)] += 1
    ours = {a: m1.get(a, 0) - m0.get(a, 0) for a in bcc}
    print(f"\nloss 5% on portal 1 for 25 s: kvmscope {ours}, tcpretrans {bcc}")
    assert bcc["198.18.1.2"] >= 20, out[:20]
    assert abs(ours["198.18.1.2"] - bcc["198.18.1.2"]) <= 0.05 * bcc["198.18.1.2"], (ours, bcc)
    assert ours["198.18.2.2"] <= 2 and bcc["198.18.2.2"] <= 2, (ours, bcc)
