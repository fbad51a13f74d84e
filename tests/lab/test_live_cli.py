"""top, retrans --follow and diagnose on the live lab, with a real fault injected."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.lab

ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}


def kvmscope(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "agent", "--standalone", *args], capture_output=True, text=True, env=ENV, timeout=180)
    if check:
        assert r.returncode in (0, 3), r.stderr
    return r


def test_top_once_ranks_the_lossy_vm_first(lab):
    vm0 = next(n for n in lab.vm_names if lab.vm_portal(n) == 1)
    lab.run("loss", 5, "--portal", 1)
    try:
        time.sleep(2)
        data = json.loads(kvmscope("top", "--once", "--json", "--interval", "4").stdout)
    finally:
        lab.run("loss", 0)
    rows = data["disks"]
    assert (rows[0]["vm"], rows[0]["disk"]) == (vm0, "vda"), rows[:2]
    assert rows[0]["mean_ms"] > 3 * max(r["mean_ms"] for r in rows[1:] if r["mean_ms"] is not None)
    assert rows[0]["retransmits_per_second"] > 0
    text = kvmscope("top", "--once").stdout
    assert all(len(line) <= 80 for line in text.splitlines()), text


def test_retrans_follow_streams_attributed_events(lab):
    vm0 = next(n for n in lab.vm_names if lab.vm_portal(n) == 1)
    p = subprocess.Popen([sys.executable, "-m", "agent", "--standalone", "retrans", "--follow", "--json"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        time.sleep(4)  # compile and attach
        lab.run("loss", 5, "--portal", 1)
        time.sleep(6)
    finally:
        lab.run("loss", 0)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert events, err
    # the clean portal may see a tail-loss probe or two on a loaded machine (real retransmits,
    # about 0.4/s here under load): the lossy path must dominate, not be alone
    lossy = [e for e in events if e["connection"].endswith("->198.18.1.2:3260")]
    clean = [e for e in events if e["connection"].endswith("->198.18.2.2:3260")]
    assert len(lossy) + len(clean) == len(events), events[:3]
    assert len(lossy) >= 10 and len(clean) <= max(3, len(lossy) // 10), (len(lossy), len(clean), clean[:3])
    attributed = [e for e in lossy if e["vm"] == vm0 and e["disk"] == "vda"]
    assert len(attributed) >= 0.9 * len(lossy)
    assert "Traceback" not in err


def test_diagnose_live_loss_vs_throttle(lab):
    lab.run("loss", 5, "--portal", 1)
    try:
        time.sleep(2)
        r = kvmscope("diagnose", "--window", "8s", "--json")
    finally:
        lab.run("loss", 0)
    assert r.returncode == 3
    rep = json.loads(r.stdout)
    problems = [f for f in rep["findings"] if f["severity"] != "info"]
    assert [f["rule"] for f in problems] == ["packet_loss"]
    assert problems[0]["subject"] == {"kind": "portal", "id": "198.18.1.2:3260"}

    lab.run("throttle-target", 40)
    try:
        time.sleep(3)
        r = kvmscope("diagnose", "--window", "8s", "--json")
    finally:
        lab.run("throttle-target", "off")
    rep = json.loads(r.stdout)
    assert r.returncode == 3
    assert {f["rule"] for f in rep["findings"] if f["severity"] != "info"} == {"slow_target"}


def test_diagnose_healthy_exit_zero(lab):
    time.sleep(3)  # let the previous faults' effects settle
    r = kvmscope("diagnose", "--window", "6s")
    assert r.returncode == 0, r.stdout
    assert "no problems found" in r.stdout


def test_diagnose_attached_to_a_running_agent_over_its_socket(lab, tmp_path):
    """The attach path on the live lab: a real agent serving its root-only socket, `diagnose` (no
    --standalone) reads its history through it and finds the injected loss."""
    from agent.api import fetch_snapshots
    from tests.conftest import free_port, wait_for

    sock = tmp_path / "run" / "api.sock"
    env = dict(ENV, KVMSCOPE_API__SOCKET=str(sock), KVMSCOPE_METRICS__LISTEN=f"127.0.0.1:{free_port()}")
    agent = subprocess.Popen([sys.executable, "-m", "agent", "run", "--interval", "1", "-q"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    def probes_up():
        h = fetch_snapshots(str(sock), last=1)[0][0].health.get("ebpf_tcp_retrans")
        assert h is not None and h.status.value == "ok", f"ebpf_tcp_retrans: {h}"  # the reason, if it times out
        return True

    try:
        try:
            wait_for(probes_up, 240, "the agent's retransmit probe, through its socket")
        except AssertionError as e:
            agent.terminate()
            raise AssertionError(f"{e}\nagent: {agent.communicate(timeout=30)[1][-2000:]}") from None
        lab.run("loss", 5, "--portal", 1)
        try:
            time.sleep(9)
            r = subprocess.run([sys.executable, "-m", "agent", "diagnose", "--window", "8s", "--json"],
                               capture_output=True, text=True, env=env, timeout=120)
        finally:
            lab.run("loss", 0)
    finally:
        agent.terminate()
        err = agent.communicate(timeout=30)[1]
    assert f"attached to the running agent on {sock}" in r.stderr, r.stderr
    assert "sampling" not in r.stderr
    rep = json.loads(r.stdout)
    assert r.returncode == 3 and rep["window"]["snapshots"] >= 6
    assert [f["rule"] for f in rep["findings"] if f["severity"] != "info"] == ["packet_loss"], rep["findings"]
    assert agent.returncode == 0 and not sock.exists(), err
