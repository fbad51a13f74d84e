"""What changed over a window of snapshots: the numbers the rules judge.

Counters are turned into deltas and rates between the first and last
snapshot of the window (per-interval series where a rule needs the shape,
e.g. a disk that stopped). Everything here is pure: a list of snapshots in,
a :class:`Window` out.

Baselines are learnt from the ``history`` (snapshots before the window, the
agent's ring or a recording's lead-in): a disk's usual mean latency (the
median of its per-interval means) and a portal's usual smoothed RTT (a low
quantile of the per-snapshot mean RTT of its connections). Per portal, not
per connection, so a reconnect does not reset it; without history a
portal's baseline is the same low quantile over the window itself (marked
``source: "window"``: it underestimates an inflation that lasted the whole
window, so the verdict leans away from the network, never toward it).
"""

from __future__ import annotations

import operator
import threading
import weakref
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field
from statistics import mean, median

from agent import health
from agent.records.addr import fmt_endpoint
from agent.diagnose.timeline import Timeline, build_timeline, disk_steps, slid, slide_slot
from agent.records.disk_latency import BLOCK, LIBISCSI
from agent.records.paths import StoragePath, build_paths
from agent.records.rates import window_latencies_ms
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
    baseline_ms: float | None = None  # its usual mean latency, learnt from the history (None: no history)
    iscsi_ms: float | None = None  # libiscsi command time per request (ebpf_libiscsi), None without it
    host_block_ms: float | None = None  # host block layer time per request of its QEMU (ebpf_block_io)
    target: str | None = None  # iSCSI target IQN and LUN (from its path)
    lun: int | None = None


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
    rtt_mean_ms: float | None = None  # mean smoothed RTT over the window's observations
    rttvar_mean_ms: float | None = None  # mean RTT variance (tcpi_rttvar) over them
    dsacks: int | None = None  # tcpi_dsack_dups delta: retransmits the portal had already (not lost)
    ooo: int | None = None  # tcpi_rcv_ooopack delta: holes toward the host (Linux >= 5.4)
    data_segs_in: int | None = None  # tcpi_data_segs_in delta
    rto_stall_s: float | None = None  # tcpi_total_rto_time delta: time in RTO recovery (Linux >= 6.7)
    rto_count: int | None = None  # tcpi_total_rto delta
    rto_ms: float | None = None  # the retransmission timeout at the end

    @property
    def real_retrans(self) -> int:
        """Retransmits minus those the portal reported as duplicates (DSACK: not lost)."""
        return max(self.retrans - (self.dsacks or 0), 0)

    @property
    def loss_ratio(self) -> float | None:
        """Lost / sent in the window (bytes, else segments): agent.health.loss_ratio, DSACKed retransmits
        left out (scaled on the byte counters, which do not tell them apart)."""
        scale = self.real_retrans / self.retrans if self.retrans else 1.0
        return health.loss_ratio(None if self.bytes_retrans is None else self.bytes_retrans * scale, self.bytes_sent,
                                 self.real_retrans, self.segs_out)


@dataclass(frozen=True)
class PortalWindow:
    """One portal's path over the window: its connections together, both directions, its RTT against its baseline."""

    portal: str
    connections: tuple[str, ...]  # four-tuples (ESTABLISHED at some point in the window)
    rtt_ms: float | None  # mean over the window of the per-snapshot mean smoothed RTT of its connections
    rtt_baseline_ms: float | None
    rtt_baseline_source: str | None  # "history" (learnt before the window) | "window" (no history)
    rtt_history_samples: int
    retrans: int
    real_retrans: int  # minus DSACKed ones
    segs_out: int
    ooo: int | None
    data_segs_in: int | None
    seconds: float

    @property
    def rtt_inflation(self) -> float | None:
        if self.rtt_ms is None or not self.rtt_baseline_ms:
            return None
        return self.rtt_ms / self.rtt_baseline_ms

    @property
    def ooo_per_second(self) -> float | None:
        return None if self.ooo is None else self.ooo / self.seconds

    @property
    def ooo_ratio(self) -> float | None:
        if self.ooo is None or not self.data_segs_in:
            return None
        return self.ooo / self.data_segs_in


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
    portals: dict[str, PortalWindow] = field(default_factory=dict)
    history_snapshots: int = 0  # snapshots before the window the baselines were learnt from

    @property
    def seconds(self) -> float:
        return max(self.end - self.start, 1e-9)


