"""Values over an interval between two cumulative samples of the same disk.

QEMU counts, per disk and per operation, the requests completed and the
total time they took (libvirt ``block.N.{rd,wr,fl}.{reqs,times}``, QMP
``query-blockstats`` ``*_operations`` / ``*_total_time_ns``). The mean
latency of the requests completed in an interval is Δtotal_time / Δrequests.
A counter that went backwards (the QEMU process restarted, the disk was
re-plugged) or an interval without a completed request has no mean: None.
This is the one place that computes it (exporter-side rates are left to
PromQL: ``rate(time) / rate(requests)`` is the same quotient).
"""

from __future__ import annotations

from agent.records.vms import DiskStats

# operation -> (requests counter, total time counter) of DiskStats
OPS: dict[str, tuple[str, str]] = {
    "read": ("rd_reqs", "rd_time_ns"),
    "write": ("wr_reqs", "wr_time_ns"),
    "flush": ("fl_reqs", "fl_time_ns"),
}


def mean_latency_ns(prev: DiskStats | None, cur: DiskStats, op: str = "all") -> float | None:
    """Mean latency in ns of the ``op`` requests (read, write, flush, or all three) completed
    between ``prev`` and ``cur``; since the QEMU process started when ``prev`` is None.

    None when no request completed in between or a counter went backwards.
    """
    ops = OPS.values() if op == "all" else (OPS[op],)
    d_reqs = d_time = 0
    for reqs, time_ns in ops:
        r, t = getattr(cur, reqs), getattr(cur, time_ns)
        if prev is not None:
            r0, t0 = getattr(prev, reqs), getattr(prev, time_ns)
            if r < r0 or t < t0:
                return None  # a reset: the interval has no meaning
            r, t = r - r0, t - t0
        d_reqs += r
        d_time += t
    if d_reqs <= 0:
        return None
    return d_time / d_reqs


def mean_latency_ms(prev: DiskStats | None, cur: DiskStats, op: str = "all") -> float | None:
    """:func:`mean_latency_ns` in milliseconds."""
    ns = mean_latency_ns(prev, cur, op)
    return None if ns is None else ns / 1e6
