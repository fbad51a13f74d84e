"""Per-interval series over a window of snapshots, and the outages found in them.

The window (:mod:`agent.diagnose.window`) sums counters between its first
and last snapshot; a short outage that has ended disappears in such sums (a
few retransmits, a lower mean rate). This module keeps the shape in time:

* per VM disk, requests completed and their mean latency in each interval
  (QEMU ``query-blockstats`` / libvirt block stats, cumulative counters);
* per portal, the bytes its storage connections got acknowledged or
  received in each interval (``tcpi_bytes_acked`` + ``tcpi_bytes_received``,
  Linux >= 4.1/4.2), the RTO backoff (``tcpi_backoff``) and the age of the
  freshest ACK (``tcpi_last_ack_recv``) at each snapshot, and the
  retransmits (``tcpi_total_retrans``) in each interval.

:func:`find_outages` reads it: a portal is **down** over a run of intervals
in which its connections made no progress (nothing acknowledged, nothing
received) while I/O was outstanding (its disks, busy before, completed
nothing, or data sat unacknowledged) and TCP was retransmitting into the
silence (RTO backoff or retransmits). The run ends, and the portal has
**recovered**, at the first interval with progress again. A silence that
fills no whole interval is seen at a snapshot inside it: the connections
backing off with nothing acknowledged for a while (:func:`_silences_between`).

Times inside an interval are estimated, never guessed at the interval's
edge (docs/diagnose.md, "The outage rule"): the stop from the freshest
ACK's age at the first silent snapshot, else from the rate before it; the
resumption from how much of the first interval after the silence the usual
rate fills (``t_end - done / rate``), clamped to that interval. A stalled
disk's request waited about as long as the stall, plus its usual latency.

Pure: snapshots in, frozen records out; cost linear in snapshots x disks.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from statistics import median

from agent.records.addr import fmt_endpoint
from agent.records.rates import mean_latency_ms
from agent.records.snapshot import Snapshot


@dataclass(frozen=True)
class Timeline:
    times: tuple[float, ...]  # snapshot timestamps; interval i spans times[i]..times[i+1]
    disk_ops: dict[str, tuple[int | None, ...]]  # "vm/disk" -> requests completed per interval
    disk_ms: dict[str, tuple[float | None, ...]]  # "vm/disk" -> mean latency per interval (ms)
    disk_portal: dict[str, str | None]  # "vm/disk" -> portal (None: not on iSCSI)
    portal_progress: dict[str, tuple[int | None, ...]]  # portal -> bytes acked + received per interval
    portal_retrans: dict[str, tuple[int, ...]]  # portal -> retransmits per interval
    portal_backoff: dict[str, tuple[int, ...]]  # portal -> highest tcpi_backoff at each snapshot
    portal_ack_age_ms: dict[str, tuple[int | None, ...]]  # portal -> freshest ACK's age at each snapshot
    portal_unacked: dict[str, tuple[int, ...]]  # portal -> segments in flight at each snapshot


def _ops(st) -> int:
    return st.rd_reqs + st.wr_reqs + st.fl_reqs


def _disk_keys(s: Snapshot) -> list:
    """("vm/disk", VmDisk) of a snapshot's disks, in its order (made once per snapshot)."""
    keys = s.__dict__.get("_timeline_disk_keys")
    if keys is None:
        keys = s.__dict__["_timeline_disk_keys"] = [(f"{vm}/{dname}", d) for (vm, dname), (_v, d) in s.vm_disks.items()]
    return keys


