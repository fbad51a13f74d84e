"""What changed over a window of snapshots: the numbers the rules judge.

Counters are turned into deltas and rates between the first and last
snapshot of the window (per-interval series where a rule needs the shape,
e.g. a disk that stopped). Everything here is pure: a list of snapshots in,
a :class:`Window` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from agent import health
from agent.records.addr import fmt_endpoint
from agent.diagnose.timeline import Timeline, build_timeline
from agent.records.paths import StoragePath, build_paths
from agent.records.rates import mean_latency_ms
from agent.records.snapshot import Snapshot, Status


@dataclass(frozen=True)
class DiskWindow:
    vm: str
    disk: str
    backend: str
    portal: str | None
    ops: int  # requests completed in the window (read + write + flush)
    ops_per_second: float
    mean_ms: float | None  # mean latency per request in the window
    read_ms: float | None
    write_ms: float | None
    stalled: bool  # had I/O earlier in the window, none at its end
    intervals_ops: tuple[int, ...] = ()


@dataclass(frozen=True)
class ConnWindow:
    four_tuple: str
    portal: str
    vm: str | None
    disk: str | None
    retrans: int  # segments retransmitted in the window
    retrans_per_second: float
    segs_out: int
    rtt_ms: float | None
    max_backoff: int
    state: str
    present_at_end: bool
    bytes_sent: int | None = None  # tcpi_bytes_sent delta (None: kernel < 4.19)
    bytes_retrans: int | None = None  # tcpi_bytes_retrans delta

    @property
    def loss_ratio(self) -> float | None:
        """Retransmitted / sent in the window (bytes, else segments): agent.health.loss_ratio."""
        return health.loss_ratio(self.bytes_retrans, self.bytes_sent, self.retrans, self.segs_out)


@dataclass(frozen=True)
class MapWindow:
    """A dm-multipath map over the window (source: multipath), with the VMs and workloads on it."""

    name: str
    paths_total: int
    active_first: int
    active_last: int
    active_min: int
    failed: tuple[dict, ...]  # paths failed at the end: {path, devno, portal, session, session_state, checker_state}
    remaining: tuple[dict, ...]  # paths usable at the end: {path, portal, session}
    failed_within: tuple[str, ...]  # paths that failed at some point of the window (sdX)
    queueing_seen: bool  # no usable path and I/O held, in some snapshot
    queueing_last: bool
    queue_if_no_path: bool
    no_path_retry: str | None  # multipathd's "queueing" at the end: off | on | N chk | N sec
    vms: tuple[str, ...]  # VMs with a disk on the map (the join)
    disks: tuple[tuple[str, str], ...]  # (vm, disk) on the map
    openers: tuple[tuple[int, str], ...]  # processes holding the map open while degraded


@dataclass(frozen=True)
class Window:
    host: str
    start: float
    end: float
    snapshots: int
    disks: tuple[DiskWindow, ...]
    conns: tuple[ConnWindow, ...]
    paths: tuple[StoragePath, ...]
    reconnects: dict[tuple[str, str], int]  # (vm, portal) -> new connections seen in the window
    sessions: dict[int, dict]  # sid -> {"states": [...], "last": str, "target":..., "portal":..., errors deltas}
    ifaces: dict[str, dict[str, int]]  # name -> counter deltas (errors, drops)
    storage_ifaces: frozenset[str]
    host_retrans: int | None
    host_out_segs: int | None
    blind_spots: dict[str, str]  # source -> reason (failed somewhere in the window)
    timeline: Timeline | None = None  # per-interval series and outages (agent/diagnose/timeline.py)
    multipath: tuple[MapWindow, ...] = ()
    kernel_events: tuple = ()  # storage_log events of the window (StorageLogEvent), for the kernel-path rules

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-9)


def _disk_windows(snaps: list[Snapshot], dt: float, portal_of: dict) -> list[DiskWindow]:
    """Per VM disk: requests and mean latency over the window, requests per interval (for stalls)."""
    series = [s.vm_disks for s in snaps]
    disks = []
    for key, (vm, d) in series[-1].items():
        if d.stats is None:
            continue
        stats = [sd[key][1].stats for sd in series if key in sd and sd[key][1].stats is not None]
        a, b = stats[0], d.stats
        ops = (b.rd_reqs - a.rd_reqs) + (b.wr_reqs - a.wr_reqs) + (b.fl_reqs - a.fl_reqs)
        per = tuple((y.rd_reqs + y.wr_reqs + y.fl_reqs) - (x.rd_reqs + x.wr_reqs + x.fl_reqs)
                    for x, y in zip(stats, stats[1:]))
        disks.append(DiskWindow(
            vm=vm.name,
            disk=d.target,
            backend=d.backend,
            portal=portal_of.get((vm.name, d.target)) or (fmt_endpoint(*d.hosts[0]) if d.hosts else None),
            ops=ops,
            ops_per_second=ops / dt,
            mean_ms=mean_latency_ms(a, b),
            read_ms=mean_latency_ms(a, b, "read"),
            write_ms=mean_latency_ms(a, b, "write"),
            stalled=health.stalled(per),
            intervals_ops=per,
        ))
    return sorted(disks, key=lambda d: (d.vm, d.disk))


def _connections_seen(snaps: list[Snapshot]) -> dict[str, list]:
    """four-tuple -> its observations, in snapshot order."""
    seen: dict[str, list] = {}
    for s in snaps:
        for conn in s.storage_connections:
            seen.setdefault(conn.four_tuple, []).append(conn)
    return seen


def _four_tuples(snap: Snapshot) -> set[str]:
    return {x.four_tuple for x in snap.storage_connections}


def _counter_delta(first, last, name: str, born_inside: bool) -> int | None:
    """last - first of a tcp_info counter; a connection born inside the window counts from 0."""
    b = getattr(last, name, None)
    if b is None:
        return None
    a = 0 if born_inside or first is None else getattr(first, name, None)
    return None if a is None else max(b - a, 0)


def _conn_windows(snaps: list[Snapshot], seen: dict[str, list], dt: float, paths) -> list[ConnWindow]:
    """Per storage connection: retransmits, segments and bytes over the window, its last state."""
    owner = {p.connection: (p.vm, p.disk) for p in paths if p.connection}
    first_conns, last_conns = _four_tuples(snaps[0]), _four_tuples(snaps[-1])
    conns = []
    for ft, obs in seen.items():
        i0, i1 = obs[0].info, obs[-1].info
        if i1 is None:
            continue
        born_inside = ft not in first_conns
        retrans = _counter_delta(i0, i1, "total_retrans", born_inside) or 0
        vm, disk = owner.get(ft, (None, None))
        conns.append(ConnWindow(
            four_tuple=ft,
            portal=obs[-1].portal,
            vm=vm,
            disk=disk,
            retrans=retrans,
            retrans_per_second=retrans / dt,
            segs_out=_counter_delta(i0, i1, "segs_out", born_inside) or 0,
            rtt_ms=i1.rtt_us / 1000 if i1.rtt_us is not None else None,
            max_backoff=max((o.info.backoff or 0) for o in obs if o.info),
            state=obs[-1].state,
            present_at_end=ft in last_conns,
            bytes_sent=_counter_delta(i0, i1, "bytes_sent", born_inside),
            bytes_retrans=_counter_delta(i0, i1, "bytes_retrans", born_inside),
        ))
    return sorted(conns, key=lambda c: (c.portal, c.four_tuple))


def _reconnects(snaps: list[Snapshot], seen: dict[str, list]) -> dict[tuple[str, str], int]:
    """Distinct connections per (owning VM, portal), minus one."""
    pid_vm = {}
    for s in snaps:
        pid_vm.update(s.vm_by_pid)
    per_owner: dict[tuple, set] = {}
    for ft, obs in seen.items():
        o = obs[-1]
        if o.pid is not None:
            per_owner.setdefault((pid_vm.get(o.pid, f"pid {o.pid}"), o.portal), set()).add(ft)
    return {k: len(v) - 1 for k, v in per_owner.items() if len(v) > 1}


def _sessions(snaps: list[Snapshot]) -> dict[int, dict]:
    """Kernel iSCSI sessions: states seen, last state, error counter deltas."""
    sessions: dict[int, dict] = {}
    for s in snaps:
        for sess in s.iscsi_sessions:
            e = sessions.setdefault(sess.sid, {"states": [], "target": sess.target, "portal": sess.portal,
                                               "recovery_tmo": sess.recovery_tmo, "first_stats": sess.stats})
            e["states"].append(sess.state)
            e["last"] = sess.state
            e["last_stats"] = sess.stats
            e["disks"] = [d.name for d in sess.disks]
    for e in sessions.values():
        a, b = e.pop("first_stats") or {}, e.pop("last_stats") or {}
        e["errors"] = {k: b.get(k, 0) - a.get(k, 0) for k in ("digest_err", "timeout_err", "eh_abort_cnt") if k in b}
    return sessions


def _iface_deltas(first: Snapshot, last: Snapshot) -> dict[str, dict[str, int]]:
    ifaces: dict[str, dict[str, int]] = {}
    fi, li = first.interfaces, last.interfaces
    if fi and li:
        for i in li.ifaces:
            j = fi.get(i.name)
            if j is not None:
                ifaces[i.name] = {k: i.counters.get(k, 0) - j.counters.get(k, 0) for k in i.counters}
    return ifaces


def _host_tcp(first: Snapshot, last: Snapshot) -> tuple[int | None, int | None]:
    """(RetransSegs, OutSegs) deltas of the host's /proc/net/snmp, None without it."""
    a, b = first.host_tcp, last.host_tcp
    if not (a and b):
        return None, None
    return b.tcp.get("RetransSegs", 0) - a.tcp.get("RetransSegs", 0), b.tcp.get("OutSegs", 0) - a.tcp.get("OutSegs", 0)


