"""tcp_retrans and tcp_lifecycle probes against real TCP in our own namespaces."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from agent.ebpf.loader import ATTACHED, LoadOptions
from agent.ebpf.tcp_lifecycle import TcpLifecycleProbe
from agent.ebpf.tcp_retrans import TcpRetransProbe
from agent.exporters.render_ebpf import render_tcp_retrans
from tests.ebpf.conftest import PY, in_ns, sh
from tests.ebpf.helpers_net import CLIENT, SERVER

pytestmark = pytest.mark.ebpf

TRACEFS = Path("/sys/kernel/tracing")


@pytest.fixture
def trace_instance():
    """An ftrace instance of our own recording tcp:tcp_retransmit_skb for
    every dport the test uses (3260, 3261, 3263): the independent count (no
    BPF involved), including a tail-loss probe on the clean connection."""
    inst = TRACEFS / "instances" / f"ksprb{os.getpid()}"
    if not (TRACEFS / "instances").is_dir():
        pytest.skip("tracefs instances not available")
    inst.mkdir()
    try:
        ev = inst / "events" / "tcp" / "tcp_retransmit_skb"
        (inst / "buffer_size_kb").write_text("4096\n")
        (ev / "filter").write_text("dport == 3260 || dport == 3261 || dport == 3263\n")
        (ev / "enable").write_text("1\n")
        yield inst
    finally:
        try:
            (inst / "events" / "tcp" / "tcp_retransmit_skb" / "enable").write_text("0\n")
        except OSError:
            pass
        inst.rmdir()


def start_server(netpair, ports: str, mode: str = "sink"):
    srv = in_ns(netpair["b"], PY, "-c", SERVER, ports, mode)
    for _ in ports.split(","):
        line = srv.stdout.readline()
        assert line.startswith("listening"), srv.stderr.read() if srv.poll() is not None else line
    return srv


@pytest.mark.parametrize("all_connections", [False, True], ids=["storage-only", "all-connections"])
def test_retransmits_per_connection_match_ftrace(netpair, trace_instance, all_connections):
    """3260 (storage) and 3263 (not storage) lossy, 3261 (storage) clean.
    By default a non-storage connection only counts in the "other"
    aggregate (filtered before any map work); with all_connections it has
    its own exact entry too."""
    probe = TcpRetransProbe(LoadOptions(storage_ports=(3260, 3261)), all_connections=all_connections)
    rep = probe.load()
    assert rep.state == ATTACHED, rep
    srv = start_server(netpair, "3260,3261,3263")
    # drop on arrival (INPUT of the peer): a local OUTPUT drop is an error
    # returned to TCP, which resends through the normal path, not a retransmit
    drop = (f"ip netns exec {netpair['b']} iptables -I INPUT -p tcp -s {netpair['addr_a']} -m multiport --dports 3260,3263 "
            "-m statistic --mode random --probability 0.05 -j DROP")
    sh(drop)
    try:
        cl = in_ns(netpair["a"], PY, "-c", CLIENT, netpair["addr_b"], "3260,3261,3263", str(8 * 1024 * 1024))
        out, err = cl.communicate(timeout=120)
        assert cl.returncode == 0, err
        lport = {int(p): int(lp) for p, lp in (line.split() for line in out.splitlines())}
        time.sleep(0.3)
        data = probe.read()
        trace = (trace_instance / "trace").read_text()
    finally:
        sh(drop.replace(" -I ", " -D "), check=False)
        srv.kill()
        probe.close()

    pat = re.compile(rf"saddr={re.escape(netpair['addr_a'])} daddr={re.escape(netpair['addr_b'])}")
    def independent_count(dport):
        return sum(1 for line in trace.splitlines()
                   if f"sport={lport[dport]} dport={dport}" in line and pat.search(line) and line.rstrip().endswith("err=0"))

    independent, independent_other = independent_count(3260), independent_count(3263)
    assert independent > 0 and independent_other > 0, "no retransmits at 5% drop: the rig did not drop anything"

    def conn(dport):
        for c in data.connections:
            if (c.saddr, c.sport, c.daddr, c.dport) == (netpair["addr_a"], lport[dport], netpair["addr_b"], dport):
                return c
        return None

    lossy = conn(3260)
    assert lossy is not None, "the probe has no entry for the lossy connection's exact 4-tuple"
    assert lossy.family == "ipv4" and lossy.storage
    assert lossy.retransmits == independent
    assert lossy.last_state in ("ESTABLISHED", "FIN_WAIT1", "CLOSING", "LAST_ACK")
    # the clean connection: no drop rule, so it counts exactly what the kernel did, which
    # is less than the lossy one (on a loaded 2-CPU machine tail-loss probes and spurious
    # timeouts fire on a clean path too: CI saw 3 where the lossy connection had < 60)
    clean = conn(3261)
    clean_independent = independent_count(3261)
    assert (clean.retransmits if clean else 0) == clean_independent
    assert clean_independent < independent, (clean_independent, independent)
    other = conn(3263)
    if all_connections:
        assert other is not None and not other.storage and other.retransmits == independent_other
        assert any(e.dport == 3263 and e.sport == lport[3263] for e in data.events)
    else:
        assert other is None, "a non-storage connection got a map entry without all_connections"
        assert not any(e.dport == 3263 for e in data.events)
    # the aggregate covers the non-storage connection either way (other host
    # traffic may add to it, never take away)
    assert data.other["retransmit"] >= independent_other
    assert data.totals["retransmit"] == data.other["retransmit"] + sum(c["retransmit"] for c in data.storage.values())
    # Prometheus: the storage remote carries at least this connection's count
    assert data.storage[(netpair["addr_b"], 3260)]["retransmit"] >= independent
    fams = {f.name: f for f in render_tcp_retrans(data)}
    samples = {tuple(s.labels.values()): s.value for s in fams["kvmscope_tcp_retransmits"].samples
               if s.name.endswith("_total")}
    assert samples[(netpair["addr_b"], "3260")] >= independent
    assert ("other", "other") in samples
    assert data.probe.events >= independent and data.probe.run_cnt > 0
    # the stream saw the lossy connection too (rate cap far above this rate)
    assert any(e.dport == 3260 and e.sport == lport[3260] for e in data.events)


def test_lifecycle_connect_close_reset(netpair):
    probe = TcpLifecycleProbe(LoadOptions(storage_ports=(3260, 3262)))
    assert probe.load().state == ATTACHED
    srv = start_server(netpair, "3260")
    rst = start_server(netpair, "3262", "rst")
    try:
        cl = in_ns(netpair["a"], PY, "-c", CLIENT, netpair["addr_b"], "3260", "1000")
        out, err = cl.communicate(timeout=30)
        assert cl.returncode == 0, err
        normal_port = int(out.split()[1])
        cl_pid = cl.pid
        # the server resets this one (SO_LINGER 0)
        cl2 = in_ns(netpair["a"], PY, "-c",
                    "import socket,sys,time; s=socket.create_connection((sys.argv[1],3262)); print(s.getsockname()[1], flush=True);"
                    " s.send(b'hi'); time.sleep(0.5); print(s.recv(1) if True else 0)", netpair["addr_b"])
        out2, _ = cl2.communicate(timeout=30)
        reset_port = int(out2.split()[0])
        time.sleep(0.2)
        data = probe.read()
    finally:
        srv.kill()
        rst.kill()
        probe.close()
    cid = {e.conn_id for e in data.events if e.sport == normal_port and e.dport == 3260}
    assert len(cid) == 1
    ev = [e for e in data.events if e.conn_id in cid]
    kinds = [e.kind for e in ev]
    assert kinds[0] == "connect" and "established" in kinds and kinds[-1] == "close", kinds
    assert ev[0].comm.startswith("python") and ev[0].tgid > 0
    assert ev[-1].age_seconds > 0 and ev[-1].established_seconds > 0
    cid2 = {e.conn_id for e in data.events if e.sport == reset_port and e.dport == 3262}
    ev2 = [e for e in data.events if e.conn_id in cid2]
    assert [e.kind for e in ev2][-1] == "reset" and ev2[-1].reset == "received", ev2
    counts = data.counts[(netpair["addr_b"], 3260)]
    assert counts["connect"] >= 1 and counts["close"] >= 1
    assert data.counts[(netpair["addr_b"], 3262)]["reset"] >= 1


def test_lifecycle_stream_cap_accounts_for_every_record(netpair):
    """The event stream's bookkeeping (probes/common.h ks_stream_*): capped
    at one record per CPU per second, every tracked transition is either
    read from the ring buffer or counted as dropped, never both or neither.
    Port 3267 is this test's alone (nothing else on the host is tracked)."""
    probe = TcpLifecycleProbe(LoadOptions(storage_ports=(3267,), events_per_second=1))
    assert probe.load().state == ATTACHED
    srv = start_server(netpair, "3267")
    try:
        for _ in range(5):
            cl = in_ns(netpair["a"], PY, "-c", CLIENT, netpair["addr_b"], "3267", "1000")
            _, err = cl.communicate(timeout=30)
            assert cl.returncode == 0, err
        time.sleep(0.2)
        data = probe.read()
    finally:
        srv.kill()
        probe.close()
    t = data.totals
    assert t["transitions"] >= 5 * 4, t  # connect, established and the closing steps of 5 connections
    assert data.events and t["stream_dropped"] > 0, t
    assert len(data.events) + t["stream_dropped"] == t["transitions"] - t["untracked_closes"], (len(data.events), t)


