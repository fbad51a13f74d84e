"""kvmscope's eBPF probes inside the kernel-initiator host kvmslab-kh (Debian 6.1
under TCG), held against Debian's own bcc tools (bpfcc-tools) run beside them in
the same guest over the same interval (issue 15, "the eBPF probes in this
kernel": cross-check each against biolatency/tcpretrans/tcplife).

The bcc tools compile their C with the kernel's headers (net/sock.h, net/tcp.h)
in clang inside the guest: under TCG that is about a minute of the guest's one
vCPU on an idle guest (measured: 54-62 s of QEMU CPU time, 9p or tmpfs headers
alike), and far longer beside the guest's O_DIRECT load, its firmware-only VM and
its agent on a loaded machine. So the module's `bcc_tools` fixture starts the
tool with those paused (SIGSTOP, :func:`guest_paused`) until it has attached;
the comparison itself runs with the load going.

A tool runs in its own session with SIGINT restored (the guest agent, started in
the background by the guest's stage-2 shell, has it ignored, and so would every
child: bcc's count modes print their tables on SIGINT) and unbuffered output
(a Python tool writing into a file holds its lines in a block buffer).
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import time
import urllib.request

import pytest

from tests.conftest import wait_for
from tests.lab.test_kernel_host import PORTAL1, PORTAL2, kernelhost_interval, sessions_by_portal

pytestmark = pytest.mark.lab

RUN = "/run/kvmslab-bcc"          # in the guest (tmpfs): the tools' output, errors, pids
COMPILE_TIMEOUT = 600             # a bcc tool's compile + attach in the guest, load paused
LOSS_PCT = 5
LOSS_SECONDS = 20

# started by the guest agent: own session, SIGINT back to default, unbuffered
LAUNCH = r"""
import os, signal, subprocess, sys
out, err, pidfile = sys.argv[1:4]
p = subprocess.Popen(sys.argv[4:], stdin=subprocess.DEVNULL, stdout=open(out, "w"), stderr=open(err, "w"),
                     start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
open(pidfile, "w").write(str(p.pid))
"""


LOAD_PIDS = "/run/kvmslab-load.pid /run/libvirt/qemu/*.pid"   # the O_DIRECT load, the firmware-only VM
AGENT_PID = "/run/kvmscope-run.pid"                             # the guest's `kvmscope run`


@contextlib.contextmanager
def guest_paused(kh, load: bool = True, agent: bool = False):
    """Processes of the guest stopped (SIGSTOP) for the block: with ``load`` its I/O makers (the O_DIRECT
    load, the firmware-only VM: nothing is issued on the map then), with ``agent`` its running kvmscope
    (its probes stay attached and counting), so that bcc's clang has the guest's one vCPU to itself."""
    pids = f"$(cat {LOAD_PIDS if load else ''} {AGENT_PID if agent else ''} 2>/dev/null)"
    kh.sh(f"kill -STOP {pids}")
    try:
        yield
    finally:
        kh.sh(f"kill -CONT {pids}", check=False)


class BccTool:
    """One of Debian's bcc tools (/usr/sbin/NAME-bpfcc) running in the guest."""

    def __init__(self, kh, name: str, *args: str):
        self.kh, self.name, self.args = kh, name, [str(a) for a in args]
        self.out, self.err, self.pidfile = (f"{RUN}/{name}.{x}" for x in ("out", "err", "pid"))
        self.pid: int | None = None
        self.ready_seconds: float | None = None

    def start(self):
        self.kh.run("mkdir", "-p", RUN)
        self.kh.run("python3", "-c", LAUNCH, self.out, self.err, self.pidfile,
                    f"/usr/sbin/{self.name}-bpfcc", *self.args)
        self.pid = int(self.kh.read(self.pidfile))

    def alive(self) -> bool:
        return self.kh.exec("kill", "-0", str(self.pid), check=False)["rc"] == 0

    def output(self) -> str:
        return self.kh.exec("cat", self.out, check=False)["stdout"]

    def wait_ready(self, timeout: float = COMPILE_TIMEOUT, marker: str = "Tracing"):
        """Until the tool prints `marker` (tracing tools: their 'Tracing ...' line, printed once bcc has
        compiled, loaded and attached)."""
        t0 = time.monotonic()

        def ready():
            if marker in self.output():
                return True
            if not self.alive():
                raise AssertionError(f"{self.name} exited before attaching:\n"
                                     f"{self.kh.exec('cat', self.err, check=False)['stdout']}")
            return False

        end = t0 + timeout
        while not ready():
            assert time.monotonic() < end, f"{self.name} not attached after {timeout}s"
            time.sleep(2)
        self.ready_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 120) -> str:
        """SIGINT (a count mode prints its table then), wait for the exit; its output."""
        if self.pid is None:
            return ""
        self.kh.exec("kill", "-INT", str(self.pid), check=False)
        res = self.kh.exec(sh=f"for i in $(seq {int(timeout * 5)}); do kill -0 {self.pid} 2>/dev/null || exit 0; "
                              f"sleep 0.2; done; kill -KILL {self.pid}; exit 1", timeout=timeout + 10, check=False)
        out = self.output()
        self.pid = None
        assert res["rc"] == 0, f"{self.name} did not exit on SIGINT within {timeout}s:\n{out[-2000:]}"
        return out


