"""TCP retransmits and resets per connection (probes/tcp_retrans.bpf.c).

Tracepoints: tcp:tcp_retransmit_skb (4.15+, required), tcp:tcp_retransmit_synack
(4.15+), tcp:tcp_send_reset (4.15+; sockaddr layout since 6.10),
tcp:tcp_receive_reset (4.15+). Counting happens in the kernel; each cycle
reads the maps.

Prometheus counters stay monotonic although the kernel maps are bounded
LRU maps: per connection, the increase since the last read is added to a
running total per storage remote (address, port); "other" is the kernel's
never-evicted total minus the storage total. The running totals are bounded
too (any local user can make SYN retransmits to many addresses on a storage
port): at most ``max_remotes`` remotes, the one with the oldest new event
evicted first (a remote is "seen" when its counts move, so the idle entries
of a flood never push out an active portal), and a remote without a new
event for ``expire_cycles`` reads is forgotten; both counted in ``dropped`` (exported
as kvmscope_collector_dropped_samples_total). A forgotten remote that comes
back starts from zero (a counter reset, which rate() handles).

Per-connection entries and stream events cover connections to a storage
port; every other connection only counts in the "other" aggregate (the
kernel returns before any hash map work) unless the probe is built with
``all_connections=True`` (``-DTRACK_ALL_CONNS``: a second LRU map of all
connections, and their events in the stream).

Events lost: stream events dropped by the rate cap or a full ring buffer,
plus program recursion misses. Cost per storage-port event: one per-CPU
array lookup, one hash lookup, one ring buffer record (no reader wakeup:
the rings are drained by polling each cycle).
"""

from __future__ import annotations

import ctypes

from agent.ebpf import decode
from agent.ebpf.bounded import AgingTable, Reuse, Tuples, shared_copy
from agent.ebpf.loader import Probe
from agent.records.ebpf import TcpConnection, TcpRetransData, TcpRetransEvent

# The C side of everything below is probes/tcp_retrans.h (checked by
# tests/unit/test_probe_layouts.py). KINDS: enum kind, in order.
KINDS = ("retransmit", "synack_retransmit", "reset_sent", "reset_received")
TOT_STORAGE, TOT_N = 4, 8


class ConnKey(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
    ]


class ConnVal(ctypes.Structure):
    _fields_ = [
        ("count", ctypes.c_uint64 * len(KINDS)),
        ("last_ns", ctypes.c_uint64),
        ("last_state", ctypes.c_uint32),
        ("state_mask", ctypes.c_uint32),
    ]


class Event(ctypes.Structure):
    _fields_ = [
        ("ts", ctypes.c_uint64),
        ("state", ctypes.c_int32),
        ("kind", ctypes.c_uint8),
        ("storage", ctypes.c_uint8),
        ("family", ctypes.c_uint16),
        ("sport", ctypes.c_uint16),
        ("dport", ctypes.c_uint16),
        ("saddr", ctypes.c_uint8 * 16),
        ("daddr", ctypes.c_uint8 * 16),
    ]


class TotalsVal(ctypes.Structure):
    _fields_ = [("t", ctypes.c_uint64 * TOT_N), ("stream", decode.KsStream)]


STRUCTS = {"conn_key": ConnKey, "conn_val": ConnVal, "event": Event, "totals_val": TotalsVal}
# maps read through these types (not bcc's own reading of the C)
TABLES = {"storage_conns": (ConnKey, ConnVal), "conns": (ConnKey, ConnVal), "totals": (ctypes.c_int, TotalsVal)}


def conn_fields(k) -> tuple[str, str, int, str, int]:
    fam = int(k.family)
    return (decode.family_name(fam), decode.addr_text(fam, bytes(k.saddr)), int(k.sport),
            decode.addr_text(fam, bytes(k.daddr)), int(k.dport))


def connection(k: ConnKey, v: ConnVal, storage: bool) -> TcpConnection:
    counts = tuple(int(c) for c in v.count)
    fam, sa, sp, da, dp = conn_fields(k)
    mask = int(v.state_mask)
    return TcpConnection(fam, sa, sp, da, dp, storage, *counts, decode.tcp_state_name(int(v.last_state)),
                         tuple(decode.tcp_state_name(s) for s in range(32) if mask >> s & 1), int(v.last_ns))


MAX_REMOTES = 1024  # storage remotes with running totals (as many as the kernel's MAX_STORAGE_CONNS connections)
EXPIRE_CYCLES = 17280  # reads (a day at 5 s) without a new event before a remote's totals are forgotten