def _ops(st) -> int:
    return st.rd_reqs + st.wr_reqs + st.fl_reqs


_new = object.__new__


def _made(cls, **values):
    """``cls(**values)`` for a frozen dataclass of this module given every one of its fields (no
    ``__post_init__``, no slots): the record without its ``__init__``'s ``object.__setattr__`` per field, for
    the per-disk and per-connection windows made by the thousand every cycle (equal to, and hashed like, the
    record ``cls(**values)`` makes; tests/unit/test_window_records.py)."""
    rec = _new(cls)
    rec.__dict__.update(values)
    return rec


def _disk_baselines(history: list[Snapshot]) -> dict[tuple, float]:
    """(vm, disk) -> its usual mean latency: the median of its per-interval means over the history."""
    with _samples_lock:
        return _latency_samples(history).baselines(health.BASELINE_QUANTILE)


def _step_latencies(a: Snapshot, b: Snapshot) -> tuple:
    """((vm, disk), mean latency ms) of the disks with a latency between two consecutive snapshots
    (each step computed once, kept on its snapshot: timeline.disk_steps)."""
    return tuple((key, ms) for key, (_name, _done, ms) in disk_steps(a, b).items() if ms is not None)


class _SlidingSamples:
    """Per disk, the mean latency of each step of a history, held sorted (a running order statistic).

    The live diagnosis asks every cycle for the baselines of a history that slid by a snapshot since the
    last cycle: the steps that left its front are taken out of each disk's sorted samples and the new
    ones put in (a bisection each), instead of walking every step of every disk and sorting ~120 values
    per disk again. The quantile read from the sorted samples is exactly :func:`agent.health.baseline`'s
    over the same values."""

    __slots__ = ("refs", "steps", "ordered")

    def __init__(self):
        self.refs: tuple = ()  # weak references to the history's snapshots
        self.steps: deque = deque()  # per step of the history: its ((vm, disk), ms), to take out later
        self.ordered: dict[tuple, list[float]] = {}

    def _add(self, step: tuple) -> None:
        ordered = self.ordered
        for key, ms in step:
            vals = ordered.get(key)
            if vals is None:
                ordered[key] = [ms]
            else:
                insort(vals, ms)
        self.steps.append(step)

    def _take_out(self) -> None:
        ordered = self.ordered
        for key, ms in self.steps.popleft():
            vals = ordered[key]
            del vals[bisect_left(vals, ms)]
            if not vals:
                del ordered[key]

    def update(self, history: list[Snapshot]) -> None:
        drop = slid(self.refs, history)
        if drop is None:
            self.steps, self.ordered = deque(), {}
            keep = 1
        else:
            for _ in range(drop):
                self._take_out()
            keep = len(self.refs) - drop
        for a, b in zip(history[keep - 1:], history[keep:]):
            self._add(_step_latencies(a, b))
        self.refs = tuple(weakref.ref(s) for s in history)

    def baselines(self, q: float) -> dict[tuple, float]:
        """key -> health.quantile_sorted(its samples, q), for the keys with enough samples (the rank of each
        sample count worked out once)."""
        least, rank, out = health.MIN_BASELINE_SAMPLES, {}, {}
        for key, vals in self.ordered.items():
            n = len(vals)
            if n >= least:
                at = rank.get(n)
                if at is None:
                    at = rank[n] = min(n - 1, max(0, int(round(q * (n - 1)))))
                out[key] = vals[at]
        return out


