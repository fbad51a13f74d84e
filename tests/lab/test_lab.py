"""Real-component tests of the kvmscope lab (deploy/lab/lab).

Run as root:  /usr/bin/python3 -m pytest -m lab tests/lab -v -s
Tests run in file order and share one lab (session fixture);
test_zz_down.py, last of tests/lab, runs `lab down` and checks nothing is left behind.
"""

import os
import re
import subprocess
import time

import pytest

from .conftest import LAB_DIR, format_window

pytestmark = pytest.mark.lab

WINDOW = 10          # seconds per measurement window
SETTLE = 2           # seconds after changing a fault before measuring


def sh(*cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True).stdout


def vms_on(lab, portal):
    return [n for n in lab.vm_names if lab.vm_portal(n) == portal]


# ---------------------------------------------------------------------------

def test_up_vms_run_and_both_disks_grow(lab):
    st = lab.status
    assert len(st["vms"]) == 2
    assert st["up"] is True
    # VM i uses portal (i % 2) + 1, one target per VM, LUN 1
    for vm in st["vms"]:
        vda = next(d for d in vm["disks"] if d["dev"] == "vda")
        vdb = next(d for d in vm["disks"] if d["dev"] == "vdb")
        assert vda["backend"] == "iscsi"
        assert vda["portal"] == (vm["index"] % 2) + 1
        assert vda["address"] == f"198.18.{vda['portal']}.2"
        assert vda["lun"] == 1
        assert vda["target_backing_device"].startswith("/dev/loop")
        assert vdb["backend"] == "file"
        assert vdb["path"].startswith(LAB_DIR)
    # libvirt bulk stats: both disks of every VM read AND write
    a = lab.block_stats()
    time.sleep(3)
    b = lab.block_stats()
    for name in lab.vm_names:
        assert b[name]["state"] == lab.libvirt.VIR_DOMAIN_RUNNING, name
        for dev in ("vda", "vdb"):
            for kind in ("rd.reqs", "wr.reqs"):
                assert b[name][dev][kind] > a[name][dev][kind], \
                    f"{name} {dev} {kind} did not grow: {a[name][dev]} -> {b[name][dev]}"
    # the iSCSI sessions really go to the namespace portals
    ss = sh("ss", "-tn", "state", "established", "( dport = :3260 )")
    for vm in st["vms"]:
        vda = next(d for d in vm["disks"] if d["dev"] == "vda")
        assert f"{vda['address']}:3260" in ss, ss


def test_loss_on_portal1_slows_only_portal1_vms(lab):
    p1, p2 = vms_on(lab, 1), vms_on(lab, 2)
    assert p1 and p2
    base = lab.window(WINDOW)
    print("\n" + format_window("baseline", base))
    lab.run("loss", 5, "--portal", 1)
    try:
        st = lab.status_json(interval=0.5)
        assert st["faults"]["loss_pct"] == {"1": 5.0, "2": 0.0}
        time.sleep(SETTLE)
        lossy = lab.window(WINDOW + 2)
        print(format_window("5% loss on portal 1", lossy))
    finally:
        lab.run("loss", 0)
    for n in p1:
        b, l_ = base["vms"][n]["vda"], lossy["vms"][n]["vda"]
        assert b["avg_ms"] is not None
        assert l_["ops"] > 0, f"{n} vda made no progress under 5% loss"
        assert l_["avg_ms"] > max(3 * b["avg_ms"], 2.0), \
            f"{n} (portal 1) latency {b['avg_ms']:.3f} -> {l_['avg_ms']:.3f} ms"
    for n in p2:
        b, l_ = base["vms"][n]["vda"], lossy["vms"][n]["vda"]
        assert l_["avg_ms"] < 2 * b["avg_ms"] + 0.5, \
            f"{n} (portal 2) latency rose {b['avg_ms']:.3f} -> {l_['avg_ms']:.3f} ms"
    assert lossy["retrans"] >= 10 and lossy["retrans"] > 5 * (base["retrans"] + 1), \
        f"RetransSegs baseline +{base['retrans']}, under loss +{lossy['retrans']}"

    # `loss 0` clears: no DROP rule left, latency comes back
    assert "DROP" not in sh("iptables", "-S", "KVMSLAB")
    assert "DROP" not in sh("ip", "netns", "exec", "kvmslab-stor",
                            "iptables", "-S", "KVMSLAB")
    time.sleep(3)
    after = lab.window(WINDOW - 2)
    print(format_window("after loss 0", after))
    for n in p1:
        b, a_ = base["vms"][n]["vda"], after["vms"][n]["vda"]
        assert a_["ops"] > 0 and a_["avg_ms"] < 3 * b["avg_ms"] + 0.5, \
            f"{n} did not recover: {b['avg_ms']:.3f} -> {a_['avg_ms']} ms"