FLOOD = """
import socket, sys, time
n = int(sys.argv[1])
socks = []
for i in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((f"127.1.{i // 250}.{i % 250 + 1}", 3260))
    socks.append(s)
time.sleep(1.6)  # the first SYN retransmit comes after the initial RTO (1 s)
for s in socks:
    s.close()
"""


def test_retrans_storage_remotes_bounded_under_syn_flood():
    """What any local user can do: SYNs to many addresses on port 3260 that nobody answers (dropped on
    arrival in a namespace of our own, 127.1.0.0/16 on its loopback). Every remote gets a kernel map entry
    and a SYN retransmit; the agent keeps running totals for at most max_remotes of them and counts the rest."""
    from tests.ebpf.conftest import need_root

    need_root()
    ns, n, cap = "ksprb-flood", 300, 32
    sh(f"ip netns del {ns}", check=False)
    sh(f"ip netns add {ns} && ip -n {ns} link set lo up")
    try:
        sh(f"ip netns exec {ns} iptables -A INPUT -p tcp --dport 3260 --syn -j DROP")
        probe = TcpRetransProbe(LoadOptions(storage_ports=(3260,)), max_remotes=cap, expire_cycles=3)
        rep = probe.load()
        assert rep.state == ATTACHED, rep
        try:
            fl = in_ns(ns, PY, "-c", FLOOD, str(n))
            _, err = fl.communicate(timeout=60)
            assert fl.returncode == 0, err
            time.sleep(0.2)
            kernel = {bytes(k): k for k in probe.bpf[b"storage_conns"].keys()}
            flood = {conn_remote(k) for k in kernel.values()} & {f"127.1.{i // 250}.{i % 250 + 1}" for i in range(n)}
            assert len(flood) >= n * 0.9, f"only {len(flood)} flood remotes reached the kernel map"
            data = probe.read()
            assert len(data.storage) <= cap
            assert probe.dropped["evicted"] >= len(flood) - cap
            # the source exports it (loop health -> kvmscope_collector_dropped_samples_total)
            from agent.ebpf.source import ProbeSource

            src = ProbeSource.__new__(ProbeSource)
            src.probe = probe
            assert src.dropped["evicted"] == probe.dropped["evicted"]
            # the counts the agent does keep are the real ones: one SYN retransmit (or two) per remote
            assert all(1 <= c["retransmit"] <= 3 for c in data.storage.values()), data.storage
        finally:
            probe.close()
    finally:
        sh(f"ip netns del {ns}", check=False)


