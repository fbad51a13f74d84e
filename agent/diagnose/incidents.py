"""Incidents: the findings of the live diagnosis followed in time, with a start, an end and the stall.

A finding says what is wrong over a window; an incident says since when,
until when, and what it did to the VMs' disks. :class:`IncidentTracker` is
fed the findings of every cycle of the agent's live diagnosis
(:mod:`agent.diagnose.live`) with the snapshots they were judged on:

* a warning or critical finding opens an incident under its **incident key**
  (:func:`incident_key`: the finding's cause key, with every finding about
  the path to one portal, ``path_down`` or ``path_outage``, under
  ``path_down:portal:<portal>``, because an outage of a path is one cause
  whichever VM, disk, session or connection showed it first); the same key
  in the next cycles updates it (worst severity, latest title, the VMs and
  disks it touched);
* it is **resolved** when no finding has its key any more (end: the last
  cycle that reported it) or, for the path to a portal, as soon as the
  timeline shows the path making progress again (:func:`find_outages`: end =
  the estimated moment it came back; start moved back to the estimated
  moment it stopped, which the first finding only reports a cycle or two
  later). A key reported again within ``reopen_seconds`` of its end reopens
  the incident (a flickering cause is one incident), except a path whose
  outage already ended (the recovered-outage finding stays in the window
  for ``diagnose.window_seconds``, and is the same incident); nor does a
  finding about the disks of a path whose outage ended inside the window (its
  aftermath: the requests that waited through it complete in the interval
  after it, which alone looks like a slow target once the silence has left
  the window);
* the **stall** of each disk it touched: how long the disk completed no
  request (:mod:`agent.diagnose.timeline`, estimated inside the intervals)
  and the worst mean latency of an interval around it.

Memory is bounded: at most ``max_open`` open incidents (the oldest is
dropped, counted in :attr:`IncidentTracker.dropped`), the last ``max_kept``
resolved ones, at most :data:`MAX_DISKS` disks per incident. Resolved
incidents outlive the snapshot history (``agent.history``), so ``kvmscope
diagnose --window 2h`` lists incidents older than the oldest snapshot.

The incident id is ``blake2b(host | key | start)``: the document id in
Elasticsearch too (an incident is shipped when it opens and when it is
resolved, as two documents of the same incident id).
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from agent.diagnose.timeline import Outage, Timeline, build_timeline, find_outages, gap_bounds, zero_runs
from agent.records.snapshot import Snapshot

SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}
MAX_DISKS = 64
# a rule's findings that stand for another rule's cause (the same incident)
FAMILY = {"path_outage": "path_down"}
PATH_KEY = "path_down:portal:"


def finding_portal(f) -> str | None:
    """The portal a finding is about: its subject, else ``evidence["portal"]``."""
    if f.subject.get("kind") == "portal":
        return str(f.subject.get("id"))
    p = f.evidence.get("portal") if isinstance(f.evidence, dict) else None
    return p if isinstance(p, str) else None


def cause_key_of(f) -> str:
    """The finding's own stable cause key (``Finding.cause_key`` where the rules define it)."""
    key = getattr(f, "cause_key", None)
    if isinstance(key, str) and key:
        return key
    return f"{f.rule}:{f.subject.get('kind')}:{f.subject.get('id')}"


def incident_key(f) -> str:
    """The key an incident is followed by (module docstring): the cause key, the path family per portal."""
    return incident_keys(f)[0]


def incident_keys(f) -> list[str]:
    """:func:`incident_key`, one per portal for a path finding about several (``evidence["portals"]``: the
    outage of each path is followed on its own, as ``path_down`` reports them one by one while they last)."""
    family = FAMILY.get(f.rule, f.rule)
    if family == "path_down":
        portals = f.evidence.get("portals") if isinstance(f.evidence, dict) else None
        if isinstance(portals, list) and portals and all(isinstance(p, str) for p in portals):
            return [f"path_down:portal:{p}" for p in portals]
        portal = finding_portal(f)
        if portal:
            return [f"path_down:portal:{portal}"]
    key = cause_key_of(f)
    return [family + key[len(f.rule):] if key.startswith(f.rule) else key]