def test_throttle_target_raises_latency_without_retransmits(lab):
    base = lab.window(WINDOW)
    print("\n" + format_window("baseline", base))
    lab.run("throttle-target", 50)
    try:
        st = lab.status_json(interval=0.5)
        assert st["faults"]["throttle_iops"] == 50
        for vm in st["vms"]:
            mm = next(d for d in vm["disks"] if d["dev"] == "vda")["target_backing_majmin"]
            for f in ("read", "write"):
                with open(f"/sys/fs/cgroup/blkio/blkio.throttle.{f}_iops_device") as fh:
                    assert f"{mm} 50" in fh.read()
        time.sleep(SETTLE)
        slow = lab.window(WINDOW)
        print(format_window("target throttled to 50 IOPS", slow))
    finally:
        lab.run("throttle-target", "off")
    for n in lab.vm_names:
        b, s = base["vms"][n]["vda"], slow["vms"][n]["vda"]
        assert s["ops"] > 0, f"{n} vda made no progress while throttled"
        assert s["avg_ms"] > max(5 * b["avg_ms"], 5.0), \
            f"{n} vda latency {b['avg_ms']:.3f} -> {s['avg_ms']:.3f} ms"
        # throttle is on the target's devices only: host-file vdb unaffected
        assert slow["vms"][n]["vdb"]["avg_ms"] < 5.0
    assert slow["retrans"] <= 3, f"RetransSegs +{slow['retrans']} while throttled"
    for f in ("read", "write"):
        with open(f"/sys/fs/cgroup/blkio/blkio.throttle.{f}_iops_device") as fh:
            rules = fh.read()
        for vm in lab.status["vms"]:
            mm = vm["disks"][0]["target_backing_majmin"]
            assert not re.search(rf"^{mm} ", rules, re.M), rules
    time.sleep(SETTLE)
    after = lab.window(5)
    for n in lab.vm_names:
        assert after["vms"][n]["vda"]["avg_ms"] < 3 * base["vms"][n]["vda"]["avg_ms"] + 0.5


def test_target_offline_stops_one_path_and_online_resumes(lab):
    p1, p2 = vms_on(lab, 1), vms_on(lab, 2)
    lab.run("target-offline", "--portal", 2)
    try:
        st = lab.status_json(interval=0.5)
        assert st["faults"]["offline_portals"] == [2]
        time.sleep(SETTLE)
        off = lab.window(6)
        print("\n" + format_window("portal 2 offline", off))
    finally:
        lab.run("target-online", "--portal", 2)
    for n in p2:
        assert off["vms"][n]["vda"]["ops"] == 0, f"{n} vda still doing I/O"
        assert off["vms"][n]["vdb"]["ops"] > 0
    for n in p1:
        assert off["vms"][n]["vda"]["ops"] > 0
    # I/O resumes on its own once the portal answers again (TCP backoff)
    deadline = time.monotonic() + 45
    while True:
        w = lab.window(2)
        if all(w["vms"][n]["vda"]["ops"] > 0 for n in p2):
            break
        assert time.monotonic() < deadline, "portal 2 VMs did not resume I/O"


def test_status_json_shape(lab):
    st = lab.status_json(interval=1.0)
    assert st["schema"] == 1
    assert st["namespace"] == {"name": "kvmslab-stor", "exists": True}
    assert st["tgtd"]["running"] is True
    assert [p["address"] for p in st["portals"]] == ["198.18.1.2", "198.18.2.2"]
    faults = dict(st["faults"])
    # no flap going on; the record of earlier flaps (an earlier lab test's) is history, not a fault
    flaps = faults.pop("flaps")
    assert flaps["down"] == [] and isinstance(flaps["periods"], list), flaps
    assert all(p["end"] is not None for p in flaps["periods"]), flaps
    assert faults == {"loss_pct": {"1": 0.0, "2": 0.0},
                      "loss_direction": {"1": "both", "2": "both"},
                      "throttle_iops": None, "throttle_iops_by_lun": {},
                      "offline_portals": [], "shape_rate_kbit": {"1": None, "2": None}}
    for vm in st["vms"]:
        assert vm["running"] and vm["load_progressing"], vm
        for d in vm["disks"]:
            assert d["ops_per_s"] > 0 and d["avg_latency_ms"] > 0, d