@pytest.fixture(scope="module")
def bcc_tools(kernel_host):
    """bcc's tcpretrans -c started in the guest once for the module, after the guest's agent has its probes
    attached. Its compile is what costs: done with the whole guest paused but its kernel (load, VM, agent)."""
    kh = kernel_host
    t0 = time.monotonic()
    tools = {"tcpretrans": BccTool(kh, "tcpretrans", "-c")}
    try:
        with guest_paused(kh):
            # the agent compiles its probes in children at start (minutes under TCG)
            first = wait_for(lambda: (lambda s: s if s.tcp_retrans is not None and s.block_io is not None
                                      else None)(latest_snapshot(kh)),
                             COMPILE_TIMEOUT, "the guest agent's tcp_retrans and block_io probes", step=2)
            probe_wait = time.monotonic() - t0
            with guest_paused(kh, load=False, agent=True):
                tools["tcpretrans"].start()
                tools["tcpretrans"].wait_ready()
        print(f"\nin the guest: kvmscope's probes attached after {probe_wait:.0f}s (load paused), tcpretrans -c "
              f"{tools['tcpretrans'].ready_seconds:.0f}s after its start (load and agent paused)")
        yield {"first": first, **tools}
    finally:
        for tool in tools.values():
            if tool.pid is not None:
                kh.exec("kill", "-KILL", str(tool.pid), check=False)


def parse_tcpretrans_counts(text: str) -> dict[tuple[str, int, str, int], int]:
    """`tcpretrans -c` table -> {(laddr, lport, raddr, rport): retransmits}. Pure."""
    out = {}
    for m in re.finditer(r"^\[([0-9a-fA-F.:]+)\]#(\d+)\s+<->\s+\[([0-9a-fA-F.:]+)\]#(\d+)\s+(\d+)\s*$", text, re.M):
        out[(m.group(1), int(m.group(2)), m.group(3), int(m.group(4)))] = int(m.group(5))
    return out


def guest_api(kh, path: str, timeout: float = 30):
    """GET one of the guest agent's API endpoints over its /metrics listener (TLS + client certificate)."""
    tls = kh.record["metrics_tls"]
    ctx = ssl.create_default_context(cafile=tls["ca"])
    ctx.load_cert_chain(tls["cert"], tls["key"])
    base = kh.record["metrics_url"].rsplit("/metrics", 1)[0]
    with urllib.request.urlopen(base + path, context=ctx, timeout=timeout) as r:
        return json.loads(r.read())


def latest_snapshot(kh):
    """The running guest agent's latest snapshot (agent/api.py), decoded."""
    from agent.codec import snapshot_from_json

    (d,) = guest_api(kh, "/api/v1/snapshots?last=1")
    return snapshot_from_json(d)


def next_snapshot(kh, after_seq: int, timeout: float):
    return wait_for(lambda: (lambda s: s if s.seq > after_seq else None)(latest_snapshot(kh)), timeout,
                    f"a guest agent snapshot after #{after_seq}", step=1)


def conn_retransmits(snap, conn: tuple[str, int, str, int]) -> int:
    """kvmscope's eBPF count (tcp:tcp_retransmit_skb) of one connection in a snapshot; 0 when the probe has
    not seen it retransmit."""
    tr = snap.tcp_retrans
    assert tr is not None, f"no tcp_retrans data in the guest agent's snapshot: {snap.health.get('ebpf_tcp_retrans')}"
    for c in tr.connections:
        if (c.saddr, c.sport, c.daddr, c.dport) == conn:
            return c.retransmits
    return 0


def portal_retransmits(metrics: str, addr: str) -> int:
    m = re.search(r'^kvmscope_tcp_retransmits_total\{remote_address="%s",remote_port="3260"\} (\S+)$'
                  % re.escape(addr), metrics, re.M)
    return int(float(m.group(1))) if m else 0


