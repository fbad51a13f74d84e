"""What "lossy", "slow" and "stalled" mean: one definition, with its numbers.

Every judgement of a storage path or a VM disk goes through here:
``kvmscope diagnose`` and the agent's live findings (agent/diagnose/rules.py),
``kvmscope fleet`` (agent/fleet/analysis.py), and the Prometheus alert rules
(dashboards/prometheus/kvmscope-alerts.yml, whose numbers tests/unit/test_alerts.py
compares with the ones below). The defaults of the ``diagnose`` configuration
section and of ``kvmscope fleet``'s options are these constants. The reasons
are in docs/diagnose.md ("What lossy, slow and stalled mean").

**Lossy** (a connection, or a host's path to a portal, over a window): it
retransmits at least :data:`LOSS_MIN_RETRANS_PER_S` segments per second
**and** at least :data:`LOSS_MIN_RATIO` of what it sent was retransmitted.
Both, because each one alone misjudges a real fleet: a rate alone calls a busy
clean connection lossy (0.5/s is 0.01 % of 5,000 segments/s, and a target
that is merely slow makes a few tail-loss probes and spurious timeouts that
count as retransmits), a ratio alone calls an idle connection lossy after one
probe (1 of 50 segments is 2 %). The ratio is the part that carries over from
one host to another (it is what the I/O feels: the share of requests that wait
for a retransmission); the rate is a floor against counting noise. The ratio
is in bytes (tcpi_bytes_retrans / tcpi_bytes_sent, Linux >= 4.19, what the
exporter and so Prometheus have) and in segments where the kernel has no byte
counters (tcpi_total_retrans / tcpi_segs_out). An unknown ratio (no byte or
segment counters) leaves the rate to decide.

**Slow** (a VM disk over a window): mean latency per request above
:data:`SLOW_MS` over at least :data:`MIN_OPS` requests; **critical** above
:data:`CRITICAL_MS`. The alert on disk latency uses the critical number.

**Stalled** (a VM disk): it completed requests earlier in the window and none
in its last interval. A connection is **dead** (its portal stopped answering)
when its retransmission timer has backed off at least :data:`DEAD_BACKOFF`
times in a row while its disks did nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

# -- loss
LOSS_MIN_RETRANS_PER_S = 0.5   # retransmitted segments per second, at least
LOSS_MIN_RATIO = 0.01          # retransmitted / sent (bytes, else segments), at least
# -- slowness
SLOW_MS = 5.0                  # mean latency per request (ms) above which a disk is slow
CRITICAL_MS = 50.0             # ... above which it is critical (the latency alert's threshold)
MIN_OPS = 10                   # requests in the window before a disk's mean latency is judged
# -- stall
DEAD_BACKOFF = 2               # consecutive unanswered RTOs (tcpi_backoff) of a dead connection

# The alert rules' windows: the range of their rate() and their `for:` (docs/runbooks.md).
ALERT_LOSS_RANGE, ALERT_LOSS_FOR = "2m", "2m"
ALERT_SLOW_RANGE, ALERT_SLOW_FOR = "5m", "5m"


def loss_ratio(retrans_bytes: int | float | None = None, sent_bytes: int | float | None = None,
               retrans_segs: int | float | None = None, sent_segs: int | float | None = None) -> float | None:
    """Retransmitted / sent: bytes when the byte counters are there, else segments, else None."""
    for retrans, sent in ((retrans_bytes, sent_bytes), (retrans_segs, sent_segs)):
        if retrans is None or sent is None:
            continue
        if sent > 0:
            return max(retrans, 0) / sent
        return 1.0 if retrans > 0 else 0.0
    return None


def lossy(retrans_per_s: float | None, ratio: float | None,
          min_retrans_per_s: float = LOSS_MIN_RETRANS_PER_S, min_ratio: float = LOSS_MIN_RATIO) -> bool:
    """Retransmits at least ``min_retrans_per_s`` and (when known) a ratio of at least ``min_ratio``."""
    if retrans_per_s is None or retrans_per_s <= 0 or retrans_per_s < min_retrans_per_s:
        return False
    return ratio is None or ratio >= min_ratio


def slow(mean_ms: float | None, ops: int, slow_ms: float = SLOW_MS, min_ops: int = MIN_OPS) -> bool:
    """Mean latency per request above ``slow_ms`` over at least ``min_ops`` requests."""
    return ops >= min_ops and mean_ms is not None and mean_ms > slow_ms


def critical(mean_ms: float | None, critical_ms: float = CRITICAL_MS) -> bool:
    return mean_ms is not None and mean_ms > critical_ms


def stalled(intervals_ops: Sequence[int]) -> bool:
    """Requests completed earlier in the window, none in its last interval."""
    return len(intervals_ops) >= 2 and intervals_ops[-1] == 0 and any(v > 0 for v in intervals_ops[:-1])


def backing_off(max_backoff: int) -> bool:
    """The retransmission timer backed off enough times that the peer is not answering."""
    return max_backoff >= DEAD_BACKOFF