# the histories _latency_samples saw last, most recently used first: two slots, the live diagnosis' window
# and its recent intervals (agent/diagnose/live.py) each slide their own; used and replaced under _samples_lock
_samples_lock = threading.Lock()
_SLOTS = 2
_samples: list[_SlidingSamples] = []


def _latency_samples(history: list[Snapshot]) -> _SlidingSamples:
    """The per-disk samples of ``history`` (:func:`slide_slot`; one history can be the start of another: the
    recent intervals' history holds the window's). Call under ``_samples_lock``."""
    return slide_slot(_samples, _SLOTS, _SlidingSamples, history)[0]


def _probe_totals(snap: Snapshot) -> dict[tuple, tuple[int, int]]:
    """(vm, disk, source) -> (requests, summed ns) of that disk's probe histograms with a sum in one snapshot
    (agent.records.disk_latency; indexed once per snapshot: every cycle reads the window's two ends)."""
    idx = snap.__dict__.get("_window_probe_totals")
    if idx is None:
        idx = {}
        for h in snap.vm_disk_latency.histograms:
            if h.sum_ns is not None:
                k = (h.vm, h.disk, h.source)
                c, t = idx.get(k, (0, 0))
                idx[k] = (c + h.count, t + h.sum_ns)
        snap.__dict__["_window_probe_totals"] = idx  # frozen dataclass: a cache, not a field
    return idx


def _probe_ms(a: dict, b: dict, key: tuple) -> float | None:
    """Mean time per request of a VM disk's probe histograms (agent.records.disk_latency) over the window:
    ``a``, ``b`` the :func:`_probe_totals` of its first and last snapshot, ``key`` (vm, disk, source)."""
    a, b = a.get(key), b.get(key)
    if a is None or b is None or b[0] - a[0] <= 0 or b[1] < a[1]:
        return None
    return (b[1] - a[1]) / (b[0] - a[0]) / 1e6


def _disk_static(last: Snapshot, paths) -> list[tuple]:
    """What a window needs of each VM disk of its last snapshot besides counters, in window order (VM, disk):
    (key, "vm/disk", vm, disk record, portal, target, lun); made once per snapshot and paths (the live
    diagnosis' two windows end at the same snapshot)."""
    memo = last.__dict__.get("_window_disk_static")
    if memo is not None and memo[0] is paths:
        return memo[1]
    portal_of = {(p.vm, p.disk): p.portal for p in paths}
    lun_of = {(p.vm, p.disk): (p.target, p.lun) for p in paths if p.target}
    out = []
    for key, (vm, d) in last.vm_disks.items():
        if d.stats is None:
            continue
        target, lun = lun_of.get((vm.name, d.target), (d.iqn, d.lun))
        portal = portal_of.get((vm.name, d.target)) or (fmt_endpoint(*d.hosts[0]) if d.hosts else None)
        out.append((key, f"{key[0]}/{key[1]}", vm.name, d, d.backend, portal, target, lun))
    out.sort(key=lambda x: (x[2], x[3].target))  # stable: what sorting the windows by (vm, disk) gave
    last.__dict__["_window_disk_static"] = (paths, out)  # frozen dataclass: a cache, not a field
    return out


