"""`kvmscope doctor`: checks of the host's storage-path configuration.

Each check is a small documented function registered by name with
:func:`check` (like the sources) in a ``checks_*.py`` module of this
package, auto-discovered. A check takes a :class:`DoctorInput` (the
configuration, the injectable :class:`~agent.hostpaths.HostPaths` including
``/etc``, one snapshot of the sources, and two probes of the live host that
tests replace) and returns :class:`Result` records: one per subject (the
host, a session, a LUN, a VM disk...), each with a status, the finding with
the actual values, why it matters, a reference, and the fix.

Statuses: ``ok``, ``info`` (worth knowing, nothing to change), ``warning``
(a setting that makes an outage worse than it needs to be), ``problem``
(a setting that loses data or hangs VMs), ``skipped`` (nothing to check
here, or the input is missing: the reason says which).

A check that raises is reported as ``skipped`` with ``error`` set; it never
stops the other checks.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

from agent.config import Config
from agent.hostpaths import HostPaths
from agent.records.snapshot import Snapshot

log = logging.getLogger(__name__)

STATUSES = ("ok", "info", "warning", "problem", "skipped")
SEVERITY = {"ok": 0, "skipped": 0, "info": 1, "warning": 2, "problem": 3}
EXIT_OK = 0
EXIT_COULD_NOT_RUN = 1
EXIT_PROBLEMS = 3  # same convention as `kvmscope diagnose`

# the sources a doctor run collects (in-process, once)
SOURCES = ["iscsi_kernel", "block_devices", "net_ifaces", "libvirt", "qmp", "storage_tcp", "multipath"]


@dataclass(frozen=True)
class Result:
    check: str
    status: str  # ok | info | warning | problem | skipped
    subject: str  # "host", "session 3", "iqn.../1", "vm0/vda", "kvmslab-h1"...
    finding: str  # what was found, with the actual values
    why: str = ""  # why it matters
    reference: str = ""  # documentation by name and section
    fix: str = ""  # what to change, when something should change
    values: dict[str, Any] = field(default_factory=dict)  # the actual values, machine-readable
    error: str | None = None  # the check itself failed (then status is "skipped")

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")

    def as_dict(self) -> dict:
        return {
            "check": self.check,
            "status": self.status,
            "subject": self.subject,
            "finding": self.finding,
            "why": self.why,
            "reference": self.reference,
            "fix": self.fix,
            "values": self.values,
            "error": self.error,
        }


@dataclass
class DoctorInput:
    """Everything the checks read. Tests build it from fixture trees and records."""

    config: Config
    paths: HostPaths
    snapshot: Snapshot
    # samples of the storage sockets' inet_diag timers, {"src:sport->dst:dport": [timer, ...]};
    # None when the host cannot be observed (a recording)
    socket_timers: Callable[[], dict[str, list[int]]] | None = None
    # (available, detail) of the bcc Python module
    bcc_status: Callable[[], tuple[bool, str]] | None = None

    def health(self, source: str) -> str | None:
        """Why a source's data is missing ("failed: ..." / "no data: ..."), None when present."""
        if source in self.snapshot.data:
            return None
        h = self.snapshot.health.get(source)
        if h is None:
            return f"{source} not collected"
        return f"{source} {'failed' if h.status.value == 'failed' else 'had no data'}: {h.reason}"


@dataclass(frozen=True)
class CheckInfo:
    name: str
    order: int
    title: str
    doc: str
    func: Callable[[DoctorInput], list[Result]]


CHECKS: dict[str, CheckInfo] = {}


def check(name: str, order: int, title: str):
    """Register a check: ``func(inp: DoctorInput) -> list[Result]``."""

    def deco(func):
        CHECKS[name] = CheckInfo(name, order, title, (func.__doc__ or "").strip(), func)
        return func

    return deco


def load_checks() -> list[CheckInfo]:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name.startswith("checks_"):
            importlib.import_module(f"{__name__}.{mod.name}")
    return sorted(CHECKS.values(), key=lambda c: c.order)


def run_checks(inp: DoctorInput, only: list[str] | None = None) -> list[Result]:
    """Run every check (or ``only`` those), each isolated from the others' failures."""
    out: list[Result] = []
    for info in load_checks():
        if only and info.name not in only:
            continue
        try:
            results = info.func(inp)
        except Exception as e:  # a broken check never hides the others
            log.debug("check %s failed", info.name, exc_info=True)
            results = [Result(info.name, "skipped", "host", f"check failed: {type(e).__name__}: {e}",
                              error=f"{type(e).__name__}: {e}")]
        out.extend(results)
    return out


def exit_code(results: list[Result]) -> int:
    if any(r.status in ("warning", "problem") for r in results):
        return EXIT_PROBLEMS
    if any(r.error for r in results):
        return EXIT_COULD_NOT_RUN
    return EXIT_OK
