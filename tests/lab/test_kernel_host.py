"""The kernel-initiator host kvmslab-kh (`lab up --kernel-host`): open-iscsi
logged in through both portals, dm-multipath over the two sessions, and
kvmscope's iscsi_kernel leg measured against what the guest's own iscsiadm,
multipathd and sysfs say (read by the test, through the guest agent).

Faults are the lab's own (`lab target-offline`, `lab loss`), acting on the
guest's TCP stack: its segments are routed through the portal veths. The
failover under `lab target-offline --portal 1` (session, path, the load's
stall, reinstatement) is tests/lab/test_multipath_lab.py's, together with
what kvmscope says of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest


pytestmark = pytest.mark.lab

PORTAL1, PORTAL2 = "198.18.1.2:3260", "198.18.2.2:3260"


def kernelhost_interval() -> float:
    from kvmslab.kernelhost import KVMSCOPE_INTERVAL  # tests.lab.kernelhost put deploy/lab on sys.path

    return KVMSCOPE_INTERVAL


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
        if line.startswith("Current Portal:"):  # a session's block starts here; its SID comes later
            cur = {"disks": {}}
            continue
        m = re.match(r"SID: (\d+)", line)
        if m and cur is not None:
            out[int(m.group(1))] = cur
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