def _disk_windows(snaps: list[Snapshot], dt: float, paths, history: list[Snapshot],
                  timeline: Timeline) -> list[DiskWindow]:
    """Per VM disk: requests and mean latency over the window, requests per interval (for stalls), its baseline
    and the time its probes measured below QEMU.

    The requests per interval are the timeline's (each step computed once, kept on its snapshot) for a disk
    with a step in every interval of the window; one that came, went or was reset within it is walked
    snapshot by snapshot."""
    series = [s.vm_disks for s in snaps]
    baselines = _disk_baselines(history + snaps[:1]) if history else {}
    first, last = snaps[0], snaps[-1]
    first_disks, steps = series[0], timeline.disk_ops
    probes_a, probes_b = _probe_totals(first), _probe_totals(last)
    disks = []
    for key, name, vm, d, backend, portal, target, lun in _disk_static(last, paths):
        per = steps.get(name)
        if per is not None and None not in per and (f := first_disks.get(key)) is not None \
                and f[1].stats is not None:
            a = f[1].stats
        else:
            stats = [sd[key][1].stats for sd in series if key in sd and sd[key][1].stats is not None]
            a = stats[0]
            per = tuple(_ops(y) - _ops(x) for x, y in zip(stats, stats[1:]))
        b = d.stats
        ops = _ops(b) - _ops(a)
        total_ms, read_ms, write_ms = window_latencies_ms(a, b)
        disks.append(_made(
            DiskWindow,
            vm=vm,
            disk=d.target,
            backend=backend,
            portal=portal,
            ops=ops,
            ops_per_second=ops / dt,
            mean_ms=total_ms,
            read_ms=read_ms,
            write_ms=write_ms,
            stalled=health.stalled(per),
            intervals_ops=per,
            baseline_ms=baselines.get(key),
            iscsi_ms=_probe_ms(probes_a, probes_b, (vm, d.target, LIBISCSI)) if probes_b else None,
            host_block_ms=_probe_ms(probes_a, probes_b, (vm, d.target, BLOCK)) if probes_b else None,
            target=target,
            lun=lun,
        ))
    return disks


def _four_tuple_order(s: Snapshot) -> tuple[str, ...] | None:
    """The four-tuples of a snapshot's storage connections, in its order; None when one repeats (made once per
    snapshot)."""
    memo = s.__dict__.get("_window_four_tuple_order")
    if memo is None:
        names = tuple(c.four_tuple for c in s.storage_connections)
        memo = s.__dict__["_window_four_tuple_order"] = (names if len(set(names)) == len(names) else None,)
    return memo[0]


def _connections_seen(snaps: list[Snapshot]) -> dict[str, list]:
    """four-tuple -> its observations, in snapshot order."""
    order = _four_tuple_order(snaps[0])
    if order is not None and all(_four_tuple_order(s) == order for s in snaps[1:]):
        # the same connections in the same order in every snapshot (no reconnect in the window): the walk's
        # dict, its lists made by zip
        return dict(zip(order, map(list, zip(*(s.storage_connections for s in snaps)))))
    seen: dict[str, list] = {}
    for s in snaps:
        for conn in s.storage_connections:
            seen.setdefault(conn.four_tuple, []).append(conn)
    return seen


def _four_tuples(snap: Snapshot) -> set[str]:
    return {x.four_tuple for x in snap.storage_connections}


# the tcp_info counters a connection's window takes the delta of (ConnWindow's fields, in this order)
_DELTAS = ("total_retrans", "segs_out", "bytes_sent", "bytes_retrans", "dsack_dups", "rcv_ooopack", "data_segs_in",
           "total_rto_time_ms", "total_rto")


_DELTA_VALUES = operator.attrgetter(*_DELTAS)


def _deltas(i0, i1, born_inside: bool) -> list:
    """last - first of each tcp_info counter of ``_DELTAS`` (at least 0; None when an end lacks it); a
    connection born inside the window counts from 0."""
    try:  # the counters in one C call per end (a TcpInfo has every one of them)
        b = _DELTA_VALUES(i1)
        a = None if born_inside or i0 is None else _DELTA_VALUES(i0)
    except AttributeError:  # not a TcpInfo: by name, a missing one None
        return _deltas_by_name(i0, i1, born_inside)
    if a is None:
        return [None if y is None else 0 if y < 0 else y for y in b]
    return [None if y is None or x is None else 0 if (d := y - x) < 0 else d for x, y in zip(a, b)]


