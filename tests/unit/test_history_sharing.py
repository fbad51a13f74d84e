"""What stays the same from one cycle to the next is held once by the agent's history (issue 17 goal 1):
the host sources give back last cycle's record of an idle block device or network interface, and the whole
collection when nothing moved; the probes' per-entry records have no per-instance dict. Real sysfs-shaped
trees under tmp_path, read by the sources themselves."""

from __future__ import annotations

import dataclasses

import pytest

from agent.config import Config
from agent.hostpaths import HostPaths
from agent.records import ebpf as rec
from agent.sources import SourceContext
from agent.sources.block_devices import BlockDevicesSource
from agent.sources.net_ifaces import NetIfacesSource


def _blockdev(root, name, devno, stat):
    d = root / "sys" / "block" / name
    (d / "slaves").mkdir(parents=True)
    (d / "holders").mkdir()
    (d / "dev").write_text(devno + "\n")
    (d / "stat").write_text(" ".join(str(n) for n in stat) + "\n")
    return d


def test_block_devices_share_idle_devices_and_unchanged_collections(tmp_path):
    busy = _blockdev(tmp_path, "sda", "8:0", [1] * 17)
    _blockdev(tmp_path, "sdb", "8:16", [2] * 17)
    src = BlockDevicesSource(SourceContext(Config(), HostPaths(sysfs=tmp_path / "sys")))
    one = src.collect()
    two = src.collect()
    assert two is one  # nothing moved
    (busy / "stat").write_text(" ".join(["5"] * 17) + "\n")
    three = src.collect()
    assert three is not two
    assert three.get("sdb") is one.get("sdb")  # idle: last cycle's record
    assert three.get("sda") is not one.get("sda") and three.get("sda").stat["read_ios"] == 5
    assert one.get("sda").stat["read_ios"] == 1  # the earlier snapshot's record did not change
    (tmp_path / "sys" / "block" / "sdb" / "dev").unlink()  # vanished
    four = src.collect()
    assert [d.name for d in four.devices] == ["sda"] and four.get("sda") is three.get("sda")


def _iface(root, name, rx):
    d = root / "sys" / "class" / "net" / name
    (d / "statistics").mkdir(parents=True)
    (d / "operstate").write_text("up\n")
    (d / "mtu").write_text("1500\n")
    for c in ("rx_packets", "tx_packets"):
        (d / "statistics" / c).write_text(f"{rx}\n")
    return d


def test_net_ifaces_share_idle_interfaces(tmp_path):
    busy = _iface(tmp_path, "ksbusy0", 1)
    _iface(tmp_path, "ksidle0", 7)
    src = NetIfacesSource(SourceContext(Config(), HostPaths(sysfs=tmp_path / "sys")))
    one = src.collect()
    assert src.collect() is one
    (busy / "statistics" / "rx_packets").write_text("9\n")
    two = src.collect()
    assert two is not one and two.get("ksidle0") is one.get("ksidle0")
    assert two.get("ksbusy0").counters["rx_packets"] == 9 and one.get("ksbusy0").counters["rx_packets"] == 1


@pytest.mark.parametrize("cls", [rec.BlockHistogram, rec.BlockProcess, rec.TcpConnection, rec.TcpRetransEvent,
                                 rec.ConnEvent, rec.LiveConn, rec.LibiscsiLatency, rec.LibiscsiContext])
def test_per_entry_probe_records_have_slots(cls):
    assert "__slots__" in vars(cls) and "__dict__" not in vars(cls)


def test_records_as_dict_unchanged_by_slots():
    c = rec.TcpConnection("ipv4", "10.0.0.1", 40000, "198.18.1.2", 3260, True, 1, 0, 0, 0, "ESTABLISHED",
                          ("SYN_SENT", "ESTABLISHED"), 5)
    d = c.as_dict()
    assert list(d) == [f.name for f in dataclasses.fields(c)] and d["states"] == ["SYN_SENT", "ESTABLISHED"]
    e = rec.ConnEvent(1, "connect", "CLOSE", "SYN_SENT", "initiator", "ipv4", "10.0.0.1", 40000, "198.18.1.2",
                      3260, 42, "qemu", 0.5, 0.0, "", 1)
    assert e.as_dict() == {f.name: getattr(e, f.name) for f in dataclasses.fields(e)} and len(e.as_dict()) == 16


class _Table:
    def __init__(self, rows):
        self.rows = rows

    def items(self):
        return list(self.rows)


