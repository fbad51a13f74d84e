"""Generate docs/metrics.md from the metric catalog (the one source of truth).

    python -m agent.exporters.docs > docs/metrics.md

A test fails when docs/metrics.md differs from this output.
"""

from __future__ import annotations

import sys

from agent.exporters import catalog
from agent.exporters.prometheus import load_renderers

UNITS = {
    "_seconds": "seconds",
    "_seconds_total": "seconds",
    "_bytes": "bytes",
    "_bytes_total": "bytes",
    "_segments": "segments",
    "_segments_total": "segments",
    "_total": "count",
}


def unit_of(name: str) -> str:
    for suffix, unit in sorted(UNITS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(suffix):
            return unit
    if name.endswith("_info"):
        return "info (always 1)"
    return "-"


def render() -> str:
    load_renderers()
    lines = [
        "# Metrics",
        "",
        "Generated from `agent/exporters/catalog.py` and the renderers by",
        "`python -m agent.exporters.docs > docs/metrics.md`; a test keeps this file in sync.",
        "",
        "All names start with `kvmscope_`, use base units, and counters end in `_total`.",
        "Histograms expose `_bucket` (every bound present), `_sum` and `_count`.",
        "",
        "| metric | type | unit | labels | source | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(catalog.CATALOG):
        d = catalog.CATALOG[name]
        labels = ", ".join(f"`{label}`" for label in d.labels) or "-"
        lines.append(f"| `{name}` | {d.type} | {unit_of(name)} | {labels} | {d.source or '-'} | {d.help} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
