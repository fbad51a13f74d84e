"""Shared fixtures and the golden-file switch.

Golden files (tests/golden/) are whole outputs compared byte for byte. They
change only when a test runs with ``--update-golden``; review the diff.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
GOLDEN = ROOT / "tests" / "golden"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(fn, timeout: float, what: str, step: float = 0.5):
    """fn() until it returns something true (returned), retrying on exceptions, up
    to `timeout` seconds; then an AssertionError naming `what` and the last error."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = e
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


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
