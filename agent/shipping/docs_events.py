"""Events from comparing two consecutive cycles: ``logs-kvmscope.events``.

* ``iscsi-session-state-change``: an open-iscsi session's state (or its
  connection's state) differs from the previous cycle, or a session
  appeared/vanished;
* ``tcp-connection-state-change``: a storage connection appeared, vanished
  or changed TCP state;
* ``retransmit-burst``: a storage connection retransmitted segments since
  the previous cycle (tcpi_total_retrans grew).

The first cycle only records a baseline (no "appeared" storm at start-up).
"""

from __future__ import annotations

from agent.shipping.docs_storage_tcp import conn_key
from agent.shipping.ecs import Doc, snapshot_builder


def _sessions(snap):
    d = snap.iscsi if snap is not None else None
    return {s.sid: s for s in d.sessions} if d is not None else None


def _conns(snap):
    d = snap.storage_tcp if snap is not None else None
    return {conn_key(c): c for c in d.connections} if d is not None else None


@snapshot_builder
def change_events(snap, prev_snap):
    if prev_snap is None:
        return
    now, before = _sessions(snap), _sessions(prev_snap)
    if now is not None and before is not None:
        for sid in sorted(set(now) | set(before)):
            a, b = before.get(sid), now.get(sid)
            sa = (a.state if a else "ABSENT", a.connections[0].state if a and a.connections else None)
            sb = (b.state if b else "ABSENT", b.connections[0].state if b and b.connections else None)
            if sa == sb:
                continue
            s = b or a
            frm, to = "/".join(x for x in sa if x), "/".join(x for x in sb if x)
            yield Doc(
                "events",
                f"session:{sid}:{frm}->{to}",
                {
                    "event.category": ["network"],
                    "event.type": ["change"],
                    "event.action": "iscsi-session-state-change",
                    "message": f"iSCSI session {sid} ({s.target}): {frm} -> {to}",
                    "kvmscope.iscsi.session.sid": sid,
                    "kvmscope.iscsi.target": s.target,
                    "kvmscope.change.from": frm,
                    "kvmscope.change.to": to,
                },
            )
    cn, cb = _conns(snap), _conns(prev_snap)
    if cn is None or cb is None:
        return
    vms = snap.vm_by_pid
    for key in sorted(set(cn) | set(cb), key=str):
        a, b = cb.get(key), cn.get(key)
        c = b or a
        common = {
            "event.category": ["network"],
            "source.ip": c.src,
            "source.port": c.sport,
            "destination.ip": c.dst,
            "destination.port": c.dport,
            "network.transport": "tcp",
            "process.pid": c.pid,
            "process.name": c.comm,
            "kvmscope.vm.name": vms.get(c.pid) if c.pid else None,
            "kvmscope.connection": c.four_tuple,
            "kvmscope.portal": c.portal,
        }
        sa, sb = (a.state if a else "ABSENT"), (b.state if b else "ABSENT")
        if sa != sb:
            yield Doc(
                "events",
                f"conn:{c.four_tuple}#{c.inode}:{sa}->{sb}",
                dict(common, **{
                    "event.type": ["connection", "change"],
                    "event.action": "tcp-connection-state-change",
                    "message": f"storage connection {c.four_tuple}: {sa} -> {sb}",
                    "kvmscope.change.from": sa,
                    "kvmscope.change.to": sb,
                    "kvmscope.tcp.state": c.state,
                }),
            )
        if a and b and a.info and b.info and a.info.total_retrans is not None and b.info.total_retrans is not None:
            d = b.info.total_retrans - a.info.total_retrans
            if d > 0:
                yield Doc(
                    "events",
                    f"retrans:{c.four_tuple}#{c.inode}",
                    dict(common, **{
                        "event.type": ["connection", "info"],
                        "event.action": "retransmit-burst",
                        "message": f"storage connection {c.four_tuple}: {d} segments retransmitted",
                        "kvmscope.tcp.retrans_delta": d,
                        "kvmscope.tcp.state": c.state,
                    }),
                )