def finding_disks(f, tl: Timeline) -> set[str]:
    """The VM disks ("vm/disk") a finding touches: what it explains, names, or its subject covers."""
    out = {ident for kind, ident in (getattr(f, "explains", None) or ()) if kind == "disk"}
    ev = f.evidence if isinstance(f.evidence, dict) else {}
    for name in ("disks", "stalled_disks"):
        v = ev.get(name)
        if isinstance(v, dict):
            out.update(k for k in v if isinstance(k, str) and "/" in k)
        elif isinstance(v, list):
            out.update(k for k in v if isinstance(k, str) and "/" in k)
    kind, ident = f.subject.get("kind"), str(f.subject.get("id"))
    if kind == "disk":
        out.add(ident)
    elif kind == "vm":
        out.update(k for k in tl.disk_ops if k.rsplit("/", 1)[0] == ident)
    elif kind == "portal":
        out.update(k for k, p in tl.disk_portal.items() if p == ident)
    if not out:
        portal = finding_portal(f)
        if portal:
            out.update(k for k, p in tl.disk_portal.items() if p == portal)
    return out


@dataclass
class Incident:
    id: str
    key: str
    host: str
    rule: str
    severity: str
    title: str
    scope: str | None
    subject: dict
    start: float
    last_seen: float
    end: float | None = None
    portal: str | None = None
    cycles: int = 0
    stalls: dict[str, dict] = field(default_factory=dict)  # "vm/disk" -> {"stalled_s", "worst_ms"}
    outage: dict | None = None  # the path's outage as the timeline measured it (start, end, backoff)

    @property
    def open(self) -> bool:
        return self.end is None

    def seconds(self, now: float) -> float:
        return max((self.end if self.end is not None else now) - self.start, 0.0)

    @property
    def vms(self) -> list[str]:
        return sorted({d.rsplit("/", 1)[0] for d in self.stalls})

    def stalled_vms(self) -> list[str]:
        return sorted({d.rsplit("/", 1)[0] for d, s in self.stalls.items() if s.get("stalled_s")})

    def summary(self, now: float) -> str:
        """One line: what, when, how long, what it did to the VMs."""
        state = "open" if self.open else "resolved"
        span = f"since {iso(self.start)}" if self.open else f"from {iso(self.start)} to {iso(self.end)}"
        worst = max((s["stalled_s"] for s in self.stalls.values() if s.get("stalled_s")), default=None)
        stalled = self.stalled_vms()
        tail = f"; VMs {', '.join(stalled)} stalled {worst:.1f} s" if stalled and worst else ""
        return f"{state} {self.seconds(now):.1f} s {span}: {self.title}{tail}"

    def as_dict(self, now: float | None = None) -> dict:
        now = self.last_seen if now is None else now
        return {
            "id": self.id, "key": self.key, "host": self.host, "rule": self.rule, "severity": self.severity,
            "state": "open" if self.open else "resolved", "title": self.title, "scope": self.scope,
            "subject": self.subject, "portal": self.portal, "start": round(self.start, 3),
            "end": None if self.end is None else round(self.end, 3),
            "duration_seconds": round(self.seconds(now), 3), "last_seen": round(self.last_seen, 3),
            "cycles": self.cycles, "vms": self.vms, "stalled_vms": self.stalled_vms(),
            "disks": {k: dict(v) for k, v in sorted(self.stalls.items())}, "outage": self.outage,
            "summary": self.summary(now),
        }


