"""ECS documents for storage TCP connections: one ``metrics-kvmscope.connection`` per socket per cycle.

``source.*`` is the host end, ``destination.*`` the portal; ``process.*`` the
owner (the qemu process for libiscsi, none for the kernel initiator);
``kvmscope.tcp.*`` the kernel's tcp_info. ``kvmscope.tcp.retrans_delta`` is
the growth of tcpi_total_retrans since the previous cycle (what the
"retransmits on storage connections" search looks for).
"""

from __future__ import annotations

import dataclasses

from agent.records.snapshot import Snapshot
from agent.shipping.ecs import Doc, builder


_TCP_FIELDS: dict[type, tuple[tuple[str, str], ...]] = {}  # record class -> (attribute, document field)


def _tcp_fields(cls) -> tuple[tuple[str, str], ...]:
    """tcp_info's attributes that go into a document (all but state and ca_state), in their order."""
    t = _TCP_FIELDS.get(cls)
    if t is None:
        t = _TCP_FIELDS[cls] = tuple((f.name, f"kvmscope.tcp.{f.name}") for f in dataclasses.fields(cls)
                                     if f.name not in ("state", "ca_state"))
    return t


def conn_key(c) -> tuple:
    return (c.src, c.sport, c.dst, c.dport, c.inode)


@builder(Snapshot.storage_tcp)
def connection_docs(data, prev, snap, prev_snap):
    before = {conn_key(c): c for c in prev.connections} if prev is not None else {}
    vms = snap.vm_by_pid
    dt = snap.timestamp - prev_snap.timestamp if prev_snap is not None else None
    for c in data.connections:
        f = {
            "event.category": ["network"],
            "event.type": ["connection", "info"],
            "source.ip": c.src,
            "source.port": c.sport,
            "destination.ip": c.dst,
            "destination.port": c.dport,
            "network.transport": "tcp",
            "network.type": c.family,
            "process.pid": c.pid,
            "process.name": c.comm,
            "kvmscope.vm.name": vms.get(c.pid) if c.pid else None,
            "kvmscope.tcp.state": c.state,
            "kvmscope.connection": c.four_tuple,
            "kvmscope.portal": c.portal,
        }
        info = c.info
        if info is not None:  # its fields are plain numbers: read them, no deep copy (dataclasses.asdict)
            for attr, key in _TCP_FIELDS.get(type(info)) or _tcp_fields(type(info)):
                v = getattr(info, attr)
                if v is not None:
                    f[key] = v
        p = before.get(conn_key(c))
        if p is not None and p.info and c.info and p.info.total_retrans is not None and c.info.total_retrans is not None:
            f["kvmscope.tcp.retrans_delta"] = max(0, c.info.total_retrans - p.info.total_retrans)
            if dt:
                f["kvmscope.interval_seconds"] = round(dt, 3)
        yield Doc("connection", f"{c.four_tuple}#{c.inode}", f)