def disk_steps(first: Snapshot, second: Snapshot) -> dict[tuple[str, str], tuple[str, int, float | None]]:
    """(vm, disk) -> ("vm/disk", requests completed, their mean latency in ms or None) between two
    consecutive snapshots, for the disks with stats in both whose counters did not go back in total (a VM
    restart resets them; the latency is None when any counter went back or nothing completed).

    Kept on ``second`` for up to four ``first``s (each named by a weak reference, so no snapshot keeps an
    older one alive):
    every cycle the live window, its latency baselines over the history and the incident tracker ask
    again for the steps of snapshots they saw in earlier cycles, and only the newest step is new."""
    memo = second.__dict__.get("_timeline_disk_steps")
    if memo is None:
        memo = second.__dict__["_timeline_disk_steps"] = {}  # frozen dataclass: a cache, not a field
    hit = memo.get(id(first))
    if hit is not None and hit[0]() is first:
        return hit[1]
    out = {}
    before = first.vm_disks
    for k, (_v, d) in second.vm_disks.items():
        b = d.stats
        if b is None:
            continue
        prev = before.get(k)
        if prev is None or prev[1].stats is None:
            continue
        a = prev[1].stats
        done = _ops(b) - _ops(a)
        if done < 0:  # counters reset (the VM restarted)
            continue
        out[k] = (f"{k[0]}/{k[1]}", done, mean_latency_ms(a, b))
    if len(memo) >= 4:  # the consecutive step, and a few of a caller that skips snapshots
        memo.clear()
    memo[id(first)] = (weakref.ref(first), out)
    return out


def _conns(s: Snapshot) -> dict:
    """four-tuple -> storage connection of a snapshot (made once per snapshot)."""
    conns = s.__dict__.get("_timeline_conns")
    if conns is None:
        conns = s.__dict__["_timeline_conns"] = {c.four_tuple: c for c in s.storage_connections}
    return conns


def _portals(s: Snapshot) -> frozenset[str]:
    """The portals of a snapshot's storage connections (made once per snapshot)."""
    portals = s.__dict__.get("_timeline_portals")
    if portals is None:
        portals = s.__dict__["_timeline_portals"] = frozenset(c.portal for c in s.storage_connections)
    return portals


def _portal_state(s: Snapshot) -> dict[str, tuple[int, int, int | None]]:
    """portal -> (highest tcpi_backoff, segments in flight, freshest ACK's age of an ESTABLISHED connection)
    at one snapshot, over its connections with tcp_info (made once per snapshot)."""
    agg = s.__dict__.get("_timeline_portal_state")
    if agg is not None:
        return agg
    agg = {}
    for c in _conns(s).values():
        info = c.info
        if info is None:
            continue
        b, u, age = agg.get(c.portal, (0, 0, None))
        b = max(b, info.backoff or 0)
        u += info.unacked or 0
        if c.state == "ESTABLISHED" and info.last_ack_recv_ms is not None:
            age = info.last_ack_recv_ms if age is None else min(age, info.last_ack_recv_ms)
        agg[c.portal] = (b, u, age)
    s.__dict__["_timeline_portal_state"] = agg
    return agg


def _portal_steps(first: Snapshot, second: Snapshot) -> dict[str, tuple[int, int]]:
    """portal -> (bytes acknowledged + received, retransmits) between two consecutive snapshots, over the
    connections of ``second`` that report both byte counters; kept like :func:`disk_steps`."""
    memo = second.__dict__.get("_timeline_portal_steps")
    if memo is not None and memo[0]() is first:
        return memo[1]
    before = _conns(first)
    out: dict[str, tuple[int, int]] = {}
    for ft, c in _conns(second).items():
        info = c.info
        if info is None or info.bytes_acked is None or info.bytes_received is None:
            continue
        bi = getattr(before.get(ft), "info", None)
        # a connection born inside the interval counts from 0 (a reconnect is progress)
        a = 0 if bi is None else (bi.bytes_acked or 0) + (bi.bytes_received or 0)
        r0 = 0 if bi is None else (bi.total_retrans or 0)
        got, r = out.get(c.portal, (0, 0))
        out[c.portal] = (got + max(info.bytes_acked + info.bytes_received - a, 0),
                         r + max((info.total_retrans or 0) - r0, 0))
    second.__dict__["_timeline_portal_steps"] = (weakref.ref(first), out)
    return out


def _disk_names(s: Snapshot) -> tuple[str, ...]:
    """The "vm/disk" names of a snapshot's disks, in its order (made once per snapshot)."""
    names = s.__dict__.get("_timeline_disk_names")
    if names is None:
        names = s.__dict__["_timeline_disk_names"] = tuple(key for key, _d in _disk_keys(s))
    return names


