"""ECS documents for VM disks (libvirt / QMP sources), joined to their storage path.

One ``metrics-kvmscope.vm_disk`` document per VM disk per cycle: identity
(VM, disk, backend, IQN/LUN, portal, session), the cumulative QEMU counters,
and per-interval IOPS and average latency computed against the previous
cycle (latency = Δtotal_time_ns / Δrequests, QEMU's own accounting); the
interval's p50/p90/p99 from the disk's latency histogram
(``snap.vm_disk_latency``: QEMU's own, else libiscsi uprobes or the VM's
QEMU process on the host block device; ``latency_source`` names it; a
percentile is the upper bound of its bucket), and a libiscsi disk's
commands in flight, aborts and reconnects.
"""

from __future__ import annotations

import operator

from agent.records.addr import fmt_endpoint
from agent.records.disk_latency import disk_percentiles
from agent.records.rates import mean_latencies_ns
from agent.shipping.ecs import Doc, snapshot_builder


_STATS = ("rd_reqs", "rd_bytes", "rd_time_ns", "wr_reqs", "wr_bytes", "wr_time_ns", "fl_reqs", "fl_time_ns",
          "failed_reqs", "idle_time_ns")
_stats = operator.attrgetter(*_STATS)  # one call per record instead of one getattr per counter


def _rate(a, b, dt):
    if a is None or b is None or a < b:
        return None
    return round((a - b) / dt, 3)


def _ms4(v):
    return None if v is None or v == _INF else round(v, 4)


_INF = float("inf")


@snapshot_builder
def vm_disk_docs(snap, prev_snap):
    cur = snap.vm_disks if snap is not None else {}
    if not cur:
        return
    prev = prev_snap.vm_disks if prev_snap is not None else {}
    paths = {}
    try:
        for p in snap.paths:
            paths.setdefault((p.vm, p.disk), p)
    except Exception:  # the join is a bonus: documents go out without it
        paths = {}
    try:
        lat = snap.vm_disk_latency
        pct = disk_percentiles(prev_snap.vm_disk_latency if prev_snap is not None else None, lat)
        iscsi = {(x.vm, x.disk): x for x in lat.iscsi}
    except Exception:  # a bonus too
        pct, iscsi = {}, {}
    dt = snap.timestamp - prev_snap.timestamp if prev_snap is not None else 0.0
    for key, (vm, disk) in sorted(cur.items()):
        # Written nested (what ecs.finish would make of the dotted names kvmscope.vm.name ...), in the order
        # of those names (docs/elasticsearch.md); None values are left out, empty objects too.
        p = paths.get(key)
        v = {"name": vm.name, "uuid": vm.uuid, "state": vm.state, "manager": vm.manager}
        if None in v.values():
            v = {a: b for a, b in v.items() if b is not None}
        d = {"target": disk.target, "kind": disk.kind, "protocol": disk.protocol, "backend": disk.backend,
             "source": disk.source}
        if None in d.values():
            d = {a: b for a, b in d.items() if b is not None}
        k = {"vm": v, "disk": d}
        i = {}
        if disk.iqn is not None:
            i["target"] = disk.iqn
        if disk.lun is not None:
            i["lun"] = disk.lun
        if i:
            k["iscsi"] = i
        if p is not None:
            portal = p.portal or (fmt_endpoint(*disk.hosts[0]) if disk.hosts else None)
            if portal is not None:
                k["portal"] = portal
            if p.session is not None:
                i["session"] = {"sid": p.session}
                if "iscsi" not in k:
                    k["iscsi"] = i
            if p.host_device is not None:
                d["host_device"] = p.host_device
            if p.connection is not None:
                k["connection"] = p.connection
        elif disk.hosts:
            k["portal"] = fmt_endpoint(*disk.hosts[0])
        s = disk.stats
        if s is not None:
            st = {a: b for a, b in zip(_STATS, _stats(s)) if b is not None}
            if st:
                d["stats"] = st
            pv = prev.get(key)
            ps = pv[1].stats if pv else None
            if ps is not None and dt > 0:
                k["interval_seconds"] = round(dt, 3)
                r = _rate(s.rd_reqs, ps.rd_reqs, dt)
                if r is not None:
                    d["read_iops"] = r
                w = _rate(s.wr_reqs, ps.wr_reqs, dt)
                if w is not None:
                    d["write_iops"] = w
                rd, wr, both = mean_latencies_ns(ps, s)
                if rd is not None:
                    d["read_latency_ms"] = round(rd / 1e6, 4)
                if wr is not None:
                    d["write_latency_ms"] = round(wr / 1e6, 4)
                if both is not None:
                    d["latency_ms"] = round(both / 1e6, 4)
        q = pct.get(key) if prev_snap is not None else None
        if q is not None:
            if q.source is not None:
                d["latency_source"] = q.source
            if q.requests is not None:
                d["latency_requests"] = q.requests
            for name, val in (("latency_p50_ms", q.p50_ms), ("latency_p90_ms", q.p90_ms), ("latency_p99_ms", q.p99_ms)):
                val = _ms4(val)
                if val is not None:
                    d[name] = val
            if q.mean_ms is not None:
                d["latency_hist_mean_ms"] = round(q.mean_ms, 4)
        x = iscsi.get(key)
        if x is not None:
            xi = {"in_flight": x.inflight, "aborts": x.aborts, "reconnects": x.reconnects}
            if None in xi.values():
                xi = {a: b for a, b in xi.items() if b is not None}
            if xi:
                d["iscsi"] = xi
        f = {"event.category": ["host"], "event.type": ["info"], "kvmscope": k}
        if vm.pid is not None:
            f["process"] = {"pid": vm.pid}
        yield Doc("vm_disk", f"{vm.name}/{disk.target}", f)
