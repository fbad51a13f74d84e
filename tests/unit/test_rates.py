"""The one mean-latency-per-interval function (agent/records/rates.py)."""

import pytest

from agent.records.rates import mean_latencies_ns, mean_latency_ms, mean_latency_ns
from agent.records.vms import DiskStats

A = DiskStats(rd_reqs=100, rd_time_ns=1_000_000_000, wr_reqs=50, wr_time_ns=500_000_000, fl_reqs=10, fl_time_ns=10_000_000)


def test_per_op_and_all():
    b = DiskStats(rd_reqs=110, rd_time_ns=1_050_000_000, wr_reqs=70, wr_time_ns=900_000_000, fl_reqs=10, fl_time_ns=10_000_000)
    assert mean_latency_ns(A, b, "read") == 5_000_000  # 50 ms over 10 reads
    assert mean_latency_ms(A, b, "write") == 20.0  # 400 ms over 20 writes
    assert mean_latency_ns(A, b, "flush") is None  # no flush in the interval
    assert mean_latency_ms(A, b) == pytest.approx(450 / 30)  # every op: Δtime / Δrequests


def test_since_start_without_prev():
    assert mean_latency_ms(None, A, "read") == 10.0
    assert mean_latency_ms(None, DiskStats(), "read") is None


def test_counter_reset_and_zero_delta():
    restarted = DiskStats(rd_reqs=5, rd_time_ns=20_000_000)  # QEMU restarted: counters below the previous sample
    assert mean_latency_ns(A, restarted, "read") is None
    assert mean_latency_ns(A, restarted) is None
    assert mean_latency_ns(A, A) is None  # no request completed
    time_went_back = DiskStats(rd_reqs=101, rd_time_ns=999_000_000, wr_reqs=50, wr_time_ns=500_000_000, fl_reqs=10, fl_time_ns=10_000_000)
    assert mean_latency_ns(A, time_went_back, "read") is None


def test_unknown_op():
    with pytest.raises(KeyError):
        mean_latency_ns(A, A, "discard")


def _reference(prev, cur, op):
    """The definition, written plainly: sums of the deltas of the op's counters, None on any reset."""
    ops = {"read": [("rd_reqs", "rd_time_ns")], "write": [("wr_reqs", "wr_time_ns")],
           "flush": [("fl_reqs", "fl_time_ns")]}
    ops["all"] = ops["read"] + ops["write"] + ops["flush"]
    dr = dt = 0
    for r, t in ops[op]:
        r1, t1 = getattr(cur, r), getattr(cur, t)
        r0, t0 = (getattr(prev, r), getattr(prev, t)) if prev is not None else (0, 0)
        if r1 < r0 or t1 < t0:
            return None
        dr, dt = dr + r1 - r0, dt + t1 - t0
    return dt / dr if dr > 0 else None


def test_matches_the_definition_for_any_counters():
    from hypothesis import given, settings, strategies as st

    counters = st.integers(0, 10**6)
    stats = st.builds(DiskStats, rd_reqs=counters, rd_time_ns=counters, wr_reqs=counters, wr_time_ns=counters,
                      fl_reqs=counters, fl_time_ns=counters)

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.none(), stats), stats, st.sampled_from(["all", "read", "write", "flush"]))
    def check(prev, cur, op):
        assert mean_latency_ns(prev, cur, op) == _reference(prev, cur, op)
        assert mean_latencies_ns(prev, cur) == tuple(_reference(prev, cur, o) for o in ("read", "write", "all"))

    check()
