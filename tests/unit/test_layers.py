"""The import direction of agent/: sources -> records in a snapshot -> outputs, and no arrow back.

Floors, bottom up (docs/architecture.md):
  records   agent/records/          imports nothing of the agent but itself
  sources   agent/sources/, agent/ebpf/, agent/source_api.py
            import records and the plumbing (config, errors, hostpaths, fsutil), never an output
  core      the other top-level modules (loop, engine, codec, api, config, ...): below the outputs
  outputs   exporters, shipping, diagnose, doctor, fleet, cli: each reads records and the
            snapshot, none imports another's internals (ALLOWED below lists the exceptions)
Nothing outside agent/cli/ imports agent.cli (agent/__main__.py starts it).
A small AST walk (every import, including the ones inside functions); no extra dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"

OUTPUTS = ("exporters", "shipping", "diagnose", "doctor", "fleet", "cli")
SOURCES = ("sources", "ebpf", "source_api")
ASSEMBLY = ("agent.loop", "agent.engine", "agent.codec", "agent.api")  # above the sources: they run or serve them

# output -> another output's module: the only cross edges. Each says why.
ALLOWED = {
    # the CLI is the front of every output: its commands run them
    ("cli", "agent.diagnose.window"),  # diagnose, top, retrans build a window
    ("cli", "agent.diagnose.rules"),  # diagnose runs the rules
    ("cli", "agent.diagnose.report"),  # diagnose renders the report
    ("cli", "agent.diagnose.live"),  # run starts the live diagnosis
    ("cli", "agent.doctor"),  # doctor runs the checks
    ("cli", "agent.doctor.live"),  # doctor's live socket probes
    ("cli", "agent.doctor.report"),  # doctor renders the report
    ("cli", "agent.fleet.analysis"),  # fleet judges
    ("cli", "agent.fleet.prometheus"),  # fleet queries Prometheus
    ("cli", "agent.shipping.shipper"),  # run starts shipping
    ("cli", "agent.exporters.registry"),  # run loads the renderers
    ("cli", "agent.exporters.server"),  # run serves /metrics
    ("cli", "agent.exporters.render_diagnosis"),  # run hands the live findings to /metrics
    ("cli", "agent.exporters.render_shipping"),  # run hands shipping health to /metrics
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[str]:
    """Every agent module ``path`` imports (``from agent.x import y`` counts as agent.x and agent.x.y)."""
    me = module_name(path) if path.is_relative_to(AGENT) else path.stem
    pkg = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append(base)
            out += [f"{base}.{a.name}" for a in node.names]
    return [m for m in out if m == "agent" or m.startswith("agent.")]


def layer(mod: str) -> str:
    """records | sources | an output's name | core."""
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top == "records":
        return "records"
    if top in SOURCES:
        return "sources"
    if top in OUTPUTS:
        return top
    return "core"


def _under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def _real(mod: str, known: set[str]) -> str | None:
    """The module an import name stands for (``agent.x.y`` may be the name y inside agent.x)."""
    while mod and mod not in known:
        mod = mod.rpartition(".")[0]
    return mod or None


def violations(graph: dict[str, list[str]]) -> list[str]:
    """``importer -> imported: rule`` for every edge that points the wrong way."""
    known = set(graph)
    out = []
    for src, targets in sorted(graph.items()):
        ls = layer(src)
        for t in sorted({m for m in (_real(t, known) for t in targets) if m and m != src}):
            lt = layer(t)
            if _under(t, "agent.cli") and ls != "cli" and src != "agent.__main__":
                out.append(f"{src} -> {t}: only agent/cli imports the CLI")
            elif ls == "records" and lt != "records":
                out.append(f"{src} -> {t}: records import nothing above them")
            elif ls == "sources" and (lt in OUTPUTS or t in ASSEMBLY):
                out.append(f"{src} -> {t}: sources import records, never an output")
            elif ls == "core" and lt in OUTPUTS and src != "agent.__main__":
                out.append(f"{src} -> {t}: the core does not import an output")
            elif ls in OUTPUTS and lt in OUTPUTS and ls != lt and (ls, t) not in ALLOWED and t != "agent":
                out.append(f"{src} -> {t}: outputs do not import each other's internals (ALLOWED lists the exceptions)")
    return out


def agent_graph() -> dict[str, list[str]]:
    return {module_name(p): imports(p) for p in sorted(AGENT.rglob("*.py"))}


def test_imports_point_down():
    graph = agent_graph()
    assert len(graph) > 50 and "agent.records.snapshot" in graph  # the walk sees the tree
    assert violations(graph) == []


def test_every_allowed_edge_still_exists():
    """An exception nobody needs any more is removed from the list, so the list stays short."""
    graph = agent_graph()
    used = {(layer(s), _real(t, set(graph))) for s, ts in graph.items() for t in ts}
    assert sorted(ALLOWED - used) == []


def test_the_walk_sees_each_kind_of_wrong_arrow(tmp_path):
    graph = {
        "agent.records.vms": ["agent.sources.libvirt_vms"],
        "agent.sources.libvirt_vms": ["agent.records.vms", "agent.exporters.catalog"],
        "agent.sources.iscsi_kernel": ["agent.loop"],
        "agent.exporters.catalog": [],
        "agent.exporters.render_x": ["agent.shipping.fields", "agent.exporters.catalog", "agent.records.vms"],
        "agent.shipping.fields": [],
        "agent.diagnose.report": ["agent.cli.common"],
        "agent.cli.common": [],
        "agent.cli.run": ["agent.exporters.server", "agent.shipping.fields"],
        "agent.exporters.server": [],
        "agent.loop": ["agent.records.vms"],
    }
    assert violations(graph) == [
        "agent.cli.run -> agent.shipping.fields: outputs do not import each other's internals (ALLOWED lists the exceptions)",
        "agent.diagnose.report -> agent.cli.common: only agent/cli imports the CLI",
        "agent.exporters.render_x -> agent.shipping.fields: outputs do not import each other's internals (ALLOWED lists the exceptions)",
        "agent.records.vms -> agent.sources.libvirt_vms: records import nothing above them",
        "agent.sources.iscsi_kernel -> agent.loop: sources import records, never an output",
        "agent.sources.libvirt_vms -> agent.exporters.catalog: sources import records, never an output",
    ]
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from agent.cli.common import clean\n")
    assert "agent.cli.common" in imports(p)