class _DiskSeries:
    """The per-disk series (requests, mean latency per interval) of a list of snapshots that all hold the same
    disks in the same order, carried from cycle to cycle as the list slides: the steps that left its front are
    cut off each disk's series and the new steps appended, instead of walking every step of every disk again
    (the live diagnosis' window and its recent intervals each slide by one snapshot per cycle). The series are
    exactly the walk's (:func:`build_timeline`'s general loop) over the same snapshots."""

    __slots__ = ("refs", "names", "keys", "ops", "ms")

    def __init__(self):
        self.refs: tuple = ()  # weak references to the snapshots
        self.names: tuple[str, ...] = ()  # every snapshot's _disk_names
        self.keys: list[tuple] = []  # ("vm/disk", (vm, disk)) in that order
        self.ops: list[list] = []  # per disk (in that order): requests completed per interval
        self.ms: list[list] = []  # per disk: mean latency per interval

    def _append(self, a: Snapshot, b: Snapshot) -> None:
        step = disk_steps(a, b)
        get = step.get
        for (_name, key), ops, ms in zip(self.keys, self.ops, self.ms):
            x = get(key)
            if x is None:
                ops.append(None)
                ms.append(None)
            else:
                ops.append(x[1])
                ms.append(x[2])

    def update(self, snaps: list[Snapshot]) -> bool:
        """Slide to ``snaps`` (or walk them afresh); False when their disks differ between snapshots."""
        drop = slid(self.refs, snaps)
        names = self.names
        if drop is not None and all(_disk_names(s) == names for s in snaps[len(self.refs) - drop:]):
            if drop:
                for series in self.ops:
                    del series[:drop]
                for series in self.ms:
                    del series[:drop]
            keep = len(self.refs) - drop
        else:
            names = _disk_names(snaps[0])
            if not all(_disk_names(s) == names for s in snaps[1:]):
                self.refs = ()
                return False
            self.names = names
            self.keys = list(zip(names, snaps[0].vm_disks))
            self.ops = [[] for _ in names]
            self.ms = [[] for _ in names]
            keep = 1
        for a, b in zip(snaps[keep - 1:], snaps[keep:]):
            self._append(a, b)
        self.refs = tuple(weakref.ref(s) for s in snaps)
        return True


def slid(refs: tuple, snaps: list[Snapshot]) -> int | None:
    """How many snapshots left the front of the list ``refs`` (weak references) was made of, when ``snaps``
    is that list slid forward (its remaining snapshots, the same objects, at the front); None otherwise."""
    if len(refs) < 2 or not snaps:
        return None
    head = snaps[0]
    for drop, r in enumerate(refs):
        if r() is head:
            keep = len(refs) - drop
            if keep < 2 or keep > len(snaps):
                return None
            return drop if all(r() is s for r, s in zip(refs[drop:], snaps)) else None
    return None


def slide_slot(slots: list, limit: int, new, snaps: list[Snapshot]):
    """(slot, its ``update(snaps)``'s result) for state kept across cycles over a sliding list of snapshots:
    of ``slots`` (most recently used first, at most ``limit``), the one that slid to ``snaps`` with the fewest
    snapshots out and in, else the least recently used one (or ``new()`` while there are fewer than
    ``limit``) to be walked afresh by its ``update`` (:func:`slid` over each slot's ``refs``). The slot is
    put back at the front after its update; one whose update raised is dropped, not reused half-updated. Call under the slots' lock."""
    best, slot = None, None
    for x in slots:
        drop = slid(x.refs, snaps)
        if drop is not None:
            cost = drop + len(snaps) - (len(x.refs) - drop)
            if best is None or cost < best:
                best, slot = cost, x
    if slot is None:
        slot = slots.pop() if len(slots) >= limit else new()
    else:
        slots.remove(slot)
    res = slot.update(snaps)
    slots.insert(0, slot)
    return slot, res


# the lists of snapshots _disk_series saw last, most recently used first: two slots, the live diagnosis' window
# and its recent intervals each slide their own; used and replaced under _series_lock
_series_lock = threading.Lock()
_SERIES_SLOTS = 2
_series_slots: list[_DiskSeries] = []


def _disk_series(snaps: list[Snapshot]) -> _DiskSeries | None:
    """The per-disk series of ``snaps`` (:func:`slide_slot`); None when the snapshots' disks differ. Call under
    ``_series_lock``."""
    slot, same_disks = slide_slot(_series_slots, _SERIES_SLOTS, _DiskSeries, snaps)
    return slot if same_disks else None


