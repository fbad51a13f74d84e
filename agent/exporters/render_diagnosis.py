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
