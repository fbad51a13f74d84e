"""Events from the eBPF probes (``logs-kvmscope.events``): storage-port TCP lifecycle
(connect, established, close, reset) and per-event retransmits/resets.

Probe events carry CLOCK_MONOTONIC nanoseconds; they become wall time once,
here, against the clocks read when the documents are built (right after the
cycle). Ids use the event's own monotonic time and 4-tuple, not the cycle.
Only storage-port events are shipped (the probes say which are).
"""

from __future__ import annotations

import time

from agent.records.addr import fmt_conn, fmt_endpoint
from agent.records.snapshot import Snapshot
from agent.shipping.ecs import Doc, builder


def _wall(monotonic_ns: int) -> float:
    return time.time() - (time.monotonic_ns() - monotonic_ns) / 1e9


def _conn(family, saddr, sport, daddr, dport, pid=None, comm=None) -> dict:
    return {
        "source.ip": saddr, "source.port": sport, "destination.ip": daddr, "destination.port": dport,
        "network.transport": "tcp", "network.type": family, "process.pid": pid or None, "process.name": comm or None,
        "kvmscope.connection": fmt_conn(saddr, sport, daddr, dport), "kvmscope.portal": fmt_endpoint(daddr, dport),
    }


@builder(Snapshot.tcp_lifecycle)
def lifecycle_docs(data, prev, snap, prev_snap):
    for e in getattr(data, "events", ()):
        f = _conn(e.family, e.saddr, e.sport, e.daddr, e.dport, e.tgid, e.comm)
        f.update({
            "event.category": ["network"],
            "event.type": ["connection", "change"],
            "event.action": f"tcp-{e.kind}",
            "message": f"storage connection {f['kvmscope.connection']}: {e.kind} ({e.oldstate} -> {e.newstate})"
                       + (f", reset {e.reset}" if e.reset else ""),
            "kvmscope.change.from": e.oldstate,
            "kvmscope.change.to": e.newstate,
            "kvmscope.tcp.state": e.newstate,
        })
        yield Doc("events", f"lifecycle:{e.conn_id}:{e.monotonic_ns}:{e.kind}:{f['kvmscope.connection']}", f,
                  timestamp=_wall(e.monotonic_ns), id_time=False)


@builder(Snapshot.tcp_retrans)
def retrans_docs(data, prev, snap, prev_snap):
    for e in getattr(data, "events", ()):
        if not e.storage:
            continue
        f = _conn(e.family, e.saddr, e.sport, e.daddr, e.dport)
        f.update({
            "event.category": ["network"],
            "event.type": ["connection", "info"],
            "event.action": f"tcp-{e.kind}".replace("_", "-"),
            "message": f"storage connection {f['kvmscope.connection']}: {e.kind} in {e.state}",
            "kvmscope.tcp.state": e.state,
        })
        yield Doc("events", f"retrans:{e.monotonic_ns}:{e.kind}:{f['kvmscope.connection']}", f,
                  timestamp=_wall(e.monotonic_ns), id_time=False)
