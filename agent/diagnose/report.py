"""Diagnose end to end: snapshots -> window -> findings -> text or JSON."""

from __future__ import annotations

import json

from agent.config import DiagnoseConfig
from agent.diagnose.rules import Finding, run_rules
from agent.diagnose.window import Window, build_window
from agent.text import clean

EXIT_OK = 0
EXIT_PROBLEMS = 3  # warning or critical findings; 1 = could not run, 2 = bad usage


def diagnose(snaps, cfg: DiagnoseConfig, if_addrs=None, history=()) -> tuple[Window, list[Finding]]:
    """The rules over ``snaps``; ``history`` (older snapshots) teaches the baselines."""
    w = build_window(snaps, if_addrs, history=history)
    return w, run_rules(w, cfg)


def report_json(w: Window, findings: list[Finding], incidents: list[dict] | None = None) -> dict:
    """The stable JSON; ``incidents`` (agent.diagnose.incidents dicts) under "incidents" when given."""
    out = {
        "host": w.host,
        "window": {"start": w.start, "end": w.end, "seconds": round(w.seconds, 3), "snapshots": w.snapshots},
        "summary": {s: sum(1 for f in findings if f.severity == s) for s in ("critical", "warning", "info")},
        "findings": [f.as_dict() for f in findings],
        "disks": [
            {"vm": d.vm, "disk": d.disk, "backend": d.backend, "portal": d.portal,
             "ops_per_second": round(d.ops_per_second, 1),
             "mean_ms": None if d.mean_ms is None else round(d.mean_ms, 3), "stalled": d.stalled}
            for d in w.disks
        ],
    }
    if incidents is not None:
        out["incidents"] = incidents
    return out


def _fmt_ev(v) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt_ev(x)}" for k, x in v.items())
    if isinstance(v, list):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return str(v)


def incidents_text(incidents: list[dict], window_seconds: float) -> list[str]:
    """The incidents section: one line each (state, duration, span, title, stalled VMs), then its disks."""
    if not incidents:
        return []
    lines = ["", f"incidents in the last {window_seconds:.0f}s: {len(incidents)}"]
    for inc in incidents:
        lines.append(f"{inc['severity'].upper():<8} {clean(inc.get('summary') or inc['title'])}")
        for disk, st in sorted((inc.get("disks") or {}).items()):
            if st.get("stalled_s") or st.get("worst_ms") is not None:
                worst = "" if st.get("worst_ms") is None else f", worst interval {st['worst_ms']:.1f} ms per request"
                lines.append(f"  {clean(disk)}: no I/O for {st.get('stalled_s') or 0:.1f} s{worst}")
    return lines


def report_text(w: Window, findings: list[Finding], incidents: list[dict] | None = None,
                incidents_seconds: float | None = None) -> str:
    lines = []
    n = {s: sum(1 for f in findings if f.severity == s) for s in ("critical", "warning", "info")}
    problems = n["critical"] + n["warning"]
    head = f"kvmscope diagnose: host {clean(w.host)}, {w.seconds:.0f}s window, {w.snapshots} snapshots, " + (
        f"{problems} problem(s)" if problems else "no problems found")
    lines.append(head)
    slowest = sorted((d for d in w.disks if d.mean_ms is not None), key=lambda d: -d.mean_ms)[:5]
    if slowest:
        lines.append("slowest disks: " + "; ".join(
            f"{clean(d.vm)} {d.disk} {d.mean_ms:.2f} ms x {d.ops_per_second:.0f}/s" for d in slowest))
    for f in findings:
        lines.append("")
        lines.append(f"{f.severity.upper():<8} {clean(f.title)}")
        if f.scope:
            lines.append(f"  scope:    {clean(f.scope)}")
        lines.append(f"  evidence: {clean(_fmt_ev(f.evidence))}")
        lines.append(f"  cause:    {clean(f.cause)}")
        for c in f.next_checks:
            lines.append(f"  check:    {clean(c)}")
    lines.extend(incidents_text(incidents or [], incidents_seconds or w.seconds))
    return "\n".join(lines) + "\n"


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