def session_conn(kh, sid: int) -> tuple[str, int, str, int]:
    """(local address, local port, portal address, port) of a session's connection, from sysfs."""
    d = f"/sys/class/iscsi_connection/connection{sid}:0"
    local_port = int(kh.read(f"{d}/local_port"))
    addr, port = kh.read(f"{d}/persistent_address").strip(), int(kh.read(f"{d}/persistent_port"))
    local = kh.sh(f"ss -tnH state established '( sport = :{local_port} )' | awk '{{print $3}}'").strip()
    return local.rsplit(":", 1)[0], local_port, addr, port


def test_loss_on_portal1_retransmits_agree_with_tcpretrans(kernel_host, lab, bcc_tools):
    """`lab loss 5 --portal 1`: the guest's kvmscope (tcp_retrans probe, read from its running agent) counts
    the retransmits of the portal-1 session's connection as bcc's `tcpretrans -c` does over the same
    interval, within 5%; the portal-2 session's connection retransmits next to nothing in both."""
    kh = kernel_host
    interval = kernelhost_interval()
    by_portal = sessions_by_portal(kh)
    conn1, conn2 = session_conn(kh, by_portal[PORTAL1]), session_conn(kh, by_portal[PORTAL2])
    assert f"{conn1[2]}:{conn1[3]}" == PORTAL1 and f"{conn2[2]}:{conn2[3]}" == PORTAL2, (conn1, conn2)
    tool, first = bcc_tools["tcpretrans"], bcc_tools["first"]
    t0 = time.monotonic()
    try:
        # mark A: a snapshot taken after the tool attached whose counts on both connections equal those of a
        # reference snapshot taken before it attached (the first reference: `first`, before the tool
        # started): nothing retransmitted between the tool's attach and A, so its count and kvmscope's delta
        # from A start at the same retransmit
        ref = first
        at_ready = latest_snapshot(kh).seq
        while True:
            a = next_snapshot(kh, max(ref.seq, at_ready), 3 * interval)
            if all(conn_retransmits(a, c) == conn_retransmits(ref, c) for c in (conn1, conn2)):
                break
            assert time.monotonic() - t0 < COMPILE_TIMEOUT + 180, "retransmits on the guest's sessions never settle"
            ref = a
        m_a = kh.metrics()
        lab.run("loss", LOSS_PCT, "--portal", 1)
        try:
            time.sleep(LOSS_SECONDS)
        finally:
            lab.run("loss", 0, "--portal", 1)
        # mark B, with the load paused (no new data: what is in flight is acked within a second or two): the
        # first of two consecutive snapshots with equal counts whose cycles began after the pause (not the
        # one in progress then), then the tool's table
        with guest_paused(kh):
            prev = next_snapshot(kh, latest_snapshot(kh).seq + 1, 3 * interval)
            while True:
                b = next_snapshot(kh, prev.seq, 3 * interval)
                if all(conn_retransmits(b, c) == conn_retransmits(prev, c) for c in (conn1, conn2)):
                    break
                prev = b
            m_b = kh.metrics()
            out = tool.stop()
    finally:
        if tool.pid is not None:
            kh.exec("kill", "-KILL", str(tool.pid), check=False)
    bcc = parse_tcpretrans_counts(out)
    ours = {c: conn_retransmits(b, c) - conn_retransmits(a, c) for c in (conn1, conn2)}
    theirs = {c: bcc.get(c, 0) for c in (conn1, conn2)}
    portal1_metric = portal_retransmits(m_b, conn1[2]) - portal_retransmits(m_a, conn1[2])
    took = time.monotonic() - t0
    print(f"loss {LOSS_PCT}% on portal 1 for {LOSS_SECONDS}s, snapshots #{a.seq}..#{b.seq}: "
          f"portal-1 session {conn1}: kvmscope {ours[conn1]} (metric {portal1_metric}), tcpretrans {theirs[conn1]}"
          f"{'' if not theirs[conn1] else f' ({100 * (ours[conn1] - theirs[conn1]) / theirs[conn1]:+.1f}%)'}; "
          f"portal-2 session {conn2}: kvmscope {ours[conn2]}, tcpretrans {theirs[conn2]}; "
          f"test took {took:.0f}s\ntcpretrans table:\n{out}")
    assert theirs[conn1] >= 20, f"too few retransmits to compare: {bcc}"
    assert abs(ours[conn1] - theirs[conn1]) <= 0.05 * theirs[conn1], (ours, theirs)
    # the exported per-portal counter says the same (it sums the portal's connections: one here)
    assert portal1_metric == ours[conn1], (portal1_metric, ours)
    assert ours[conn2] <= 2 and theirs[conn2] <= 2, (ours, theirs)
    # every flow tcpretrans saw to a portal is one of the two sessions' connections
    assert {k for k in bcc if k[3] == 3260} <= {conn1, conn2}, bcc
