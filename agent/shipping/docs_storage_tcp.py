"""ECS documents for storage TCP connections: one ``metrics-kvmscope.connection`` per socket per cycle.

``source.*`` is the host end, ``destination.*`` the portal; ``process.*`` the
owner (the qemu process for libiscsi, none for the kernel initiator);
``kvmscope.tcp.*`` the kernel's tcp_info. ``kvmscope.tcp.retrans_delta`` is
the growth of tcpi_total_retrans since the previous cycle (what the
"retransmits on storage connections" search looks for).
"""

from __future__ import annotations

import dataclasses
import operator

from agent.records.snapshot import Snapshot
from agent.shipping.ecs import Doc, builder


_TCP_FIELDS: dict[type, tuple[tuple[str, ...], operator.attrgetter]] = {}  # record class -> (names, their getter)


def _tcp_fields(cls) -> tuple[tuple[str, ...], operator.attrgetter]:
    """tcp_info's attributes that go into a document (all but state and ca_state), in their order, and one
    getter of them all (one call per record instead of one per attribute)."""
    t = _TCP_FIELDS.get(cls)
    if t is None:
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("state", "ca_state"))
        t = _TCP_FIELDS[cls] = (names, operator.attrgetter(*names))
    return t


def conn_key(c) -> tuple:
    return (c.src, c.sport, c.dst, c.dport, c.inode)


def _pair(a: str, x, b: str, y) -> dict:
    """{a: x, b: y} without the None values."""
    if x is None:
        return {} if y is None else {b: y}
    return {a: x} if y is None else {a: x, b: y}


@builder(Snapshot.storage_tcp)
def connection_docs(data, prev, snap, prev_snap):
    before = {conn_key(c): c for c in prev.connections} if prev is not None else {}
    vms = snap.vm_by_pid
    dt = snap.timestamp - prev_snap.timestamp if prev_snap is not None else None
    for c in data.connections:
        # written nested (what ecs.finish would make of source.ip, ..., kvmscope.tcp.*), in the order of those
        # dotted names; None values and empty objects left out
        f = {"event.category": ["network"], "event.type": ["connection", "info"]}
        for name, obj in (("source", _pair("ip", c.src, "port", c.sport)),
                          ("destination", _pair("ip", c.dst, "port", c.dport)),
                          ("network", _pair("transport", "tcp", "type", c.family)),
                          ("process", _pair("pid", c.pid, "name", c.comm))):
            if obj:
                f[name] = obj
        k = {}
        vm = vms.get(c.pid) if c.pid else None
        if vm is not None:
            k["vm"] = {"name": vm}
        tcp = {}
        if c.state is not None:
            tcp["state"] = c.state
            k["tcp"] = tcp
        if c.four_tuple is not None:
            k["connection"] = c.four_tuple
        if c.portal is not None:
            k["portal"] = c.portal
        info = c.info
        if info is not None:  # its fields are plain numbers: read them, no deep copy (dataclasses.asdict)
            names, get = _TCP_FIELDS.get(type(info)) or _tcp_fields(type(info))
            for attr, v in zip(names, get(info)):
                if v is not None:
                    tcp[attr] = v
        p = before.get(conn_key(c))
        if p is not None and p.info and c.info and p.info.total_retrans is not None and c.info.total_retrans is not None:
            tcp["retrans_delta"] = max(0, c.info.total_retrans - p.info.total_retrans)
            if dt:
                k["interval_seconds"] = round(dt, 3)
        if tcp and "tcp" not in k:  # no state: the object starts at its first field
            k = _after(k, "tcp", tcp)
        if k:
            f["kvmscope"] = k
        yield Doc("connection", f"{c.four_tuple}#{c.inode}", f)


def _after(k: dict, name: str, value: dict) -> dict:
    """``k`` with ``name`` placed before interval_seconds (where its first dotted field came)."""
    out = {a: b for a, b in k.items() if a != "interval_seconds"}
    out[name] = value
    if "interval_seconds" in k:
        out["interval_seconds"] = k["interval_seconds"]
    return out
