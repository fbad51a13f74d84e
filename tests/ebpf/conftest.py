"""Rigs for the eBPF tests: real kernel, real probes, run as root.

* ``netpair``: two network namespaces of our own (ksprb-a, ksprb-b) joined by
  a veth pair, 198.18.93.1/30 <-> 198.18.93.2/30 (RFC 2544 benchmark space).
* ``loopdev``: a loop device over a file in /dev/shm, detached afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

NS_A, NS_B = "ksprb-a", "ksprb-b"
ADDR_A, ADDR_B = "198.18.93.1", "198.18.93.2"


def sh(cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True, **kw)


def need_root():
    if os.geteuid() != 0:
        pytest.skip("eBPF tests need root (this run is not root)")


@pytest.fixture(scope="session")
def netpair():
    need_root()
    for tool in ("ip", "iptables"):
        if not shutil.which(tool):
            pytest.skip(f"{tool} not installed")
    for ns in (NS_A, NS_B):
        sh(f"ip netns del {ns}", check=False)
    sh(f"ip netns add {NS_A} && ip netns add {NS_B}")
    try:
        sh(f"ip link add ksprb0 netns {NS_A} type veth peer name ksprb1 netns {NS_B}")
        sh(f"ip -n {NS_A} addr add {ADDR_A}/30 dev ksprb0 && ip -n {NS_A} link set ksprb0 up && ip -n {NS_A} link set lo up")
        sh(f"ip -n {NS_B} addr add {ADDR_B}/30 dev ksprb1 && ip -n {NS_B} link set ksprb1 up && ip -n {NS_B} link set lo up")
        yield {"a": NS_A, "b": NS_B, "addr_a": ADDR_A, "addr_b": ADDR_B}
    finally:
        for ns in (NS_A, NS_B):
            sh(f"ip netns del {ns}", check=False)


def in_ns(ns: str, *argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


@pytest.fixture
def loopdev(tmp_path_factory):
    need_root()
    backing = Path("/dev/shm") / f"ksprb-loop-{os.getpid()}.img"
    sh(f"truncate -s 256M {backing}")
    dev = sh(f"losetup --find --show {backing}").stdout.strip()
    try:
        yield dev
    finally:
        sh(f"losetup -d {dev}", check=False)
        backing.unlink(missing_ok=True)


PY = sys.executable
