"""iSCSI command latency inside QEMU (QEMU's own libiscsi initiator), per
process, iSCSI context, LUN and op, from uprobes on libiscsi.so.7.

See agent/ebpf/libiscsi.py and docs/probes.md. No eBPF or no libiscsi on
the host: no data, with the reason and the fix.
"""

from agent.ebpf.libiscsi import LibiscsiProbe
from agent.ebpf.source import ProbeSource
from agent.sources import register


@register("ebpf_libiscsi", description="iSCSI command latency per QEMU process/LUN/op (eBPF uprobes on libiscsi.so.7)")
class EbpfLibiscsiSource(ProbeSource):
    probe_class = LibiscsiProbe
