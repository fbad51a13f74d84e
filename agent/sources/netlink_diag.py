"""Socket enumeration with tcp_info through NETLINK_SOCK_DIAG (inet_diag).

The kernel interface behind ``ss -tni``: one SOCK_DIAG_BY_FAMILY dump per
address family returns every TCP socket with its 4-tuple, state, inode and,
with the INET_DIAG_INFO extension, ``struct tcp_info`` (include/uapi/linux/
tcp.h). ``struct tcp_info`` only grows at its end, so fields are decoded by
offset as far as the returned length reaches; a field the running kernel
does not have is None.

The receive side (what the host sees of the target's sending) is here too:
``rcv_rtt_us`` (the receiver's RTT estimate, from the time a window of data
takes to arrive), ``rcv_ooopack`` (segments that arrived out of order: a
hole, i.e. loss or reordering toward the host), ``dsack_dups`` (duplicate
segments the peer reported: spurious retransmits), ``reord_seen``,
``bytes_received``, ``segs_in``/``data_segs_in``; and the sender's limits
(``busy_time_us``, ``rwnd_limited_us``, ``sndbuf_limited_us``, ``delivered``).

Kernel versions, by offset (a field past the returned length is None, so an
older kernel degrades field by field): rcv_rtt/rcv_space/reordering 2.6;
bytes_acked/received 4.1; segs_out/in 4.2; min_rtt, data_segs_in/out 4.6;
delivery_rate 4.9; busy/rwnd/sndbuf-limited 4.10; delivered(_ce) 4.18;
bytes_sent/retrans, dsack_dups, reord_seen 4.19; rcv_ooopack, snd_wnd 5.4;
rcv_wnd 6.2; total_rto* 6.7. Needs no privileges for the caller's own
network namespace (tcp_info of other users' sockets is returned too).
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

from agent.records.tcp import TcpInfo, tcp_info_of

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
INET_DIAG_INFO = 2

# state numbers: include/net/tcp_states.h (one table for inet_diag and the probes)
from agent.ebpf.decode import TCP_STATES  # noqa: E402

# every state but LISTEN (we want connections, not listeners)
ALL_BUT_LISTEN = sum(1 << s for s in TCP_STATES if s != 10)

# (name, struct code, offset) in struct tcp_info; u8 flags first, then u32s, u64s...
_TCP_INFO_FIELDS = [
    ("state", "B", 0),
    ("ca_state", "B", 1),
    ("retransmits", "B", 2),
    ("probes", "B", 3),
    ("backoff", "B", 4),
    ("rto_us", "I", 8),
    ("ato_us", "I", 12),
    ("snd_mss", "I", 16),
    ("rcv_mss", "I", 20),
    ("unacked", "I", 24),
    ("sacked", "I", 28),
    ("lost", "I", 32),
    ("retrans", "I", 36),
    ("last_data_sent_ms", "I", 44),
    ("last_data_recv_ms", "I", 52),
    ("last_ack_recv_ms", "I", 56),
    ("pmtu", "I", 60),
    ("rtt_us", "I", 68),
    ("rttvar_us", "I", 72),
    ("snd_ssthresh", "I", 76),
    ("snd_cwnd", "I", 80),
    ("reordering", "I", 88),
    ("rcv_rtt_us", "I", 92),
    ("rcv_space", "I", 96),
    ("total_retrans", "I", 100),
    ("bytes_acked", "Q", 120),
    ("bytes_received", "Q", 128),
    ("segs_out", "I", 136),
    ("segs_in", "I", 140),
    ("notsent_bytes", "I", 144),
    ("min_rtt_us", "I", 148),
    ("data_segs_in", "I", 152),
    ("data_segs_out", "I", 156),
    ("delivery_rate", "Q", 160),
    ("busy_time_us", "Q", 168),
    ("rwnd_limited_us", "Q", 176),
    ("sndbuf_limited_us", "Q", 184),
    ("delivered", "I", 192),
    ("delivered_ce", "I", 196),
    ("bytes_sent", "Q", 200),
    ("bytes_retrans", "Q", 208),
    ("dsack_dups", "I", 216),
    ("reord_seen", "I", 220),
    ("rcv_ooopack", "I", 224),
    ("snd_wnd", "I", 228),
    ("rcv_wnd", "I", 232),
    ("total_rto", "H", 240),
    ("total_rto_recoveries", "H", 242),
    ("total_rto_time_ms", "I", 244),
]


_TCP_INFO_STRUCTS: dict[int, tuple[struct.Struct, tuple[str, ...]]] = {}


def _tcp_info_struct(length: int) -> tuple[struct.Struct, tuple[str, ...]]:
    """One struct for every field a tcp_info of ``length`` bytes holds (pad bytes between them)."""
    t = _TCP_INFO_STRUCTS.get(length)
    if t is None:
        fmt, names, at = "=", [], 0
        for name, code, off in _TCP_INFO_FIELDS:
            size = struct.calcsize(code)
            if off + size > length:
                continue
            fmt += f"{off - at}x{code}" if off > at else code
            names.append(name)
            at = off + size
        t = (struct.Struct(fmt), tuple(names))
        if len(_TCP_INFO_STRUCTS) < 64:
            _TCP_INFO_STRUCTS[length] = t
    return t


def parse_tcp_info(buf: bytes) -> TcpInfo:
    st, names = _tcp_info_struct(len(buf))
    return tcp_info_of(names, st.unpack_from(buf))


class SharedTcpInfo:
    """tcp_info decoder for a source that dumps the same connections every cycle (storage_tcp): a socket's
    numbers that did not move since the last dump are the last TcpInfo's objects, and an unchanged tcp_info
    is the last TcpInfo itself (what :func:`agent.records.tcp.share_tcp_info` makes of two decoded records,
    here from the decoded tuple: one TcpInfo built per socket, none when nothing moved). Pass it as
    ``tcp_info`` to :func:`dump_tcp`; :meth:`rotate` after each complete dump (sockets not seen are forgotten)."""

    __slots__ = ("_last", "_now")

    def __init__(self):
        self._last: dict[tuple, tuple] = {}  # key -> (field names, values, TcpInfo) of the last dump
        self._now: dict[tuple, tuple] = {}

    def __call__(self, key: tuple, buf: bytes) -> TcpInfo:
        st, names = _tcp_info_struct(len(buf))
        vals = st.unpack_from(buf)
        last = self._last.get(key)
        if last is not None and last[0] is names:
            if last[1] == vals:
                self._now[key] = last
                return last[2]
            vals = tuple([p if p == n else n for p, n in zip(last[1], vals)])
        info = tcp_info_of(names, vals)
        self._now[key] = (names, vals, info)
        return info

    def rotate(self) -> None:
        self._last, self._now = self._now, {}


@dataclass(frozen=True)
class DiagSocket:
    family: int
    state: str
    src: str
    sport: int
    dst: str
    dport: int
    inode: int
    uid: int
    info: TcpInfo | None
    # idiag_timer: 0 none, 1 retransmit, 2 keepalive, 3 TIME_WAIT, 4 zero-window probe
    # (net/ipv4/tcp_diag.c / inet_diag.c); idiag_expires: ms until it fires
    timer: int | None = None
    timer_expires_ms: int | None = None


def _addr(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def build_request(family: int, states: int = ALL_BUT_LISTEN, seq: int = 1) -> bytes:
    sockid = b"\0" * 48
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, states) + sockid
    hdr = struct.pack("=IHHII", 16 + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
    return hdr + req


_new = object.__new__
_NLMSGHDR, _HEAD, _PORTS, _TAIL, _ATTR = (struct.Struct(f) for f in ("=IHHII", "=BBBB", "!HH", "=IIIII", "=HH"))


def parse_messages(data: bytes, dports: frozenset[int] | None = None,
                   tcp_info: SharedTcpInfo | None = None) -> tuple[list[DiagSocket], bool]:
    """Parse a netlink datagram of inet_diag messages. Returns (sockets, done).

    ``dports``: only sockets whose remote port is one of these (the others are not decoded); ``tcp_info``:
    decodes each socket's tcp_info, by (src, sport, dst, dport, inode) (default :func:`parse_tcp_info`)."""
    out = []
    off, n = 0, len(data)
    nlh, head, ports, tail, attr = _NLMSGHDR.unpack_from, _HEAD.unpack_from, _PORTS.unpack_from, _TAIL.unpack_from, \
        _ATTR.unpack_from
    while off + 16 <= n:
        length, mtype, _flags, _seq, _pid = nlh(data, off)
        if length < 16:
            break
        b, end = off + 16, min(off + length, n)  # the message's body: data[b:end]
        off += (length + 3) & ~3
        if mtype == NLMSG_DONE:
            return out, True
        if mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", data, b)[0] if end - b >= 4 else 0
            if code:
                raise OSError(code, f"inet_diag: {errno.errorcode.get(code, code)}")
            continue
        if mtype != SOCK_DIAG_BY_FAMILY or end - b < 72:
            continue
        sport, dport = ports(data, b + 4)
        if dports is not None and dport not in dports:
            continue
        family, state, timer, _retrans = head(data, b)
        src, dst = _addr(family, data[b + 8:b + 24]), _addr(family, data[b + 24:b + 40])
        expires, _rq, _wq, uid, inode = tail(data, b + 52)
        info = None
        a = b + 72
        while a + 4 <= end:
            alen, atype = attr(data, a)
            if alen < 4:
                break
            if atype == INET_DIAG_INFO:
                raw = data[a + 4:min(a + alen, end)]
                info = parse_tcp_info(raw) if tcp_info is None else tcp_info((src, sport, dst, dport, inode), raw)
            a += (alen + 3) & ~3
        sock = _new(DiagSocket)  # DiagSocket(...) without its frozen __init__'s setattr per field (every field)
        sock.__dict__.update(
            family=family,
            state=TCP_STATES.get(state, str(state)),
            src=src,
            sport=sport,
            dst=dst,
            dport=dport,
            inode=inode,
            uid=uid,
            info=info,
            timer=timer,
            timer_expires_ms=expires,
        )
        out.append(sock)
    return out, False


def dump_tcp(families=(socket.AF_INET, socket.AF_INET6), timeout: float = 2.0,
             dports: frozenset[int] | None = None, tcp_info: SharedTcpInfo | None = None) -> list[DiagSocket]:
    """Every non-listening TCP socket of this network namespace (only those to ``dports``, when given;
    ``tcp_info`` as for :func:`parse_messages`)."""
    result: list[DiagSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as s:
        s.settimeout(timeout)
        for seq, fam in enumerate(families, 1):
            s.send(build_request(fam, seq=seq))
            while True:
                socks, done = parse_messages(s.recv(1 << 16), dports, tcp_info)
                result.extend(socks)
                if done:
                    break
    return result
