"""Connect/established/close/reset of storage-port TCP connections, from the
tcp_lifecycle eBPF probe.

Tracepoint sock:inet_sock_set_state (+ tcp resets); see
agent/ebpf/tcp_lifecycle.py and docs/probes.md. No eBPF on the host: no data,
with the reason and the fix.
"""

from agent.ebpf.source import ProbeSource
from agent.ebpf.tcp_lifecycle import TcpLifecycleProbe
from agent.sources import register


@register("ebpf_tcp_lifecycle", description="storage-port TCP connection lifecycle (eBPF, sock:inet_sock_set_state)")
class EbpfTcpLifecycleSource(ProbeSource):
    probe_class = TcpLifecycleProbe
