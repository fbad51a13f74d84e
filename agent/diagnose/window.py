"""What changed over a window of snapshots: the numbers the rules judge.

Counters are turned into deltas and rates between the first and last
snapshot of the window (per-interval series where a rule needs the shape,
e.g. a disk that stopped). Everything here is pure: a list of snapshots in,
a :class:`Window` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import median

from agent.records.addr import fmt_endpoint
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

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-9)


def build_window(snaps: list[Snapshot], if_addrs: dict[str, str] | None = None) -> Window:
    if not snaps:
        raise ValueError("no snapshots")
    first, last = snaps[0], snaps[-1]
    dt = max(last.timestamp - first.timestamp, 1e-9)
    paths = last.paths if if_addrs is None else build_paths(last, if_addrs)
    portal_of = {(p.vm, p.disk): p.portal for p in paths}

    # -- VM disks
    series = [s.vm_disks for s in snaps]
    disks = []
    for key, (vm, d) in series[-1].items():
        if d.stats is None:
            continue
        firsts = [sd[key][1].stats for sd in series if key in sd and sd[key][1].stats is not None]
        a, b = firsts[0], d.stats
        ops = (b.rd_reqs - a.rd_reqs) + (b.wr_reqs - a.wr_reqs) + (b.fl_reqs - a.fl_reqs)
        per = []
        for x, y in zip(firsts, firsts[1:]):
            per.append((y.rd_reqs + y.wr_reqs + y.fl_reqs) - (x.rd_reqs + x.wr_reqs + x.fl_reqs))
        stalled = len(per) >= 2 and per[-1] == 0 and any(v > 0 for v in per[:-1])
        disks.append(
            DiskWindow(
                vm=vm.name,
                disk=d.target,
                backend=d.backend,
                portal=portal_of.get((vm.name, d.target)) or (fmt_endpoint(*d.hosts[0]) if d.hosts else None),
                ops=ops,
                ops_per_second=ops / dt,
                mean_ms=mean_latency_ms(a, b),
                read_ms=mean_latency_ms(a, b, "read"),
                write_ms=mean_latency_ms(a, b, "write"),
                stalled=stalled,
                intervals_ops=tuple(per),
            )
        )

    # -- storage connections
    owner = {p.connection: (p.vm, p.disk) for p in paths if p.connection}
    seen: dict[str, list] = {}
    for s in snaps:
        for conn in s.storage_connections:
            seen.setdefault(conn.four_tuple, []).append(conn)
    last_conns = {c.four_tuple for c in last.storage_connections}
    first_conns = {c.four_tuple for c in first.storage_connections}
    conns = []
    for ft, obs in seen.items():
        i0, i1 = obs[0].info, obs[-1].info
        if i1 is None:
            continue
        # a connection born inside the window counts all its retransmits
        born_inside = ft not in first_conns
        retrans = (i1.total_retrans or 0) - (0 if born_inside or i0 is None else (i0.total_retrans or 0))
        segs = (i1.segs_out or 0) - (0 if born_inside or i0 is None else (i0.segs_out or 0))
        vm, disk = owner.get(ft, (None, None))
        conns.append(
            ConnWindow(
                four_tuple=ft,
                portal=obs[-1].portal,
                vm=vm,
                disk=disk,
                retrans=max(retrans, 0),
                retrans_per_second=max(retrans, 0) / dt,
                segs_out=max(segs, 0),
                rtt_ms=i1.rtt_us / 1000 if i1.rtt_us is not None else None,
                max_backoff=max((o.info.backoff or 0) for o in obs if o.info),
                state=obs[-1].state,
                present_at_end=ft in last_conns,
            )
        )

    # -- reconnects: distinct connections per (owner pid, portal), minus one
    per_owner: dict[tuple, set] = {}
    pid_vm = {}
    for s in snaps:
        pid_vm.update(s.vm_by_pid)
    for ft, obs in seen.items():
        o = obs[-1]
        if o.pid is not None:
            per_owner.setdefault((pid_vm.get(o.pid, f"pid {o.pid}"), o.portal), set()).add(ft)
    reconnects = {k: len(v) - 1 for k, v in per_owner.items() if len(v) > 1}

    # -- kernel sessions
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

    # -- interfaces
    ifaces: dict[str, dict[str, int]] = {}
    fi, li = first.interfaces, last.interfaces
    if fi and li:
        for i in li.ifaces:
            j = fi.get(i.name)
            if j is None:
                continue
            ifaces[i.name] = {k: i.counters.get(k, 0) - j.counters.get(k, 0) for k in i.counters}
    storage_ifaces = {p.interface for p in paths if p.interface}

    # -- host TCP
    host_retrans = host_out = None
    a, b = first.host_tcp, last.host_tcp
    if a and b:
        host_retrans = b.tcp.get("RetransSegs", 0) - a.tcp.get("RetransSegs", 0)
        host_out = b.tcp.get("OutSegs", 0) - a.tcp.get("OutSegs", 0)

    blind = {}
    for s in snaps:
        for name, h in s.health.items():
            if h.status is Status.FAILED:
                blind[name] = h.reason
    return Window(
        host=last.host,
        start=first.timestamp,
        end=last.timestamp,
        snapshots=len(snaps),
        disks=tuple(sorted(disks, key=lambda d: (d.vm, d.disk))),
        conns=tuple(sorted(conns, key=lambda c: (c.portal, c.four_tuple))),
        paths=tuple(paths),
        reconnects=reconnects,
        sessions=sessions,
        ifaces=ifaces,
        storage_ifaces=frozenset(storage_ifaces),
        host_retrans=host_retrans,
        host_out_segs=host_out,
        blind_spots=blind,
    )


def median_or_none(values):
    values = [v for v in values if v is not None]
    return median(values) if values else None
