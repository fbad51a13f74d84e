"""The import direction of agent/: sources -> records in a snapshot -> outputs, and no arrow back.

Every module of agent/ stands on one floor (FLOORS, bottom up; docs/architecture.md) and imports
only modules of its own floor or the floors below it. The outputs share one floor but are islands:
one output imports another's module only through an edge listed in ALLOWED. So:
  * records import nothing of the agent but records, and only the standard library besides;
  * agent.ebpf never imports agent.sources (both take the source contract from agent.source_api);
  * no source imports an output or the loop that runs it;
  * nothing outside agent/cli/ imports agent.cli (agent/__main__.py, the entry point, starts it).
A new module lands on a floor by its place in the tree; a top-level module must be listed below.
A small AST walk (every import, including the ones inside functions); no extra dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"

# bottom up: (floor, the modules and packages on it)
FLOORS = (
    ("records", ("agent.records",)),
    ("base", ("agent", "agent.errors", "agent.config", "agent.hostpaths", "agent.fsutil", "agent.text",
              "agent.durations", "agent.health", "agent.sdnotify", "agent.marks")),
    ("source_api", ("agent.source_api",)),
    ("ebpf", ("agent.ebpf",)),
    ("sources", ("agent.sources",)),
    ("assembly", ("agent.loop", "agent.engine", "agent.codec", "agent.api")),  # run the sources, serve snapshots
    ("outputs", ("agent.exporters", "agent.shipping", "agent.diagnose", "agent.doctor", "agent.fleet", "agent.cli")),
    ("entry", ("agent.__main__",)),
)
NAMES = [name for name, _mods in FLOORS]

# The only edges between two outputs (importer's output, imported module). The CLI is the front of
# every output: its commands run them.
ALLOWED = {
    ("agent.cli", "agent.diagnose.window"),  # diagnose, top, retrans build a window
    ("agent.cli", "agent.diagnose.rules"),  # diagnose runs the rules
    ("agent.cli", "agent.diagnose.report"),  # diagnose renders the report
    ("agent.cli", "agent.diagnose.live"),  # run starts the live diagnosis
    ("agent.cli", "agent.diagnose.incidents"),  # diagnose follows incidents over a recording or samples
    ("agent.cli", "agent.doctor"),  # doctor runs the checks
    ("agent.cli", "agent.doctor.live"),  # doctor's live socket probes
    ("agent.cli", "agent.doctor.report"),  # doctor renders the report
    ("agent.cli", "agent.fleet.analysis"),  # fleet judges
    ("agent.cli", "agent.fleet.prometheus"),  # fleet queries Prometheus
    ("agent.cli", "agent.shipping.shipper"),  # run starts shipping
    ("agent.cli", "agent.exporters.registry"),  # run loads the renderers
    ("agent.cli", "agent.exporters.server"),  # run serves /metrics
    ("agent.cli", "agent.exporters.render_diagnosis"),  # run hands the live findings to /metrics
    ("agent.cli", "agent.exporters.render_shipping"),  # run hands shipping health to /metrics
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(AGENT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_imports(path: Path) -> list[str]:
    """Every module name ``path`` imports (``from agent.x import y`` counts as agent.x and agent.x.y)."""
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
    return out


def imports(path: Path) -> list[str]:
    """The agent modules ``path`` imports."""
    return [m for m in all_imports(path) if m == "agent" or m.startswith("agent.")]


def _under(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def place(mod: str) -> tuple[int, str] | None:
    """(floor index, the package or module that puts it there), the most specific listing first."""
    best = None
    for i, (_name, mods) in enumerate(FLOORS):
        for m in mods:
            if (_under(mod, m) if m != "agent" else mod == "agent") and (best is None or len(m) > len(best[1])):
                best = (i, m)
    return best


def _real(mod: str, known: set[str]) -> str | None:
    """The module an import name stands for (``agent.x.y`` may be the name y inside agent.x)."""
    while mod and mod not in known:
        mod = mod.rpartition(".")[0]
    return mod or None


def violations(graph: dict[str, list[str]]) -> list[str]:
    """``importer -> imported: rule`` for every edge that points the wrong way (and every module on no floor)."""
    known = set(graph)
    out = [f"{m}: on no floor (add it to FLOORS)" for m in sorted(known) if place(m) is None]
    for src, targets in sorted(graph.items()):
        ps = place(src)
        if ps is None:
            continue
        for t in sorted({m for m in (_real(t, known) for t in targets) if m and m != src}):
            pt = place(t)
            if pt is None:
                continue
            if _under(t, "agent.cli") and not _under(src, "agent.cli") and src != "agent.__main__":
                out.append(f"{src} -> {t}: only agent/cli imports the CLI")
            elif pt[0] > ps[0]:
                out.append(f"{src} -> {t}: {NAMES[ps[0]]} imports nothing of {NAMES[pt[0]]}, a floor above it")
            elif NAMES[ps[0]] == "outputs" and pt[0] == ps[0] and ps[1] != pt[1] and (ps[1], t) not in ALLOWED:
                out.append(f"{src} -> {t}: outputs do not import each other's modules (ALLOWED lists the exceptions)")
    return out


def agent_graph() -> dict[str, list[str]]:
    return {module_name(p): imports(p) for p in sorted(AGENT.rglob("*.py"))}


def test_imports_point_down():
    graph = agent_graph()
    assert len(graph) > 50 and "agent.records.snapshot" in graph  # the walk sees the tree
    assert violations(graph) == []


def test_records_import_only_the_standard_library():
    bad = []
    for p in sorted((AGENT / "records").rglob("*.py")):
        for m in all_imports(p):
            top = m.split(".")[0]
            if m and not _under(m, "agent.records") and top not in sys.stdlib_module_names and top != "__future__":
                bad.append(f"{module_name(p)} imports {m}")
    assert bad == []


def test_every_allowed_edge_still_exists():
    """An exception nobody needs any more is removed from the list, so the list stays short."""
    graph = agent_graph()
    used = {(place(s)[1], _real(t, set(graph))) for s, ts in graph.items() if place(s) for t in ts}
    assert sorted(ALLOWED - used) == []


def test_the_walk_sees_each_kind_of_wrong_arrow(tmp_path):
    graph = {
        "agent.records.vms": ["agent.sources.libvirt_vms"],
        "agent.sources.libvirt_vms": ["agent.records.vms", "agent.exporters.catalog", "agent.ebpf.loader"],
        "agent.sources.iscsi_kernel": ["agent.loop"],
        "agent.ebpf.loader": ["agent.sources", "agent.source_api"],
        "agent.sources": ["agent.source_api"],
        "agent.source_api": ["agent.config"],
        "agent.config": ["agent.health"],
        "agent.health": [],
        "agent.exporters.catalog": [],
        "agent.exporters.render_x": ["agent.shipping.fields", "agent.exporters.catalog", "agent.records.vms"],
        "agent.shipping.fields": [],
        "agent.diagnose.report": ["agent.cli.common"],
        "agent.cli.common": [],
        "agent.cli.run": ["agent.exporters.server", "agent.shipping.fields"],
        "agent.exporters.server": [],
        "agent.loop": ["agent.records.vms"],
        "agent.newthing": [],
    }
    assert violations(graph) == [
        "agent.newthing: on no floor (add it to FLOORS)",
        "agent.cli.run -> agent.shipping.fields: outputs do not import each other's modules (ALLOWED lists the exceptions)",
        "agent.diagnose.report -> agent.cli.common: only agent/cli imports the CLI",
        "agent.ebpf.loader -> agent.sources: ebpf imports nothing of sources, a floor above it",
        "agent.exporters.render_x -> agent.shipping.fields: outputs do not import each other's modules (ALLOWED lists the exceptions)",
        "agent.records.vms -> agent.sources.libvirt_vms: records imports nothing of sources, a floor above it",
        "agent.sources.iscsi_kernel -> agent.loop: sources imports nothing of assembly, a floor above it",
        "agent.sources.libvirt_vms -> agent.exporters.catalog: sources imports nothing of outputs, a floor above it",
    ]
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from agent.cli.common import clean\n")
    assert "agent.cli.common" in imports(p)


def test_architecture_doc_names_every_module_and_no_other():
    """docs/architecture.md's module table is the map a newcomer reads: every module of agent/ is in it
    (by path or file name), every agent/ path it names exists, and its floor table lists FLOORS."""
    import re

    doc = (AGENT.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(AGENT.parent)) for p in sorted(AGENT.rglob("*.py")) if p.name != "__init__.py"
               and str(p.relative_to(AGENT.parent)) not in doc and not re.search(rf"[`/]{re.escape(p.name)}`", doc)]
    assert missing == []
    assert [m for m in re.findall(r"agent/[\w/]+\.py", doc) if not (AGENT.parent / m).exists()] == []
    assert [name for name in NAMES if f"| {name} |" not in doc] == []
