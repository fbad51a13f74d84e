"""Diagnosis rules: each looks at a :class:`Window` and returns findings.

Every rule is small and documented the same way (shown by
``kvmscope diagnose --rules`` and in docs/diagnose.md):
symptom, signals, threshold, remedy. Thresholds come from the ``diagnose``
section of the configuration; what lossy, slow and stalled mean (and the
defaults) is :mod:`agent.health`, shared with fleet and the alert rules.
:func:`run_rules` isolates the rules like sources: one that raises becomes a
``blind_spots`` finding and the others still run; rules only read the
(frozen) window.

Severities: ``critical`` (I/O is failing or stalled), ``warning`` (I/O is
slow or the path is degraded), ``info`` (context, e.g. blind spots).

One finding per root cause: every finding has a stable :attr:`Finding.cause_key`
(rule, scope kind, scope id: the same cause gives the same key from one cycle
to the next, so findings can be followed as incidents) and lists the effects
it explains (:attr:`Finding.explains`: ``("disk", "vm/disk")``,
``("conn", four-tuple)``). Rules carry a precedence (:func:`rule`,
lower runs first and wins); after all rules ran, a finding whose effects are
all explained by a finding of a rule with a lower precedence is dropped and
named in that finding's ``explains_also``. A rule of another module registers
the same way (``rule(precedence=10)(fn)``) and so claims, for example, the
retransmits of an outage it explains.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from statistics import median

from agent import health
from agent.config import DiagnoseConfig
from agent.diagnose.budget import disk_budget
from agent.diagnose.window import ConnWindow, DiskWindow, Window

log = logging.getLogger(__name__)

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


@dataclass
class Finding:
    rule: str
    severity: str
    subject: dict  # {"kind": vm|disk|portal|session|host|interface|source, "id": ...}
    title: str
    evidence: dict
    cause: str
    next_checks: list[str] = field(default_factory=list)
    scope: str | None = None  # one VM | all VMs on a portal | all VMs on the host
    # the effects this finding accounts for: ("disk", "vm/disk"), ("conn", four-tuple)
    explains: frozenset = frozenset()
    # tells two findings of one rule on one subject apart (e.g. a session's state and its error counters)
    aspect: str | None = None

    @property
    def scope_kind(self) -> str:
        return str(self.subject.get("kind"))

    @property
    def scope_id(self) -> str:
        return str(self.subject.get("id"))

    @property
    def cause_key(self) -> str:
        """rule:scope kind:scope id[:aspect]: stable while the cause lasts (no numbers, no title)."""
        return ":".join([self.rule, self.scope_kind, self.scope_id] + ([self.aspect] if self.aspect else []))

    def as_dict(self) -> dict:
        return {
            "cause_key": self.cause_key,
            "rule": self.rule,
            "severity": self.severity,
            "subject": self.subject,
            "scope": self.scope,
            "title": self.title,
            "evidence": self.evidence,
            "cause": self.cause,
            "next_checks": self.next_checks,
        }


RULES = []
DEFAULT_PRECEDENCE = 100


def precedence_of(fn) -> int:
    return getattr(fn, "precedence", DEFAULT_PRECEDENCE)


def rule(fn=None, *, precedence: int = DEFAULT_PRECEDENCE):
    """Register a rule (``@rule`` or ``@rule(precedence=N)``); lower precedence wins a shared effect."""

    def add(f):
        f.precedence = precedence
        RULES.append(f)
        RULES.sort(key=precedence_of)  # stable: same precedence keeps the order of registration
        return f

    return add(fn) if fn is not None else add


def _r(x, n=2):
    return None if x is None else round(x, n)


def _slow(d: DiskWindow, cfg: DiagnoseConfig) -> bool:
    """agent.health.slow: over diagnose.slow_ms, and over SLOW_BASELINE_FACTOR x its own baseline when learnt."""
    return health.slow(d.mean_ms, d.ops, cfg.slow_ms, cfg.min_ops, d.baseline_ms)


def _budgets(ds, w: Window) -> dict[str, dict]:
    """vm/disk -> its latency budget as evidence (agent/diagnose/budget.py)."""
    out = {}
    for d in ds:
        b = disk_budget(d, w)
        if b is not None:
            out[f"{d.vm}/{d.disk}"] = b.as_evidence()
    return out


def _vms_scope(ident: str, affected_vms: set, all_vms: set) -> str:
    """The scope words: every VM on the portal (when several), one VM, or some of them."""
    if len(affected_vms) == 1:
        return "one VM"
    if affected_vms >= all_vms:
        return f"all VMs on portal {ident}"
    return f"some VMs on portal {ident}"


def _dead(c: ConnWindow, w: Window) -> bool:
    """A connection whose peer stopped answering: RTO backing off and its disk doing nothing."""
    if not health.backing_off(c.max_backoff):
        return False
    disks = [d for d in w.disks if d.vm == c.vm and d.disk == c.disk]
    return health.backing_off(c.max_backoff) and bool(disks) and all(d.ops == 0 or d.stalled for d in disks)


def _lossy(c: ConnWindow, cfg: DiagnoseConfig) -> bool:
    """Loss on an established connection (SYN retries of a dead portal are path_down's): agent.health.lossy."""
    if c.state != "ESTABLISHED" or c.retrans <= 0:
        return False
    return health.lossy(c.retrans_per_second, c.loss_ratio, cfg.retrans_per_second, cfg.retrans_ratio)


def _ratio_of(cs: list[ConnWindow]) -> float | None:
    """The loss ratio of several connections together (bytes when every one has them)."""
    with_bytes = all(c.bytes_sent is not None and c.bytes_retrans is not None for c in cs)
    return health.loss_ratio(
        sum(c.bytes_retrans for c in cs) if with_bytes else None, sum(c.bytes_sent for c in cs) if with_bytes else None,
        sum(c.retrans for c in cs), sum(c.segs_out for c in cs))


def _effects(disks=(), conns=()) -> frozenset:
    """What a finding explains: its disks and its connections (Finding.explains)."""
    return frozenset([("disk", f"{d.vm}/{d.disk}") for d in disks] + [("conn", c.four_tuple) for c in conns])


def _disks_on(w: Window, portal: str) -> list[DiskWindow]:
    return [d for d in w.disks if d.portal == portal]


def _portals(w: Window) -> list[str]:
    return sorted({c.portal for c in w.conns} | {d.portal for d in w.disks if d.portal})


def _lossy_tx(cs: list[ConnWindow], seconds: float, cfg: DiagnoseConfig) -> bool:
    """The host's sending side of these connections together is lossy (DSACKed retransmits left out)."""
    real = sum(c.real_retrans for c in cs)
    if real <= 0:
        return False
    retrans = sum(c.retrans for c in cs)
    ratio = _ratio_of(cs)
    ratio = None if ratio is None else ratio * (real / retrans if retrans else 1.0)
    return health.lossy(real / seconds, ratio, cfg.retrans_per_second, cfg.retrans_ratio)


def _lossy_rx(cs: list[ConnWindow], seconds: float) -> bool:
    """Segments toward the host are lost: holes (out-of-order arrivals) at agent.health's rate and ratio."""
    known = [c for c in cs if c.ooo is not None]
    if not known:
        return False
    ooo, segs = sum(c.ooo for c in known), sum(c.data_segs_in or 0 for c in known)
    return health.lossy_toward_host(ooo / seconds, ooo / segs if segs else None)


def _live_conns(w: Window, portal: str) -> list[ConnWindow]:
    return [c for c in w.conns if c.portal == portal and c.state == "ESTABLISHED" and not _dead(c, w)]


@rule(precedence=50)
def packet_loss(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Packet loss on an iSCSI path, in either direction.

    Symptom: VM disks on one portal (or all) get slow.
    Signals: per portal, its connections together: retransmits the host
    sent (tcp_info total_retrans deltas) minus those the portal reported as
    duplicates (DSACK: not lost), and holes in what the host received
    (tcpi_rcv_ooopack: loss toward the host, where the portal retransmits
    and the host's own counters barely move); each slow disk's latency
    budget.
    Threshold: the health model's "lossy" (agent/health.py) on the portal's
    connections together or on one of them: lost/s >= diagnose.retrans_per_second
    and lost/sent >= diagnose.retrans_ratio; toward the host, out-of-order
    segments at the same rate and >= RX_LOSS_MIN_RATIO of the data received.
    Every VM with a disk on that portal is named (they share the path);
    every portal lossy = the host side.
    Remedy: find where packets are lost: host interface counters, bond and
    switch port errors, MTU mismatches, the target's NIC.
    """
    by_portal: dict[str, tuple[list[ConnWindow], list[str]]] = {}
    for portal in _portals(w):
        live = _live_conns(w, portal)
        if not live:
            continue
        directions = []
        if _lossy_tx(live, w.seconds, cfg):
            lossy = live
            directions.append("from the host")
        else:
            lossy = [c for c in live if _lossy_tx([c], w.seconds, cfg)]
            if lossy:
                directions.append("from the host")
        if _lossy_rx(live, w.seconds):
            lossy, directions = live, directions + ["toward the host"]
        if lossy:
            by_portal[portal] = (lossy, directions)
    if not by_portal:
        return []
    all_portals = _portals(w)
    host_wide = len(all_portals) > 1 and set(by_portal) == set(all_portals)
    if host_wide:
        groups = [("host", w.host, [c for cs, _ in by_portal.values() for c in cs],
                   sorted({x for _, ds in by_portal.values() for x in ds}))]
    else:
        groups = [("portal", p, cs, ds) for p, (cs, ds) in sorted(by_portal.items())]
    findings = []
    for kind, ident, cs, directions in groups:
        portals = sorted({c.portal for c in cs})
        whole = [c for p in portals for c in _live_conns(w, p)]
        owners = {(c.vm, c.disk) for c in cs}
        on_portals = [d for d in w.disks if d.portal in portals]
        affected = on_portals if len(cs) == len(whole) else [d for d in on_portals if (d.vm, d.disk) in owners]
        if not affected:
            affected = on_portals
        affected_set = set(affected)  # DiskWindow is frozen: hashed and compared by value, as `in` a list does
        others = [d for d in w.disks if d not in affected_set and d.mean_ms is not None and d.ops >= cfg.min_ops]
        slow = [d for d in affected if _slow(d, cfg)]
        stalled = [d for d in affected if d.stalled]
        vms = sorted({d.vm for d in affected})
        if kind == "host":
            scope = "all VMs on the host"
        else:
            scope = _vms_scope(ident, set(vms), {d.vm for d in on_portals})
        retrans, real = sum(c.retrans for c in cs), sum(c.real_retrans for c in cs)
        ratio = _ratio_of(cs)
        ratio = None if ratio is None else ratio * (real / retrans if retrans else 1.0)
        known = [c for c in cs if c.ooo is not None]
        ooo = sum(c.ooo for c in known) if known else None
        segs_in = sum(c.data_segs_in or 0 for c in known)
        severity = "critical" if stalled or any(health.critical(d.mean_ms, cfg.critical_ms) for d in slow) else "warning"
        ifaces = sorted({p.interface for p in w.paths if p.portal in portals and p.interface})
        ev = {
            "direction": " and ".join(directions),
            "retransmits": retrans,
            "retransmits_per_second": _r(retrans / w.seconds),
            "retransmits_not_lost_dsack": retrans - real,
            "retransmit_ratio_pct": _r(100.0 * ratio, 3) if ratio is not None else None,
            "out_of_order_received": ooo,
            "out_of_order_per_second": None if ooo is None else _r(ooo / w.seconds),
            "out_of_order_ratio_pct": _r(100.0 * ooo / segs_in, 3) if ooo is not None and segs_in else None,
            "connections": len(cs),
            "rtt_ms": _r(max((c.rtt_ms or 0) for c in cs), 3),
            "vms": vms,
            "disks": {f"{d.vm}/{d.disk}": _r(d.mean_ms, 3) for d in affected},
            "other_disks_median_ms": _r(median([d.mean_ms for d in others]), 3) if others else None,
        }
        if slow:
            ev["budget"] = _budgets(slow, w)
        where = "all portals" if kind == "host" else f"portal {ident}"
        rate = (f"{ev['out_of_order_per_second']} segments/s arrive out of order" if directions == ["toward the host"]
                else f"{_r(real / w.seconds)} lost segments/s")
        findings.append(
            Finding(
                rule="packet_loss",
                severity=severity,
                subject={"kind": kind, "id": ident},
                scope=scope,
                explains=_effects(affected, cs),
                title=f"packet loss on the path to {where} ({' and '.join(directions)}): {rate}"
                + (f", {len(slow)} slow disk(s)" if slow else "") + f"; VMs {', '.join(vms)}",
                evidence=ev,
                cause=(
                    "TCP segments to/from the iSCSI portal are being lost and retransmitted; each loss stalls "
                    "the SCSI commands behind it (RTO >= 200 ms when fast retransmit cannot help)"
                    + ("; losses toward the host are retransmitted by the portal, so the host's own retransmit "
                       "counters barely move: the holes in what it receives show them" if "toward the host" in directions
                       else "")
                    + (" on every path of the host: suspect the host side (interface, bond, uplink)" if kind == "host" else "")
                ),
                next_checks=[
                    f"interface counters on {', '.join(ifaces) or 'the storage interface'}: ip -s link show",
                    "switch port and target NIC error/discard counters on this path",
                    "MTU along the path (kvmscope doctor); a jumbo-frame mismatch drops large segments",
                    f"VMs affected: {', '.join(vms) or '-'}",
                ],
            )
        )
    return findings


@rule(precedence=55)
def network_queueing(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Queueing on the network path (RTT inflated, no loss).

    Symptom: VM disks on one portal get slow; nothing is lost.
    Signals: the smoothed RTT of the portal's connections against the
    portal's learnt baseline (a low quantile of its RTT in the history), and
    each slow disk's latency budget: how much of what it lost over its own
    baseline the RTT inflation and retransmission stalls account for.
    Threshold: a slow disk whose budget's dominant layer is the network:
    the network part >= NETWORK_SHARE of its excess latency and the RTT
    >= RTT_INFLATED_FACTOR x the baseline (agent/health.py). Every VM on
    the portal is named when the portal's RTT as a whole is inflated.
    Remedy: a congested or rate-limited link: interface and switch queue
    drops/marks, policers or shapers on the path, a saturated uplink or
    bond member, other traffic sharing the storage VLAN.
    """
    out = []
    for portal in _portals(w):
        p = w.portals.get(portal)
        on = _disks_on(w, portal)
        slow = [d for d in on if _slow(d, cfg) and not d.stalled]
        net = {}
        for d in slow:
            b = disk_budget(d, w)
            if b is not None and b.dominant == "network":
                net[f"{d.vm}/{d.disk}"] = b
        if not net or p is None:
            continue
        portal_wide = health.rtt_inflated(p.rtt_ms, p.rtt_baseline_ms)  # the portal as a whole, not one connection
        affected = on if portal_wide else [d for d in on if f"{d.vm}/{d.disk}" in net]
        vms = sorted({d.vm for d in affected})
        conns = [c for c in w.conns if c.portal == portal and (portal_wide or f"{c.vm}/{c.disk}" in net)]
        worst = max(b.total_ms for b in net.values())
        b0 = max(net.values(), key=lambda b: b.total_ms)
        ev = {
            "rtt_ms": _r(p.rtt_ms, 3),
            "rtt_baseline_ms": _r(p.rtt_baseline_ms, 3),
            "rtt_baseline_from": p.rtt_baseline_source,
            "rtt_inflation": _r(p.rtt_inflation, 1),
            "retransmits_lost": p.real_retrans,
            "vms": vms,
            "disks": {f"{d.vm}/{d.disk}": _r(d.mean_ms, 3) for d in affected},
            "budget": {k: b.as_evidence() for k, b in sorted(net.items())},
        }
        out.append(Finding(
            rule="network_queueing",
            severity="critical" if health.critical(worst, cfg.critical_ms) else "warning",
            subject={"kind": "portal", "id": portal} if portal_wide else {"kind": "disk", "id": sorted(net)[0]},
            scope=_vms_scope(portal, set(vms), {d.vm for d in on}),
            explains=_effects(affected, conns),
            title=f"queueing on the network path to portal {portal}: RTT {p.rtt_ms:.2f} ms vs baseline "
                  f"{p.rtt_baseline_ms:.2f} ms (x{p.rtt_inflation:.0f}), no loss; the network is "
                  f"{100 * (b0.network_share or 0):.0f}% of the added latency of {b0.disk}; VMs {', '.join(vms)}",
            evidence=ev,
            cause="requests wait in a queue on the path to the portal (a rate-limited, shaped or congested "
                  "link): the round trip grew many times over its usual value while nothing is lost, and that "
                  "growth accounts for the disks' added latency; the target is not what is slow",
            next_checks=[
                "tc -s qdisc show on the storage interfaces (backlog, drops); shapers or policers on the path",
                "switch port utilisation and queue drops/ECN marks toward the target",
                "other traffic on the storage VLAN or bond member; the link's negotiated speed (ethtool)",
                f"VMs affected: {', '.join(vms)}",
            ]))
    return out


@rule(precedence=80)
def slow_target(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Slow target or backing storage.

    Symptom: VM disks on iSCSI are slow.
    Signals: each slow disk's latency budget: what is left of its time per
    request after the layers the agent measures (host block layer, iSCSI
    command, network: RTT against its baseline and retransmit stalls) on a
    path that is not lossy; grouped by what the slow disks share: every
    portal (the host's target side), one portal, or one LUN.
    Threshold: a slow disk (agent.health.slow) whose budget's dominant
    layer is the target (the network accounts for < NETWORK_SHARE of its
    added latency). "Network clean" is said only when the budget shows it.
    Remedy: look at the target: its backing storage latency, queue depth,
    controller load, snapshot/replication jobs.
    """
    lossy_portals = {p for p in _portals(w) if _lossy_tx(_live_conns(w, p), w.seconds, cfg)
                     or _lossy_rx(_live_conns(w, p), w.seconds)}
    iscsi_host = {(p.vm, p.disk): p.portal for p in w.paths if p.backend == "host-iscsi"}
    slow, budgets = [], {}
    for d in w.disks:
        portal = d.portal or iscsi_host.get((d.vm, d.disk))
        if not portal or not (d.backend in ("libiscsi", "host-iscsi") or (d.vm, d.disk) in iscsi_host):
            continue
        if not _slow(d, cfg) or portal in lossy_portals or d.stalled:
            continue
        d = d if d.portal else replace(d, portal=portal)
        b = disk_budget(d, w)
        if b is None or b.dominant != "target":
            continue
        slow.append(d)
        budgets[f"{d.vm}/{d.disk}"] = b
    if not slow:
        return []
    portals = sorted({d.portal for d in slow})
    all_portals = _portals(w)
    fine_local = [d for d in w.disks if d.backend == "host" and (d.vm, d.disk) not in iscsi_host
                  and d.mean_ms is not None and d.ops >= cfg.min_ops and not _slow(d, cfg)]
    groups: list[tuple[str, str, str, list[DiskWindow]]] = []
    if len(portals) == len(all_portals) and len(all_portals) > 1:
        groups.append(("host", w.host, "all VMs on the host (every portal)", slow))
    else:
        for portal in portals:
            ds = [d for d in slow if d.portal == portal]
            on = [d for d in w.disks if d.portal == portal]
            if len({d.vm for d in on}) > 1 and len(ds) == len(on):
                groups.append(("portal", portal, f"all VMs on portal {portal}", ds))
            else:  # one finding per slow LUN: what these disks share is their LUN (or their target)
                for d in ds:
                    lun = f"{d.target}/{d.lun}" if d.target else f"{d.vm}/{d.disk}"
                    groups.append(("lun" if d.target else "disk", lun, "one VM", [d]))
    out = []
    for kind, ident, scope, ds in groups:
        worst = max(d.mean_ms for d in ds)
        conns = [c for c in w.conns if (c.vm, c.disk) in {(d.vm, d.disk) for d in ds}
                 or (kind != "lun" and c.portal in {d.portal for d in ds})]
        bs = {k: budgets[f"{d.vm}/{d.disk}"] for d in ds for k in [f"{d.vm}/{d.disk}"]}
        shares = [b.network_share or 0.0 for b in bs.values()]
        lost = sum(c.real_retrans for c in conns)
        clean = lost == 0 and max(shares) < health.NETWORK_SHARE / 2
        net = "network clean" if clean else f"network at most {100 * max(shares):.0f}% of the added latency"
        vms = sorted({d.vm for d in ds})
        ev = {
            "disks": {f"{d.vm}/{d.disk}": _r(d.mean_ms, 3) for d in ds},
            "ops_per_second": {f"{d.vm}/{d.disk}": _r(d.ops_per_second, 1) for d in ds},
            "vms": vms,
            "retransmits_on_their_connections": sum(c.retrans for c in conns),
            "retransmits_lost": lost,
            "rtt_ms": _r(max((c.rtt_ms or 0) for c in conns), 3) if conns else None,
            "local_disks_median_ms": _r(median([d.mean_ms for d in fine_local]), 3) if fine_local else None,
            "budget": {k: b.as_evidence() for k, b in sorted(bs.items())},
        }
        out.append(Finding(
            rule="slow_target",
            severity="critical" if health.critical(worst, cfg.critical_ms) else "warning",
            subject={"kind": kind, "id": ident},
            scope=scope,
            explains=_effects(ds),
            title=f"slow iSCSI target or backing storage ({len(ds)} disk(s), worst {worst:.1f} ms per request), {net}",
            evidence=ev,
            cause="requests wait on the target: its backing storage or controller is slow; the latency budget "
                  "leaves the time to the target" + ("" if clean else " (the network's part is in the evidence)"),
            next_checks=[
                "target side: backing device latency and queue (iostat -x on the target), controller load",
                "jobs on the array/target: snapshots, rebuilds, replication, thin-pool exhaustion",
                "other initiators saturating the same LUN or RAID group",
            ],
        ))
    return out


@rule(precedence=20)
def path_down(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Session or connection down, recovering or flapping.

    Symptom: a VM's disk stops (I/O hangs) or stutters.
    Signals: open-iscsi session state != LOGGED_IN; a libiscsi disk whose
    qemu has no ESTABLISHED connection to its portal; a disk whose requests
    stopped within the window; new connections replacing old ones
    (reconnects); error counters (timeouts, digest errors) rising.
    Threshold: any of these. When every VM (several) with a disk on a portal
    is down there, or reconnected to it, that is one finding for the portal
    naming them all (scope "all VMs on portal X"), not one per VM.
    Remedy: check the portal is reachable and the target serves the LUN;
    for flapping, the NOP-Out/timeout settings and the network in between.
    """
    out = []
    for sid, s in sorted(w.sessions.items()):
        bad_states = [x for x in s["states"] if x != "LOGGED_IN"]
        if s.get("last") != "LOGGED_IN":
            out.append(Finding(
                rule="path_down", severity="critical", subject={"kind": "session", "id": str(sid)}, scope=None,
                explains=frozenset({("session", str(sid))}),
                title=f"iSCSI session {sid} to {s['portal']} is {s.get('last')}",
                evidence={"state": s.get("last"), "target": s["target"], "portal": s["portal"],
                          "recovery_timeout_s": s.get("recovery_tmo"), "disks": s.get("disks")},
                cause="the session lost its connection and is in recovery; I/O on its disks is queued until it "
                      "logs in again or recovery_tmo expires (then I/O fails, or multipath fails over)",
                next_checks=["iscsiadm -m session -P 1", f"reachability of {s['portal']} (ping, port 3260)",
                             "kernel log: 'detected conn error', 'ping timeout'"]))
        elif bad_states:
            out.append(Finding(
                rule="path_down", severity="warning", subject={"kind": "session", "id": str(sid)}, scope=None,
                explains=frozenset({("session", str(sid))}),
                title=f"iSCSI session {sid} to {s['portal']} recovered within the window",
                evidence={"states_seen": s["states"], "portal": s["portal"]},
                cause="the session dropped and logged in again (flapping path)",
                next_checks=["kernel log around the window", "NOP-Out interval/timeout (kvmscope doctor)"]))
        errs = {k: v for k, v in s.get("errors", {}).items() if v > 0}
        if errs:
            out.append(Finding(
                rule="path_down", severity="warning", subject={"kind": "session", "id": str(sid)}, scope=None,
                title=f"iSCSI session {sid} error counters rising: {', '.join(f'{k} +{v}' for k, v in errs.items())}",
                evidence=errs, aspect="errors",
                cause="digest errors mean corruption on the wire; timeouts mean commands or NOPs "
                "were not answered in time",
                next_checks=["iscsiadm -m session -r SID -s", "network path errors", "target logs"]))
    libiscsi = {(p.vm, p.disk): p for p in w.paths if p.backend == "libiscsi"}
    conns_of: dict[tuple, list[ConnWindow]] = {}  # (vm, disk) -> its connections present at the end, in order
    for c in w.conns:
        if c.present_at_end:
            conns_of.setdefault((c.vm, c.disk), []).append(c)
    per_disk: list[tuple[DiskWindow, Finding]] = []
    for d in w.disks:
        p = libiscsi.get((d.vm, d.disk))
        conns = conns_of.get((d.vm, d.disk), [])
        established = [c for c in conns if c.state == "ESTABLISHED"]
        dead = [c for c in established if _dead(c, w)]
        if dead:
            c = dead[0]
            per_disk.append((d, Finding(
                rule="path_down", severity="critical", subject={"kind": "disk", "id": f"{d.vm}/{d.disk}"},
                scope="one VM", explains=_effects([d], conns),
                title=f"{d.vm} {d.disk}: portal {d.portal} stopped answering; I/O stopped",
                evidence={"ops_in_window": d.ops, "intervals_ops": list(d.intervals_ops), "connection": c.four_tuple,
                          "rto_backoff": c.max_backoff, "retransmits": c.retrans, "portal": d.portal},
                cause="the TCP connection is still open but nothing comes back: retransmission timeouts back off "
                      "while the guest's requests wait (target down or the path black-holing packets); libiscsi "
                      "will declare a NOP timeout and reconnect",
                next_checks=[f"reachability of {d.portal} (ping, port 3260) from this host",
                             "target service and its portal configuration", "firewall/ACL changes on the path",
                             f"QEMU log of {d.vm}: 'iSCSI: NOP timeout. Reconnecting...'"])))
        elif p is not None and not established and (d.stalled or d.ops == 0 or p.connection is None):
            per_disk.append((d, Finding(
                rule="path_down", severity="critical", subject={"kind": "disk", "id": f"{d.vm}/{d.disk}"},
                scope="one VM", explains=_effects([d], conns),
                title=f"{d.vm} {d.disk}: no established iSCSI connection to {d.portal}; I/O "
                + ("stopped" if d.stalled or d.ops == 0 else "at risk"),
                evidence={"ops_in_window": d.ops, "intervals_ops": list(d.intervals_ops),
                          "connection_states": sorted({c.state for c in conns}) or None, "portal": d.portal},
                cause="QEMU's libiscsi lost its TCP connection to the portal (target down, unreachable, or "
                      "not answering); the guest's requests wait until libiscsi reconnects",
                next_checks=[f"reachability of {d.portal}", "target service state",
                             f"QEMU log of {d.vm}: 'iSCSI: NOP timeout. Reconnecting...'"])))
        elif d.stalled:
            per_disk.append((d, Finding(
                rule="path_down", severity="critical", subject={"kind": "disk", "id": f"{d.vm}/{d.disk}"},
                scope="one VM", explains=_effects([d], conns),
                title=f"{d.vm} {d.disk}: I/O stopped during the window",
                evidence={"intervals_ops": list(d.intervals_ops), "portal": d.portal, "backend": d.backend},
                cause="requests stopped completing: the path or the target stopped answering, or the guest "
                      "stopped issuing I/O",
                next_checks=["kvmscope paths", "target reachability", "guest console"])))
    out.extend(_group_down_by_portal(w, per_disk))
    reconnects = _reconnects_by_portal(w)
    for (vm, portal), n in sorted(w.reconnects.items()):
        if portal in reconnects:
            continue
        out.append(Finding(
            rule="path_down", severity="warning", subject={"kind": "vm", "id": vm}, scope="one VM",
            aspect=f"reconnects to {portal}",
            title=f"{vm}: {n} reconnect(s) to {portal} within {w.seconds:.0f}s",
            evidence={"reconnects": n, "portal": portal},
            cause="the iSCSI connection was re-established (libiscsi reconnect after a NOP timeout, or the "
                  "target reset the connection)",
            next_checks=[f"QEMU log of {vm}", "target logs for connection resets", "retransmits on this path"]))
    for portal, per_vm in sorted(reconnects.items()):
        vms = sorted(per_vm)
        on = _disks_on(w, portal)
        out.append(Finding(
            rule="path_down", severity="warning", subject={"kind": "portal", "id": portal},
            scope=f"all VMs on portal {portal}", aspect="reconnects",
            explains=_effects(on, [c for c in w.conns if c.portal == portal]),
            title=f"portal {portal}: every VM on it reconnected within {w.seconds:.0f}s ({', '.join(vms)})",
            evidence={"reconnects": dict(sorted(per_vm.items())), "portal": portal, "vms": vms},
            cause="every iSCSI connection to this portal was re-established: the portal or the path to it "
                  "went away and came back (a flap), not one VM's connection",
            next_checks=[f"reachability of {portal}", "target logs for connection resets around the window",
                         "kernel and QEMU logs: 'NOP timeout. Reconnecting...'"]))
    return out


def _group_down_by_portal(w: Window, per_disk: list[tuple[DiskWindow, Finding]]) -> list[Finding]:
    """One finding per portal when every VM on it (several) is down there; the per-disk findings otherwise."""
    out, by_portal = [], {}
    for d, f in per_disk:
        by_portal.setdefault(d.portal, []).append((d, f))
    for portal, items in sorted(by_portal.items(), key=lambda kv: str(kv[0])):
        on = [d for d in w.disks if d.portal == portal] if portal else []
        down = {(d.vm, d.disk) for d, _ in items}
        if not portal or len({d.vm for d in on}) < 2 or not all((d.vm, d.disk) in down for d in on):
            out.extend(f for _, f in items)
            continue
        vms = sorted({d.vm for d, _ in items})
        stopped = [f"{d.vm}/{d.disk}" for d, _ in items if d.ops == 0 or d.stalled]
        conns = [c for c in w.conns if c.portal == portal]
        out.append(Finding(
            rule="path_down", severity="critical", subject={"kind": "portal", "id": portal},
            scope=f"all VMs on portal {portal}",
            explains=frozenset().union(*(f.explains for _, f in items)) | _effects(on, conns),
            title=f"portal {portal} stopped answering: I/O of every VM on it stopped ({', '.join(vms)})",
            evidence={"portal": portal, "vms": vms, "disks_stopped": stopped,
                      "disks": {f"{d.vm}/{d.disk}": f.evidence for d, f in items},
                      "rto_backoff": max((c.max_backoff for c in conns), default=0)},
            cause="every connection to this portal stopped getting answers at once (or is gone): the portal, "
                  "its target, or the path to it is down; one cause for all of its VMs, not one per VM",
            next_checks=[f"reachability of {portal} (ping, port 3260) from this host",
                         "target service and its portal configuration", "firewall/ACL changes on the path",
                         "QEMU logs of its VMs: 'iSCSI: NOP timeout. Reconnecting...'"]))
    return out


def _reconnects_by_portal(w: Window) -> dict[str, dict[str, int]]:
    """portal -> {vm: reconnects} where every VM (several) with a disk on the portal reconnected."""
    per: dict[str, dict[str, int]] = {}
    for (vm, portal), n in w.reconnects.items():
        per.setdefault(portal, {})[vm] = n
    out = {}
    for portal, vms in per.items():
        on = {d.vm for d in _disks_on(w, portal)}
        if len(on) > 1 and on <= set(vms):
            out[portal] = vms
    return out


@rule
def interface_errors(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Host interface errors or drops on the storage path.

    Symptom: retransmits, slow disks on the portals reached through one interface.
    Signals: rx/tx errors and drops (sysfs statistics) on interfaces that
    carry storage connections.
    Threshold: any increase within the window.
    Remedy: check cabling/optics, NIC driver and firmware, ring buffer sizes
    (drops), the switch port.
    """
    out = []
    for name in sorted(w.storage_ifaces):
        d = w.ifaces.get(name, {})
        bad = {k: v for k, v in d.items() if k.endswith(("_errors", "_dropped")) and v > 0}
        if bad:
            out.append(Finding(
                rule="interface_errors", severity="warning", subject={"kind": "interface", "id": name},
                scope=None,
                title=f"interface {name} on the storage path: " + ", ".join(f"{k} +{v}" for k, v in sorted(bad.items())),
                evidence=dict(bad, rx_packets=d.get("rx_packets"), tx_packets=d.get("tx_packets")),
                cause="the host's interface is dropping or corrupting packets on the iSCSI path",
                next_checks=[f"ip -s -s link show {name}", f"ethtool -S {name}", "switch port counters"]))
    return out


@rule(precedence=60)
def saturating_vm(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """A VM saturating its own disk.

    Symptom: one VM's disk is slow; others on the same path are fine.
    Signals: that disk's request rate is far above the median of the other
    disks on the same portal, its latency is above the threshold, and the
    others' latency is below it; no retransmits on the path.
    Threshold: ops/s > diagnose.saturation_factor x median of the others.
    Remedy: the VM is asking for more than its LUN gives: per-VM I/O limits
    (libvirt <iotune>), a faster LUN, or spreading the load.
    """
    out = []
    for portal in _portals(w):
        on = [d for d in w.disks if d.portal == portal and d.mean_ms is not None and d.ops >= cfg.min_ops]
        if len(on) < 2:
            continue
        # the disk must be slow and every other one not: exactly one slow disk on the portal (checked first:
        # the median of the others is a sort per disk, too much for every disk of a big host)
        slow = [d for d in on if _slow(d, cfg)]
        for d in slow if len(slow) == 1 else ():
            others = [o for o in on if o is not d]
            med = median([o.ops_per_second for o in others])
            if d.ops_per_second > cfg.saturation_factor * max(med, 1e-9):
                out.append(Finding(
                    rule="saturating_vm", severity="warning", subject={"kind": "disk", "id": f"{d.vm}/{d.disk}"},
                    scope="one VM", explains=_effects([d]),
                    title=f"{d.vm} {d.disk} saturates its disk: {d.ops_per_second:.0f} ops/s at {d.mean_ms:.1f} ms "
                    f"while the others on {portal} do {med:.0f} ops/s",
                    evidence={"ops_per_second": _r(d.ops_per_second, 1), "mean_ms": _r(d.mean_ms, 3),
                              "others_median_ops_per_second": _r(med, 1),
                              "others_max_ms": _r(max(o.mean_ms for o in others), 3)},
                    cause="the latency is the VM's own queueing: it issues more I/O than its LUN serves",
                    next_checks=["the guest's workload (iostat in the guest)", "libvirt <iotune> limits",
                                 "the LUN's service level on the target"]))
    return out


@rule
def blind_spots(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Blind spots: sources (or rules) that failed, so every verdict is weaker.

    Symptom: none by itself.
    Signals: collectors or probes that failed during the window; a rule that
    raised is reported the same way (subject kind "rule", with its error)
    while the other rules still run.
    Threshold: any failure.
    Remedy: fix the source (its reason says how); until then read the other
    findings with care.
    """
    if not w.blind_spots:
        return []
    return [Finding(
        rule="blind_spots", severity="info", subject={"kind": "source", "id": ", ".join(sorted(w.blind_spots))},
        scope=None,
        title=f"blind spots: {', '.join(sorted(w.blind_spots))} failed; the verdict above is weaker",
        evidence=dict(sorted(w.blind_spots.items())),
        cause="without these sources some causes cannot be seen or told apart",
        next_checks=["kvmscope run --once (each collector's reason)", "kvmscope probes check"])]


def slow_unexplained(w: Window, cfg: DiagnoseConfig, findings: list[Finding]) -> list[Finding]:
    """Slow, cause not determined.

    Symptom: a disk is slow and no rule explains it.
    Signals: every slow disk (agent.health.slow) that no other finding
    names among the effects it explains; its latency budget and, for each
    cause the rules look for, why it was ruled out (loss in both directions,
    the path's state, RTT inflation and the network's share, saturation).
    Threshold: slow and unexplained (runs after every other rule, so no slow
    disk is left out of the report).
    Remedy: the budget says where the time goes; look there (QEMU and the
    guest when the time is spent above the iSCSI command, the host's CPU
    when every layer grew).
    """
    explained = {e for f in findings for e in f.explains}
    out = []
    for d in w.disks:
        key = f"{d.vm}/{d.disk}"
        if not _slow(d, cfg) or ("disk", key) in explained:
            continue
        b = disk_budget(d, w)
        p = w.portals.get(d.portal) if d.portal else None
        ruled_out = []
        if p is not None:
            ruled_out.append(f"packet loss on {p.portal}: {p.real_retrans} lost segment(s) sent, "
                             + ("out-of-order arrivals not counted by this kernel" if p.ooo is None
                                else f"{p.ooo} out-of-order arrival(s)") + f" in {w.seconds:.0f}s")
            conns = [c for c in w.conns if c.vm == d.vm and c.disk == d.disk]
            ruled_out.append("path down: " + (", ".join(f"{c.four_tuple} {c.state}, RTO backoff {c.max_backoff}"
                                                          for c in conns) or "no connection of its own seen"))
        else:
            ruled_out.append("network: no iSCSI path known for this disk (backend " + d.backend + ")")
        if b is not None and b.rtt_ms is not None:
            ruled_out.append(f"network queueing: RTT x{(b.rtt_inflation or 0):.1f} its baseline, the network "
                             f"{100 * (b.network_share or 0):.0f}% of the added latency")
        if b is not None:
            ruled_out.append(f"slow target: the budget's dominant layer is {b.dominant.replace('_', ' ')}"
                             if b.dominant != "target" else "slow target: not an iSCSI disk on a clean path")
        peers = [o for o in w.disks if o.portal == d.portal and o is not d and o.ops >= cfg.min_ops] if d.portal else []
        if peers:
            ruled_out.append(f"saturation: {d.ops_per_second:.0f} ops/s vs its neighbours' median "
                             f"{median([o.ops_per_second for o in peers]):.0f}")
        ev = {"mean_ms": _r(d.mean_ms, 3), "baseline_ms": _r(d.baseline_ms, 3), "ops_per_second": _r(d.ops_per_second, 1),
              "ruled_out": ruled_out}
        if b is not None:
            ev["budget"] = b.as_evidence()
        out.append(Finding(
            rule="slow_unexplained",
            severity="critical" if health.critical(d.mean_ms, cfg.critical_ms) else "warning",
            subject={"kind": "disk", "id": key}, scope="one VM", explains=_effects([d]),
            title=f"{d.vm} {d.disk}: slow ({d.mean_ms:.1f} ms per request), cause not determined"
                  + (f"; most of it in the {b.dominant.replace('_', ' ')} layer" if b is not None else ""),
            evidence=ev,
            cause="no rule's signals explain this disk's latency; the budget and what was ruled out are in the "
                  "evidence",
            next_checks=["the budget's dominant layer first", "the guest's own I/O pattern (iostat in the guest)",
                         "the host's CPU pressure (/proc/pressure/cpu) when every layer grew"]))
    return out


def rule_failed(name: str, error: BaseException) -> Finding:
    """A rule that raised: a blind spot like a failed source, named with its error."""
    err = f"{type(error).__name__}: {error}"
    return Finding(
        rule="blind_spots", severity="info", subject={"kind": "rule", "id": name}, scope=None,
        title=f"blind spot: rule {name} failed ({err}); the causes it looks for were not checked",
        evidence={"rule": name, "error": err},
        cause="a bug in the rule or input it did not expect; the other rules ran",
        next_checks=["the agent's log (the traceback)", "report it with `kvmscope diagnose --json` output"])


def consolidate(ranked: list[tuple[int, Finding]], recent: frozenset = frozenset()) -> list[Finding]:
    """One finding per cause: drop a finding whose effects are all explained by one of lower precedence.

    ``ranked``: (precedence of its rule, finding). The winner keeps the dropped
    one's cause key in ``evidence["explains_also"]``. Findings that explain no
    effect (blind spots, interface counters) are always kept. ``recent``: the ids of the findings judged
    on the window's most recent intervals (:func:`run_rules`): across the two windows a finding of the
    same rule explains too (the whole window's, ranked first, wins over its regrouping on the recent
    intervals), within one window it does not.
    """
    kept: list[Finding] = []
    claimed: dict[tuple, Finding] = {}

    def other(owner: Finding, f: Finding) -> bool:
        return owner.rule != f.rule or (id(owner) in recent) != (id(f) in recent)

    for _prec, f in sorted(ranked, key=lambda pf: pf[0]):
        owners = {id(claimed[e]): claimed[e] for e in f.explains if e in claimed and other(claimed[e], f)}
        if f.explains and all(e in claimed and other(claimed[e], f) for e in f.explains):
            for o in owners.values():
                o.evidence.setdefault("explains_also", []).append(f.cause_key)
            continue
        kept.append(f)
        for e in f.explains:
            claimed.setdefault(e, f)
    return kept


def _ranked(w: Window, cfg: DiagnoseConfig, rules) -> list[tuple[int, Finding]]:
    """(precedence, finding) of every rule over ``w``; one that raises is a blind spot, the others still run."""
    ranked: list[tuple[int, Finding]] = []
    for r in RULES if rules is None else rules:
        try:
            ranked.extend((precedence_of(r), f) for f in r(w, cfg))
        except Exception as e:  # a rule bug must not hide the other rules' findings
            log.exception("diagnosis rule %s failed", r.__name__)
            ranked.append((DEFAULT_PRECEDENCE, rule_failed(r.__name__, e)))
    return ranked


def _unexplained(w: Window, cfg: DiagnoseConfig, findings: list[Finding]) -> list[Finding]:
    try:
        return slow_unexplained(w, cfg, findings)
    except Exception as e:  # as for any rule
        log.exception("diagnosis rule slow_unexplained failed")
        return [rule_failed("slow_unexplained", e)]


def _judged_recently(f: Finding, recent: Window) -> Finding:
    """A finding only the recent intervals show: its evidence says over what it was judged."""
    f.evidence["judged_over"] = f"the last {recent.snapshots - 1} interval(s) ({recent.seconds:.0f} s)"
    return f


def run_rules(w: Window, cfg: DiagnoseConfig, rules=None, recent: Window | None = None) -> list[Finding]:
    """Every rule over the window; one that raises is reported as a blind spot, the others still run.

    ``recent``: the window's most recent intervals (the live diagnosis, ``diagnose.recent_intervals``):
    every rule runs over them too, with the same thresholds, and a cause either window shows is reported.
    A fault that started inside the window is named as soon as its last intervals show it, not once it
    outweighs the healthy intervals before it. One finding per cause key (the more severe; the whole
    window's when equal), and one finding per cause across both (:func:`consolidate`)."""
    ranked = _ranked(w, cfg, rules)
    quick: set[int] = set()
    if recent is not None:
        at = {f.cause_key: i for i, (_p, f) in enumerate(ranked)}
        for prec, f in _ranked(recent, cfg, rules):
            i = at.get(f.cause_key)
            if i is None:
                at[f.cause_key] = len(ranked)
                ranked.append((prec, _judged_recently(f, recent)))
                quick.add(id(f))
            elif SEVERITY_ORDER[f.severity] < SEVERITY_ORDER[ranked[i][1].severity]:
                ranked[i] = (prec, _judged_recently(f, recent))
                quick.add(id(f))
    findings = consolidate(ranked, frozenset(quick))
    more = _unexplained(w, cfg, findings)
    if recent is not None:
        keys = {f.cause_key for f in more}
        more += [_judged_recently(f, recent) for f in _unexplained(recent, cfg, findings + more)
                 if f.cause_key not in keys]
    findings.extend(more)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.rule, str(f.subject.get("id"))))
    return findings


def describe_rules() -> list[dict]:
    out = []
    for r in [*RULES, slow_unexplained]:
        doc = (r.__doc__ or "").strip()
        title, _, body = doc.partition("\n")
        out.append({"rule": r.__name__, "title": title.strip(), "doc": " ".join(body.split())})
    return out


# rules of other modules register themselves with their precedence when imported (at the end: they import
# Finding and rule from here)
import importlib  # noqa: E402

importlib.import_module("agent.diagnose.outage")  # path_outage, precedence 10


def _load_rule_modules() -> None:
    """Import the ``rules_*`` modules of this package (the kernel path's, ...): their rules register on import."""
    import pkgutil

    import agent.diagnose as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("rules_"):
            importlib.import_module(f"{pkg.__name__}.{mod.name}")


_load_rule_modules()
