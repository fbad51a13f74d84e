"""Host-wide TCP counters from /proc/net/snmp and /proc/net/netstat.

Sources: ``/proc/net/snmp`` (``Tcp:`` group, RFC 4022 MIB counters kept by
the kernel for IPv4 and IPv6 together) and ``/proc/net/netstat``
(``TcpExt:`` group, Linux-specific: RTO timeouts, fast retransmits, loss
probes...). Both files are pairs of lines: a header line of field names and a
value line, each starting with the group name. Any kernel since 2.6 has them;
the TcpExt field set grows with kernel versions, so fields are read by name
and absent ones are simply absent.

Scope: the network namespace the agent runs in (normally the host's).
Cost: two small reads per cycle.
"""

from __future__ import annotations

import sys


from agent.errors import NoData
from agent.records.tcp import HostTcpCounters
from agent.sources import SourceContext, register


def parse_proc_net_groups(text: str) -> dict[str, dict[str, int]]:
    """Parse the header/value line pairs of /proc/net/snmp or /proc/net/netstat.

    >>> parse_proc_net_groups("Tcp: A B\\nTcp: 1 -1\\n")
    {'Tcp': {'A': 1, 'B': -1}}

    A pair whose lengths differ, or a value that is not an integer, is
    skipped (a partial read must not invent numbers).
    """
    groups: dict[str, dict[str, int]] = {}
    pending: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if name not in pending:
            pending[name] = fields
            continue
        header = pending.pop(name)
        if len(header) != len(fields):
            continue
        try:
            values = [int(v) for v in fields]
        except ValueError:
            continue
        # interned names: every snapshot of the agent's history shares them (~300 strings a cycle otherwise)
        groups[sys.intern(name)] = dict(zip(map(sys.intern, header), values))
    return groups


@register("host_tcp", description="host TCP counters from /proc/net/snmp and /proc/net/netstat")
class HostTcpSource:
    def __init__(self, ctx: SourceContext):
        self.paths = ctx.paths

    def collect(self) -> HostTcpCounters:
        snmp = parse_proc_net_groups(self.paths.read_text(self.paths.proc("net", "snmp")))
        try:
            netstat = parse_proc_net_groups(self.paths.read_text(self.paths.proc("net", "netstat")))
        except FileNotFoundError:
            netstat = {}
        if "Tcp" not in snmp:
            raise NoData("no Tcp group in /proc/net/snmp (kernel without IPv4?)")
        return HostTcpCounters(tcp=snmp["Tcp"], tcp_ext=netstat.get("TcpExt", {}))

    def close(self) -> None:
        pass
