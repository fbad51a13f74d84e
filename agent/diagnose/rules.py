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
    return health.slow(d.mean_ms, d.ops, cfg.slow_ms, cfg.min_ops)


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


@rule(precedence=50)
def packet_loss(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Packet loss on an iSCSI path.

    Symptom: VM disks on one portal (or all) get slow.
    Signals: TCP retransmits on the storage connections to that portal
    (tcp_info total_retrans deltas), with the latency of the disks served
    by those connections.
    Threshold: the health model's "lossy" (agent/health.py): on one
    connection, retransmits/s >= diagnose.retrans_per_second and
    retransmitted/sent (bytes, else segments) >= diagnose.retrans_ratio.
    Remedy: find where packets are lost: host interface counters, bond and
    switch port errors, MTU mismatches, the target's NIC.
    """
    lossy = [c for c in w.conns if _lossy(c, cfg) and not _dead(c, w)]
    if not lossy:
        return []
    by_portal: dict[str, list[ConnWindow]] = {}
    for c in lossy:
        by_portal.setdefault(c.portal, []).append(c)
    all_portals = _portals(w)
    findings = []
    host_wide = len(all_portals) > 1 and set(by_portal) == set(all_portals)
    groups = [("host", w.host, [c for cs in by_portal.values() for c in cs])] if host_wide else [
        ("portal", p, cs) for p, cs in sorted(by_portal.items())
    ]
    for kind, ident, cs in groups:
        portals = sorted({c.portal for c in cs})
        owners = {(c.vm, c.disk) for c in cs}
        affected = [d for d in w.disks if d.portal in portals and (d.vm, d.disk) in owners]
        if not affected:
            affected = [d for d in w.disks if d.portal in portals]
        affected_set = set(affected)  # DiskWindow is frozen: hashed and compared by value, as `in` a list does
        others = [d for d in w.disks if d not in affected_set and d.mean_ms is not None and d.ops >= cfg.min_ops]
        slow = [d for d in affected if _slow(d, cfg)]
        stalled = [d for d in affected if d.stalled]
        all_on_portal = [c for c in w.conns if c.portal in portals]
        if kind == "host":
            scope = "all VMs on the host"
        elif len(cs) == len(all_on_portal) and len({c.vm for c in all_on_portal}) > 1:
            scope = f"all VMs on portal {ident}"
        else:
            scope = "one VM" if len({c.vm for c in cs}) == 1 else f"some VMs on portal {ident}"
        retrans = sum(c.retrans for c in cs)
        ratio = _ratio_of(cs)
        severity = "critical" if stalled or any(health.critical(d.mean_ms, cfg.critical_ms) for d in slow) else "warning"
        vms = sorted({d.vm for d in affected})
        ifaces = sorted({p.interface for p in w.paths if p.portal in portals and p.interface})
        ev = {
            "retransmits": retrans,
            "retransmits_per_second": _r(retrans / w.seconds),
            "retransmit_ratio_pct": _r(100.0 * ratio, 3) if ratio is not None else None,
            "connections": len(cs),
            "rtt_ms": _r(max((c.rtt_ms or 0) for c in cs), 3),
            "disks": {f"{d.vm}/{d.disk}": _r(d.mean_ms, 3) for d in affected},
            "other_disks_median_ms": _r(median([d.mean_ms for d in others]), 3) if others else None,
        }
        where = "all portals" if kind == "host" else f"portal {ident}"
        findings.append(
            Finding(
                rule="packet_loss",
                severity=severity,
                subject={"kind": kind, "id": ident},
                scope=scope,
                explains=_effects(affected, cs),
                title=f"packet loss on the path to {where}: {ev['retransmits_per_second']} retransmits/s"
                + (f", {len(slow)} slow disk(s)" if slow else ""),
                evidence=ev,
                cause=(
                    "TCP segments to/from the iSCSI portal are being lost and retransmitted; each loss stalls "
                    "the SCSI commands behind it (RTO >= 200 ms when fast retransmit cannot help)"
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


@rule(precedence=80)
def slow_target(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Slow target or backing storage.

    Symptom: VM disks on iSCSI are slow.
    Signals: mean latency per request above the threshold while the storage
    connections of those disks are clean (no retransmits) and up.
    Threshold: mean latency > diagnose.slow_ms over >= diagnose.min_ops requests.
    Remedy: look at the target: its backing storage latency, queue depth,
    controller load, snapshot/replication jobs; the network is not to blame.
    """
    lossy_portals = {c.portal for c in w.conns if _lossy(c, cfg)}
    slow = [d for d in w.disks if d.backend in ("libiscsi", "host-iscsi") and _slow(d, cfg) and d.portal
            and d.portal not in lossy_portals and not d.stalled]
    # host-backed disks through kernel sessions have backend "host" on the disk record; use paths
    iscsi_host = {(p.vm, p.disk): p.portal for p in w.paths if p.backend == "host-iscsi"}
    for d in w.disks:
        if d.backend == "host" and (d.vm, d.disk) in iscsi_host and _slow(d, cfg):
            portal = iscsi_host[(d.vm, d.disk)]
            if portal not in lossy_portals and not d.stalled:
                slow.append(d if d.portal else replace(d, portal=portal))
    if not slow:
        return []
    portals = sorted({d.portal for d in slow})
    all_portals = _portals(w)
    fine_local = [d for d in w.disks if d.backend == "host" and (d.vm, d.disk) not in iscsi_host
                  and d.mean_ms is not None and d.ops >= cfg.min_ops and not _slow(d, cfg)]
    if len(portals) == len(all_portals) and len(all_portals) > 1:
        kind, ident, scope = "host", w.host, "all VMs on the host (every portal)"
    elif len(portals) == 1:
        kind, ident = "portal", portals[0]
        on = [d for d in w.disks if d.portal == ident]
        scope = f"all VMs on portal {ident}" if len(slow) == len(on) and len({d.vm for d in on}) > 1 else (
            "one VM" if len({d.vm for d in slow}) == 1 else f"some VMs on portal {ident}")
    else:
        kind, ident, scope = "host", w.host, f"VMs on portals {', '.join(portals)}"
    worst = max(d.mean_ms for d in slow)
    clean_conns = [c for c in w.conns if c.portal in portals]
    ev = {
        "disks": {f"{d.vm}/{d.disk}": _r(d.mean_ms, 3) for d in slow},
        "ops_per_second": {f"{d.vm}/{d.disk}": _r(d.ops_per_second, 1) for d in slow},
        "retransmits_on_their_connections": sum(c.retrans for c in clean_conns),
        "rtt_ms": _r(max((c.rtt_ms or 0) for c in clean_conns), 3) if clean_conns else None,
        "local_disks_median_ms": _r(median([d.mean_ms for d in fine_local]), 3) if fine_local else None,
    }
    return [
        Finding(
            rule="slow_target",
            severity="critical" if health.critical(worst, cfg.critical_ms) else "warning",
            subject={"kind": kind, "id": ident},
            scope=scope,
            explains=_effects(slow),
            title=f"slow iSCSI target or backing storage ({len(slow)} disk(s), worst {worst:.1f} ms per request), network clean",
            evidence=ev,
            cause="requests wait on the target: its backing storage or controller is slow; the TCP path shows no significant loss",
            next_checks=[
                "target side: backing device latency and queue (iostat -x on the target), controller load",
                "jobs on the array/target: snapshots, rebuilds, replication, thin-pool exhaustion",
                "other initiators saturating the same LUN or RAID group",
            ],
        )
    ]


@rule(precedence=20)
def path_down(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """Session or connection down, recovering or flapping.

    Symptom: a VM's disk stops (I/O hangs) or stutters.
    Signals: open-iscsi session state != LOGGED_IN; a libiscsi disk whose
    qemu has no ESTABLISHED connection to its portal; a disk whose requests
    stopped within the window; new connections replacing old ones
    (reconnects); error counters (timeouts, digest errors) rising.
    Threshold: any of these.
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
    for d in w.disks:
        p = libiscsi.get((d.vm, d.disk))
        conns = conns_of.get((d.vm, d.disk), [])
        established = [c for c in conns if c.state == "ESTABLISHED"]
        dead = [c for c in established if _dead(c, w)]
        if dead:
            c = dead[0]
            out.append(Finding(
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
                             f"QEMU log of {d.vm}: 'iSCSI: NOP timeout. Reconnecting...'"]))
        elif p is not None and not established and (d.stalled or d.ops == 0 or p.connection is None):
            out.append(Finding(
                rule="path_down", severity="critical", subject={"kind": "disk", "id": f"{d.vm}/{d.disk}"},
                scope="one VM", explains=_effects([d], conns),
                title=f"{d.vm} {d.disk}: no established iSCSI connection to {d.portal}; I/O "
                + ("stopped" if d.stalled or d.ops == 0 else "at risk"),
                evidence={"ops_in_window": d.ops, "intervals_ops": list(d.intervals_ops),
                          "connection_states": sorted({c.state for c in conns}) or None, "portal": d.portal},
                cause="QEMU's libiscsi lost its TCP connection to the portal (target down, unreachable, or "
                      "not answering); the guest's requests wait until libiscsi reconnects",
                next_checks=[f"reachability of {d.portal}", "target service state",
                             f"QEMU log of {d.vm}: 'iSCSI: NOP timeout. Reconnecting...'"]))
        elif d.stalled:
            out.append(Finding(
                rule="path_down", severity="critical", subject={"kind": "disk", "id": f"{d.vm}/{d.disk}"},
                scope="one VM", explains=_effects([d], conns),
                title=f"{d.vm} {d.disk}: I/O stopped during the window",
                evidence={"intervals_ops": list(d.intervals_ops), "portal": d.portal, "backend": d.backend},
                cause="requests stopped completing: the path or the target stopped answering, or the guest "
                      "stopped issuing I/O",
                next_checks=["kvmscope paths", "target reachability", "guest console"]))
    for (vm, portal), n in sorted(w.reconnects.items()):
        out.append(Finding(
            rule="path_down", severity="warning", subject={"kind": "vm", "id": vm}, scope="one VM",
            aspect=f"reconnects to {portal}",
            title=f"{vm}: {n} reconnect(s) to {portal} within {w.seconds:.0f}s",
            evidence={"reconnects": n, "portal": portal},
            cause="the iSCSI connection was re-established (libiscsi reconnect after a NOP timeout, or the "
                  "target reset the connection)",
            next_checks=[f"QEMU log of {vm}", "target logs for connection resets", "retransmits on this path"]))
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


def rule_failed(name: str, error: BaseException) -> Finding:
    """A rule that raised: a blind spot like a failed source, named with its error."""
    err = f"{type(error).__name__}: {error}"
    return Finding(
        rule="blind_spots", severity="info", subject={"kind": "rule", "id": name}, scope=None,
        title=f"blind spot: rule {name} failed ({err}); the causes it looks for were not checked",
        evidence={"rule": name, "error": err},
        cause="a bug in the rule or input it did not expect; the other rules ran",
        next_checks=["the agent's log (the traceback)", "report it with `kvmscope diagnose --json` output"])


def consolidate(ranked: list[tuple[int, Finding]]) -> list[Finding]:
    """One finding per cause: drop a finding whose effects are all explained by one of lower precedence.

    ``ranked``: (precedence of its rule, finding). The winner keeps the dropped
    one's cause key in ``evidence["explains_also"]``. Findings that explain no
    effect (blind spots, interface counters) are always kept.
    """
    kept: list[Finding] = []
    claimed: dict[tuple, Finding] = {}
    for _prec, f in sorted(ranked, key=lambda pf: pf[0]):
        owners = {id(claimed[e]): claimed[e] for e in f.explains if e in claimed and claimed[e].rule != f.rule}
        if f.explains and all(e in claimed and claimed[e].rule != f.rule for e in f.explains):
            for o in owners.values():
                o.evidence.setdefault("explains_also", []).append(f.cause_key)
            continue
        kept.append(f)
        for e in f.explains:
            claimed.setdefault(e, f)
    return kept


def run_rules(w: Window, cfg: DiagnoseConfig, rules=None) -> list[Finding]:
    """Every rule over the window; one that raises is reported as a blind spot, the others still run."""
    ranked: list[tuple[int, Finding]] = []
    for r in RULES if rules is None else rules:
        try:
            ranked.extend((precedence_of(r), f) for f in r(w, cfg))
        except Exception as e:  # a rule bug must not hide the other rules' findings
            log.exception("diagnosis rule %s failed", r.__name__)
            ranked.append((DEFAULT_PRECEDENCE, rule_failed(r.__name__, e)))
    findings = consolidate(ranked)
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.rule, str(f.subject.get("id"))))
    return findings


def describe_rules() -> list[dict]:
    out = []
    for r in RULES:
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