def build_timeline(snaps: list[Snapshot], paths=()) -> Timeline:
    """The per-interval series of ``snaps`` (oldest first); ``paths`` map disks to portals."""
    times = tuple(s.timestamp for s in snaps)
    n = len(snaps)
    portal_of = {f"{p.vm}/{p.disk}": p.portal for p in paths if p.portal}
    if n >= 2:
        with _series_lock:
            slid = _disk_series(snaps)
            if slid is not None:  # the same disks in every snapshot: the series carried forward
                disk_ops = {key: tuple(v) for (key, _k), v in zip(slid.keys, slid.ops)}
                disk_ms = {key: tuple(v) for (key, _k), v in zip(slid.keys, slid.ms)}
    else:
        slid = None
    if slid is not None:
        disk_portal = {key: portal_of.get(key) or (fmt_endpoint(*d.hosts[0]) if d.hosts else None)
                       for key, d in _disk_keys(snaps[0])}
    else:
        disk_ops, disk_ms, disk_portal = _walk_disks(snaps, portal_of)
    portals = sorted(set().union(*(_portals(s) for s in snaps)))
    progress = {p: [None] * max(n - 1, 0) for p in portals}
    retrans = {p: [0] * max(n - 1, 0) for p in portals}
    backoff = {p: [0] * n for p in portals}
    ack_age: dict[str, list] = {p: [None] * n for p in portals}
    unacked = {p: [0] * n for p in portals}
    for i, s in enumerate(snaps):
        for p, (b, u, age) in _portal_state(s).items():
            backoff[p][i], unacked[p][i], ack_age[p][i] = b, u, age
        if i:
            for p, (got, r) in _portal_steps(snaps[i - 1], s).items():
                progress[p][i - 1], retrans[p][i - 1] = got, r
    return Timeline(
        times=times,
        disk_ops=disk_ops,
        disk_ms=disk_ms,
        disk_portal=disk_portal,
        portal_progress={k: tuple(v) for k, v in progress.items()},
        portal_retrans={k: tuple(v) for k, v in retrans.items()},
        portal_backoff={k: tuple(v) for k, v in backoff.items()},
        portal_ack_age_ms={k: tuple(v) for k, v in ack_age.items()},
        portal_unacked={k: tuple(v) for k, v in unacked.items()},
    )


def _walk_disks(snaps: list[Snapshot], portal_of: dict) -> tuple[dict, dict, dict]:
    """(disk_ops, disk_ms, disk_portal) of :class:`Timeline`, walked snapshot by snapshot (disks that come
    and go within the window: None where a disk has no step)."""
    steps = max(len(snaps) - 1, 0)
    disk_ops: dict[str, list] = {}
    disk_ms: dict[str, list] = {}
    disk_portal: dict[str, str | None] = {}
    for i, s in enumerate(snaps):
        for key, d in _disk_keys(s):
            if key not in disk_portal:
                disk_portal[key] = portal_of.get(key) or (fmt_endpoint(*d.hosts[0]) if d.hosts else None)
                disk_ops[key] = [None] * steps
                disk_ms[key] = [None] * steps
        if i:
            for key, done, ms in disk_steps(snaps[i - 1], s).values():
                disk_ops[key][i - 1] = done
                disk_ms[key][i - 1] = ms
    return ({k: tuple(v) for k, v in disk_ops.items()}, {k: tuple(v) for k, v in disk_ms.items()}, disk_portal)


# -- gaps: runs of intervals without progress, and when inside them things stopped and resumed ----------


def zero_runs(series) -> list[tuple[int, int]]:
    """(first, last) interval indexes of each run of 0 in ``series`` (None breaks a run)."""
    runs, start = [], None
    for i, v in enumerate(series):
        if v == 0:
            start = i if start is None else start
        else:
            if start is not None:
                runs.append((start, i - 1))
            start = None
    if start is not None:
        runs.append((start, len(series) - 1))
    return runs