def _deltas_by_name(i0, i1, born_inside: bool) -> list:
    if born_inside or i0 is None:
        return [None if (b := getattr(i1, n, None)) is None else max(b, 0) for n in _DELTAS]
    return [None if (b := getattr(i1, n, None)) is None or (a := getattr(i0, n, None)) is None else max(b - a, 0)
            for n in _DELTAS]


def _owners(last: Snapshot, paths) -> dict[str, tuple]:
    """four-tuple -> (vm, disk) of the paths joined to a connection; made once per snapshot and paths."""
    memo = last.__dict__.get("_window_owners")
    if memo is None or memo[0] is not paths:
        memo = last.__dict__["_window_owners"] = (paths, {p.connection: (p.vm, p.disk) for p in paths if p.connection})
    return memo[1]


def _obs_terms(o) -> tuple | None:
    """A connection observation's part in its window: (backoff, smoothed RTT, RTT variance), the RTTs None
    unless ESTABLISHED with an RTT (what the RTT means count); None without tcp_info."""
    i = o.info
    if i is None:
        return None
    if i.rtt_us and o.state == "ESTABLISHED":
        return (i.backoff or 0, i.rtt_us, i.rttvar_us)
    return (i.backoff or 0, None, None)


def _exact(v) -> bool:
    """A value _mean sums as an int (a tcp_info u32)."""
    return type(v) is int and 0 <= v < 1 << 53


class _ConnSums:
    """Per connection, its window's running sums, carried from cycle to cycle as the window slides: the
    observations' backoffs (in order, for their maximum), the sum and count of the smoothed RTTs and of
    their variances (ints: exact; a value that is not a u32-like int is counted as ``odd``, and that
    connection's means are walked instead). The snapshot that leaves the window takes its observations'
    terms out, the new one puts its in."""

    __slots__ = ("refs", "per")

    def __init__(self):
        self.refs: tuple = ()
        self.per: dict[str, list] = {}  # ft -> [observations, backoffs, rtt sum, rtt n, var sum, var n, odd]

    def _put(self, s: Snapshot, sign: int) -> None:
        per = self.per
        for c in s.storage_connections:
            ft, t = c.four_tuple, _obs_terms(c)
            e = per.get(ft)
            if e is None:
                e = per[ft] = [0, deque(), 0, 0, 0, 0, 0]
            e[0] += sign
            if t is not None:
                if sign > 0:
                    e[1].append(t[0])
                else:
                    e[1].popleft()
                for v, at in ((t[1], 2), (t[2], 4)):
                    if v is None:
                        continue
                    if _exact(v):
                        e[at] += sign * v
                        e[at + 1] += sign
                    else:
                        e[6] += sign
            if e[0] == 0:
                del per[ft]

    def update(self, snaps: list[Snapshot]) -> None:
        drop = slid(self.refs, snaps)
        gone = [] if drop is None else [r() for r in self.refs[:drop]]
        if drop is None or any(g is None for g in gone):  # another list, or what left it is no more
            self.per = {}
            keep = 0
        else:
            for g in gone:
                self._put(g, -1)
            keep = len(self.refs) - drop
        for s in snaps[keep:]:
            self._put(s, 1)
        self.refs = tuple(weakref.ref(s) for s in snaps)


_conn_lock = threading.Lock()
_conn_slots: list[_ConnSums] = []  # most recently used first; the live window and its recent intervals


def _conn_sums(snaps: list[Snapshot]) -> _ConnSums:
    """The running sums of ``snaps`` (:func:`slide_slot`). Call under ``_conn_lock``."""
    return slide_slot(_conn_slots, _SLOTS, _ConnSums, snaps)[0]


def _conn_windows(snaps: list[Snapshot], seen: dict[str, list], dt: float, paths) -> list[ConnWindow]:
    """Per storage connection: retransmits, segments and bytes over the window, its last state; its mean RTT
    and highest backoff from the window's running sums (:class:`_ConnSums`)."""
    with _conn_lock:
        return _conn_windows_summed(snaps, seen, dt, paths, _conn_sums(snaps).per)


