"""The lab's fault shapes beyond loss/throttle/offline (issue 13's fault matrix),
each applied briefly to the real lab and its effect measured independently of
kvmscope: libvirt bulk block stats per VM (ops, average latency), the host's
and the storage namespace's /proc/net/snmp RetransSegs, and `ss -ti` smoothed
RTT of each portal's iSCSI connections.

  shape    `lab shape 1mbit --portal 1`: RTT of portal 1's connections >= 5x,
           host retransmits barely move, portal 1's VM slows;
  loss     `lab loss 5 --portal 1 --direction to-host`: the target retransmits,
           the host hardly; portal 1's VM slows, portal 2's does not (and the
           mirror image for to-target);
  flap     `lab flap --portal 2 --down 4 --up 6 --count 2`: portal 2's VM does
           no I/O inside each recorded down period and resumes after it, portal
           1's VM keeps going;
  one LUN  `lab throttle-target 30 --vm <portal-1 VM>`: only that VM slows.

Run as root:  /usr/bin/python3 -m pytest -m lab tests/lab/test_lab_faults.py -v -s
"""

import re
import statistics
import subprocess
import sys
import time

import pytest

from .conftest import LAB, LAB_PYTHON, format_window

pytestmark = pytest.mark.lab

NETNS = "kvmslab-stor"
SETTLE = 3
WINDOW = 8


def sh(*cmd):
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True).stdout


def snmp_retrans(text):
    tcp = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
    return int(tcp[1][tcp[0].index("RetransSegs")])


def host_retrans():
    with open("/proc/net/snmp") as f:
        return snmp_retrans(f.read())


def target_retrans():
    """RetransSegs of the storage namespace's TCP stack (tgtd's side)."""
    return snmp_retrans(sh("ip", "netns", "exec", NETNS, "cat", "/proc/net/snmp"))


def portal_rtts(addr):
    """Smoothed RTT (ms) of every established connection to addr:3260 (ss -ti)."""
    out = sh("ss", "-tin", "state", "established", "dst", addr, "dport", "=", ":3260")
    return [float(m) for m in re.findall(r"\brtt:([\d.]+)/", out)]


def rtt_median(addr, samples=5, every=0.4):
    vals = []
    for _ in range(samples):
        vals.extend(portal_rtts(addr))
        time.sleep(every)
    assert vals, f"no established connection to {addr}:3260"
    return statistics.median(vals)


def vms_on(lab, portal):
    return [n for n in lab.vm_names if lab.vm_portal(n) == portal]


def vda(w, name):
    return w["vms"][name]["vda"]


def measure(lab, seconds):
    t0 = target_retrans()
    w = lab.window(seconds)
    w["target_retrans"] = target_retrans() - t0
    return w


def show(label, w):
    print(format_window(label, w) + f"\n  target RetransSegs +{w['target_retrans']}")


@pytest.fixture(scope="module")
def base(lab):
    w = measure(lab, WINDOW)
    w["rtt"] = {p: rtt_median(f"198.18.{p}.2") for p in (1, 2)}
    print()
    show("baseline", w)
    print(f"  RTT median: portal 1 {w['rtt'][1]:.3f} ms, portal 2 {w['rtt'][2]:.3f} ms")
    for n in lab.vm_names:
        assert vda(w, n)["ops"] > 0 and vda(w, n)["avg_ms"] is not None, n
    return w


