"""Judge storage paths across hosts: portal-wide or host-local.

Input: one :class:`PathSample` per (host, portal) over a window, built from
the agents' inet_diag counters in Prometheus
(``kvmscope_storage_connection_retransmitted_segments_total``,
``kvmscope_storage_connection_bytes_total``, ``kvmscope_storage_connections``).

A path (host -> portal) is **bad** when, over the window,

* it is lossy as the health model (:mod:`agent.health`) defines it for
  ``diagnose`` and the alerts too: at least ``min_retrans_per_s`` segments/s
  *and* at least ``min_ratio`` of the bytes it sent were retransmissions
  (tcp_info's ``tcpi_bytes_retrans / tcpi_bytes_sent``; the ratio keeps a busy
  clean host from looking worse than an idle lossy one, the rate keeps one
  tail-loss probe on an idle connection from counting), or
* it is unreachable: the host has connections to the portal but none
  established (SYN_SENT, CLOSE_WAIT... after a dead portal or a reset).

Then, per portal, over the hosts that have connections to it:

* ``portal-wide``: bad from at least 2 hosts and from at least
  ``portal_share`` of them. The common part is the portal: the target, its
  NIC or its network segment.
* ``host-local``: bad from some hosts while at least one other host reaches it
  cleanly. The common part is each bad host's own path.
* ``single-host``: bad, but only one host talks to it: the two cannot be told
  apart from here.

And per host, its bad paths that are not part of a portal-wide problem: all of
its portals bad (two or more) points at the host's own NIC, cable or switch
port for the storage network; some of them, at the path to those portals
(a per-portal interface, VLAN or switch port).

Pure functions; no I/O. Thresholds are arguments, defaults in
:class:`Thresholds` (the health model's numbers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent import health

PORTAL_WIDE = "portal-wide"
HOST_LOCAL = "host-local"
SINGLE_HOST = "single-host"
OK = "ok"


@dataclass(frozen=True)
class Thresholds:
    min_retrans_per_s: float = health.LOSS_MIN_RETRANS_PER_S
    min_ratio: float = health.LOSS_MIN_RATIO
    portal_share: float = 0.5

    def __post_init__(self):
        if not (self.min_retrans_per_s >= 0):
            raise ValueError(f"min_retrans_per_s must be >= 0, got {self.min_retrans_per_s}")
        if not (0 <= self.min_ratio <= 1):
            raise ValueError(f"min_ratio must be between 0 and 1, got {self.min_ratio}")
        if not (0 < self.portal_share <= 1):
            raise ValueError(f"portal_share must be above 0 and at most 1, got {self.portal_share}")


@dataclass(frozen=True)
class PathSample:
    """What one host saw of one portal over the window (None: no such series)."""

    host: str
    portal: str
    retrans_per_s: float | None = None      # segments/s, tcpi_total_retrans rate
    sent_bytes_per_s: float | None = None    # tcpi_bytes_sent rate (includes retransmissions)
    retrans_bytes_per_s: float | None = None  # tcpi_bytes_retrans rate
    established: int | None = None           # connections ESTABLISHED now
    other_states: dict[str, int] = field(default_factory=dict)  # connections in other states now

    @property
    def ratio(self) -> float | None:
        return health.loss_ratio(self.retrans_bytes_per_s, self.sent_bytes_per_s)


@dataclass(frozen=True)
class PathVerdict:
    host: str
    portal: str
    bad: bool
    why: str
    retrans_per_s: float | None
    ratio: float | None
    established: int | None
    other_states: dict[str, int]


@dataclass(frozen=True)
class Finding:
    scope: str     # portal | host
    subject: str   # the portal or the host
    verdict: str   # portal-wide | host-local | single-host
    bad: tuple[str, ...]    # hosts (scope portal) or portals (scope host) with a bad path
    clean: tuple[str, ...]  # hosts/portals with a clean path
    summary: str
    look_at: str


@dataclass(frozen=True)
class FleetReport:
    paths: tuple[PathVerdict, ...]
    portals: dict[str, str]   # portal -> verdict (ok included)
    hosts: dict[str, str]     # host -> ok | host-local | portal-wide (only affected by portal-wide problems)
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> bool:
        return bool(self.findings)


def judge_path(s: PathSample, t: Thresholds) -> PathVerdict:
    ratio = s.ratio
    bad, why = False, "clean"
    if s.established == 0 and sum(s.other_states.values()) > 0:
        states = ", ".join(f"{n} {st}" for st, n in sorted(s.other_states.items()))
        bad, why = True, f"unreachable: no established connection ({states})"
    elif s.retrans_per_s is not None and s.retrans_per_s >= t.min_retrans_per_s and s.retrans_per_s > 0:
        if health.lossy(s.retrans_per_s, ratio, t.min_retrans_per_s, t.min_ratio):
            pct = "" if ratio is None else f", {ratio * 100:.1f}% of bytes sent"
            bad, why = True, f"retransmits {s.retrans_per_s:.2f}/s{pct}"
        else:
            why = f"retransmits {s.retrans_per_s:.2f}/s but only {ratio * 100:.2f}% of bytes sent"
    elif s.retrans_per_s is None and s.established is None:
        why = "no data"
    return PathVerdict(s.host, s.portal, bad, why, s.retrans_per_s, ratio, s.established, dict(s.other_states))


def analyse(samples: list[PathSample], t: Thresholds | None = None) -> FleetReport:
    """Judge every path, then every portal, then every host (see the module docstring)."""
    t = t or Thresholds()
    merged: dict[tuple[str, str], PathSample] = {}
    for s in samples:
        if (s.host, s.portal) in merged:
            raise ValueError(f"two samples for host {s.host!r} and portal {s.portal!r}")
        merged[(s.host, s.portal)] = s
    paths = tuple(judge_path(s, t) for _k, s in sorted(merged.items()))
    by_portal: dict[str, list[PathVerdict]] = {}
    by_host: dict[str, list[PathVerdict]] = {}
    for p in paths:
        by_portal.setdefault(p.portal, []).append(p)
        by_host.setdefault(p.host, []).append(p)

    findings: list[Finding] = []
    portals: dict[str, str] = {}
    for portal, ps in sorted(by_portal.items()):
        bad = tuple(p.host for p in ps if p.bad)
        clean = tuple(p.host for p in ps if not p.bad)
        if not bad:
            portals[portal] = OK
        elif len(bad) >= 2 and len(bad) >= t.portal_share * len(ps):
            portals[portal] = PORTAL_WIDE
            findings.append(Finding(
                "portal", portal, PORTAL_WIDE, bad, clean,
                f"portal {portal} is bad from {len(bad)} of {len(ps)} hosts",
                "the target, its NIC or its network segment (switch, VLAN, link to the array)"))
        elif clean:
            portals[portal] = HOST_LOCAL
        else:
            portals[portal] = SINGLE_HOST
            findings.append(Finding(
                "portal", portal, SINGLE_HOST, bad, clean,
                f"portal {portal} is bad from {bad[0]}, the only host with connections to it",
                "cannot tell target from host path with one host; compare with another host's path to it"))

    hosts: dict[str, str] = {}
    for host, ps in sorted(by_host.items()):
        local = tuple(p.portal for p in ps if p.bad and portals[p.portal] == HOST_LOCAL)
        fine = tuple(p.portal for p in ps if not p.bad)
        if local:
            hosts[host] = HOST_LOCAL
            if not fine and len(ps) >= 2:
                where = "the host's storage NIC, its cable or switch port (every portal is bad from here)"
            else:
                where = "this host's path to " + ", ".join(local) + " (its interface, cable, VLAN or switch port)"
            findings.append(Finding(
                "host", host, HOST_LOCAL, local, fine,
                f"host {host} has bad paths to {', '.join(local)} while other hosts reach "
                f"{'it' if len(local) == 1 else 'them'} cleanly", where))
        elif any(p.bad for p in ps):
            hosts[host] = PORTAL_WIDE if any(portals[p.portal] == PORTAL_WIDE for p in ps if p.bad) else SINGLE_HOST
        else:
            hosts[host] = OK
    return FleetReport(paths, portals, hosts, tuple(findings))
