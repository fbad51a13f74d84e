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
    # plain attribute reads (no getattr by name): the diagnosis and the documents ask for every disk,
    # several operations each, every cycle
    if op == "all":
        r1, t1, r2, t2, r3, t3 = (cur.rd_reqs, cur.rd_time_ns, cur.wr_reqs, cur.wr_time_ns, cur.fl_reqs,
                                  cur.fl_time_ns)
        if prev is not None:
            p1, q1, p2, q2, p3, q3 = (prev.rd_reqs, prev.rd_time_ns, prev.wr_reqs, prev.wr_time_ns, prev.fl_reqs,
                                      prev.fl_time_ns)
            if r1 < p1 or t1 < q1 or r2 < p2 or t2 < q2 or r3 < p3 or t3 < q3:
                return None  # a reset: the interval has no meaning
            d_reqs = (r1 - p1) + (r2 - p2) + (r3 - p3)
            d_time = (t1 - q1) + (t2 - q2) + (t3 - q3)
        else:
            d_reqs, d_time = r1 + r2 + r3, t1 + t2 + t3
    else:
        if op == "read":
            r, t = cur.rd_reqs, cur.rd_time_ns
            if prev is not None:
                r0, t0 = prev.rd_reqs, prev.rd_time_ns
        elif op == "write":
            r, t = cur.wr_reqs, cur.wr_time_ns
            if prev is not None:
                r0, t0 = prev.wr_reqs, prev.wr_time_ns
        elif op == "flush":
            r, t = cur.fl_reqs, cur.fl_time_ns
            if prev is not None:
                r0, t0 = prev.fl_reqs, prev.fl_time_ns
        else:
            raise KeyError(op)
        if prev is not None:
            if r < r0 or t < t0:
                return None  # a reset: the interval has no meaning
            r, t = r - r0, t - t0
        d_reqs, d_time = r, t
    if d_reqs <= 0:
        return None
    return d_time / d_reqs


def mean_latencies_ns(prev: DiskStats | None, cur: DiskStats) -> tuple[float | None, float | None, float | None]:
    """(read, write, all) of :func:`mean_latency_ns` at once: each counter read once (for the callers that
    want the three for every disk every cycle)."""
    r1, t1, r2, t2, r3, t3 = cur.rd_reqs, cur.rd_time_ns, cur.wr_reqs, cur.wr_time_ns, cur.fl_reqs, cur.fl_time_ns
    if prev is not None:
        p1, q1, p2, q2, p3, q3 = prev.rd_reqs, prev.rd_time_ns, prev.wr_reqs, prev.wr_time_ns, prev.fl_reqs, prev.fl_time_ns
        ok1, ok2, ok3 = r1 >= p1 and t1 >= q1, r2 >= p2 and t2 >= q2, r3 >= p3 and t3 >= q3
        r1, t1, r2, t2, r3, t3 = r1 - p1, t1 - q1, r2 - p2, t2 - q2, r3 - p3, t3 - q3
    else:
        ok1 = ok2 = ok3 = True
    read = t1 / r1 if ok1 and r1 > 0 else None
    write = t2 / r2 if ok2 and r2 > 0 else None
    n = r1 + r2 + r3
    both = (t1 + t2 + t3) / n if ok1 and ok2 and ok3 and n > 0 else None
    return read, write, both


def mean_latency_ms(prev: DiskStats | None, cur: DiskStats, op: str = "all") -> float | None:
    """:func:`mean_latency_ns` in milliseconds."""
    ns = mean_latency_ns(prev, cur, op)
    return None if ns is None else ns / 1e6


def window_latencies_ms(prev: DiskStats, cur: DiskStats) -> tuple[float | None, float | None, float | None]:
    """(all, read, write) :func:`mean_latency_ms` between ``prev`` and ``cur`` in one pass over the counters
    (the same quotients: the live diagnosis asks for the three of every disk every cycle)."""
    rr, rt = cur.rd_reqs - prev.rd_reqs, cur.rd_time_ns - prev.rd_time_ns
    wr, wt = cur.wr_reqs - prev.wr_reqs, cur.wr_time_ns - prev.wr_time_ns
    fr, ft = cur.fl_reqs - prev.fl_reqs, cur.fl_time_ns - prev.fl_time_ns
    r_back, w_back = rr < 0 or rt < 0, wr < 0 or wt < 0
    read = None if r_back or rr <= 0 else rt / rr / 1e6
    write = None if w_back or wr <= 0 else wt / wr / 1e6
    n = rr + wr + fr
    total = None if r_back or w_back or fr < 0 or ft < 0 or n <= 0 else (rt + wt + ft) / n / 1e6
    return total, read, write
