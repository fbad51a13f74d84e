"""What doctor observes on the live host beyond one snapshot (thin I/O).

:func:`sample_socket_timers` dumps the TCP sockets a few times (inet_diag,
:func:`agent.sources.netlink_diag.dump_tcp`) and keeps each storage
socket's ``idiag_timer``: a keepalive timer (2) is only visible while the
socket has nothing in flight, so one dump is not enough on a busy disk.
Cost: ``samples`` netlink dumps, ``gap`` seconds apart (default 10 x 0.1 s).
"""

from __future__ import annotations

import time
from typing import Callable

from agent.records.addr import fmt_conn
from agent.sources.netlink_diag import DiagSocket, dump_tcp


def four_tuple(s: DiagSocket) -> str:
    """``SRC:SPORT->DST:DPORT`` exactly as StorageConnection.four_tuple writes it."""
    return fmt_conn(s.src, s.sport, s.dst, s.dport)


def sample_socket_timers(ports: set[int], samples: int = 10, gap: float = 0.1,
                         dump: Callable[[], list[DiagSocket]] = dump_tcp) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in range(samples):
        if i:
            time.sleep(gap)
        for s in dump():
            if s.dport in ports and s.timer is not None and s.state == "ESTABLISHED":
                out.setdefault(four_tuple(s), []).append(s.timer)
    return out
