"""CLI commands attach to a running agent through its local API."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest


@pytest.fixture
def running_agent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}
    env["KVMSCOPE_METRICS__LISTEN"] = f"127.0.0.1:{port}"
    env["KVMSCOPE_AGENT__COLLECTORS__DISABLE"] = "[ebpf_block_io, ebpf_tcp_lifecycle, ebpf_tcp_retrans]"
    p = subprocess.Popen([sys.executable, "-m", "agent", "run", "--interval", "0.5", "-q"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            if len(json.load(urllib.request.urlopen(f"{base}/api/v1/snapshots?last=3", timeout=1))) >= 3:
                break
        except OSError:
            pass
        time.sleep(0.2)
    yield base, env
    p.terminate()
    p.wait(10)


def test_snapshots_endpoint(running_agent):
    base, _ = running_agent
    snaps = json.load(urllib.request.urlopen(f"{base}/api/v1/snapshots?last=2", timeout=2))
    assert len(snaps) == 2 and snaps[1]["seq"] == snaps[0]["seq"] + 1
    assert "host_tcp" in snaps[1]["data"]
    recent = json.load(urllib.request.urlopen(f"{base}/api/v1/snapshots?seconds=1.2", timeout=2))
    assert 1 <= len(recent) <= 4
    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"{base}/api/v1/snapshots?last=zero", timeout=2)
    assert ei.value.code == 400


def test_diagnose_attaches_and_uses_history(running_agent):
    _, env = running_agent
    time.sleep(1.5)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "agent", "diagnose", "--window", "2s", "--json"], env=env,
                       capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode in (0, 3), r.stderr
    assert "attached to the running agent" in r.stderr
    assert "sampling" not in r.stderr and took < 10
    rep = json.loads(r.stdout)
    assert rep["window"]["snapshots"] >= 3  # 2 s of a 0.5 s agent


def test_standalone_flag_does_not_attach(running_agent):
    _, env = running_agent
    r = subprocess.run([sys.executable, "-m", "agent", "--standalone", "paths", "--json"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "attached" not in r.stderr