def test_libiscsi_records_of_idle_luns_and_contexts_are_the_last_reads(monkeypatch):
    """The libiscsi probe's read over its maps (the probe's own ctypes layouts, filled here as the kernel would):
    an idle (process, context, LUN, op) and an unchanged context give back the last read's record."""
    from agent.ebpf import libiscsi as li

    p = li.LibiscsiProbe()
    monkeypatch.setattr(p, "percpu_totals", lambda name, n: [0] * n)
    monkeypatch.setattr(p, "stats", lambda: None)
    monkeypatch.setattr(p, "_cycle", lambda lats, stats: {})

    def lat(tgid, op, counts):
        v = li.LunVal()
        for s, c in counts.items():
            v.slots[s] = c
        v.sum_ns = sum(counts.values()) * 1000
        return li.LunKey(ctx=0x10, tgid=tgid, lun=0, op=op), [v]  # one CPU

    ctx = (li.CtxKey(ctx=0x10, tgid=7), li.CtxVal(lun=0, target=b"iqn.2026-11.lab:t1", portal=b"198.18.1.2:3260"))
    read_lat, write_lat = lat(7, 0, {10: 3}), lat(7, 1, {11: 2})
    p.bpf = {b"lat": _Table([read_lat, write_lat]), b"ctxs": _Table([ctx]), b"inflight": _Table([])}
    one = p.read()
    p.bpf[b"lat"] = _Table([read_lat, lat(7, 1, {11: 5})])  # writes went on, reads idle
    two = p.read()
    assert two.latencies[0] is one.latencies[0] and two.contexts[0] is one.contexts[0]
    assert two.latencies[1] is not one.latencies[1]
    assert (one.latencies[1].slots, two.latencies[1].slots) == ({11: 2}, {11: 5})
    assert two.latencies[1].count == 5 and two.contexts[0].portal == "198.18.1.2:3260"


def test_tcp_info_values_that_did_not_move_are_last_cycles():
    """storage_tcp over two dumps of one connection (tcp_info bytes as the kernel lays them out, parsed by the
    source's own parser): the numbers that did not move are the previous TcpInfo's objects, an unchanged tcp_info
    is the previous one, and the records compare as before."""
    import struct

    from agent.records.tcp import share_tcp_info
    from agent.sources.netlink_diag import DiagSocket, parse_tcp_info
    from agent.sources.storage_tcp import StorageTcpSource

    def info(acked):
        buf = bytearray(248)
        struct.pack_into("=I", buf, 16, 1460)  # tcpi_snd_mss
        struct.pack_into("=Q", buf, 120, acked)  # tcpi_bytes_acked
        struct.pack_into("=Q", buf, 128, 987654321)  # tcpi_bytes_received
        return parse_tcp_info(bytes(buf))

    dumps = [info(1000000), info(2000000), info(2000000)]
    sock = lambda i: DiagSocket(2, "ESTABLISHED", "10.0.0.1", 40000, "198.18.1.2", 3260, 77, 0, i)  # noqa: E731
    src = StorageTcpSource(SourceContext(Config(), HostPaths()), dump=lambda: [sock(dumps.pop(0))])
    src._owners[77] = (4242, "qemu-system-x86")  # no /proc scan: the owner is known
    a, b, c = (src.collect().connections[0].info for _ in range(3))
    assert a.bytes_acked == 1000000 and b.bytes_acked == 2000000 and b == info(2000000)
    assert b.bytes_received is a.bytes_received and b.snd_mss == a.snd_mss == 1460
    assert c is b
    assert share_tcp_info(None, a) is None and share_tcp_info(a, None) is a


def _diag_msg(inode, sport, tcp_info: bytes, dport=3260):
    """One inet_diag message as the kernel writes it: the socket, then an INET_DIAG_SHUTDOWN and an
    INET_DIAG_INFO attribute."""
    import socket
    import struct

    from agent.sources.netlink_diag import INET_DIAG_INFO, SOCK_DIAG_BY_FAMILY

    body = struct.pack("=BBBB", socket.AF_INET, 1, 0, 0) + struct.pack("!HH", sport, dport)
    body += socket.inet_aton("10.0.0.1") + b"\0" * 12 + socket.inet_aton("198.18.1.2") + b"\0" * 12
    body += b"\0" * 12 + struct.pack("=IIIII", 0, 0, 0, 0, inode)
    body += struct.pack("=HHB3x", 5, 8, 0)  # INET_DIAG_SHUTDOWN, padded to 4
    body += struct.pack("=HH", 4 + len(tcp_info), INET_DIAG_INFO) + tcp_info
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 0, 1, 0) + body