def _blind_spots(snaps: list[Snapshot]) -> dict[str, str]:
    blind = {}
    for s in snaps:
        for name, h in s.health.items():
            if h.status is Status.FAILED:
                blind[name] = h.reason
    return blind


def _multipath_windows(snaps: list[Snapshot], paths) -> list[MapWindow]:
    last = snaps[-1]
    portal = {}
    for s in snaps:
        for sess in s.iscsi_sessions:
            for d in sess.disks:
                if d.name:
                    portal[d.name] = (sess.portal, sess.sid, sess.state)
    out = []
    for m in last.multipath_maps:
        hist = [s.multipath.by_name(m.name) for s in snaps if s.multipath is not None]
        hist = [h for h in hist if h is not None]
        def leg(p, fields):
            pt, sid, state = portal.get(p.name or "", (None, None, None))
            d = {"path": p.name or p.devno, "devno": p.devno, "portal": pt, "session": sid}
            if fields:
                d.update(session_state=state, checker_state=p.checker_state, dev_state=p.dev_state)
            return d
        on_map = [(p.vm, p.disk) for p in paths if p.multipath == m.name]
        out.append(MapWindow(
            name=m.name,
            paths_total=len(m.paths),
            active_first=hist[0].active_paths if hist else m.active_paths,
            active_last=m.active_paths,
            active_min=min((h.active_paths for h in hist), default=m.active_paths),
            failed=tuple(leg(p, True) for p in m.paths if not p.active),
            remaining=tuple(leg(p, False) for p in m.paths if p.active),
            failed_within=tuple(sorted({p.name or p.devno for h in hist for p in h.paths if not p.active}
                                       | {p.name or p.devno for p in m.paths
                                          if hist and (q := hist[0].path(p.devno)) is not None
                                          and p.fail_count is not None and q.fail_count is not None
                                          and p.fail_count > q.fail_count})),
            queueing_seen=any(h.stalled for h in hist),
            queueing_last=m.stalled,
            queue_if_no_path=m.queue_if_no_path,
            no_path_retry=m.no_path_retry,
            vms=tuple(sorted({v for v, _d in on_map})),
            disks=tuple(sorted(set(on_map))),
            openers=next((h.openers for h in reversed(hist) if h.openers), ()),
        ))
    return out


