"""Prometheus rendering of the host-wide TCP counters (agent/sources/host_tcp.py)."""

from __future__ import annotations

from typing import Iterable

from agent.exporters import catalog as C
from agent.exporters.registry import renderer
from agent.records.snapshot import Snapshot
from agent.records.tcp import HostTcpCounters


@renderer(Snapshot.host_tcp)
def render_host_tcp(data: HostTcpCounters) -> Iterable:
    groups = {"Tcp": data.tcp, "TcpExt": data.tcp_ext}
    for (group, field), d in C.HOST_TCP_FIELDS.items():
        value = groups[group].get(field)
        if value is None:
            continue  # older kernel without this field: absent, not zero
        fam = d.family()
        fam.add_metric([], value)
        yield fam