def usual_rate(times, series, first: int, last: int) -> float | None:
    """Median per-second rate of the intervals with progress outside the run [first, last] and not next
    to it (the neighbours are the partial intervals being estimated); without any, the faster neighbour's."""
    rates = [v / (times[i + 1] - times[i]) for i, v in enumerate(series)
             if v and (i < first - 1 or i > last + 1) and times[i + 1] > times[i]]
    if rates:
        return median(rates)
    # a short window: only the two partial neighbours; the faster one is the nearer to the usual rate
    # (with one neighbour only, its own rate would put the edge at its end: no estimate, the middle)
    partial = [v / (times[i + 1] - times[i]) for i, v in enumerate(series)
               if v and i in (first - 1, last + 1) and times[i + 1] > times[i]]
    return max(partial) if len(partial) == 2 else None


def gap_bounds(times, series, first: int, last: int, rate: float | None = None) -> tuple[float, float | None]:
    """Estimated (stopped, resumed) of the run of silent intervals [first, last] of ``series``.

    Stopped: in the interval before the run, the work done at the usual rate took ``done / rate``
    seconds from its start; resumed: in the interval after it, ``done / rate`` seconds before its end;
    each clamped to its interval, the interval's middle when no rate is known. Resumed is None when the
    run reaches the end of the series (still silent); a run from the first interval starts at times[0]."""
    rate = usual_rate(times, series, first, last) if rate is None else rate

    def inside(t0, t1, done, from_start):
        if not rate or done is None:
            return (t0 + t1) / 2
        d = min(max(done / rate, 0.0), t1 - t0)
        return t0 + d if from_start else t1 - d

    stopped = times[0] if first == 0 else inside(times[first - 1], times[first], series[first - 1], True)
    resumed = None if last >= len(series) - 1 else inside(times[last + 1], times[last + 2], series[last + 1], False)
    return stopped, resumed


@dataclass(frozen=True)
class DiskStall:
    disk: str  # "vm/disk"
    stalled_s: float  # how long it completed no request
    worst_ms: float | None  # worst mean latency of an interval around the stall (ms)

    @property
    def vm(self) -> str:
        return self.disk.rsplit("/", 1)[0]


@dataclass(frozen=True)
class Outage:
    portal: str
    start: float  # estimated: the last acknowledgement before the silence
    end: float | None  # estimated: progress again (None: still down at the window's end)
    since_window_start: bool  # already silent at the window's first snapshot (start is a bound)
    max_backoff: int
    retransmits: int
    stalls: tuple[DiskStall, ...]

    @property
    def recovered(self) -> bool:
        return self.end is not None

    def seconds(self, now: float) -> float:
        return (self.end if self.end is not None else now) - self.start


def _disk_stall(tl: Timeline, key: str, first: int, last: int, start: float, end: float | None) -> DiskStall | None:
    """The disk's own silent run overlapping intervals [first, last] of an outage from ``start`` to
    ``end``: its requests cannot complete while the path is silent, so it stopped no earlier than the
    outage (the ACK estimate beats the rate one, which a busy vCPU skews) and resumed no earlier than
    the path, at the first of its own intervals with completions again."""
    ops = tl.disk_ops[key]
    for a, b in zero_runs(ops):
        if b < first or a > last:
            continue
        if not any(v for v in ops[:a] if v):  # not busy before the run: idle, not stalled
            continue
        stopped, resumed = gap_bounds(tl.times, ops, a, b)
        stopped = max(stopped, start)
        if resumed is not None:
            resumed = max(tl.times[b + 1], end if end is not None else resumed)
        lo, hi = max(a - 1, 0), min(b + 1, len(ops) - 1)
        worst = [m for m in tl.disk_ms[key][lo:hi + 1] if m is not None]
        return DiskStall(key, round((resumed if resumed is not None else tl.times[-1]) - stopped, 3),
                         round(max(worst), 3) if worst else None)
    return None


