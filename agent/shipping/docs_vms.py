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

from agent.records.addr import fmt_endpoint
from agent.records.disk_latency import disk_percentiles
from agent.records.rates import mean_latency_ms
from agent.shipping.ecs import Doc, snapshot_builder


def _rate(cur, prev, attr, dt):
    a, b = getattr(cur, attr), getattr(prev, attr)
    if a is None or b is None or a < b:
        return None
    return (a - b) / dt


def _lat_ms(cur, prev, op):
    ms = mean_latency_ms(prev, cur, op)
    return None if ms is None else round(ms, 4)


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
    for (vmname, target), (vm, disk) in sorted(cur.items()):
        p = paths.get((vmname, target))
        f = {
            "event.category": ["host"],
            "event.type": ["info"],
            "kvmscope.vm.name": vm.name,
            "kvmscope.vm.uuid": vm.uuid,
            "kvmscope.vm.state": vm.state,
            "kvmscope.vm.manager": vm.manager,
            "process.pid": vm.pid,
            "kvmscope.disk.target": disk.target,
            "kvmscope.disk.kind": disk.kind,
            "kvmscope.disk.protocol": disk.protocol,
            "kvmscope.disk.backend": disk.backend,
            "kvmscope.disk.source": disk.source,
            "kvmscope.iscsi.target": disk.iqn,
            "kvmscope.iscsi.lun": disk.lun,
        }
        if disk.hosts:
            h, port = disk.hosts[0]
            f["kvmscope.portal"] = fmt_endpoint(h, port)
        if p is not None:
            f["kvmscope.portal"] = p.portal or f.get("kvmscope.portal")
            f["kvmscope.iscsi.session.sid"] = p.session
            f["kvmscope.disk.host_device"] = p.host_device
            f["kvmscope.connection"] = p.connection
        s = disk.stats
        if s is not None:
            for k in ("rd_reqs", "rd_bytes", "rd_time_ns", "wr_reqs", "wr_bytes", "wr_time_ns", "fl_reqs", "fl_time_ns",
                      "failed_reqs", "idle_time_ns"):
                f[f"kvmscope.disk.stats.{k}"] = getattr(s, k)
            pv = prev.get((vmname, target))
            ps = pv[1].stats if pv else None
            if ps is not None and prev_snap is not None and snap.timestamp > prev_snap.timestamp:
                dt = snap.timestamp - prev_snap.timestamp
                f["kvmscope.interval_seconds"] = round(dt, 3)
                r, w = _rate(s, ps, "rd_reqs", dt), _rate(s, ps, "wr_reqs", dt)
                f["kvmscope.disk.read_iops"] = round(r, 3) if r is not None else None
                f["kvmscope.disk.write_iops"] = round(w, 3) if w is not None else None
                f["kvmscope.disk.read_latency_ms"] = _lat_ms(s, ps, "read")
                f["kvmscope.disk.write_latency_ms"] = _lat_ms(s, ps, "write")
                lat = _lat_ms(s, ps, "all")
                if lat is not None:
                    f["kvmscope.disk.latency_ms"] = lat
        q = pct.get((vmname, target)) if prev_snap is not None else None
        if q is not None:
            f["kvmscope.disk.latency_source"] = q.source
            f["kvmscope.disk.latency_requests"] = q.requests
            for k in ("p50_ms", "p90_ms", "p99_ms"):
                v = getattr(q, k)
                f[f"kvmscope.disk.latency_{k}"] = None if v is None or v == float("inf") else round(v, 4)
            if q.mean_ms is not None:
                f["kvmscope.disk.latency_hist_mean_ms"] = round(q.mean_ms, 4)
        x = iscsi.get((vmname, target))
        if x is not None:
            f["kvmscope.disk.iscsi.in_flight"] = x.inflight
            f["kvmscope.disk.iscsi.aborts"] = x.aborts
            f["kvmscope.disk.iscsi.reconnects"] = x.reconnects
        yield Doc("vm_disk", f"{vm.name}/{disk.target}", f)
