"""inet_diag timers (idiag_timer) as doctor samples them: parsed from a literal netlink
message, and read from real loopback sockets of this kernel (keepalive on / off)."""

import socket
import struct

from agent.doctor.live import four_tuple, sample_socket_timers
from agent.sources.netlink_diag import SOCK_DIAG_BY_FAMILY, dump_tcp, parse_messages


def _msg(timer, expires):
    body = struct.pack("=BBBB", socket.AF_INET, 1, timer, 0) + struct.pack("!HH", 40000, 3260)
    body += socket.inet_aton("192.0.2.10") + b"\0" * 12 + socket.inet_aton("192.0.2.1") + b"\0" * 12
    body += b"\0" * 12  # if, cookie
    body += struct.pack("=IIIII", expires, 0, 0, 0, 4242)
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 0, 1, 0) + body


def test_timer_and_expiry_are_decoded():
    (s,), done = parse_messages(_msg(2, 7000))
    assert (s.timer, s.timer_expires_ms, s.inode, s.state) == (2, 7000, 4242, "ESTABLISHED")
    assert four_tuple(s) == "192.0.2.10:40000->192.0.2.1:3260" and not done


def test_keepalive_timer_seen_on_real_idle_sockets():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    ka, plain = socket.socket(), socket.socket()
    ka.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    try:
        ka.connect(("127.0.0.1", port))
        plain.connect(("127.0.0.1", port))
        peers = [srv.accept()[0] for _ in range(2)]
        timers = sample_socket_timers({port}, samples=3, gap=0.01, dump=dump_tcp)
        t_ka = f"127.0.0.1:{ka.getsockname()[1]}->127.0.0.1:{port}"
        t_plain = f"127.0.0.1:{plain.getsockname()[1]}->127.0.0.1:{port}"
        assert set(timers[t_ka]) == {2}, timers
        assert set(timers[t_plain]) == {0}, timers
        for p in peers:
            p.close()
    finally:
        for s in (ka, plain, srv):
            s.close()
