"""Shared fixtures, the golden-file switch and the no-skip rule.

Golden files (tests/golden/) are whole outputs compared byte for byte. They
change only when a test runs with ``--update-golden``; review the diff.

No-skip rule: with ``KVMSCOPE_REQUIRE_REAL=1`` (``make test``, and so CI) a
skipped test is a failure, unless its reason names something this kind of
machine truly lacks (``MACHINE_LACKS``; skip with ``skip_lacking(key, ...)``).
``make unit`` and a plain ``pytest`` skip as before. See docs/reliability.md.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.request
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


def scrape(port: int, timeout: float = 5.0) -> dict[str, float]:
    """An agent's /metrics on 127.0.0.1 as {series: value} (series = name{labels} exactly as written)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


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


# -- the no-skip rule -----------------------------------------------------------
REQUIRE_REAL_ENV = "KVMSCOPE_REQUIRE_REAL"
LACKS_PREFIX = "machine lacks: "
# What a machine that runs `make test` (root, deploy/setup.sh done: Debian
# packages, kernel headers, tracefs, Elasticsearch) may still truly lack. A skip
# for anything else (not root, a tool setup.sh installs, a probe that did not
# load) means the suite did not test what it claims, so it fails.
MACHINE_LACKS = {
    "kernel-iscsi-initiator": "no kernel iSCSI initiator (iscsi_tcp, CONFIG_SCSI) in the host's own kernel",
    "systemd-pid1": "systemd is not PID 1 (no service manager to start units)",
    "hw-kvm": "no hardware-accelerated KVM (guests run under QEMU TCG)",
}


def skip_lacking(key: str, detail: str = "") -> None:
    """Skip because the machine truly lacks MACHINE_LACKS[key]; allowed under the no-skip rule."""
    __tracebackhide__ = True  # the skip is reported at the caller's line
    pytest.skip(LACKS_PREFIX + MACHINE_LACKS[key] + (f": {detail}" if detail else ""))


def require_real() -> bool:
    return os.environ.get(REQUIRE_REAL_ENV, "") not in ("", "0")


def _skip_reason(longrepr) -> str:
    # a skip's longrepr is (path, lineno, "Skipped: <reason>")
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def skip_allowed(reason: str) -> bool:
    return any(reason.startswith(LACKS_PREFIX + what) for what in MACHINE_LACKS.values())


def _refuse_skip(report) -> None:
    reason = _skip_reason(report.longrepr)
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under {REQUIRE_REAL_ENV}=1 (make test): {reason}\n"
        f"A skip passes here only when the machine truly lacks one of: "
        f"{'; '.join(MACHINE_LACKS.values())} (tests.conftest.skip_lacking). "
        f"Install what is missing (deploy/setup.sh --test) or run `make unit` for a quick run.")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if require_real() and report.skipped and not hasattr(report, "wasxfail") \
            and not skip_allowed(_skip_reason(report.longrepr)):
        _refuse_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if require_real() and report.skipped and not skip_allowed(_skip_reason(report.longrepr)):
        _refuse_skip(report)
