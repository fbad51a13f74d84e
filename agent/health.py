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

A disk's own **baseline** (its usual mean latency, learnt from the history
before the window, :func:`baseline`) raises the bar: with one, a disk is slow
only when it is also :data:`SLOW_BASELINE_FACTOR` times its baseline, so a
host whose disks always run at 6 ms is not "slow" every minute while a disk
that goes from 6 to 30 ms is. Without history (a first sample) the absolute
number alone decides.

**Lossy toward the host**: the host's retransmit counters only see losses of
what the host sends; losses toward the host show as segments arriving out of
order (``tcpi_rcv_ooopack``: a later segment came before a lost one). The
same rate floor, and :data:`RX_LOSS_MIN_RATIO` of the data segments received:
a quarter of the send side's ratio, because only a loss followed by more data
of the same flight leaves a hole (with small iSCSI responses most losses are
the last segment of their flight and leave none). Retransmits the portal
reported as duplicates (DSACK, ``tcpi_dsack_dups``) were not lost (tail-loss
probes and spurious timeouts of a busy host) and do not count as loss.

**The latency budget** (agent/diagnose/budget.py): the network is named as
the cause of a slow disk when its measured part (RTT inflation over its
baseline, retransmission stalls) is at least :data:`NETWORK_SHARE` of what
the disk lost over its own baseline, and its RTT is at least
:data:`RTT_INFLATED_FACTOR` times the path's baseline and steady (RTT
variance under :data:`RTT_STEADY_VARIATION` x the RTT: a standing queue
delays every segment alike, while a slow target that acknowledges commands
only with their late responses, and data at once, makes the samples spread
as wide as their mean; the inflation then counts toward the target). The measured network
part is a lower bound (a payload's serialisation behind a rate limit and the
portal's own retransmissions do not show in the RTT) and what is left,
charged to the target, an upper bound; so a third, not a half.

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
SLOW_BASELINE_FACTOR = 3.0     # ... and this many times the disk's own baseline, when it has one
BASELINE_QUANTILE = 0.5        # a disk's baseline: the median of its per-interval means in the history
MIN_BASELINE_SAMPLES = 3       # intervals (snapshots for RTT) of history before a baseline is learnt
# -- loss toward the host
RX_LOSS_MIN_RATIO = 0.0025     # out-of-order segments / data segments received, at least
# -- the latency budget
NETWORK_SHARE = 1 / 3          # network's measured share of a slow disk's excess latency to name it
RTT_INFLATED_FACTOR = 3.0      # smoothed RTT / the path's baseline RTT for "inflated" (queueing)
RTT_BASELINE_QUANTILE = 0.1    # a path's baseline RTT: this low quantile of its smoothed RTT in the history
RTT_STEADY_VARIATION = 1.0     # rttvar / srtt below this: the inflation is a standing queue on the path
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


def slow(mean_ms: float | None, ops: int, slow_ms: float = SLOW_MS, min_ops: int = MIN_OPS,
         baseline_ms: float | None = None, factor: float = SLOW_BASELINE_FACTOR) -> bool:
    """Mean latency per request above ``slow_ms`` over at least ``min_ops`` requests, and above
    ``factor`` x the disk's own baseline when it has one."""
    if not (ops >= min_ops and mean_ms is not None and mean_ms > slow_ms):
        return False
    return baseline_ms is None or mean_ms > factor * baseline_ms


def quantile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (nearest rank, 0 <= q <= 1) of ``values``; None when empty."""
    return quantile_sorted(sorted(v for v in values if v is not None), q)


def quantile_sorted(vs: Sequence[float], q: float) -> float | None:
    """:func:`quantile` of values already sorted (ascending, no None)."""
    if not vs:
        return None
    return vs[min(len(vs) - 1, max(0, int(round(q * (len(vs) - 1)))))]


def baseline(values: Sequence[float], q: float, min_samples: int = MIN_BASELINE_SAMPLES) -> float | None:
    """A learnt baseline: the q-quantile of ``values`` (the history), None with fewer than ``min_samples``."""
    vs = [v for v in values if v is not None]
    return quantile(vs, q) if len(vs) >= min_samples else None


def lossy_toward_host(ooo_per_s: float | None, ooo_ratio: float | None,
                      min_per_s: float = LOSS_MIN_RETRANS_PER_S, min_ratio: float = RX_LOSS_MIN_RATIO) -> bool:
    """Out-of-order arrivals (holes) at least ``min_per_s`` and at least ``min_ratio`` of the data received."""
    if ooo_per_s is None or ooo_per_s <= 0 or ooo_per_s < min_per_s:
        return False
    return ooo_ratio is None or ooo_ratio >= min_ratio


def rtt_inflated(rtt_ms: float | None, baseline_ms: float | None, factor: float = RTT_INFLATED_FACTOR) -> bool:
    return rtt_ms is not None and baseline_ms is not None and baseline_ms > 0 and rtt_ms >= factor * baseline_ms


def rtt_queueing(rtt_ms: float | None, rttvar_ms: float | None, baseline_ms: float | None,
                 factor: float = RTT_INFLATED_FACTOR, steady: float = RTT_STEADY_VARIATION) -> bool:
    """RTT inflated over its baseline *and* steady (rttvar < steady x srtt): a queue on the path delays every
    segment alike; a peer that acknowledges some segments late (a slow target piggybacking ACKs on late
    responses) inflates the mean with a deviation of the order of the mean."""
    if not rtt_inflated(rtt_ms, baseline_ms, factor):
        return False
    return rttvar_ms is None or rttvar_ms < steady * rtt_ms


def network_explains(share: float | None, min_share: float = NETWORK_SHARE) -> bool:
    """The network's measured share of a slow disk's excess latency is enough to name it."""
    return share is not None and share >= min_share


def critical(mean_ms: float | None, critical_ms: float = CRITICAL_MS) -> bool:
    return mean_ms is not None and mean_ms > critical_ms


def stalled(intervals_ops: Sequence[int]) -> bool:
    """Requests completed earlier in the window, none in its last interval."""
    return len(intervals_ops) >= 2 and intervals_ops[-1] == 0 and any(v > 0 for v in intervals_ops[:-1])


def backing_off(max_backoff: int) -> bool:
    """The retransmission timer backed off enough times that the peer is not answering."""
    return max_backoff >= DEAD_BACKOFF
