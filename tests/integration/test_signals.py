"""Signals to a real `kvmscope run` (issue 16 #15): SIGHUP re-checks the configuration file and
never kills the agent; SIGTERM stops it within a bounded time even when a source is stuck for good
(here: host_tcp reading a FIFO nobody writes, a real open() that never returns)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import yaml

from agent.sources import load_registry
from tests.conftest import free_port, wait_for

CLEAN_ENV = {k: v for k, v in os.environ.items() if not k.startswith("KVMSCOPE_")}


def _agent(cfg_path, port, tmp_path):
    env = dict(CLEAN_ENV, KVMSCOPE_API__SOCKET=str(tmp_path / "api.sock"))
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "-c", str(cfg_path), "run", "--listen", f"127.0.0.1:{port}",
         "--interval", "0.5", "-q"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _up(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as r:
        return b'"seq"' in r.read()


def test_sighup_rechecks_the_file_and_keeps_running(tmp_path):
    cfg = tmp_path / "config.yaml"
    good = {"agent": {"collectors": {"disable": [n for n in load_registry() if n != "host_tcp"]}}}
    cfg.write_text(yaml.safe_dump(good))
    port = free_port()
    p = _agent(cfg, port, tmp_path)
    try:
        wait_for(lambda: _up(port), 30, "the agent's API")
        cfg.write_text("agent:\n  interval: -3\n")
        p.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert p.poll() is None, "SIGHUP killed the agent"
        assert _up(port)
        cfg.write_text(yaml.safe_dump({**good, "agent": {**good["agent"], "interval": 7}}))
        p.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert p.poll() is None and _up(port)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    assert p.returncode == 0, err
    assert "SIGHUP: " in err and "agent.interval: got -3" in err and "keeping the running configuration" in err
    valid = [ln for ln in err.splitlines() if ln.startswith(f"SIGHUP: {cfg}")]
    assert len(valid) == 1 and " is valid; " in valid[0] and "restart" in valid[0], err


def test_sigterm_with_a_source_hung_forever_exits_promptly(tmp_path):
    proc = tmp_path / "proc"
    (proc / "net").mkdir(parents=True)
    os.mkfifo(proc / "net" / "snmp")  # open() for reading blocks until a writer comes: never
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        "agent": {"collectors": {"disable": [n for n in load_registry() if n != "host_tcp"]},
                  "collector_timeout": 0.3},
        "paths": {"procfs": str(proc)}}))
    port = free_port()
    p = _agent(cfg, port, tmp_path)
    try:
        def hung():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as r:
                return b"still running since" in r.read()
        wait_for(hung, 30, "host_tcp reported as hung")
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            raise AssertionError("the agent did not exit within 20 s of SIGTERM with a hung source") from None
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
    print(f"\nexit after SIGTERM with a hung source: {took:.2f}s, rc {p.returncode}")
    assert p.returncode == 0, err
    assert took < 5, took
    assert "stopped" in err
