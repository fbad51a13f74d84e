"""`kvmscope run` as a real process: /metrics served, promtool accepts it, signals stop it."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from tests.conftest import free_port

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}



SOCK_DIR = tempfile.TemporaryDirectory(prefix="kvmscope-test-run-")  # removed when the run ends


def start_agent(port: int, *extra: str) -> subprocess.Popen:
    sock = os.path.join(SOCK_DIR.name, f"api-{port}.sock")  # not /run/kvmscope's
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--listen", f"127.0.0.1:{port}", "--interval", "0.5", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(CLEAN_ENV, KVMSCOPE_API__SOCKET=sock),
    )


def scrape(port: int, path: str = "/metrics", deadline: float = 20.0) -> str:
    end = time.monotonic() + deadline
    last = None
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                body = r.read().decode()
            if "kvmscope_collector_success" in body or path != "/metrics":
                return body
        except OSError as e:
            last = e
        time.sleep(0.2)
    raise AssertionError(f"agent did not serve {path} in {deadline}s: {last}")


@pytest.fixture
def agent_proc():
    port = free_port()
    p = start_agent(port)
    yield p, port
    if p.poll() is None:
        p.kill()
        p.wait(5)


def test_metrics_served_and_counters_move(agent_proc):
    p, port = agent_proc
    first = scrape(port)
    assert 'kvmscope_collector_success{collector="host_tcp"} 1.0' in first
    assert 'kvmscope_collector_duration_seconds{collector="host_tcp"}' in first
    assert "kvmscope_host_tcp_sent_segments_total" in first

    def value(text, name):
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    # our own scrapes are TCP traffic on loopback: the sent-segment counter must grow
    time.sleep(1.2)
    second = scrape(port)
    assert value(second, "kvmscope_host_tcp_sent_segments_total") > value(first, "kvmscope_host_tcp_sent_segments_total")
    assert value(second, "kvmscope_snapshot_timestamp_seconds") > value(first, "kvmscope_snapshot_timestamp_seconds")


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Debian prometheus) not installed; make test installs it")
def test_promtool_accepts_metrics(agent_proc):
    _, port = agent_proc
    body = scrape(port)
    r = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "" and r.stderr.strip() == "", r.stdout + r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(agent_proc, sig):
    p, port = agent_proc
    scrape(port)
    p.send_signal(sig)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0, err
    assert f"{sig.name}: stopping" in err and err.rstrip().endswith("stopped")
    assert "Traceback" not in err
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1)


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = start_agent(port)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 1
    assert f"kvmscope: error: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err


def test_health_api(agent_proc):
    import json

    _, port = agent_proc
    scrape(port)
    health = json.loads(scrape(port, "/api/v1/health"))
    names = {c["name"]: c["status"] for c in health["snapshot"]["collectors"]}
    assert names["host_tcp"] == "ok"


def test_run_once_exits_zero():
    r = subprocess.run([sys.executable, "-m", "agent", "run", "--once"], capture_output=True, text=True, env=CLEAN_ENV, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "cycle 1: " in r.stderr and " 0 failed in " in r.stderr
