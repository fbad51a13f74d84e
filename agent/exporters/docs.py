"""Generate docs/metrics.md from the metric catalog (the one source of truth).

    python -m agent.exporters.docs > docs/metrics.md

A test fails when docs/metrics.md differs from this output.
"""

from __future__ import annotations

import sys

from agent.exporters import catalog
from agent.exporters.registry import load_renderers

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


# label -> a typical value, for the example column (unknown labels show "...")
EXAMPLE_LABELS = {
    "collector": "libvirt", "version": "0.1.0", "python": "3.11.2", "kind": "vm",
    "vm": "web01", "disk": "vda", "op": "read", "manager": "libvirt", "backend": "libiscsi",
    "target": "iqn.2025-01.io.example:lun-web01", "lun": "1", "portal": "10.0.0.5:3260", "session": "3",
    "connection": "0", "state": "LOGGED_IN", "type": "scsicmd", "direction": "tx",
    "local": "10.0.0.10:51234", "interface": "eth1", "device": "sdb",
    "remote_address": "10.0.0.5", "remote_port": "3260", "event": "connect", "probe": "tcp_retrans",
    "cause": "path_down:portal:10.0.0.5:3260", "rule": "path_down", "severity": "critical",
}


def example(d: catalog.MetricDef) -> str:
    """One sample line of the metric, with typical label values."""
    value = {"counter": "1234", "gauge": "1", "histogram": "5"}.get(d.type, "1")
    unit = unit_of(d.name)
    if d.type == "gauge" and unit == "seconds":
        value = "1795927980.515" if d.name.endswith("_timestamp_seconds") else "0.0042"
    labels = [(k, EXAMPLE_LABELS.get(k, "...")) for k in d.labels]
    name = d.name
    if d.type == "histogram":
        name += "_bucket"
        labels.append(("le", "0.004"))
    if d.name.endswith("_state") and "state" in d.labels:
        value = "1"
    body = ",".join(f'{k}="{v}"' for k, v in labels)
    return f"`{name}{{{body}}} {value}`" if labels else f"`{name} {value}`"


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
        "Address labels (`portal`, `local`, the diagnosis `subject` of a portal) are `ADDR:PORT`",
        "with an IPv6 address in brackets (`[fd00::2]:3260`), the same string as in `kvmscope paths`,",
        "`diagnose` and Elasticsearch's `kvmscope.portal` (`agent/records/addr.py`;",
        "tests/es/test_ipv6_portal.py checks it end to end).",
        "",
        "| metric | type | unit | labels | source | meaning | example |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(catalog.CATALOG):
        d = catalog.CATALOG[name]
        labels = ", ".join(f"`{label}`" for label in d.labels) or "-"
        help_ = d.help.replace("|", "\\|")
        lines.append(f"| `{name}` | {d.type} | {unit_of(name)} | {labels} | {d.source or '-'} | {help_} | {example(d)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
