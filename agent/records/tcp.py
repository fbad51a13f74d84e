"""TCP records: tcp_info of a socket, storage connections (source: storage_tcp) and the host-wide
TCP counters of /proc/net/snmp and /proc/net/netstat (source: host_tcp)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from functools import cached_property

from agent.records.addr import fmt_conn, fmt_endpoint


@dataclass(frozen=True)
class TcpInfo:
    state: int | None = None
    ca_state: int | None = None
    retransmits: int | None = None  # consecutive unrecovered RTOs now
    probes: int | None = None
    backoff: int | None = None
    rto_us: int | None = None
    ato_us: int | None = None
    snd_mss: int | None = None
    rcv_mss: int | None = None
    unacked: int | None = None
    sacked: int | None = None
    lost: int | None = None
    retrans: int | None = None
    last_data_sent_ms: int | None = None
    last_data_recv_ms: int | None = None
    last_ack_recv_ms: int | None = None
    pmtu: int | None = None
    rtt_us: int | None = None
    rttvar_us: int | None = None
    snd_ssthresh: int | None = None
    snd_cwnd: int | None = None
    reordering: int | None = None  # the sender's reordering degree (segments)
    rcv_rtt_us: int | None = None  # receive-side RTT estimate (0 until data was received)
    rcv_space: int | None = None
    total_retrans: int | None = None
    bytes_acked: int | None = None
    bytes_received: int | None = None
    segs_out: int | None = None
    segs_in: int | None = None
    notsent_bytes: int | None = None
    min_rtt_us: int | None = None  # windowed minimum RTT (net.ipv4.tcp_min_rtt_wlen, 300 s)
    data_segs_in: int | None = None
    data_segs_out: int | None = None
    delivery_rate: int | None = None
    busy_time_us: int | None = None  # time with data in flight
    rwnd_limited_us: int | None = None  # ... of which limited by the peer's receive window
    sndbuf_limited_us: int | None = None  # ... of which limited by our send buffer
    delivered: int | None = None
    delivered_ce: int | None = None
    bytes_sent: int | None = None
    bytes_retrans: int | None = None
    dsack_dups: int | None = None
    reord_seen: int | None = None
    rcv_ooopack: int | None = None  # segments received out of order (a hole toward the host)
    snd_wnd: int | None = None
    rcv_wnd: int | None = None
    total_rto: int | None = None
    total_rto_recoveries: int | None = None
    total_rto_time_ms: int | None = None


_TCP_INFO_NAMES = tuple(f.name for f in fields(TcpInfo))
_TCP_INFO_VALUES = operator.attrgetter(*_TCP_INFO_NAMES)
_TCP_INFO_NONE = dict.fromkeys(_TCP_INFO_NAMES)
_new = object.__new__


def tcp_info_of(names: tuple[str, ...], values) -> TcpInfo:
    """``TcpInfo(**dict(zip(names, values)))`` (the fields not named None), without the ~50 frozen-dataclass
    ``object.__setattr__`` calls of its ``__init__`` (TcpInfo has no ``__post_init__``, no slots): the same
    record, equal and hashed alike, for the hundreds of connections decoded every cycle."""
    info = _new(TcpInfo)
    d = info.__dict__
    d.update(_TCP_INFO_NONE)
    d.update(zip(names, values))
    return info


def share_tcp_info(new: TcpInfo | None, prev: TcpInfo | None) -> TcpInfo | None:
    """``new``, holding ``prev``'s value objects where they are equal (``prev`` itself when all are): most of a
    connection's ~50 tcp_info numbers (MSS, window, RTT, counters of an idle direction) do not move between two
    cycles, and each of those big ints would otherwise be one more object per snapshot of the history."""
    if new is None or prev is None or new is prev:
        return new
    nv, pv = _TCP_INFO_VALUES(new), _TCP_INFO_VALUES(prev)
    if nv == pv:
        return prev
    return tcp_info_of(_TCP_INFO_NAMES, [p if p == n else n for p, n in zip(pv, nv)])


@dataclass(frozen=True)
class StorageConnection:
    family: str  # ipv4 | ipv6
    state: str
    src: str
    sport: int
    dst: str
    dport: int
    inode: int
    pid: int | None
    comm: str | None
    info: TcpInfo | None

    # formatted once per record (the join, diagnosis, renderers and documents each ask for them)
    @cached_property
    def portal(self) -> str:
        return fmt_endpoint(self.dst, self.dport)

    @cached_property
    def four_tuple(self) -> str:
        return fmt_conn(self.src, self.sport, self.dst, self.dport)


@dataclass(frozen=True)
class StorageConnections:
    connections: tuple[StorageConnection, ...] = ()


@dataclass(frozen=True)
class HostTcpCounters:
    tcp: dict[str, int] = field(default_factory=dict)
    tcp_ext: dict[str, int] = field(default_factory=dict)
