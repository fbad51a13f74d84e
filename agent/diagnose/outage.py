"""The outage rule: a path to a portal that stopped answering for some seconds and came back.

Window averages hide a short outage that has ended: a few retransmits over
the window (``packet_loss`` would blame loss), a lower mean rate, a mean
latency pushed up by the requests that waited (``slow_target`` would blame
the target). The timeline of the window (:mod:`agent.diagnose.timeline`)
keeps the shape: the intervals in which the portal's connections got
nothing acknowledged and nothing received while its disks, busy before,
completed nothing and TCP retransmitted into the silence with a growing
RTO, then progress again. This rule reports each such outage that ended
inside the window, once, with its estimated start and end and the stall of
every VM disk on the path, and claims (precedence 10, before ``path_down``
20, ``packet_loss`` 50, ``slow_target`` 80) the disks and connections of
that portal, so their findings over the same window give way to it.

An outage still going on at the end of the window is ``path_down``'s (the
portal is down now); the incident that follows them is the same
(``path_down:portal:<portal>``, :mod:`agent.diagnose.incidents`). Outages of
several portals that overlap in time are one finding (one cause: the host's
side or the target's), scoped to the host when every portal went down.
"""

from __future__ import annotations

from datetime import datetime, timezone

from agent.config import DiagnoseConfig
from agent.diagnose.rules import Finding, rule
from agent.diagnose.timeline import Outage, find_outages
from agent.diagnose.window import Window

PRECEDENCE = 10


def _hms(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S.%f")[:-3]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _overlapping(outages: list[Outage]) -> list[list[Outage]]:
    """Outages grouped when their [start, end] overlap (several portals down together: one cause)."""
    groups: list[list[Outage]] = []
    for o in sorted(outages, key=lambda o: o.start):
        if groups and o.start <= max(x.end for x in groups[-1]):
            groups[-1].append(o)
        else:
            groups.append([o])
    return groups


def path_outage(w: Window, cfg: DiagnoseConfig) -> list[Finding]:
    """A short outage of the path to a portal, ended within the window.

    Symptom: the VMs on one portal (or on all) froze for seconds and went on;
    over the window their latency and the retransmits look only a little raised.
    Signals: the window's timeline: intervals in which the portal's connections
    got nothing acknowledged or received (tcpi_bytes_acked/bytes_received) while
    its disks, busy before, completed nothing, with RTO backoff or retransmits
    into the silence, then progress again; start from the freshest ACK's age,
    end from the first progress, each disk's stall.
    Threshold: any such silence that ended inside the window, of any length
    (one still going on is path_down's); takes precedence over packet_loss,
    slow_target and path_down for that portal's disks and connections.
    Remedy: what took the path away for that long: link or switch-port flaps,
    target failover or restart, firewall/ACL changes; compare the stall with the
    guests' and multipath's timeouts.
    """
    tl = w.timeline
    if tl is None:
        return []
    done = [o for o in find_outages(tl) if o.recovered]
    all_portals = sorted({c.portal for c in w.conns} | {d.portal for d in w.disks if d.portal})
    out = []
    for group in _overlapping(done):
        portals = sorted({o.portal for o in group})
        start, end = min(o.start for o in group), max(o.end for o in group)
        stalls = {s.disk: s for o in group for s in o.stalls}
        stalled_vms = sorted({s.vm for s in stalls.values()})
        worst_stall = max((s.stalled_s for s in stalls.values()), default=0.0)
        on_path = [d for d in w.disks if d.portal in portals]
        vms_on_path = sorted({d.vm for d in on_path})
        if len(portals) == 1:
            kind, ident = "portal", portals[0]
            where = f"path to portal {portals[0]}"
            scope = (f"all VMs on portal {ident}" if len(vms_on_path) > 1 and stalled_vms == vms_on_path
                     else "one VM" if len(stalled_vms) == 1 else f"some VMs on portal {ident}")
        else:
            kind, ident = "host", w.host
            where = f"paths to portals {', '.join(portals)}"
            scope = "all VMs on the host" if portals == all_portals else f"VMs on portals {', '.join(portals)}"
        vms_text = f"; VMs {', '.join(stalled_vms)} stalled {worst_stall:.1f} s" if stalled_vms else \
            "; no VM disk was waiting on it"
        explains = frozenset([("disk", f"{d.vm}/{d.disk}") for d in on_path]
                             + [("disk", k) for k in stalls]
                             + [("conn", c.four_tuple) for c in w.conns if c.portal in portals])
        worst_ms = [s.worst_ms for s in stalls.values() if s.worst_ms is not None]
        out.append(Finding(
            rule="path_outage",
            severity="warning",
            subject={"kind": kind, "id": ident},
            scope=scope,
            explains=explains,
            title=f"{where} down ~{end - start:.1f} s from {_hms(start)} to {_hms(end)} UTC, recovered{vms_text}",
            evidence={
                "portal": portals[0] if len(portals) == 1 else None,
                "portals": portals,
                "down_from": _iso(start),
                "down_to": _iso(end),
                "down_seconds": round(end - start, 3),
                "start": round(start, 3),
                "end": round(end, 3),
                "stalled_disks": {k: s.stalled_s for k, s in sorted(stalls.items())},
                "worst_interval_ms": round(max(worst_ms), 3) if worst_ms else None,
                "rto_backoff": max(o.max_backoff for o in group),
                "retransmits_into_silence": sum(o.retransmits for o in group),
                "silent_since_window_start": any(o.since_window_start for o in group),
            },
            cause="the path stopped answering: nothing was acknowledged or received while requests waited and "
                  "TCP retransmitted with a growing timeout, then it came back; the host sees it back at the "
                  "first retransmission that gets through, up to one RTO after the path returned",
            next_checks=[
                "link and switch-port logs around that time (flaps, STP, LACP)",
                "the target: failover, restart or portal reconfiguration at that time",
                "firewall/ACL changes on the path",
                "guest and multipath timeouts against the stall (kvmscope doctor)",
            ],
        ))
    return out


rule(precedence=PRECEDENCE)(path_outage)
