"""Block I/O latency per device/op and per issuing process, from the block_io
eBPF probe.

Tracepoints block:block_rq_insert/issue/complete; see agent/ebpf/block_io.py
and docs/probes.md. No eBPF on the host: no data, with the reason and the fix.
"""

from agent.ebpf.block_io import BlockIoProbe
from agent.ebpf.source import ProbeSource
from agent.sources import register


@register("ebpf_block_io", description="block I/O latency histograms per device/op and process (eBPF, block:block_rq_*)")
class EbpfBlockIoSource(ProbeSource):
    probe_class = BlockIoProbe