def _conn_windows_summed(snaps: list[Snapshot], seen: dict[str, list], dt: float, paths,
                         per: dict[str, list]) -> list[ConnWindow]:
    owner = _owners(snaps[-1], paths)
    first_conns, last_conns = _four_tuples(snaps[0]), _four_tuples(snaps[-1])
    conns = []
    for ft, obs in seen.items():
        o1 = obs[-1]
        i0, i1 = obs[0].info, o1.info
        if i1 is None:
            continue
        retrans, segs, sent, bretrans, dsacks, ooo, segs_in, rto_ms, rtos = _deltas(i0, i1, ft not in first_conns)
        retrans = retrans or 0
        e = per.get(ft)
        if e is not None and not e[6]:  # the running sums (every value an exact int)
            backoff = max(e[1])
            rtt_mean = e[2] / e[3] / 1000 if e[3] else None
            var_mean = e[4] / e[5] / 1000 if e[5] else None
        else:
            rtts, rttvars, backoffs = [], [], []
            for o in obs:  # the smoothed RTTs (and variances) while ESTABLISHED, the backoffs, in one pass
                i = o.info
                if i is not None:
                    backoffs.append(i.backoff or 0)
                    if i.rtt_us and o.state == "ESTABLISHED":
                        rtts.append(i.rtt_us)
                        if i.rttvar_us is not None:
                            rttvars.append(i.rttvar_us)
            backoff = max(backoffs)
            rtt_mean = _mean(rtts) / 1000 if rtts else None
            var_mean = _mean(rttvars) / 1000 if rttvars else None
        vm, disk = owner.get(ft, (None, None))
        conns.append(_made(
            ConnWindow,
            four_tuple=ft,
            portal=o1.portal,
            vm=vm,
            disk=disk,
            retrans=retrans,
            retrans_per_second=retrans / dt,
            segs_out=segs or 0,
            rtt_ms=i1.rtt_us / 1000 if i1.rtt_us is not None else None,
            max_backoff=backoff,
            state=o1.state,
            present_at_end=ft in last_conns,
            bytes_sent=sent,
            bytes_retrans=bretrans,
            rtt_mean_ms=rtt_mean,
            rttvar_mean_ms=var_mean,
            dsacks=dsacks,
            ooo=ooo,
            data_segs_in=segs_in,
            rto_stall_s=None if rto_ms is None else rto_ms / 1000,
            rto_count=rtos,
            rto_ms=i1.rto_us / 1000 if i1.rto_us is not None else None,
        ))
    return sorted(conns, key=lambda c: (c.portal, c.four_tuple))


def _mean(vals: list):
    """statistics.mean(vals), without its exact-fraction arithmetic when every value is an int below 2**53
    (tcp_info's are u32): Python's int / int is the correctly rounded quotient, which is what mean gives
    (and a whole mean below 2**53 is exact as a float, so dividing it further rounds the same)."""
    if set(map(type, vals)) == {int} and min(vals) >= 0 and max(vals) < 1 << 53:  # every one, in C loops
        return sum(vals) / len(vals)
    return mean(vals)


def _portal_rtt_series(snaps: list[Snapshot]) -> dict[str, list[float]]:
    """portal -> per snapshot, the mean smoothed RTT (ms) of its ESTABLISHED connections."""
    out: dict[str, list[float]] = {}
    for s in snaps:
        for portal, ms in _portal_rtt(s).items():
            out.setdefault(portal, []).append(ms)
    return out


