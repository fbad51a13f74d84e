"""Library code does not import the CLI: the arrow points from agent/cli/ to the library, never back."""

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parents[2] / "agent"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def test_no_module_outside_the_cli_imports_it():
    offenders = []
    for path in sorted(AGENT.rglob("*.py")):
        rel = path.relative_to(AGENT.parent)
        if rel.parts[1] == "cli" or rel.name == "__main__.py":
            continue
        offenders += [f"{rel}: {m}" for m in _imports(path) if m == "agent.cli" or m.startswith("agent.cli.")]
    assert offenders == []


def test_the_check_sees_a_cli_import(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("def f():\n    from agent.cli.common import clean\n")
    assert _imports(p) == ["agent.cli.common"]
