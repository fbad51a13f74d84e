"""Prometheus rendering of the running agent's live diagnosis (agent/diagnose/live.py)."""

from __future__ import annotations

from typing import Callable

from agent.exporters.catalog import define
from agent.exporters.prometheus import snapshot_renderer

FINDINGS = define(
    "kvmscope_diagnosis_findings", "gauge",
    "1 for each finding of the agent's diagnosis over its recent history (same rules as kvmscope diagnose).",
    ("rule", "severity", "subject_kind", "subject"), "agent diagnosis (docs/diagnose.md)")
PROBLEMS = define(
    "kvmscope_diagnosis_problems", "gauge",
    "Number of current diagnosis findings by severity (critical, warning, info).",
    ("severity",), "agent diagnosis (docs/diagnose.md)")

_provider: Callable[[], list] | None = None


def set_provider(fn: Callable[[], list] | None) -> None:
    global _provider
    _provider = fn


@snapshot_renderer
def render_diagnosis(_snap):
    if _provider is None:
        return []
    findings = _provider()
    fam, count = FINDINGS.family(), PROBLEMS.family()
    for f in findings:
        fam.add_metric([f.rule, f.severity, str(f.subject.get("kind")), str(f.subject.get("id"))], 1)
    for sev in ("critical", "warning", "info"):
        count.add_metric([sev], sum(1 for f in findings if f.severity == sev))
    return [fam, count]
