"""Shared fixtures and the golden-file switch.

Golden files (tests/golden/) are whole outputs compared byte for byte. They
change only when a test runs with ``--update-golden``; review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = ROOT / "tests" / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite golden files from current output")


@pytest.fixture
def golden(request):
    update = request.config.getoption("--update-golden")

    def check(name: str, actual: str):
        path = GOLDEN / name
        if update or not path.exists():
            if not update:
                pytest.fail(f"golden file {path} missing; run pytest --update-golden and review it")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual)
            return
        assert actual == path.read_text(), f"output differs from golden {path} (pytest --update-golden to accept)"

    return check


@pytest.fixture
def fixture_host():
    """A HostPaths pointing at tests/fixtures/hosts/<name>."""
    from agent.hostpaths import HostPaths

    def make(name: str) -> HostPaths:
        base = FIXTURES / "hosts" / name
        return HostPaths(procfs=base / "proc", sysfs=base / "sys", tracefs=base / "tracing", debugfs=base / "debug")

    return make
