"""benchmarks/cycle.py (make bench-cycle) at a small size: it runs end to end and writes sane numbers.

Six libvirt test-driver domains of two libiscsi disks, six real QEMU processes (`-machine none`) holding
twelve real loopback TCP connections, in a network namespace of the benchmark's own; every default source
but the eBPF probes, the join, the spool, the live diagnosis, the /metrics render. No timing is asserted
(a shared machine's numbers vary): what is asserted is that the pieces met (every disk joined to the
connection of its QEMU process) and that the numbers it reports are numbers. About 5 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_cycle_benchmark_runs_and_joins_every_disk_to_its_qemu_connection(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace, QEMU processes owned by root); make test runs as root")
    assert shutil.which("qemu-system-x86_64") and shutil.which("unshare"), "qemu-system-x86 / util-linux missing"
    out = tmp_path / "cycle.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.cycle", "--vms", "6", "--disks", "2", "--cycles", "3",
                        "--gap", "0", "--fill", "3", "--no-ebpf", "--no-write", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert (r["vms"], r["disks"], r["conns"]) == (6, 12, 12)
    # the QEMU processes were tied to their domains (-uuid) and their sockets to them (/proc fds): every disk's
    # storage path reaches the connection of its portal
    assert r["joined"] == 12
    assert r["health"]["libvirt"][0] == "ok" and r["health"]["storage_tcp"][0] == "ok", r["health"]
    assert len(r["cpu_ms"]) == 3 and all(0 < c < 60_000 for c in r["cpu_ms"])
    assert len(r["render_ms"]) == 3 and all(0 < c < 60_000 for c in r["render_ms"])
    parts = r["parts_ms"]
    for part in ("source libvirt", "source storage_tcp", "consumer live diagnosis", "consumer the snapshot's shared values "
                 "(storage-path join, disk latency join, connection names)",
                 "consumer shipping (ES documents + spool append)", "consumer /metrics prerender"):
        assert part in parts and parts[part] >= 0, sorted(parts)
    assert r["samples"] > 12 * 5  # per disk at least its info, requests, bytes and time series
    assert "| **CPU per cycle (whole process)** |" in p.stdout
