"""Prometheus rendering of the running agent's live diagnosis (agent/diagnose/live.py).

The findings live outside the snapshot: ``kvmscope run`` builds the renderer
around the live diagnosis (:func:`diagnosis_renderer`) and adds it to the
collector's renderers."""

from __future__ import annotations

from typing import Callable

from agent.exporters.catalog import define

FINDINGS = define(
    "kvmscope_diagnosis_findings", "gauge",
    "1 for each finding of the agent's diagnosis over its recent history (same rules as kvmscope diagnose).",
    ("rule", "severity", "subject_kind", "subject"), "agent diagnosis (docs/diagnose.md)")
PROBLEMS = define(
    "kvmscope_diagnosis_problems", "gauge",
    "Number of current diagnosis findings by severity (critical, warning, info).",
    ("severity",), "agent diagnosis (docs/diagnose.md)")


def diagnosis_renderer(findings: Callable[[], list]) -> Callable:
    """A snapshot renderer (run at every scrape) of the current findings ``findings()`` returns."""

    def render_diagnosis(_snap):
        return render_findings(findings())

    return render_diagnosis


def render_findings(findings: list) -> list:
    fam, count = FINDINGS.family(), PROBLEMS.family()
    for f in findings:
        fam.add_metric([f.rule, f.severity, str(f.subject.get("kind")), str(f.subject.get("id"))], 1)
    for sev in ("critical", "warning", "info"):
        count.add_metric([sev], sum(1 for f in findings if f.severity == sev))
    return [fam, count]


INCIDENTS_OPEN = define(
    "kvmscope_incidents_open", "gauge",
    "Incidents of the agent's diagnosis open now (a finding's cause followed in time; docs/diagnose.md).",
    (), "agent diagnosis incidents (docs/diagnose.md)")
INCIDENT_START = define(
    "kvmscope_incident_start_timestamp_seconds", "gauge",
    "Start of each open incident (unix time; for a path outage the estimated moment the path stopped "
    "answering). time() - this = how long it has been open.",
    ("cause", "rule", "severity"), "agent diagnosis incidents (docs/diagnose.md)")
INCIDENTS_OPENED = define(
    "kvmscope_incidents_opened_total", "counter",
    "Incidents opened since the agent started.", (), "agent diagnosis incidents (docs/diagnose.md)")
INCIDENTS_RESOLVED = define(
    "kvmscope_incidents_resolved_total", "counter",
    "Incidents resolved since the agent started (their documents carry start, end and duration).", (),
    "agent diagnosis incidents (docs/diagnose.md)")


def incidents_renderer(tracker) -> Callable:
    """A snapshot renderer (run at every scrape) of the open incidents of ``tracker``
    (agent.diagnose.incidents.IncidentTracker)."""

    def render_incidents(_snap):
        return render_incident_families(tracker.open_incidents(), tracker.opened_total, tracker.resolved_total)

    return render_incidents


def render_incident_families(open_incidents: list, opened: int, resolved: int) -> list:
    n, start = INCIDENTS_OPEN.family(), INCIDENT_START.family()
    n.add_metric([], len(open_incidents))
    for inc in open_incidents:
        start.add_metric([inc.key, inc.rule, inc.severity], inc.start)
    o, r = INCIDENTS_OPENED.family(), INCIDENTS_RESOLVED.family()
    o.add_metric([], opened)
    r.add_metric([], resolved)
    return [n, start, o, r]