def iso(ts: float) -> str:
    """UTC, milliseconds, as the Elasticsearch documents write @timestamp."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def same_outage(recorded: dict | None, o: Outage) -> bool:
    """Whether the timeline's outage ``o`` is the one an incident recorded (re-estimated as the window
    moves: it starts before the recorded end), not a later one of the same portal."""
    if recorded is None:
        return False
    return recorded["end"] is None or o.since_window_start or o.start < recorded["end"]


def incident_id(host: str, key: str, start: float) -> str:
    return hashlib.blake2b(f"{host}|{key}|{start:.3f}".encode(), digest_size=12).hexdigest()


class IncidentTracker:
    """Findings of successive cycles -> incidents (module docstring). Thread-safe readers."""

    def __init__(self, max_open: int = 256, max_kept: int = 500, reopen_seconds: float = 0.0):
        self.max_open = max_open
        self.reopen_seconds = reopen_seconds
        self._open: dict[str, Incident] = {}
        self._resolved: deque[Incident] = deque(maxlen=max_kept)
        self._lock = threading.Lock()
        self.dropped = 0  # open incidents dropped at the max_open bound
        self.opened_total = 0
        self.resolved_total = 0
        self._now = 0.0

    # -- readers ---------------------------------------------------------------------------------
    def open_incidents(self) -> list[Incident]:
        with self._lock:
            return sorted(self._open.values(), key=lambda i: i.start)

    def incidents(self, since: float | None = None) -> list[dict]:
        """Every kept incident that was open at some time after ``since`` (all when None), oldest first."""
        with self._lock:
            items = list(self._resolved) + list(self._open.values())
            now = self._now
        keep = [i for i in items if since is None or i.end is None or i.end >= since]
        return [i.as_dict(now) for i in sorted(keep, key=lambda i: i.start)]

    # -- one cycle -------------------------------------------------------------------------------
    def update(self, findings, snaps: list[Snapshot], now: float | None = None,
               timeline: Timeline | None = None) -> list[tuple[str, dict]]:
        """Feed one cycle: its findings and the snapshots they were judged on (oldest first), and their
        timeline when the window already built it. Returns the events of this cycle, ("opened" |
        "resolved", incident dict), in that order."""
        if not snaps:
            return []
        now = snaps[-1].timestamp if now is None else now
        host = snaps[-1].host
        tl = timeline if timeline is not None else build_timeline(snaps, snaps[-1].paths)
        outages = {}
        for o in find_outages(tl):  # the latest outage of each portal
            outages[o.portal] = o
        by_key: dict[str, list] = {}
        for f in findings:
            if SEVERITY_RANK.get(f.severity, 0) >= SEVERITY_RANK["warning"]:
                for key in incident_keys(f):
                    by_key.setdefault(key, []).append(f)
        events: list[tuple[str, dict]] = []
        with self._lock:
            self._now = now
            for key, fs in by_key.items():
                inc = self._open.get(key)
                if inc is None:
                    inc = self._resumable(key, fs, outages, now)
                    if inc is not None and inc.end is not None:
                        if self._ended_outage(inc, outages):
                            inc.last_seen = now  # the same outage, still in the window: nothing new
                            continue
                        self._resolved.remove(inc)  # flickered: the same incident goes on
                        inc.end = None
                        self._open[key] = inc
                    elif inc is None:
                        after = self._aftermath(key, fs, tl)
                        if after is not None:  # the requests that waited through an outage, completing
                            after.last_seen = now
                            continue
                        inc = self._new(key, fs, host, now, outages)
                        events.append(("opened", inc.as_dict(now)))
                self._touch(inc, fs, tl, now, outages)
            for key, inc in list(self._open.items()):
                o = outages.get(inc.portal) if inc.key.startswith("path_down:") else None
                ended = o is not None and o.recovered and same_outage(inc.outage, o)
                if ended or key not in by_key:
                    if ended:
                        self._take_outage(inc, o)
                    self._resolve(inc, o.end if ended else inc.last_seen)
                    events.append(("resolved", inc.as_dict(now)))
            while len(self._open) > self.max_open:
                oldest = min(self._open.values(), key=lambda i: i.start)
                del self._open[oldest.key]
                self.dropped += 1
        return events

    # -- parts -----------------------------------------------------------------------------------
    def _resumable(self, key, fs, outages, now) -> Incident | None:
        """A resolved incident of ``key`` this cycle's findings continue: ended within reopen_seconds, or
        a path whose ended outage is what the findings still show."""
        for inc in reversed(self._resolved):
            if inc.key != key:
                continue
            if self._ended_outage(inc, outages) or now - inc.end <= self.reopen_seconds:
                return inc
            return None
        return None

    def _aftermath(self, key: str, fs, tl: Timeline) -> Incident | None:
        """The path incident whose ended outage these findings are the aftermath of: every disk they touch
        is on its portal and its end is still in the window (the requests that waited through it complete
        with their long latencies in the interval after it; once the silence has left the window, that
        interval alone looks like a slow target or loss for a cycle or two)."""
        if key.startswith(PATH_KEY) or len(tl.times) < 2:
            return None
        disks = set()
        for f in fs:
            disks |= finding_disks(f, tl)
        portals = {tl.disk_portal.get(d) for d in disks}
        if not disks or len(portals) != 1 or None in portals:
            return None
        (portal,) = portals
        horizon = tl.times[0] - (tl.times[1] - tl.times[0])
        for inc in reversed(self._resolved):
            if inc.key == PATH_KEY + portal and inc.outage is not None and inc.end is not None \
                    and inc.end >= horizon:
                return inc
        return None

    @staticmethod
    def _ended_outage(inc: Incident, outages: dict) -> bool:
        o = outages.get(inc.portal)
        return o is not None and o.recovered and inc.outage is not None and inc.outage["end"] is not None \
            and same_outage(inc.outage, o)

    def _new(self, key, fs, host, now, outages) -> Incident:
        worst = max(fs, key=lambda f: SEVERITY_RANK.get(f.severity, 0))
        portal = key[len(PATH_KEY):] if key.startswith(PATH_KEY) else next(
            (p for p in (finding_portal(f) for f in fs) if p), None)
        start = now
        o = outages.get(portal) if key.startswith("path_down:") else None
        if o is not None:
            start = min(start, o.start)
        inc = Incident(id=incident_id(host, key, start), key=key, host=host, rule=FAMILY.get(worst.rule, worst.rule),
                       severity=worst.severity, title=worst.title, scope=worst.scope, subject=dict(worst.subject),
                       start=start, last_seen=now, portal=portal)
        self._open[key] = inc
        self.opened_total += 1
        return inc

    def _touch(self, inc: Incident, fs, tl: Timeline, now: float, outages: dict) -> None:
        worst = max(fs, key=lambda f: SEVERITY_RANK.get(f.severity, 0))
        ended = next((f for f in fs if isinstance(f.evidence, dict) and f.evidence.get("end")), None)
        if ended is not None:  # a finding telling the whole story (an outage that ended) names the incident
            inc.title, inc.scope = ended.title, ended.scope
        if SEVERITY_RANK.get(worst.severity, 0) >= SEVERITY_RANK.get(inc.severity, 0) and ended is None:
            inc.severity, inc.title, inc.scope = worst.severity, worst.title, worst.scope
            if worst.subject.get("kind") == "portal" or inc.subject.get("kind") != "portal":
                inc.subject = dict(worst.subject)
        inc.last_seen = now
        inc.cycles += 1
        disks: set[str] = set()
        for f in fs:
            disks |= finding_disks(f, tl)
        o = outages.get(inc.portal) if inc.key.startswith("path_down:") else None
        if o is not None and (inc.outage is None or same_outage(inc.outage, o)):
            self._take_outage(inc, o)
            disks |= {s.disk for s in o.stalls}
        for d in sorted(disks):
            if d not in inc.stalls and len(inc.stalls) >= MAX_DISKS:
                break
            cur = inc.stalls.setdefault(d, {"stalled_s": 0.0, "worst_ms": None})
            if o is None and d in tl.disk_ops:
                stalled, worst_ms = disk_stall_since(tl, d, inc.start)
                cur["stalled_s"] = max(cur["stalled_s"], stalled)
                if worst_ms is not None:
                    cur["worst_ms"] = max(cur["worst_ms"] or 0.0, worst_ms)

    @staticmethod
    def _take_outage(inc: Incident, o: Outage) -> None:
        """The timeline's outage of the incident's portal: its start (earlier than the first finding), its
        end, and each disk's stall."""
        inc.start = min(inc.start, o.start)
        inc.outage = {"start": round(o.start, 3), "end": None if o.end is None else round(o.end, 3),
                      "max_backoff": o.max_backoff, "retransmits": o.retransmits,
                      "since_window_start": o.since_window_start}
        for s in o.stalls:
            cur = inc.stalls.setdefault(s.disk, {"stalled_s": 0.0, "worst_ms": None})
            cur["stalled_s"] = max(cur["stalled_s"], s.stalled_s)
            if s.worst_ms is not None:
                cur["worst_ms"] = max(cur["worst_ms"] or 0.0, s.worst_ms)

    def _resolve(self, inc: Incident, end: float) -> None:
        inc.end = max(end, inc.start)
        del self._open[inc.key]
        self._resolved.append(inc)
        self.resolved_total += 1


