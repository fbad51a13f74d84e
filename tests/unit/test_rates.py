"""The one mean-latency-per-interval function (agent/records/rates.py)."""

import pytest

from agent.records.rates import mean_latency_ms, mean_latency_ns
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