def build_window(snaps: list[Snapshot], if_addrs: dict[str, str] | None = None) -> Window:
    """The window over ``snaps`` (oldest first): each part from its own function above."""
    if not snaps:
        raise ValueError("no snapshots")
    first, last = snaps[0], snaps[-1]
    dt = max(last.timestamp - first.timestamp, 1e-9)
    paths = last.paths if if_addrs is None else build_paths(last, if_addrs)
    seen = _connections_seen(snaps)
    host_retrans, host_out = _host_tcp(first, last)
    return Window(
        host=last.host,
        start=first.timestamp,
        end=last.timestamp,
        snapshots=len(snaps),
        disks=tuple(_disk_windows(snaps, dt, {(p.vm, p.disk): p.portal for p in paths})),
        conns=tuple(_conn_windows(snaps, seen, dt, paths)),
        paths=tuple(paths),
        reconnects=_reconnects(snaps, seen),
        sessions=_sessions(snaps),
        ifaces=_iface_deltas(first, last),
        storage_ifaces=frozenset(p.interface for p in paths if p.interface),
        host_retrans=host_retrans,
        host_out_segs=host_out,
        blind_spots=_blind_spots(snaps),
        timeline=build_timeline(snaps, paths),
        multipath=tuple(_multipath_windows(snaps, paths)),
        kernel_events=tuple(e for s in snaps if s.storage_log is not None for e in s.storage_log.events
                            if e.origin in ("kernel", "iscsid", "multipathd")),
    )


def median_or_none(values):
    values = [v for v in values if v is not None]
    return median(values) if values else None
