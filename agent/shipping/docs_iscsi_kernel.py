"""ECS documents for open-iscsi kernel sessions: one ``metrics-kvmscope.iscsi_session`` per session per cycle."""

from __future__ import annotations

from agent.records.addr import fmt_portal
from agent.records.snapshot import Snapshot
from agent.shipping.ecs import Doc, builder
from agent.shipping.fields import ISCSI_SESSION


@builder(Snapshot.iscsi)
def session_docs(data, prev, snap, prev_snap):
    known = {k.rsplit(".", 1)[1] for k in ISCSI_SESSION.fields if k.startswith("kvmscope.iscsi.stats.")}
    for s in data.sessions:
        c = s.connections[0] if s.connections else None
        f = {
            "event.category": ["network"],
            "event.type": ["info"],
            "kvmscope.iscsi.session.sid": s.sid,
            "kvmscope.iscsi.target": s.target,
            "kvmscope.iscsi.session.tpgt": s.tpgt,
            "kvmscope.iscsi.session.state": s.state,
            "kvmscope.iscsi.session.recovery_tmo": s.recovery_tmo,
            "kvmscope.iscsi.session.iface": s.iface,
            "kvmscope.iscsi.session.initiator": s.initiator,
            "kvmscope.iscsi.disks": [d.name for d in s.disks if d.name] or None,
        }
        if c is not None:
            addr, port = c.address or c.persistent_address, c.port or c.persistent_port
            f.update({
                "kvmscope.iscsi.connection.cid": c.cid,
                "kvmscope.iscsi.connection.state": c.state,
                "kvmscope.iscsi.connection.local_port": c.local_port,
                "kvmscope.iscsi.connection.ping_tmo": c.ping_tmo,
                "kvmscope.iscsi.connection.recv_tmo": c.recv_tmo,
                "destination.ip": addr,
                "destination.port": port,
                "kvmscope.portal": fmt_portal(addr, port),
            })
        for k, v in (s.stats or {}).items():
            if k in known:
                f[f"kvmscope.iscsi.stats.{k}"] = v
        yield Doc("iscsi_session", f"sid:{s.sid}", f)