class TcpRetransProbe(Probe):
    name = "tcp_retrans"
    source_file = "tcp_retrans.bpf.c"
    required = ("tcp:tcp_retransmit_skb",)
    optional = ("tcp:tcp_retransmit_synack", "tcp:tcp_send_reset", "tcp:tcp_receive_reset")
    description = "TCP retransmits and resets per connection"

    def __init__(self, opts=None, all_connections: bool = False,
                 max_remotes: int = MAX_REMOTES, expire_cycles: int = EXPIRE_CYCLES):
        super().__init__(opts)
        self.all_connections = all_connections
        self._prev: dict[bytes, tuple[int, ...]] = {}  # as big as the kernel map, rebuilt every read
        # running totals per storage remote: bounded, a remote gone from the kernel map is forgotten
        self._storage_cum: AgingTable[tuple[str, int], dict[str, int]] = AgingTable(max_remotes, expire_cycles)
        self._copy: dict[tuple[str, int], dict[str, int]] = {}  # what the last read returned
        self._pending: list[TcpRetransEvent] = []
        self._conns: Reuse[TcpConnection] = Reuse()
        self._tuples = Tuples()

    @property
    def dropped(self) -> dict[str, int]:
        """Storage remotes whose running totals were forgotten: evicted (over max_remotes) or expired."""
        return self._storage_cum.counts()

    def _fields(self, event: str) -> dict[str, str]:
        try:
            return decode.parse_format_fields(self.opts.paths.read_text(self.opts.paths.tracefs / "events" / "tcp" / event / "format"))
        except OSError:
            return {}

    def extra_cflags(self, present):
        flags = ["-DTRACK_ALL_CONNS"] if self.all_connections else []
        if "err" in self._fields("tcp_retransmit_skb"):
            flags.append("-DTCP_RETRANSMIT_HAS_ERR")
        if "tcp:tcp_send_reset" in present:
            fields = self._fields("tcp_send_reset")
            if "sport" not in fields and "saddr" in fields:
                flags.append("-DTCP_SEND_RESET_SOCKADDR")
        return flags

    def on_loaded(self):
        for name, (key, leaf) in TABLES.items():
            if name != "conns" or self.all_connections:
                self.bpf[name.encode()] = self.bpf.get_table(name.encode(), key, leaf)
        self.bpf[b"events"].open_ring_buffer(self._on_event)

    def _on_event(self, _ctx, data, _size):
        e = ctypes.cast(data, ctypes.POINTER(Event)).contents
        fam = int(e.family)
        self._pending.append(TcpRetransEvent(
            int(e.ts), KINDS[e.kind] if e.kind < len(KINDS) else str(e.kind), decode.tcp_state_name(int(e.state)),
            decode.family_name(fam), decode.addr_text(fam, bytes(e.saddr)), decode.shared_int(e.sport),
            decode.addr_text(fam, bytes(e.daddr)), decode.shared_int(e.dport), bool(e.storage)))

    def _totals(self) -> tuple[list[int], int]:
        tab = self.bpf[b"totals"]
        t, _sent, dropped = decode.sum_totals(tab.getvalue(tab.Key(0)), TOT_N)
        return t, dropped

    def events_and_lost(self):
        t, dropped = self._totals()
        return sum(t[:TOT_STORAGE]), dropped

    def accumulate(self, rows) -> dict[tuple[str, int], dict[str, int]]:
        """One read of the storage connections map, ``rows`` of (raw key, (remote address, port), counts per
        kind), into the running totals per remote; returns a copy of them (the snapshot's own, sharing the last read's where unchanged)."""
        seen: dict[bytes, tuple[int, ...]] = {}
        for raw, remote, counts in rows:
            prev = self._prev.get(raw)
            deltas = [decode.counter_delta(None if prev is None else prev[i], c) for i, c in enumerate(counts)]
            seen[raw] = counts
            if any(deltas):  # activity marks a remote seen: a flood's idle entries do not push it out
                cum = self._storage_cum.setdefault(remote, lambda: dict.fromkeys(KINDS, 0))
                for kind, d in zip(KINDS, deltas):
                    cum[kind] += d
        self._prev = seen
        self._storage_cum.end_cycle()
        self._copy = shared_copy(self._storage_cum.items(), self._copy)
        return self._copy

    def read(self) -> TcpRetransData:
        b = self.bpf
        self._pending = []
        b.ring_buffer_consume()
        events = tuple(self._pending)
        conns = []
        rows = []
        tables = (("storage_conns", True), ("conns", False)) if self.all_connections else (("storage_conns", True),)
        for table, storage in tables:
            for k, v in b[table.encode()].items():
                raw = bytes(k)
                # rebuilt only when the entry changed: the history shares the record of an idle connection
                c = self._conns.get(raw + bytes(v) + (b"s" if storage else b"o"), lambda k=k, v=v, s=storage: connection(k, v, s))
                if storage:
                    rows.append((raw, (c.daddr, c.dport),
                                 (c.retransmits, c.synack_retransmits, c.resets_sent, c.resets_received)))
                conns.append(c)
        self._conns.end_cycle()
        storage_totals = self.accumulate(rows)
        t, dropped = self._totals()
        totals = {kind: t[i] for i, kind in enumerate(KINDS)}
        storage_kernel = {kind: t[TOT_STORAGE + i] for i, kind in enumerate(KINDS)}
        other = {kind: totals[kind] - storage_kernel[kind] for kind in KINDS}
        return TcpRetransData(
            connections=self._tuples.same("connections", conns),
            storage=storage_totals,
            other=other,
            totals=totals,
            events=events,
            stream_dropped=dropped,
            probe=self.stats(),
            tracepoints=self._tuples.same("tracepoints", self.report.tracepoints),
        )