def test_shape_inflates_rtt_without_loss(lab, base):
    p1, p2 = vms_on(lab, 1), vms_on(lab, 2)
    lab.run("shape", "1mbit", "--portal", 1)
    try:
        st = lab.status_json(interval=0.5)
        assert [p["shape_rate_kbit"] for p in st["portals"]] == [1000, None]
        for ns in ([], ["-n", NETNS]):
            dev = "kvmslab-n1" if ns else "kvmslab-h1"
            out = sh("tc", *ns, "qdisc", "show", "dev", dev)
            assert re.search(r"^qdisc tbf \S+ root .*rate 1Mbit", out, re.M), out
        time.sleep(SETTLE)
        rtt1 = rtt_median("198.18.1.2")
        shaped = measure(lab, WINDOW)
        rtt2 = rtt_median("198.18.2.2", samples=2)
    finally:
        lab.run("shape", "off")
    show("portal 1 shaped to 1 Mbit/s", shaped)
    print(f"  RTT median: portal 1 {base['rtt'][1]:.3f} -> {rtt1:.3f} ms, "
          f"portal 2 {base['rtt'][2]:.3f} -> {rtt2:.3f} ms")
    assert rtt1 >= 5 * base["rtt"][1], (base["rtt"][1], rtt1)
    assert rtt2 < rtt1 / 3, (rtt1, rtt2)
    # queueing, not loss: the host hardly retransmits (5% loss gives ~+80 / 12 s)
    assert shaped["retrans"] <= 15, f"host RetransSegs +{shaped['retrans']} while shaped"
    for n in p1:
        assert vda(shaped, n)["ops"] > 0, f"{n} made no progress on the shaped link"
        assert vda(shaped, n)["avg_ms"] > 3 * vda(base, n)["avg_ms"], (n, vda(shaped, n))
    for n in p2:
        assert vda(shaped, n)["avg_ms"] < 2 * vda(base, n)["avg_ms"] + 0.5, (n, vda(shaped, n))
    # off: no tbf left on either end
    for ns, dev in (([], "kvmslab-h1"), (["-n", NETNS], "kvmslab-n1")):
        assert "tbf" not in sh("tc", *ns, "qdisc", "show", "dev", dev)


