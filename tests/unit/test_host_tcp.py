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
