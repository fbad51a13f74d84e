"""Fuzz the inet_diag netlink parser (agent/sources/netlink_diag.py): random bytes,
and real SOCK_DIAG_BY_FAMILY datagrams of this machine's kernel, mutated.

Property: ``parse_messages`` raises nothing but OSError (an NLMSG_ERROR from the
kernel, its documented error) and returns well-typed DiagSocket records."""

from __future__ import annotations

import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.sources.netlink_diag import (NETLINK_SOCK_DIAG, NLMSG_DONE, NLMSG_ERROR, SOCK_DIAG_BY_FAMILY, DiagSocket,
                                        build_request, parse_messages)
from tests.fuzz.mutate import mutated_bytes
from tests.fuzz.typecheck import check


def real_datagrams() -> list[bytes]:
    """Raw answers of this kernel to the agent's own dump request, with a loopback
    connection of ours open so that at least one socket (with INET_DIAG_INFO) is in them."""
    out = []
    with socket.socket() as srv, socket.socket() as cli, \
            socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli.connect(srv.getsockname())
        conn, _ = srv.accept()
        with conn:
            nl.settimeout(2)
            for seq, fam in enumerate((socket.AF_INET, socket.AF_INET6), 1):
                nl.send(build_request(fam, seq=seq))
                while True:
                    data = nl.recv(1 << 16)
                    out.append(data)
                    if parse_messages(data)[1]:
                        break
    return out


REAL = real_datagrams()
# one message per seed as well: mutations then hit the fields of one socket, not only the first
SINGLE = []
for d in REAL:
    off = 0
    while off + 16 <= len(d):
        length = struct.unpack_from("=I", d, off)[0]
        if length < 16:
            break
        SINGLE.append(d[off:off + length])
        off += (length + 3) & ~3
HEADERS = st.builds(lambda t, body: struct.pack("=IHHII", 16 + len(body), t, 0, 1, 0) + body,
                    st.sampled_from((NLMSG_DONE, NLMSG_ERROR, SOCK_DIAG_BY_FAMILY, 0, 0xFFFF)),
                    st.binary(max_size=200))


def parse_ok(data: bytes):
    try:
        socks, done = parse_messages(data)
    except OSError as e:
        assert isinstance(e.errno, int) and e.errno != 0
        return
    check(socks, list[DiagSocket])
    assert isinstance(done, bool)


@given(st.binary(max_size=2048))
def test_random_bytes(data):
    parse_ok(data)


@given(st.lists(st.one_of(mutated_bytes(SINGLE), HEADERS), max_size=6).map(b"".join))
def test_mutated_real_messages(data):
    parse_ok(data)


@given(mutated_bytes(REAL))
def test_mutated_real_datagrams(data):
    parse_ok(data)


def test_the_seeds_hold_a_real_socket():
    socks = [s for d in REAL for s in parse_messages(d)[0]]
    assert any(s.src == "127.0.0.1" and s.info is not None for s in socks), socks
