"""The loader on the real kernel: degraded hosts, tracefs unmounted, stats sysctl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ebpf import decode, probe_classes
from agent.ebpf.loader import ATTACHED, UNAVAILABLE, LoadOptions
from agent.hostpaths import HostPaths

pytestmark = pytest.mark.ebpf

ALL_TPS = {
    "tcp:tcp_retransmit_skb", "tcp:tcp_retransmit_synack", "tcp:tcp_send_reset", "tcp:tcp_receive_reset",
    "block:block_rq_insert", "block:block_rq_issue", "block:block_rq_complete", "block:block_io_start",
    "sock:inet_sock_set_state",
}


def load_all(opts_for):
    probes = [cls(opts_for(name)) for name, cls in probe_classes().items()]
    try:
        return {p.name: p.load() for p in probes}
    finally:
        for p in probes:
            p.close()


def test_missing_tracepoint_reported_others_attach():
    reps = load_all(lambda n: LoadOptions(tracepoints=ALL_TPS - {"block:block_rq_complete"}))
    b = reps["block_io"]
    assert b.state == UNAVAILABLE
    assert "tracepoint block:block_rq_complete not found in /sys/kernel/tracing/events" in b.reason
    assert b.fix
    assert reps["tcp_retrans"].state == ATTACHED and reps["tcp_lifecycle"].state == ATTACHED


def test_missing_optional_tracepoint_is_skipped():
    reps = load_all(lambda n: LoadOptions(tracepoints=ALL_TPS - {"block:block_rq_insert", "tcp:tcp_send_reset"}))
    assert reps["block_io"].state == ATTACHED
    assert reps["block_io"].skipped == ["block:block_rq_insert"]
    assert "block:block_rq_insert" not in reps["block_io"].tracepoints
    assert "tcp:tcp_send_reset" not in reps["tcp_retrans"].tracepoints


def test_missing_headers_reported_others_attach(tmp_path):
    missing = tmp_path / "no-such-build"
    reps = load_all(lambda n: LoadOptions(kernel_build=missing if n == "tcp_lifecycle" else None))
    rep = reps["tcp_lifecycle"]
    assert rep.state == UNAVAILABLE
    assert f"no kernel headers for bcc at {missing}" in rep.reason
    assert "linux-headers" in rep.fix
    assert reps["tcp_retrans"].state == ATTACHED and reps["block_io"].state == ATTACHED


def test_bpf_stats_sysctl_left_as_found():
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    before = path.read_text()
    cls = probe_classes()["block_io"]
    p = cls(LoadOptions())
    assert p.load().state == ATTACHED
    subprocess.run(["dd", "if=/dev/zero", "of=/dev/null", "bs=4k", "count=1"], check=True)
    with open("/tmp/ksprb-stats", "wb") as f:  # some block I/O so the programs run
        f.write(b"x" * 4096)
        os.fsync(f.fileno())
    os.unlink("/tmp/ksprb-stats")
    during = path.read_text()
    st = p.stats()
    p.close()
    assert path.read_text() == before == during
    assert st.run_cnt > 0 and st.run_time_ns > 0


def test_tcp_state_table_matches_kernel():
    fmt = Path("/sys/kernel/tracing/events/sock/inet_sock_set_state/format").read_text()
    syms = decode.parse_state_symbols(fmt)
    assert syms, "no __print_symbolic(REC->newstate ...) in the format"
    for n, name in syms.items():
        assert decode.tcp_state_name(n) == name


def test_probes_check_with_tracefs_unmounted():
    """In a private mount namespace: tracefs and debugfs unmounted; the loader
    mounts tracefs itself and every probe attaches."""
    script = (
        "umount /sys/kernel/debug/tracing 2>/dev/null; umount /sys/kernel/debug 2>/dev/null; "
        "umount /sys/kernel/tracing 2>/dev/null; "
        "test -e /sys/kernel/tracing/events && { echo still-mounted; exit 3; }; "
        f"exec {sys.executable} -m agent probes check"
    )
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "KVMSCOPE_CONFIG": ""})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/sys/kernel/tracing mounted by kvmscope" in r.stdout
    assert r.stdout.count(": attached on") == len(probe_classes())  # every probe, however many
    assert Path("/sys/kernel/tracing/events").is_dir()  # the host's tracefs untouched
