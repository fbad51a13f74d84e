"""ECS documents for host_tcp: one ``metrics-kvmscope.host`` document per cycle."""

from __future__ import annotations

from agent.records.snapshot import Snapshot
from agent.shipping.ecs import Doc, builder

# /proc/net/{snmp,netstat} field -> kvmscope.host.tcp.<name>
FIELDS = {
    ("tcp", "ActiveOpens"): "active_opens",
    ("tcp", "PassiveOpens"): "passive_opens",
    ("tcp", "AttemptFails"): "attempt_fails",
    ("tcp", "EstabResets"): "estab_resets",
    ("tcp", "CurrEstab"): "curr_estab",
    ("tcp", "InSegs"): "in_segs",
    ("tcp", "OutSegs"): "out_segs",
    ("tcp", "RetransSegs"): "retrans_segs",
    ("tcp", "InErrs"): "in_errs",
    ("tcp", "OutRsts"): "out_rsts",
    ("tcp_ext", "TCPTimeouts"): "rto_timeouts",
    ("tcp_ext", "TCPFastRetrans"): "fast_retrans",
    ("tcp_ext", "TCPLostRetransmit"): "lost_retransmit",
    ("tcp_ext", "TCPSynRetrans"): "syn_retrans",
    ("tcp_ext", "TCPLossProbes"): "loss_probes",
    ("tcp_ext", "TCPAbortOnTimeout"): "abort_on_timeout",
}


@builder(Snapshot.host_tcp)
def host_docs(data, prev, snap, prev_snap):
    f = {"event.category": ["host", "network"], "event.type": ["info"]}
    for (group, name), key in FIELDS.items():
        v = getattr(data, group).get(name)
        if v is not None:
            f[f"kvmscope.host.tcp.{key}"] = v
    if prev is not None and prev_snap is not None:
        dt = snap.timestamp - prev_snap.timestamp
        d = data.tcp.get("RetransSegs", 0) - prev.tcp.get("RetransSegs", 0)
        out = data.tcp.get("OutSegs", 0) - prev.tcp.get("OutSegs", 0)
        if dt > 0 and d >= 0:
            f["kvmscope.interval_seconds"] = round(dt, 3)
            f["kvmscope.host.tcp.retrans_per_second"] = round(d / dt, 3)
            f["kvmscope.host.tcp.retrans_ratio"] = round(d / out, 6) if out > 0 else 0.0
    yield Doc("host", "host", f)
