"""Lifecycle of TCP connections on the storage ports (probes/tcp_lifecycle.bpf.c).

Tracepoints: sock:inet_sock_set_state (4.16+, required); tcp:tcp_receive_reset
and tcp:tcp_send_reset (optional) tell a reset from an orderly close.
A connection counts when its destination port is a storage port (this host
is the initiator, the process is the one that called connect()) or its
source port is (this host is the target; no process).

Events: connect, established, close, reset, failed (connect never
completed), abort (dropped without FIN or RST: retransmission timeout),
state (other transitions). Reconnect churn shows as connect counts per
remote; every event carries the connection's age and time established.
The connect event has source port 0: the kernel moves the socket to
SYN_SENT before it picks the local port (tcp_v4_connect); ``conn_id``
ties it to the connection's later events.

Events lost: stream events dropped by the rate cap or a full ring buffer,
and closes of sockets the probe never saw open (opened before it was
attached, or evicted from the bounded socket map).
"""

from __future__ import annotations

import ctypes

from agent.ebpf import decode
from agent.ebpf.bounded import AgingTable, Reuse, Tuples, shared_copy
from agent.ebpf.loader import Probe
from agent.records.ebpf import ConnEvent, LiveConn, TcpLifecycleData

# The C side of everything below is probes/tcp_lifecycle.h (checked by
# tests/unit/test_probe_layouts.py). KINDS: enum kind, in order; all but
# the last ("state") are counted per remote.
KINDS = ("connect", "established", "close", "reset", "failed", "abort", "state")
TOT_TRANSITIONS, TOT_TRACKED, TOT_UNTRACKED_CLOSE, TOT_N = range(4)
F_RST_RECV, F_RST_SENT, F_TARGET = 1, 2, 4


