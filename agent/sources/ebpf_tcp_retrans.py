"""TCP retransmits and resets per connection, from the tcp_retrans eBPF probe.

Tracepoints tcp:tcp_retransmit_skb (+ tcp_retransmit_synack, tcp_send_reset,
tcp_receive_reset where present); see agent/ebpf/tcp_retrans.py and
docs/probes.md. No eBPF on the host: no data, with the reason and the fix.
"""

from agent.ebpf.source import ProbeSource
from agent.ebpf.tcp_retrans import TcpRetransProbe
from agent.sources import register


@register("ebpf_tcp_retrans", description="TCP retransmits/resets per connection (eBPF, tcp:tcp_retransmit_skb)")
class EbpfTcpRetransSource(ProbeSource):
    probe_class = TcpRetransProbe