def conn_remote(k) -> str:
    from agent.ebpf.tcp_retrans import conn_fields

    return conn_fields(k)[3]


CONNECT_MANY = """
import socket, sys
first, n = int(sys.argv[1]), int(sys.argv[2])
for i in range(first, first + n):
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((f"127.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}", 3260))
    except OSError:
        pass  # refused: nobody listens
    s.close()
"""


def test_lifecycle_counts_survive_a_flood_of_remotes():
    """`counts` holds 1024 (remote, port, kind) entries. Connects to 1500 local addresses on port 3260 (refused
    at once) fill it; a portal connected afterwards must still be counted: the map is an LRU and the agent
    keeps bounded running totals (it used to be a plain hash that stayed full for good)."""
    from tests.ebpf.conftest import need_root

    need_root()
    ns = "ksprb-flood"
    sh(f"ip netns del {ns}", check=False)
    sh(f"ip netns add {ns} && ip -n {ns} link set lo up")
    try:
        probe = TcpLifecycleProbe(LoadOptions(storage_ports=(3260,)), max_remotes=64)
        rep = probe.load()
        assert rep.state == ATTACHED, rep
        try:
            fl = in_ns(ns, PY, "-c", CONNECT_MANY, "0", "1500")
            _, err = fl.communicate(timeout=120)
            assert fl.returncode == 0, err
            # about full: an LRU map evicts early, in batches per CPU's local free list, and more so when the
            # flood's events land on both CPUs (829 of 1024 seen under load 20); the point is that it filled
            assert len(list(probe.bpf[b"counts"].keys())) >= 600
            first = probe.read()
            assert len(first.counts) <= 64 and probe.dropped["evicted"] > 0
            portal = in_ns(ns, PY, "-c", CONNECT_MANY, "200000", "1")  # 127.4.50.1: after the flood
            portal.communicate(timeout=30)
            data = probe.read()
            assert data.counts.get(("127.4.50.1", 3260), {}).get("connect", 0) == 1, sorted(data.counts)[:5]
        finally:
            probe.close()
    finally:
        sh(f"ip netns del {ns}", check=False)