class SockVal(ctypes.Structure):
    _fields_ = [
        ("start_ns", ctypes.c_uint64),
        ("estab_ns", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("family", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


class CountKey(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint16),
        ("port", ctypes.c_uint16),
        ("kind", ctypes.c_uint32),
        ("remote", ctypes.c_uint8 * 16),
    ]


class Event(ctypes.Structure):
    _fields_ = [
        ("ts", ctypes.c_uint64),
        ("age_ns", ctypes.c_uint64),
        ("estab_ns", ctypes.c_uint64),
        ("tgid", ctypes.c_uint32),
        ("kind", ctypes.c_uint8),
        ("oldstate", ctypes.c_uint8),
        ("newstate", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("family", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
        ("comm", ctypes.c_char * 16),
    ]


class TotalsVal(ctypes.Structure):
    _fields_ = [("t", ctypes.c_uint64 * TOT_N), ("stream", decode.KsStream)]


STRUCTS = {"sock_val": SockVal, "count_key": CountKey, "event": Event, "totals_val": TotalsVal}
# maps read through these types (not bcc's own reading of the C)
TABLES = {"socks": (ctypes.c_uint64, SockVal), "counts": (CountKey, ctypes.c_uint64), "totals": (ctypes.c_int, TotalsVal)}


def event_from_raw(e: Event) -> ConnEvent:
    fam = int(e.family)
    flags = int(e.flags)
    reset = "received" if flags & F_RST_RECV else "sent" if flags & F_RST_SENT else ""
    return ConnEvent(
        int(e.ts), KINDS[e.kind] if e.kind < len(KINDS) else str(e.kind),
        decode.tcp_state_name(int(e.oldstate)), decode.tcp_state_name(int(e.newstate)),
        "target" if flags & F_TARGET else "initiator", decode.family_name(fam),
        decode.addr_text(fam, bytes(e.saddr)), decode.shared_int(e.sport), decode.addr_text(fam, bytes(e.daddr)),
        decode.shared_int(e.dport), decode.shared_int(e.tgid), decode.comm_text(e.comm), e.age_ns / 1e9,
        e.estab_ns / 1e9, reset,
        int(e.ts) - int(e.age_ns))


def live_conn(s: SockVal) -> LiveConn:
    fam = int(s.family)
    return LiveConn("target" if s.flags & F_TARGET else "initiator", decode.family_name(fam),
                    decode.addr_text(fam, bytes(s.saddr)), int(s.sport),
                    decode.addr_text(fam, bytes(s.daddr)), int(s.dport), int(s.tgid),
                    decode.comm_text(bytes(s.comm)), int(s.start_ns), bool(s.estab_ns))


class TcpLifecycleProbe(Probe):
    name = "tcp_lifecycle"
    source_file = "tcp_lifecycle.bpf.c"
    required = ("sock:inet_sock_set_state",)
    optional = ("tcp:tcp_receive_reset", "tcp:tcp_send_reset")
    description = "connect/established/close/reset of storage-port TCP connections"

    def __init__(self, opts=None, max_remotes: int = 1024, expire_cycles: int = 17280):
        super().__init__(opts)
        self._pending: list[ConnEvent] = []
        # `counts` is an LRU map: running totals per remote, bounded like tcp_retrans's
        self._prev: dict[bytes, int] = {}
        self._cum: AgingTable[tuple[str, int], dict[str, int]] = AgingTable(max_remotes, expire_cycles)
        self._copy: dict[tuple[str, int], dict[str, int]] = {}  # what the last read returned
        self._live: Reuse[LiveConn] = Reuse()
        self._tuples = Tuples()

    @property
    def dropped(self) -> dict[str, int]:
        """Remotes whose running totals were forgotten: evicted (over max_remotes) or expired."""
        return self._cum.counts()

    def accumulate(self, rows) -> dict[tuple[str, int], dict[str, int]]:
        """One read of ``counts``, rows of (raw key, (remote, port), kind, count summed over CPUs), into the
        running totals per remote (an entry pushed out of the LRU map and created again restarts at zero);
        returns a copy of them (sharing the last read's where unchanged)."""
        seen: dict[bytes, int] = {}
        for raw, remote, kind, n in rows:
            d = decode.counter_delta(self._prev.get(raw), n)
            seen[raw] = n
            if d:  # activity marks a remote seen (see TcpRetransProbe.accumulate)
                cum = self._cum.setdefault(remote, lambda: dict.fromkeys(KINDS[:6], 0))
                cum[kind] = cum.get(kind, 0) + d
        self._prev = seen
        self._cum.end_cycle()
        self._copy = shared_copy(self._cum.items(), self._copy)
        return self._copy

    def on_loaded(self):
        for name, (key, leaf) in TABLES.items():
            self.bpf[name.encode()] = self.bpf.get_table(name.encode(), key, leaf)
        self.bpf[b"events"].open_ring_buffer(self._on_event)

    def _on_event(self, _ctx, data, _size):
        self._pending.append(event_from_raw(ctypes.cast(data, ctypes.POINTER(Event)).contents))

    def _totals(self) -> tuple[list[int], int]:
        tab = self.bpf[b"totals"]
        t, _sent, dropped = decode.sum_totals(tab.getvalue(tab.Key(0)), TOT_N)
        return t, dropped

    def events_and_lost(self):
        t, dropped = self._totals()
        return t[TOT_TRANSITIONS], dropped + t[TOT_UNTRACKED_CLOSE]

    def read(self) -> TcpLifecycleData:
        b = self.bpf
        self._pending = []
        b.ring_buffer_consume()
        events = tuple(self._pending)
        rows = []
        for k, v in b[b"counts"].items():
            fam = int(k.family)
            kind = KINDS[k.kind] if k.kind < len(KINDS) else str(k.kind)
            rows.append((bytes(k), (decode.addr_text(fam, bytes(k.remote)), int(k.port)), kind, sum(int(c) for c in v)))  # per CPU
        counts = self.accumulate(rows)
        # a socket's record is rebuilt only when its entry changed: the history shares the others
        live = [self._live.get(bytes(s), lambda s=s: live_conn(s)) for _k, s in b[b"socks"].items()]
        self._live.end_cycle()
        t, dropped = self._totals()
        totals = {"transitions": t[TOT_TRANSITIONS], "tracked": t[TOT_TRACKED], "untracked_closes": t[TOT_UNTRACKED_CLOSE],
                  "stream_dropped": dropped}
        return TcpLifecycleData(counts, self._tuples.same("live", live), events, totals, self.stats(),
                                self._tuples.same("tracepoints", self.report.tracepoints))
