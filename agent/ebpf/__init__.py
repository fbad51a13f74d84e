"""eBPF probes (bcc: tracepoints, and uprobes on libiscsi) and their loader.

``probes/<name>.bpf.c`` holds the kernel C; each has a Python side here
that builds its ``-D`` switches, reads its maps and decodes them:

  tcp_retrans    tcp:tcp_retransmit_skb (+ synack, send/receive reset)
  block_io       block:block_rq_insert/issue/complete
  tcp_lifecycle  sock:inet_sock_set_state (+ tcp resets)
  libiscsi       uprobes on libiscsi.so.7 (QEMU's iSCSI initiator)

:mod:`agent.ebpf.loader` (the Probe base and the compile thread) checks the
requirements (:mod:`agent.ebpf.requirements`), compiles, loads and attaches
each probe once in a short-lived child process (:mod:`agent.ebpf.compiler`,
the only importer of bcc) that hands the fds over, reads the maps with plain
bpf(2) calls (:mod:`agent.ebpf.bpfsys`: no bcc, no LLVM in the agent),
reports attached/unavailable/failed with reason and fix,
and measures the probes' own cost (:mod:`agent.ebpf.bpfstats` switches the
kernel's BPF run-time statistics on). :mod:`agent.ebpf.source` is the glue to
the agent loop; it takes ``SourceContext`` from :mod:`agent.source_api`, never
from ``agent.sources``. See docs/probes.md.
"""

from __future__ import annotations


def probe_classes() -> dict:
    from agent.ebpf.block_io import BlockIoProbe
    from agent.ebpf.libiscsi import LibiscsiProbe
    from agent.ebpf.tcp_lifecycle import TcpLifecycleProbe
    from agent.ebpf.tcp_retrans import TcpRetransProbe

    return {c.name: c for c in (TcpRetransProbe, BlockIoProbe, TcpLifecycleProbe, LibiscsiProbe)}
