"""Import seams kept by the module splits: the eBPF package never imports the sources package
(the probe glue takes SourceContext from agent.source_api) and no source imports an output."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def offenders(package: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((AGENT / package).rglob("*.py")):
        for name in sorted(imports_of(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{path.relative_to(AGENT.parent)} imports {name}")
    return bad


def test_ebpf_does_not_import_sources():
    assert offenders("ebpf", ("agent.sources",)) == []


def test_sources_import_no_output():
    assert offenders("sources", ("agent.shipping", "agent.exporters", "agent.diagnose", "agent.cli")) == []


def test_the_checker_sees_an_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from agent.sources import SourceContext\n")
    assert "agent.sources.SourceContext" in imports_of(p)
