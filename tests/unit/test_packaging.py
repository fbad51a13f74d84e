"""pyproject.toml lists the packages by hand (the probes' C sources are mapped
into the wheel as agent.ebpf.probes): the list must follow the agent/ tree."""

from __future__ import annotations

import tomllib

from tests.conftest import ROOT


def test_package_list_matches_the_tree():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "agent").rglob("__init__.py")}
    assert listed - {"agent.ebpf.probes"} == on_disk, "update [tool.setuptools] packages in pyproject.toml"
    assert setup["package-dir"]["agent.ebpf.probes"] == "probes"
    assert any((ROOT / "probes").glob("*.bpf.c"))


def test_one_version():
    """The version is written once (agent/__init__.py); pyproject reads it."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "agent.__version__"}
