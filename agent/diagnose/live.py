"""Diagnosis inside the running agent: the rules over its recent history, every cycle.

The findings of the last cycle are exported on /metrics
(``kvmscope_diagnosis_findings``) and, when shipping is configured, each
finding is shipped once when it appears or its severity changes (the ES
``logs-kvmscope.findings`` data stream), so Kibana and alerting see the
same verdicts as ``kvmscope diagnose`` (the same rules, so the same health
model: :mod:`agent.health` defines lossy, slow and stalled once). A rule that
raises is a ``blind_spots`` finding here too.

The findings are also followed as incidents (:mod:`agent.diagnose.incidents`:
start, end, duration, the stall of each disk), kept beyond the snapshot
history (``diagnose.incidents_kept``), exported on /metrics (open ones),
shipped when they open and when they are resolved (``logs-kvmscope.incidents``)
and served on the local API (``/api/v1/incidents``) for ``kvmscope diagnose``.

Every cycle the rules judge the last ``diagnose.window_seconds`` and, with the
same thresholds, its last ``diagnose.recent_intervals`` intervals (:func:`judge`):
a fault that started inside the window is named as soon as its last intervals
show it, not once it outweighs the healthy intervals before it.

Cost: two window builds (the window, its recent intervals) and the rules over
each per cycle, their baselines and connection sums carried from cycle to
cycle, the timeline's per-disk series too (agent/diagnose/window.py,
timeline.py); a few ms for tens of VMs, ~40 ms for 200 VMs x 4 disks on a
loaded 2-CPU machine (docs/performance.md).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable, Sequence

from agent import health
from agent.config import DiagnoseConfig
from agent.diagnose.incidents import IncidentTracker
from agent.diagnose.rules import Finding, run_rules
from agent.diagnose.window import Window, build_window
from agent.records.snapshot import Snapshot

log = logging.getLogger(__name__)


def finding_key(f: Finding) -> str:
    """The finding's stable cause key (agent.diagnose.rules.Finding.cause_key)."""
    return f.cause_key


def ship_dict(f: Finding) -> dict:
    """A finding in the shape the ES shipper takes (agent.shipping.ecs.finding_doc)."""
    d = {
        "rule": f.rule,
        "cause_key": f.cause_key,
        "severity": f.severity,
        "summary": f.title,
        "evidence": json.dumps(f.evidence, sort_keys=True, default=str),
    }
    kind, ident = f.subject.get("kind"), str(f.subject.get("id"))
    if kind == "disk" and "/" in ident:
        d["vm"], d["disk"] = ident.rsplit("/", 1)
    elif kind == "vm":
        d["vm"] = ident
    elif kind == "portal":
        d["portal"] = ident
    elif kind == "session":
        d["session"] = ident
    if "portal" in f.evidence and isinstance(f.evidence["portal"], str):
        d.setdefault("portal", f.evidence["portal"])
    if "connection" in f.evidence and isinstance(f.evidence["connection"], str):
        d["connection"] = f.evidence["connection"]
    return d


def api_dict(f: Finding) -> dict:
    """A finding for the local API (``/api/v1/findings``): its JSON with the VM disks it explains and
    their VMs (what a scoreboard or a test checks a verdict by)."""
    d = f.as_dict()
    disks = sorted(ident for kind, ident in (getattr(f, "explains", None) or ()) if kind == "disk")
    d["disks"] = disks
    d["vms"] = sorted({x.rsplit("/", 1)[0] for x in disks})
    return d


def judge(ring: Sequence[Snapshot], now: float, cfg: DiagnoseConfig) -> tuple[Window, list[Finding], list] | None:
    """One cycle's diagnosis over ``ring`` (the history, oldest first) at ``now``: the rules over the last
    ``cfg.window_seconds`` and over its last ``cfg.recent_intervals`` intervals (each window's baselines
    learnt from the ``cfg.baseline_seconds`` before it; the recent intervals only once that history holds
    enough intervals to learn a baseline: without one a short window's mean alone would judge, the whole
    window's covers that time). (window, findings, its snapshots); None with fewer than two snapshots in
    the window."""
    start = now - cfg.window_seconds
    snaps = [s for s in ring if start <= s.timestamp <= now]
    if len(snaps) < 2:
        return None
    w = build_window(snaps, history=_before(ring, start, cfg))
    recent = None
    n = cfg.recent_intervals
    if n and len(snaps) > n + 1:
        last = snaps[-(n + 1):]
        before = _before(ring, last[0].timestamp, cfg)
        if len(before) >= health.MIN_BASELINE_SAMPLES:  # judged against what was learnt before them, or not at all
            recent = build_window(last, history=before)
    return w, run_rules(w, cfg, recent=recent), snaps


def _before(ring: Sequence[Snapshot], start: float, cfg: DiagnoseConfig) -> list[Snapshot]:
    """The history a window from ``start`` learns its baselines from."""
    return [s for s in ring if start - cfg.baseline_seconds <= s.timestamp < start]


class LiveDiagnosis:
    def __init__(self, history: Callable[[], list[Snapshot]], cfg: DiagnoseConfig,
                 on_new: Callable[[Finding, Snapshot], None] | None = None,
                 on_incident: Callable[[str, dict, Snapshot], None] | None = None):
        self.history = history
        self.cfg = cfg
        self.on_new = on_new
        self.on_incident = on_incident
        self.incidents = IncidentTracker(max_kept=cfg.incidents_kept)
        self._lock = threading.Lock()
        self._current: list[Finding] = []
        self._seen: dict[str, str] = {}

    @property
    def current(self) -> list[Finding]:
        with self._lock:
            return list(self._current)

    def served(self) -> dict:
        """The current findings for ``/api/v1/findings``: the cycle they were judged at and each finding."""
        with self._lock:
            findings, seq, ts = list(self._current), self._seq, self._ts
        return {"seq": seq, "timestamp": ts, "findings": [api_dict(f) for f in findings]}

    def consume(self, snap: Snapshot) -> None:
        try:
            judged = judge(self.history(), snap.timestamp, self.cfg)
        except Exception:  # a rule bug must not stop the agent
            log.exception("live diagnosis failed")
            return
        if judged is None:
            return
        w, findings, snaps = judged
        seen = {}
        for f in findings:
            k = finding_key(f)
            seen[k] = f.severity
            if self._seen.get(k) != f.severity and self.on_new is not None:
                try:
                    self.on_new(f, snap)
                except Exception:
                    log.exception("shipping a finding failed")
        with self._lock:
            self._current = findings
            self._seen = seen
            self._seq, self._ts = snap.seq, snap.timestamp
        try:
            events = self.incidents.update(findings, snaps, timeline=w.timeline)
        except Exception:  # a bug here must not stop the agent nor hide the findings
            log.exception("following incidents failed")
            return
        for event, inc in events:
            if self.on_incident is not None:
                try:
                    self.on_incident(event, inc, snap)
                except Exception:
                    log.exception("shipping an incident failed")