def test_dumped_tcp_info_shares_with_the_last_dump():
    """The storage_tcp source's own dump path (netlink messages parsed with SharedTcpInfo): decoded as
    parse_tcp_info decodes them, the values that did not move are the last dump's objects, an unchanged
    tcp_info is the last TcpInfo; a socket with another inode (a new connection on the same 4-tuple) or
    gone for a dump shares nothing."""
    import struct

    from agent.sources.netlink_diag import SharedTcpInfo, parse_messages, parse_tcp_info

    def info(acked):
        buf = bytearray(248)
        struct.pack_into("=I", buf, 16, 1460)  # tcpi_snd_mss
        struct.pack_into("=Q", buf, 120, acked)  # tcpi_bytes_acked
        struct.pack_into("=Q", buf, 128, 987654321)  # tcpi_bytes_received
        return bytes(buf)

    shared = SharedTcpInfo()

    def dump(*msgs):
        socks, done = parse_messages(b"".join(msgs), frozenset({3260}), shared)
        shared.rotate()
        return socks

    (a,) = dump(_diag_msg(77, 40000, info(10**6)), _diag_msg(78, 3260, info(5), dport=40000))
    (b,) = dump(_diag_msg(77, 40000, info(2 * 10**6)))
    (c,) = dump(_diag_msg(77, 40000, info(2 * 10**6)))
    (d,) = dump(_diag_msg(79, 40000, info(2 * 10**6)))  # reused 4-tuple, new socket
    assert (a.sport, a.inode, a.info) == (40000, 77, parse_tcp_info(info(10**6)))
    assert b.info == parse_tcp_info(info(2 * 10**6)) and b.info.bytes_acked == 2 * 10**6
    assert b.info.bytes_received is a.info.bytes_received and b.info.snd_mss == 1460
    assert c.info is b.info
    assert d.info == c.info and d.info is not c.info and d.info.bytes_received is not c.info.bytes_received
    assert dataclasses.asdict(d.info) == dataclasses.asdict(parse_tcp_info(info(2 * 10**6)))
    assert hash(d.info) == hash(parse_tcp_info(info(2 * 10**6)))
    for rec in (a, a.info):  # made without __init__: every field, in order, as the constructor makes it
        names = [f.name for f in dataclasses.fields(rec)]
        assert list(vars(rec)) == names and rec == type(rec)(**{n: getattr(rec, n) for n in names})
    # a short tcp_info (an older kernel) shares nothing with a longer one, its missing fields None
    (e,) = dump(_diag_msg(79, 40000, info(2 * 10**6)[:160]))
    assert e.info.bytes_acked == 2 * 10**6 and e.info.bytes_sent is None and e.info.snd_mss == 1460


def test_probe_stats_share_the_counters_of_programs_that_did_not_run(tmp_path, monkeypatch):
    """Probe.stats() over /proc/self/fdinfo files as the kernel writes them (a tree under tmp_path): a program
    whose counters did not move since the last stats gives the same per-program dict; one that ran, a new one."""
    from agent.ebpf.loader import LoadOptions
    from agent.ebpf.tcp_retrans import TcpRetransProbe

    fdinfo = tmp_path / "self" / "fdinfo"
    fdinfo.mkdir(parents=True)

    def write(fd, run_ns, cnt):
        (fdinfo / str(fd)).write_text(f"pos:\t0\nflags:\t02000002\nprog_type:\t5\nrun_time_ns:\t{run_ns}\n"
                                      f"run_cnt:\t{cnt}\nrecursion_misses:\t0\n")

    p = TcpRetransProbe(LoadOptions(paths=HostPaths(procfs=tmp_path)))
    p.bpf = object()
    monkeypatch.setattr(p, "program_fds", lambda: {"tcp:tcp_retransmit_skb": 7, "tcp:tcp_send_reset": 8})
    monkeypatch.setattr(p, "events_and_lost", lambda: (0, 0))
    write(7, 5000, 10)
    write(8, 900, 3)
    one = p.stats()
    write(7, 7000, 14)
    two = p.stats()
    assert two.per_program["tcp:tcp_send_reset"] is one.per_program["tcp:tcp_send_reset"]
    assert two.per_program["tcp:tcp_retransmit_skb"] == {"run_time_ns": 7000, "run_cnt": 14, "recursion_misses": 0}
    assert one.per_program["tcp:tcp_retransmit_skb"]["run_cnt"] == 10 and (two.run_time_ns, two.run_cnt) == (7900, 17)
