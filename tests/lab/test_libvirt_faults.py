"""libvirt hung or gone mid-run: the other sources keep reporting, the cycle stays on time, it recovers."""

import os
import signal
import subprocess
import time

import pytest

from agent.config import Config
from agent.engine import build_agent
from agent.records.snapshot import Status

from .conftest import LAB_DIR

pytestmark = pytest.mark.lab


def libvirtd_pid():
    out = subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, f"expected one libvirtd, got {out}"
    return int(out[0])


def make_agent(timeout=2.0):
    cfg = Config()
    cfg.agent.interval = 5
    cfg.agent.collector_timeout = timeout
    return build_agent(cfg, ["libvirt", "storage_tcp", "host_tcp"])


def test_hung_libvirtd_times_out_others_fine(lab):
    agent = make_agent(timeout=2.0)
    try:
        assert agent.collect_once().health["libvirt"].status is Status.OK
        pid = libvirtd_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            snap = agent.collect_once()
            took = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
        assert took < 3.0, f"cycle took {took:.1f}s with a hung libvirtd"
        assert snap.health["libvirt"].status is Status.FAILED
        assert snap.health["libvirt"].reason == "timed out after 2s"
        assert snap.health["storage_tcp"].status is Status.OK
        assert len(snap.storage_connections) == len(lab.vm_names)
        # after SIGCONT the stuck call returns; the source works again
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s = agent.collect_once()
            if s.health["libvirt"].status is Status.OK:
                break
            time.sleep(0.5)
        assert s.health["libvirt"].status is Status.OK, s.health["libvirt"].reason
    finally:
        agent.close()


def test_libvirtd_gone_mid_run_then_back(lab):
    agent = make_agent()
    try:
        assert agent.collect_once().health["libvirt"].status is Status.OK
        os.kill(libvirtd_pid(), signal.SIGKILL)
        time.sleep(0.5)
        snap = agent.collect_once()
        h = snap.health["libvirt"]
        assert h.status in (Status.FAILED, Status.NODATA), h
        assert "libvirt" in h.reason
        assert snap.health["storage_tcp"].status is Status.OK
        assert snap.health["host_tcp"].status is Status.OK
        # libvirtd comes back (as the lab started it): the source reconnects by itself
        subprocess.run(["libvirtd", "-d", "-p", os.path.join(LAB_DIR, "libvirtd.pid")], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            s = agent.collect_once()
            if s.health["libvirt"].status is Status.OK and s.get("libvirt").vms:
                break
            time.sleep(1)
        assert s.health["libvirt"].status is Status.OK, s.health["libvirt"].reason
        assert {v.name for v in s.get("libvirt").vms} >= set(lab.vm_names)
    finally:
        agent.close()
