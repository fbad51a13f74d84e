"""Doctor results to text (table + details) and to JSON (schema 1, docs/doctor.md)."""

from __future__ import annotations

import json

from agent.doctor import STATUSES, CheckInfo, Result, exit_code
from agent.text import clean

SCHEMA = 1
FINDING_WIDTH = 100


def summary(results: list[Result]) -> dict[str, int]:
    return {s: sum(1 for r in results if r.status == s) for s in STATUSES}


def report_json(host: str, results: list[Result], checks: list[CheckInfo], health: dict) -> dict:
    return {
        "schema": SCHEMA,
        "host": host,
        "exit_code": exit_code(results),
        "summary": summary(results),
        "checks": [{"name": c.name, "title": c.title} for c in checks],
        "sources": {k: {"status": h.status.value, "reason": h.reason} for k, h in sorted(health.items())},
        "results": [r.as_dict() for r in results],
    }


def _cut(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def report_text(host: str, results: list[Result], verbose: bool = False) -> str:
    n = summary(results)
    lines = [
        f"kvmscope doctor: host {clean(host)}: {n['problem']} problem(s), {n['warning']} warning(s), "
        f"{n['info']} info, {n['ok']} ok, {n['skipped']} skipped"
    ]
    rows = [[r.check, r.status.upper() if r.status in ("warning", "problem") else r.status,
             _cut(clean(r.finding if r.subject == "host" else f"{r.subject}: {r.finding}"), FINDING_WIDTH)]
            for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(("CHECK", "STATUS", "FINDING"))]
    lines.append("")
    lines.append(f"{'CHECK':<{widths[0]}}  {'STATUS':<{widths[1]}}  FINDING")
    for row in rows:
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}".rstrip())
    shown = [r for r in results if verbose or r.status in ("warning", "problem", "info") or r.error]
    for r in shown:
        lines.append("")
        lines.append(f"{r.status.upper():<8} {r.check}: {clean(r.subject)}")
        lines.append(f"  finding:   {clean(r.finding)}")
        if r.why:
            lines.append(f"  why:       {clean(r.why)}")
        if r.fix:
            lines.append(f"  fix:       {clean(r.fix)}")
        if r.reference:
            lines.append(f"  reference: {clean(r.reference)}")
        if r.error:
            lines.append(f"  error:     {clean(r.error)}")
    return "\n".join(lines) + "\n"


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
