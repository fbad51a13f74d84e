"""One health model (agent/health.py): diagnose, fleet and the live findings judge loss the same way."""

import itertools

import pytest

from agent import health
from agent.config import DiagnoseConfig
from agent.diagnose.rules import _lossy
from agent.diagnose.window import ConnWindow
from agent.fleet.analysis import PathSample, Thresholds, judge_path


def conn(retrans_per_s, sent_bytes, retrans_bytes, seconds=10.0):
    n = round(retrans_per_s * seconds)
    return ConnWindow(four_tuple="a:1->b:3260", portal="b:3260", vm="vm", disk="vda", retrans=n,
                      retrans_per_second=n / seconds, segs_out=10_000, rtt_ms=0.3, max_backoff=0,
                      state="ESTABLISHED", present_at_end=True, bytes_sent=sent_bytes, bytes_retrans=retrans_bytes)


@pytest.mark.parametrize("rate, ratio, expected", [
    (3.0, 0.05, True),      # the lab's 5% loss
    (3.0, 0.001, False),    # busy and clean: the rate alone would say lossy
    (0.1, 0.10, False),     # one probe on an idle connection: the ratio alone would
    (0.25, 0.0029, False),  # the throttled-target recording: probes, no loss
    (0.5, 0.01, True),      # at the thresholds (at least)
    (0.0, 0.5, False),
    (1.0, None, True),      # ratio unknown: the rate decides
])
def test_lossy(rate, ratio, expected):
    assert health.lossy(rate, ratio) is expected


def test_ratio_prefers_bytes_then_segments():
    assert health.loss_ratio(10, 1000, 1, 1000) == 0.01
    assert health.loss_ratio(None, None, 2, 100) == 0.02
    assert health.loss_ratio(None, None, None, None) is None
    assert health.loss_ratio(5, 0) == 1.0 and health.loss_ratio(0, 0) == 0.0


def test_diagnose_and_fleet_agree_on_every_case():
    cfg, t = DiagnoseConfig(), Thresholds()
    assert (cfg.retrans_per_second, cfg.retrans_ratio) == (t.min_retrans_per_s, t.min_ratio) == (
        health.LOSS_MIN_RETRANS_PER_S, health.LOSS_MIN_RATIO)
    assert (cfg.slow_ms, cfg.critical_ms, cfg.min_ops) == (health.SLOW_MS, health.CRITICAL_MS, health.MIN_OPS)
    for rate, ratio in itertools.product([0.0, 0.1, 0.4, 0.5, 0.8, 3.0, 40.0], [0.0, 0.001, 0.005, 0.01, 0.05]):
        sent = 1_000_000
        c = conn(rate, sent, round(ratio * sent))
        p = PathSample("h", "b:3260", retrans_per_s=c.retrans_per_second, sent_bytes_per_s=sent / 10,
                       retrans_bytes_per_s=round(ratio * sent) / 10, established=1)
        assert _lossy(c, cfg) == judge_path(p, t).bad == health.lossy(c.retrans_per_second, ratio), (rate, ratio)


def test_slow_and_stalled():
    assert health.slow(5.1, 10) and not health.slow(5.0, 10) and not health.slow(50, 9) and not health.slow(None, 99)
    assert health.critical(50.1) and not health.critical(50.0)
    assert health.stalled([3, 4, 0]) and not health.stalled([0, 0, 0]) and not health.stalled([0]) \
        and not health.stalled([3, 0, 2])
