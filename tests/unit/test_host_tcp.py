"""/proc/net/snmp and /proc/net/netstat parsing, on literals and a fixture host."""

from agent.sources.host_tcp import HostTcpSource, parse_proc_net_groups
from agent.sources import SourceContext
from agent.config import Config


def test_parse_pairs_and_negative_values():
    text = "Tcp: RtoMin MaxConn RetransSegs\nTcp: 200 -1 17\nUdp: InDatagrams\nUdp: 5\n"
    assert parse_proc_net_groups(text) == {"Tcp": {"RtoMin": 200, "MaxConn": -1, "RetransSegs": 17}, "Udp": {"InDatagrams": 5}}


def test_mismatched_or_garbled_pair_is_skipped_not_invented():
    text = "Tcp: A B C\nTcp: 1 2\nTcpExt: X Y\nTcpExt: 1 zz\nIp: F\nIp: 3\n"
    assert parse_proc_net_groups(text) == {"Ip": {"F": 3}}


def test_truncated_file_header_only():
    assert parse_proc_net_groups("Tcp: A B\n") == {}


def test_fixture_host(fixture_host):
    src = HostTcpSource(SourceContext(Config(), fixture_host("basic")))
    data = src.collect()
    assert data.tcp["RetransSegs"] == 1234
    assert data.tcp["CurrEstab"] == 14
    assert data.tcp_ext["TCPTimeouts"] == 56
    assert data.tcp_ext["TCPLossProbes"] == 42


def test_live_host_reads_real_proc():
    from agent.hostpaths import HostPaths

    data = HostTcpSource(SourceContext(Config(), HostPaths())).collect()
    assert {"RetransSegs", "OutSegs", "InSegs", "CurrEstab"} <= set(data.tcp)
    assert "TCPTimeouts" in data.tcp_ext


def test_tcp_info_degrades_by_length():
    """struct tcp_info grows at its end: an older kernel returns a shorter struct, and the fields past
    its length are None (not zero, not an error); offsets from include/uapi/linux/tcp.h."""
    import struct

    from agent.sources.netlink_diag import parse_tcp_info

    buf = bytearray(248)
    struct.pack_into("=I", buf, 68, 600)       # tcpi_rtt
    struct.pack_into("=I", buf, 92, 700)       # tcpi_rcv_rtt
    struct.pack_into("=Q", buf, 128, 4096)     # tcpi_bytes_received
    struct.pack_into("=I", buf, 152, 9)        # tcpi_data_segs_in
    struct.pack_into("=Q", buf, 176, 11)       # tcpi_rwnd_limited
    struct.pack_into("=I", buf, 192, 13)       # tcpi_delivered
    struct.pack_into("=I", buf, 216, 2)        # tcpi_dsack_dups
    struct.pack_into("=I", buf, 224, 5)        # tcpi_rcv_ooopack
    struct.pack_into("=I", buf, 232, 65536)    # tcpi_rcv_wnd
    full = parse_tcp_info(bytes(buf))
    assert (full.rtt_us, full.rcv_rtt_us, full.bytes_received, full.data_segs_in, full.rwnd_limited_us,
            full.delivered, full.dsack_dups, full.rcv_ooopack, full.rcv_wnd) == (600, 700, 4096, 9, 11, 13, 2, 5, 65536)
    v419 = parse_tcp_info(bytes(buf[:224]))    # Linux 4.19..5.3: no rcv_ooopack yet
    assert v419.dsack_dups == 2 and v419.rcv_ooopack is None and v419.rcv_wnd is None
    v46 = parse_tcp_info(bytes(buf[:160]))     # Linux 4.6..4.8
    assert v46.data_segs_in == 9 and v46.delivered is None and v46.dsack_dups is None and v46.rcv_rtt_us == 700