def disk_stall_since(tl: Timeline, disk: str, since: float) -> tuple[float, float | None]:
    """The longest run without completed requests of ``disk`` after ``since`` (seconds, estimated inside
    its intervals; a run up to the window's end counts until then) and the worst interval mean latency
    (ms) since then."""
    ops, times = tl.disk_ops[disk], tl.times
    longest = 0.0
    for a, b in zero_runs(ops):
        if times[b + 1] < since or not any(v for v in ops[:a] if v):
            continue
        stopped, resumed = gap_bounds(times, ops, a, b)
        longest = max(longest, (resumed if resumed is not None else times[-1]) - max(stopped, since))
    lat = [m for i, m in enumerate(tl.disk_ms[disk]) if m is not None and times[i + 1] >= since]
    return round(longest, 3), (round(max(lat), 3) if lat else None)


def replay(snaps: list[Snapshot], cfg) -> list[dict]:
    """The incidents the live diagnosis would have followed over ``snaps`` (oldest first): the rules over
    each cycle's last ``cfg.window_seconds``, as the agent runs them. For ``kvmscope diagnose`` on a
    recording or on samples taken in-process (attached, it asks the agent's own tracker)."""
    from agent.diagnose.live import judge

    tracker = IncidentTracker()
    for i in range(1, len(snaps)):
        judged = judge(snaps[:i + 1], snaps[i].timestamp, cfg)
        if judged is not None:
            w, findings, win = judged
            tracker.update(findings, win, timeline=w.timeline)
    return tracker.incidents()