def find_outages(tl: Timeline) -> list[Outage]:
    """Every run of silent intervals per portal that TCP retransmitted into (module docstring)."""
    out = []
    for portal, prog in sorted(tl.portal_progress.items()):
        disks = [k for k, p in tl.disk_portal.items() if p == portal]
        # the first interval each disk completed something in (a disk is busy before interval i if it is < i)
        first_busy: dict[str, int | None] = {}
        for k in disks:
            first_busy[k] = None
            for j, x in enumerate(tl.disk_ops[k]):
                if x:
                    first_busy[k] = j
                    break
        silent = []
        for i, v in enumerate(prog):
            if v != 0:  # progress (or unknown): not silent, whatever the disks did
                silent.append(v if v is not None else None)
                continue
            # the disks busy before interval i: did any of them complete something in it (stop at the first)
            busy_before, nothing_done = False, True
            for k in disks:
                j = first_busy[k]
                if j is not None and j < i:
                    busy_before = True
                    if tl.disk_ops[k][i]:
                        nothing_done = False
                        break
            waiting = busy_before or tl.portal_unacked[portal][i + 1] > 0
            silent.append(0 if (nothing_done and waiting) else None)  # quiet or still completing: not an outage
        for first, last in zero_runs(silent):
            backoff = max(tl.portal_backoff[portal][first:last + 2])
            retrans = sum(tl.portal_retrans[portal][first:last + 2])  # the run and the interval that ended it
            if backoff < 1 and retrans == 0:
                continue  # quiet, not unanswered: nothing was being retransmitted
            stopped, resumed = gap_bounds(tl.times, prog, first, last)
            age = tl.portal_ack_age_ms[portal][first] if first > 0 else None
            if age is not None and first > 0:  # the freshest ACK's age at the last snapshot before the silence
                stopped = min(max(tl.times[first] - age / 1000, tl.times[first - 1]), tl.times[first])
            stalls = tuple(s for s in (_disk_stall(tl, k, first, last, stopped, resumed) for k in sorted(disks))
                           if s is not None)
            out.append(Outage(portal, stopped, resumed, first == 0, backoff, retrans, stalls))
        out.extend(_silences_between(tl, portal, disks, first_busy, [o for o in out if o.portal == portal]))
    return sorted(out, key=lambda o: (o.portal, o.start))


# Two unanswered RTOs in a row (health.DEAD_BACKOFF) take at least TCP_RTO_MIN (200 ms) + twice that:
# a freshest ACK younger than this at such a snapshot is the ACK that ended the silence, not its start.
MIN_SILENCE_MS = 600


def _silences_between(tl: Timeline, portal: str, disks: list[str], first_busy: dict,
                      found: list[Outage]) -> list[Outage]:
    """Outages shorter than the agent's interval (a 7 s silence at a 5 s interval seldom fills a whole
    interval): a snapshot taken inside the silence shows it, the connections backing off (at least
    health.DEAD_BACKOFF unanswered RTOs) with nothing acknowledged for ``age`` ms. It started ``age``
    before that snapshot and ended where progress came back in the interval after it."""
    from agent.health import DEAD_BACKOFF

    out = []
    prog, times = tl.portal_progress[portal], tl.times
    for k in range(1, len(times) - 1):
        age, backoff = tl.portal_ack_age_ms[portal][k], tl.portal_backoff[portal][k]
        if age is None or backoff < DEAD_BACKOFF or age < MIN_SILENCE_MS or not prog[k]:
            continue  # not silent at this snapshot, or silent on into the next interval (a run: above)
        t = times[k]
        if any(o.start - 1e-6 <= t <= (o.end if o.end is not None else times[-1]) + 1e-6 for o in found + out):
            continue
        start = max(t - age / 1000, times[k - 1] if prog[k - 1] else times[0])
        rate = usual_rate(times, prog, k, k - 1)  # every interval but the two around the snapshot
        done = prog[k]
        d = min(done / rate, times[k + 1] - t) if rate else (times[k + 1] - t) / 2
        end = times[k + 1] - d
        stalls = []
        for key in sorted(disks):
            if first_busy[key] is None or first_busy[key] >= k:
                continue  # not busy before: idle, not stalled
            around = [m for m in tl.disk_ms[key][k - 1:k + 1] if m is not None]
            stalls.append(DiskStall(key, round(end - start, 3), round(max(around), 3) if around else None))
        out.append(Outage(portal, start, end, False, backoff, sum(tl.portal_retrans[portal][k - 1:k + 1]),
                          tuple(stalls)))
    return out