def _portal_rtt(s: Snapshot) -> dict[str, float]:
    """portal -> the mean smoothed RTT (ms) of its ESTABLISHED connections at one snapshot (made once per
    snapshot: the baseline reads the whole history every cycle)."""
    rtt = s.__dict__.get("_window_portal_rtt")
    if rtt is None:
        per: dict[str, list[int]] = {}
        for c in s.storage_connections:
            if c.state == "ESTABLISHED" and c.info is not None and c.info.rtt_us:
                per.setdefault(c.portal, []).append(c.info.rtt_us)
        rtt = s.__dict__["_window_portal_rtt"] = {portal: _mean(vals) / 1000 for portal, vals in per.items()}
    return rtt


def _portal_windows(conns: list[ConnWindow], snaps: list[Snapshot], history: list[Snapshot],
                    dt: float) -> dict[str, PortalWindow]:
    """Per portal: its connections' counters together and its RTT against the learnt baseline."""
    now, before = _portal_rtt_series(snaps), _portal_rtt_series(history)
    out = {}
    for portal in sorted({c.portal for c in conns}):
        cs = [c for c in conns if c.portal == portal and c.state in ("ESTABLISHED", "CLOSE_WAIT", "FIN_WAIT1")]
        series = now.get(portal, [])
        learnt = health.baseline(before.get(portal, []), health.RTT_BASELINE_QUANTILE)
        if learnt is not None:
            base, source = learnt, "history"
        else:
            base, source = health.quantile(series, health.RTT_BASELINE_QUANTILE), ("window" if series else None)
        has_ooo = any(c.ooo is not None for c in cs)
        out[portal] = PortalWindow(
            portal=portal,
            connections=tuple(c.four_tuple for c in cs),
            rtt_ms=mean(series) if series else None,
            rtt_baseline_ms=base,
            rtt_baseline_source=source,
            rtt_history_samples=len(before.get(portal, [])),
            retrans=sum(c.retrans for c in cs),
            real_retrans=sum(c.real_retrans for c in cs),
            segs_out=sum(c.segs_out for c in cs),
            ooo=sum(c.ooo or 0 for c in cs) if has_ooo else None,
            data_segs_in=sum(c.data_segs_in or 0 for c in cs) if has_ooo else None,
            seconds=dt,
        )
    return out


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


def build_window(snaps: list[Snapshot], if_addrs: dict[str, str] | None = None,
                 history: list[Snapshot] | tuple = ()) -> Window:
    """The window over ``snaps`` (oldest first): each part from its own function above; ``history``
    (older snapshots, oldest first) only teaches the baselines."""
    if not snaps:
        raise ValueError("no snapshots")
    history = [h for h in history if h.timestamp < snaps[0].timestamp]
    first, last = snaps[0], snaps[-1]
    dt = max(last.timestamp - first.timestamp, 1e-9)
    paths = last.paths if if_addrs is None else build_paths(last, if_addrs)
    seen = _connections_seen(snaps)
    host_retrans, host_out = _host_tcp(first, last)
    conns = _conn_windows(snaps, seen, dt, paths)
    timeline = build_timeline(snaps, paths)
    return Window(
        host=last.host,
        start=first.timestamp,
        end=last.timestamp,
        snapshots=len(snaps),
        disks=tuple(_disk_windows(snaps, dt, paths, history, timeline)),
        conns=tuple(conns),
        paths=tuple(paths),
        reconnects=_reconnects(snaps, seen),
        sessions=_sessions(snaps),
        ifaces=_iface_deltas(first, last),
        storage_ifaces=frozenset(p.interface for p in paths if p.interface),
        host_retrans=host_retrans,
        host_out_segs=host_out,
        blind_spots=_blind_spots(snaps),
        timeline=timeline,
        multipath=tuple(_multipath_windows(snaps, paths)),
        kernel_events=tuple(e for s in snaps if s.storage_log is not None for e in s.storage_log.events
                            if e.origin in ("kernel", "iscsid", "multipathd")),
        portals=_portal_windows(conns, snaps, history, dt),
        history_snapshots=len(history),
    )


def median_or_none(values):
    values = [v for v in values if v is not None]
    return median(values) if values else None
