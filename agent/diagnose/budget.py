"""The latency budget of a slow disk: where its time per request goes, layer by layer.

The guest-visible time per request ``T`` (libvirt/QMP blockstats: time /
requests over the window) is split into what the agent measures below it:

* **host block layer** (``ebpf_block_io`` per-process histograms of the
  disk's QEMU on its host device), for disks on a host block device; for a
  kernel-initiator (open-iscsi) disk this time contains the iSCSI command;
* **iSCSI command** (``ebpf_libiscsi`` uprobes: command submit -> task
  free in QEMU's libiscsi), for libiscsi disks when the probe runs;
* **network**: the smoothed RTT of the disk's connection(s) over the window
  (every command waits at least one round trip), plus the retransmission
  stalls: the share of the window its connection spent in RTO recovery
  (``tcpi_total_rto_time``) times ``T`` (by Little's law the requests in
  flight during a stall are the average number, so a connection stalled a
  fraction f of the window adds f x T to the mean);
* **target**: what is left of the iSCSI command (or of ``T`` when nothing
  below QEMU is measured) after the network;
* **QEMU/guest**: ``T`` minus the measured command/block time, when one is.

What changed is judged against the disk's own baseline ``T0`` (learnt from
the history, 0 without one): the excess ``E = T - T0``; the network's part of
it is the RTT's inflation over the path's baseline plus the stalls. The
network is the dominant layer when that part is at least
``agent.health.NETWORK_SHARE`` of ``E`` and the path is visibly degraded
(its RTT inflated ``RTT_INFLATED_FACTOR`` times and steady, or stalls: an
erratic inflation, RTT variance as large as the RTT, is a slow peer
acknowledging late and counts toward the target); the measured
network part is a lower bound (serialisation behind a rate limit, the
portal's own retransmissions toward the host are not in the RTT) and the
target's an upper bound (it holds whatever is not measured). Pure.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import health
from agent.diagnose.window import DiskWindow, Window


@dataclass(frozen=True)
class Budget:
    disk: str  # vm/disk
    total_ms: float
    baseline_ms: float | None  # the disk's usual mean latency
    layers: dict  # layer -> ms per request (qemu_guest, host_block, iscsi_command, network, target), as measured
    rtt_ms: float | None
    rttvar_ms: float | None
    rtt_baseline_ms: float | None
    rtt_baseline_source: str | None
    stall_ms: float | None  # retransmission stalls per request (None: the kernel does not time them)
    network_excess_ms: float  # RTT inflation + stalls
    excess_ms: float  # total - baseline
    network_share: float | None  # network_excess / excess
    dominant: str  # network | target | qemu_guest

    @property
    def rtt_inflation(self) -> float | None:
        if self.rtt_ms is None or not self.rtt_baseline_ms:
            return None
        return self.rtt_ms / self.rtt_baseline_ms

    def arithmetic(self) -> str:
        parts = " + ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in self.layers.items())
        s = f"{self.total_ms:.2f} ms per request = {parts}"
        if self.rtt_ms is not None:
            s += f"; network = RTT {self.rtt_ms:.2f} ms"
            if self.rtt_baseline_ms:
                s += f" (baseline {self.rtt_baseline_ms:.2f} ms from the {self.rtt_baseline_source}, " \
                     f"x{self.rtt_inflation:.1f}"
                if self.rttvar_ms is not None:
                    steady = self.rttvar_ms < health.RTT_STEADY_VARIATION * self.rtt_ms
                    s += f", variance {self.rttvar_ms:.2f} ms: " + ("steady, a queue" if steady else
                                                                   "erratic, late acknowledgements: not counted")
                s += ")"
            s += " + retransmit stalls " + ("not timed by this kernel" if self.stall_ms is None
                                            else f"{self.stall_ms:.2f} ms")
        base = f"its baseline {self.baseline_ms:.2f} ms" if self.baseline_ms is not None else "no baseline (no history)"
        s += f"; over {base}: +{self.excess_ms:.2f} ms, of which the network +{self.network_excess_ms:.2f} ms"
        if self.network_share is not None:
            s += f" ({100 * self.network_share:.0f}%)"
        return s + f"; dominant: {self.dominant.replace('_', ' ')}"

    def as_evidence(self) -> dict:
        r = lambda x: None if x is None else round(x, 3)  # noqa: E731
        return {
            "ms_per_request": r(self.total_ms),
            "layers_ms": {k: r(v) for k, v in self.layers.items()},
            "baseline_ms": r(self.baseline_ms),
            "rtt_ms": r(self.rtt_ms),
            "rtt_variance_ms": r(self.rttvar_ms),
            "rtt_baseline_ms": r(self.rtt_baseline_ms),
            "retransmit_stall_ms": r(self.stall_ms),
            "network_share_of_excess_pct": None if self.network_share is None else round(100 * self.network_share, 1),
            "dominant": self.dominant,
            "arithmetic": self.arithmetic(),
        }


def disk_budget(d: DiskWindow, w: Window) -> Budget | None:
    """The budget of one disk over the window (None without a mean latency)."""
    if d.mean_ms is None:
        return None
    t = d.mean_ms
    conns = [c for c in w.conns if c.vm == d.vm and c.disk == d.disk]
    p = w.portals.get(d.portal) if d.portal else None
    rtts = [c.rtt_mean_ms for c in conns if c.rtt_mean_ms is not None]
    rtt = sum(rtts) / len(rtts) if rtts else (p.rtt_ms if p else None)
    vars_ = [c.rttvar_mean_ms for c in conns if c.rttvar_mean_ms is not None]
    rttvar = sum(vars_) / len(vars_) if vars_ else None
    base_rtt = p.rtt_baseline_ms if p else None
    stalls = [c.rto_stall_s for c in conns if c.rto_stall_s is not None]
    stall_ms = min(max(stalls) / w.seconds, 1.0) * t if stalls else None
    # the time measured below QEMU: the iSCSI command (libiscsi) or the host block layer (kernel initiator)
    below = d.iscsi_ms if d.iscsi_ms is not None else d.host_block_ms
    layers: dict[str, float] = {}
    if below is not None:
        layers["qemu_guest"] = max(t - below, 0.0)
        layers["iscsi_command" if d.iscsi_ms is not None else "host_block"] = min(below, t)
    cap = min(below, t) if below is not None else t
    network = min((rtt or 0.0) + (stall_ms or 0.0), cap) if (rtt is not None or stall_ms) else None
    if network is not None:
        layers["network"] = network
    layers["target"] = max(cap - (network or 0.0), 0.0)
    queueing = health.rtt_queueing(rtt, rttvar, base_rtt)
    # an inflation that is not a standing queue (erratic: late acknowledgements of a slow peer) is the target's
    inflation = max((rtt or 0.0) - (base_rtt or rtt or 0.0), 0.0) if queueing else 0.0
    net_excess = min(inflation + (stall_ms or 0.0), t)
    excess = max(t - (d.baseline_ms or 0.0), 0.0)
    share = min(net_excess / excess, 1.0) if excess > 0 else None
    degraded = queueing or bool(stall_ms and stall_ms > 0)
    if health.network_explains(share) and degraded:
        dominant = "network"
    elif below is not None and layers["qemu_guest"] > layers["target"] + (network or 0.0):
        dominant = "qemu_guest"
    else:
        dominant = "target"
    return Budget(
        disk=f"{d.vm}/{d.disk}", total_ms=t, baseline_ms=d.baseline_ms, layers=layers, rtt_ms=rtt, rttvar_ms=rttvar,
        rtt_baseline_ms=base_rtt, rtt_baseline_source=p.rtt_baseline_source if p else None, stall_ms=stall_ms,
        network_excess_ms=net_excess, excess_ms=excess, network_share=share, dominant=dominant)