def test_loss_in_one_direction(lab, base):
    p1, p2 = vms_on(lab, 1), vms_on(lab, 2)
    lab.run("loss", 5, "--portal", 1, "--direction", "to-host")
    try:
        host_rules = sh("iptables", "-S", "KVMSLAB")
        ns_rules = sh("ip", "netns", "exec", NETNS, "iptables", "-S", "KVMSLAB")
        st = lab.status_json(interval=0.5)
        time.sleep(SETTLE)
        to_host = measure(lab, WINDOW + 2)
        lab.run("loss", 5, "--portal", 1, "--direction", "to-target")
        ns_rules2 = sh("ip", "netns", "exec", NETNS, "iptables", "-S", "KVMSLAB")
        host_rules2 = sh("iptables", "-S", "KVMSLAB")
        time.sleep(SETTLE)
        to_target = measure(lab, WINDOW)
    finally:
        lab.run("loss", 0)
    print()
    show("5% loss on portal 1, to-host only", to_host)
    show("5% loss on portal 1, to-target only", to_target)
    assert (st["portals"][0]["loss_pct"], st["portals"][0]["loss_direction"]) == (5.0, "to-host")
    assert "kvmslab portal 1 loss 5% to-host" in host_rules and "DROP" not in ns_rules
    assert "kvmslab portal 1 loss 5% to-target" in ns_rules2 and "DROP" not in host_rules2

    # to-host: the target's segments are lost, so the target retransmits
    assert to_host["target_retrans"] >= 10, to_host["target_retrans"]
    assert to_host["retrans"] <= max(5, to_host["target_retrans"] // 4), \
        f"host +{to_host['retrans']} vs target +{to_host['target_retrans']}"
    # to-target: the host's segments are lost, so the host retransmits
    assert to_target["retrans"] >= 10, to_target["retrans"]
    assert to_target["target_retrans"] <= max(5, to_target["retrans"] // 4), \
        f"target +{to_target['target_retrans']} vs host +{to_target['retrans']}"
    for w in (to_host, to_target):
        for n in p1:
            assert vda(w, n)["ops"] > 0, n
            assert vda(w, n)["avg_ms"] > max(3 * vda(base, n)["avg_ms"], 2.0), (n, vda(w, n))
        for n in p2:
            assert vda(w, n)["avg_ms"] < 2 * vda(base, n)["avg_ms"] + 0.5, (n, vda(w, n))
    assert "DROP" not in sh("iptables", "-S", "KVMSLAB")


def vda_ops(lab, names):
    stats = lab.block_stats()
    return {n: stats[n]["vda"]["rd.reqs"] + stats[n]["vda"]["wr.reqs"] for n in names}


def ops_between(samples, name, t_from, t_to):
    """Requests completed between the last sample at or before t_from and the
    first sample at or after t_to (None when the samples do not cover it)."""
    before = [s for s in samples if s[0] <= t_from]
    after = [s for s in samples if s[0] >= t_to]
    if not before or not after:
        return None
    return after[0][1][name] - before[-1][1][name]


def test_flap_stops_io_during_each_down_period(lab, base):
    p1, p2 = vms_on(lab, 1), vms_on(lab, 2)
    down, up = 4, 6
    cmd = [LAB_PYTHON, LAB, "flap", "--portal", "2", "--down", str(down), "--up", str(up),
           "--count", "2"]
    samples = []                       # (wall clock, {vm: vda ops})
    last_end = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:
            samples.append((time.time(), vda_ops(lab, lab.vm_names)))
            time.sleep(0.25)
        end_wait = time.time() + 20     # I/O resumes after the last period (TCP backoff)
        while time.time() < end_wait:
            samples.append((time.time(), vda_ops(lab, lab.vm_names)))
            last_end = samples[-1][0]
            if len(samples) > 2 and all(samples[-1][1][n] > samples[-2][1][n] for n in p2):
                break
            time.sleep(0.25)
    finally:
        if proc.poll() is None:
            proc.terminate()
        out, err = proc.communicate(timeout=30)
        sys.stderr.write(err)
    assert proc.returncode == 0, err
    assert err.count("DOWN at") == 2 and err.count("UP at") == 2, err
    st = lab.status_json(interval=0.5)
    periods = st["faults"]["flaps"]["periods"][-2:]
    assert st["faults"]["flaps"]["down"] == [] and not st["portals"][1]["flap_down"]
    assert [(p["portal"], p["n"], p["count"]) for p in periods] == [(2, 1, 2), (2, 2, 2)]
    assert "DROP" not in sh("iptables", "-S", "KVMSLAB")
    for i, p in enumerate(periods):
        assert down - 0.1 <= p["seconds"] <= down + 1.5, p
        assert abs(p["end"] - p["start"] - p["seconds"]) < 0.01
        # portal 2's VM: nothing completes inside the down period (a margin for
        # a reply already received when the drop began) ...
        for n in p2:
            stalled = ops_between(samples, n, p["start"] + 0.5, p["end"] - 0.1)
            print(f"flap {i + 1}: {p['start_iso']} -> {p['end_iso']} ({p['seconds']}s): "
                  f"{n} vda +{stalled} ops inside")
            assert stalled == 0, (n, p, stalled)
        # ... while portal 1's VM keeps going
        for n in p1:
            assert ops_between(samples, n, p["start"] + 0.5, p["end"] - 0.1) > 0, n
    # I/O resumes after each period: within the up time after the first, and
    # within the wait after the last
    resume_by = [periods[1]["start"], last_end]
    for n in p2:
        for p, t_to in zip(periods, resume_by):
            grew = ops_between(samples, n, p["end"], t_to)
            print(f"  {n} vda +{grew} ops after {p['end_iso']}")
            assert grew and grew > 0, (n, p)


def test_throttle_one_lun_slows_only_its_vm(lab, base):
    victim = vms_on(lab, 1)[0]
    others = [n for n in lab.vm_names if n != victim]
    st = lab.status_json(interval=0.5)
    mm = {vm["name"]: vm["disks"][0]["target_backing_majmin"] for vm in st["vms"]}
    lab.run("throttle-target", 30, "--vm", victim)
    try:
        st = lab.status_json(interval=0.5)
        thr = {vm["name"]: vm["disks"][0]["target_throttle_iops"] for vm in st["vms"]}
        rules = {f: open(f"/sys/fs/cgroup/blkio/blkio.throttle.{f}_iops_device").read()
                 for f in ("read", "write")}
        time.sleep(SETTLE)
        slow = measure(lab, WINDOW)
    finally:
        lab.run("throttle-target", "off", "--vm", victim)
    print()
    show(f"{victim}'s LUN throttled to 30 IOPS", slow)
    assert thr == {n: (30 if n == victim else None) for n in lab.vm_names}
    assert st["faults"]["throttle_iops"] is None
    for text in rules.values():
        assert re.search(rf"^{mm[victim]} 30$", text, re.M), text
        for n in others:
            assert not re.search(rf"^{mm[n]} ", text, re.M), text
    v = vda(slow, victim)
    assert v["ops"] > 0 and v["avg_ms"] > max(5 * vda(base, victim)["avg_ms"], 5.0), v
    assert v["ops_per_s"] < 45, v              # ~30 ops/s: reads and writes alternate
    for n in others:
        assert vda(slow, n)["avg_ms"] < 2 * vda(base, n)["avg_ms"] + 0.5, (n, vda(slow, n))
    assert slow["retrans"] <= 3 and slow["target_retrans"] <= 3
    for f in ("read", "write"):
        with open(f"/sys/fs/cgroup/blkio/blkio.throttle.{f}_iops_device") as fh:
            assert not re.search(rf"^{mm[victim]} ", fh.read(), re.M)
