"""Storage connections from real sockets on loopback, checked against ss(8)."""

import os
import re
import socket
import subprocess

import pytest

from agent.config import Config
from agent.errors import NoData
from agent.hostpaths import HostPaths
from agent.sources import SourceContext
from agent.sources.netlink_diag import build_request, parse_messages
from agent.sources.storage_tcp import StorageTcpSource


@pytest.fixture
def pair():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    acc, _ = srv.accept()
    yield port, cli, acc
    for s in (cli, acc, srv):
        s.close()


def source_for(port):
    cfg = Config()
    cfg.storage.ports = [port]
    return StorageTcpSource(SourceContext(cfg, HostPaths()))


def test_exact_four_tuple_owner_and_counters(pair):
    port, cli, acc = pair
    src = source_for(port)
    cli.sendall(b"x" * 200_000)
    got = 0
    while got < 200_000:
        got += len(acc.recv(65536))
    conns = src.collect().connections
    assert len(conns) == 1  # only the client side has the storage port as remote port
    c = conns[0]
    lport = cli.getsockname()[1]
    assert (c.src, c.sport, c.dst, c.dport) == ("127.0.0.1", lport, "127.0.0.1", port)
    assert c.four_tuple == f"127.0.0.1:{lport}->127.0.0.1:{port}"
    assert c.state == "ESTABLISHED"
    assert c.pid == os.getpid()
    assert c.info.bytes_sent == 200_000
    assert c.info.bytes_acked >= 200_000
    assert c.info.total_retrans == 0
    import dataclasses  # the record made without __init__: every field, in order, as the constructor makes it

    names = [f.name for f in dataclasses.fields(c)]
    assert list(vars(c))[:len(names)] == names and c == type(c)(**{n: getattr(c, n) for n in names})

    # the same numbers as ss(8) prints for this socket
    out = subprocess.run(
        ["ss", "-tni", "state", "established", f"( sport = :{lport} )"], capture_output=True, text=True, check=True
    ).stdout
    m = re.search(r"bytes_acked:(\d+)", out)
    assert m and int(m.group(1)) == c.info.bytes_acked
    m = re.search(r"cwnd:(\d+)", out)
    assert m and int(m.group(1)) == c.info.snd_cwnd


def test_counters_grow_between_cycles(pair):
    port, cli, acc = pair
    src = source_for(port)
    cli.sendall(b"a" * 1000)
    acc.recv(1000)
    first = src.collect().connections[0].info.bytes_acked
    cli.sendall(b"b" * 5000)
    n = 0
    while n < 5000:
        n += len(acc.recv(5000))
    second = src.collect().connections[0].info.bytes_acked
    assert second - first == 5000


def test_no_storage_connections_is_nodata():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        unused = s.getsockname()[1]  # bound, not listening: no connection can exist to it
        with pytest.raises(NoData, match=f"no TCP connections to storage ports \\[{unused}\\]"):
            source_for(unused).collect()


def test_parser_rejects_error_messages():
    import struct

    err = struct.pack("=IHHII", 36, 2, 0, 1, 0) + struct.pack("=i", -13) + b"\0" * 16
    with pytest.raises(OSError, match="EACCES"):
        parse_messages(err)
    done = struct.pack("=IHHII", 20, 3, 0, 1, 0) + b"\0" * 4
    assert parse_messages(done) == ([], True)
    assert len(build_request(socket.AF_INET)) == 72


def test_receive_side_matches_ss(pair):
    """The receive side of tcp_info (what the portal sent us) on a real socket, against ss(8)."""
    port, cli, acc = pair
    src = source_for(port)
    cli.sendall(b"q" * 100)  # a request, then the "portal" answers with data
    acc.recv(100)
    acc.sendall(b"r" * 300_000)
    got = 0
    while got < 300_000:
        got += len(cli.recv(65536))
    i = src.collect().connections[0].info
    assert i.bytes_received == 300_000
    assert i.data_segs_in >= 1 and i.segs_in >= i.data_segs_in
    assert i.delivered >= 1 and i.busy_time_us is not None
    assert i.rcv_ooopack == 0 and i.dsack_dups == 0  # loopback loses and reorders nothing
    lport = cli.getsockname()[1]
    out = subprocess.run(
        ["ss", "-tni", "state", "established", f"( sport = :{lport} )"], capture_output=True, text=True, check=True
    ).stdout
    for field, value in (("bytes_received", i.bytes_received), ("segs_in", i.segs_in),
                         ("data_segs_in", i.data_segs_in), ("delivered", i.delivered)):
        m = re.search(rf"\b{field}:(\d+)", out)
        assert m and int(m.group(1)) == value, (field, value, out)
    m = re.search(r"\brcv_rtt:([\d.]+)", out)  # ss prints ms with 3 decimals
    assert i.rcv_rtt_us and m and abs(float(m.group(1)) * 1000 - i.rcv_rtt_us) <= 1, (i.rcv_rtt_us, out)
