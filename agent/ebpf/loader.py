"""Loading the probes: the Probe base class and the shared compile thread.

Every probe goes through the requirement checks (:mod:`agent.ebpf.requirements`)
and then :meth:`Probe.load`. The outcome is a :class:`ProbeReport`: ``attached``
(with the tracepoints it is on), or ``unavailable`` with the reason and the
fix (a host without what the probe needs: normal, reported as "no data"),
or ``failed`` (compile/attach error: a bug or an unusual kernel). One
probe's outcome never affects another's.

Compiling takes ~0.5 s of CPU per probe (LLVM), once at start, in a
short-lived child process per probe (:mod:`agent.ebpf.compiler`, the only
place bcc and LLVM are loaded): the child compiles, loads and attaches, and
hands the program, map and attachment fds to the agent, which reads the
maps with plain bpf(2) calls (:mod:`agent.ebpf.bpfsys`). The agent process
never maps LLVM (~130 MB resident otherwise). Probes compile in parallel
(one child each), each waited for on a background thread
(:meth:`Probe.load_async`), never per cycle.

Attachments: bcc's auto-attached ``TRACEPOINT_PROBE`` / ``RAW_TRACEPOINT_PROBE``
functions, plus what :meth:`Probe.attachments` declares (uprobes, ...).

Self-measurement: while a probe is attached it holds the kernel's BPF stats
switch (:mod:`agent.ebpf.bpfstats`); the per-program
``run_time_ns``/``run_cnt``/``recursion_misses`` are read from
``/proc/self/fdinfo/<prog fd>``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import LIBRARY_DIRS
from agent.ebpf import decode
from agent.ebpf.bpfstats import STATS
from agent.ebpf.bpfsys import BpfObject
from agent.ebpf.compiler import Attach
from agent.ebpf.objcache import ObjCache, load_or_compile
from agent.ebpf.requirements import (
    Check,
    available_tracepoints,
    check_btf,
    check_headers,
    check_privileges,
    ensure_tracefs,
)
from agent.hostpaths import HostPaths
from agent.records.ebpf import ProbeStats

log = logging.getLogger(__name__)


def _probes_dir() -> Path:
    """The probes' C sources: inside the package when installed from a wheel
    (agent/ebpf/probes, mapped from probes/ by pyproject.toml), else the
    checkout's top-level probes/ directory."""
    here = Path(__file__).resolve().parent
    packaged = here / "probes"
    if any(packaged.glob("*.bpf.c")):
        return packaged
    return here.parent.parent / "probes"


PROBES_DIR = _probes_dir()

ATTACHED = "attached"
UNAVAILABLE = "unavailable"
FAILED = "failed"
LOADING = "loading"
CLOSED = "closed"


@dataclass
class ProbeReport:
    name: str
    state: str
    tracepoints: list[str] = field(default_factory=list)  # attached
    skipped: list[str] = field(default_factory=list)  # optional, not on this kernel
    reason: str = ""
    fix: str = ""
    checks: list[Check] = field(default_factory=list)
    load_seconds: float = 0.0
    origin: str = ""  # attached from: "compiled" (bcc, in a child) or "cache" (agent/ebpf/objcache.py)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "tracepoints": self.tracepoints,
            "skipped_tracepoints": self.skipped,
            "reason": self.reason,
            "fix": self.fix,
            "load_seconds": round(self.load_seconds, 3),
            "origin": self.origin,
            "checks": [c.as_dict() for c in self.checks],
        }


# Each probe compiles in a child process of its own (after tracefs is mounted: bcc picks its tracefs
# directory at import time); these threads only wait for the children.
_COMPILER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bpf-load")


def import_bcc():
    """bcc itself, for tools that want it in their own process (benchmarks, doctor) -- never the agent's loader."""
    import bcc  # noqa: F401  (python3-bpfcc, through --system-site-packages)

    return bcc


def bcc_available() -> str | None:
    """None when python3-bpfcc is importable by the compiler process, else why not (checked without importing it)."""
    import importlib.util

    try:
        if importlib.util.find_spec("bcc") is None:
            return "No module named 'bcc'"
    except (ImportError, ValueError) as e:
        return str(e)
    return None


# -- the probe base class ---------------------------------------------------------

@dataclass
class LoadOptions:
    """Everything the loader reads from the host, injectable for tests."""

    paths: HostPaths = field(default_factory=HostPaths)
    kernel_build: Path | None = None
    tracepoints: set[str] | None = None  # None: look in tracefs
    probes_dir: Path = PROBES_DIR
    storage_ports: tuple[int, ...] = (3260,)
    events_per_second: int = 1000
    mount_tracefs: bool = True
    # where a uprobe probe looks for its shared library (the first that has it)
    library_dirs: tuple[Path, ...] = tuple(Path(d) for d in LIBRARY_DIRS)
    uprobe_budget: float = 0.02  # share of one CPU a sampling uprobe probe may cost a process (ebpf.uprobe_budget)
    # compiled probes kept per kernel (agent/ebpf/objcache.py; ebpf.cache_dir); None: compile every time
    cache_dir: Path | None = None
    compile_timeout: float = 60.0  # most seconds one compile + load + attach in the child (ebpf.compile_timeout)


@dataclass(frozen=True)
class Uprobe:
    """One uprobe of a probe: an exported function of its shared library and
    the program (a function of the probe's C) that runs on entry."""

    symbol: str
    fn_name: str
    required: bool = True

    def label(self, library: str) -> str:
        return f"uprobe:{library}:{self.symbol}"


def find_library(name: str, dirs) -> Path | None:
    """The real path of shared library ``name`` in the first of ``dirs`` that
    has it (uprobes attach to the file's inode: the path processes map)."""
    for d in dirs:
        p = Path(d) / name
        if p.is_file():
            return p.resolve()
    return None


class Probe:
    """One probes/<name>.bpf.c program set. Subclasses define the names,
    the tracepoints, extra cflags and :meth:`read`."""

    name = ""
    source_file = ""
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    description = ""
    # user-space probes: the shared library (file name) and the uprobes on it
    library = ""
    uprobes: tuple[Uprobe, ...] = ()

    def __init__(self, opts: LoadOptions | None = None):
        self.opts = opts or LoadOptions()
        self.bpf: BpfObject | None = None  # programs, maps, attachments by fd (agent/ebpf/bpfsys.py)
        self.report = ProbeReport(self.name, LOADING)
        self._stats_held = False
        self._programs: dict[str, dict[str, int]] = {}  # the last stats' per-program counters, shared while unchanged
        self.library_path: Path | None = None
        self.uprobes_attached: list[Uprobe] = []

    # subclasses ----------------------------------------------------------
    def extra_cflags(self, present: set[str]) -> list[str]:
        return []

    def attachments(self, present: set[str]) -> list[Attach]:
        """Attachments besides bcc's auto-attached ``tracepoint__cat__name`` / ``raw_tracepoint__name``
        functions, made by the compiler process; ``Attach(optional=True)`` ones may fail (listed in
        ``skipped``). By default: :attr:`uprobes` on :attr:`library_path` for every process (pid -1: also
        processes started later; the kernel puts the breakpoint in the file's pages), labelled
        ``uprobe:<library>:<symbol>``. Override to add others (a uprobe per pid, raw tracepoints, ...)."""
        return [Attach("uprobe", u.fn_name, target=f"{self.library}:{u.symbol}", binary=str(self.library_path),
                       symbol=u.symbol, pid=-1, optional=not u.required) for u in self.uprobes]

    def events_and_lost(self) -> tuple[int, int]:
        return 0, 0

    def read(self) -> Any:
        raise NotImplementedError

    # common ----------------------------------------------------------------
    def storage_port_macro(self) -> str:
        ports = sorted(set(self.opts.storage_ports)) or [3260]
        return "-DIS_STORAGE_PORT(p)=(" + "||".join(f"(p)=={int(p)}" for p in ports) + ")"

    def cflags(self, present: set[str]) -> list[str]:
        ncpu = os.cpu_count() or 1
        per_cpu = max(1, int(self.opts.events_per_second) // ncpu)
        flags = [f"-I{self.opts.probes_dir}", self.storage_port_macro(), f"-DEVENTS_PER_SEC_PER_CPU={per_cpu}"]
        for tp in self.optional:
            if tp in present:
                flags.append("-DHAVE_" + tp.partition(":")[2].upper())
        return flags + self.extra_cflags(present)

    def check(self) -> tuple[list[Check], set[str]]:
        o = self.opts
        checks = [check_privileges(o.paths), ensure_tracefs(o.paths, o.mount_tracefs), check_headers(o.paths, o.kernel_build),
                  check_btf(o.paths)]
        wanted = self.required + self.optional
        if o.tracepoints is not None:
            present = set(wanted) & set(o.tracepoints)
        elif checks[1].ok:
            present = available_tracepoints(o.paths, wanted)
        else:
            present = set()
        for tp in self.required:
            if tp in present:
                checks.append(Check(f"tracepoint {tp}", True, "present"))
            else:
                checks.append(Check(
                    f"tracepoint {tp}", False,
                    f"tracepoint {tp} not found in {o.paths.tracefs}/events",
                    "needs a kernel with this tracepoint (CONFIG_TRACEPOINTS and the subsystem's events); "
                    "list them with: ls " + f"{o.paths.tracefs}/events/{tp.partition(':')[0]}",
                ))
        if self.library:
            lib = find_library(self.library, o.library_dirs)
            self.library_path = lib
            checks.append(Check(f"library {self.library}", lib is not None,
                                str(lib) if lib else f"{self.library} not found in {', '.join(map(str, o.library_dirs))}",
                                "" if lib else f"install the package that ships {self.library} (Debian: libiscsi7, pulled "
                                               "in by qemu-block-extra), or set ebpf.library_dirs; a host without QEMU iSCSI disks needs none"))
        return checks, present

    def load(self) -> ProbeReport:
        t0 = time.monotonic()
        rep = self.report = ProbeReport(self.name, LOADING)
        try:
            checks, present = self.check()
        except Exception as e:  # a check must never take the agent down
            rep.state, rep.reason = FAILED, f"requirement check failed: {type(e).__name__}: {e}"
            return rep
        rep.checks = checks
        rep.skipped = [tp for tp in self.optional if tp not in present]
        bad = [c for c in checks if not c.ok]
        if bad:
            rep.state = UNAVAILABLE
            rep.reason = "; ".join(c.detail for c in bad)
            rep.fix = "; ".join(c.fix for c in bad if c.fix)
            rep.load_seconds = time.monotonic() - t0
            return rep
        src = self.opts.probes_dir / self.source_file
        try:
            text = src.read_text()
        except OSError as e:
            rep.state, rep.reason = FAILED, f"cannot read {src}: {e.strerror}"
            rep.fix = "reinstall kvmscope (probes/ ships with it) or set ebpf.probes_dir"
            return rep
        missing = bcc_available()
        try:
            if missing:
                raise ImportError(missing)
            cache = ObjCache(self.opts.cache_dir) if self.opts.cache_dir else None
            self.bpf, skipped, rep.origin = load_or_compile(text, self.cflags(present), self.attachments(present), cache,
                                                            self.opts.paths,
                                                            timeout=self.opts.compile_timeout)
        except ImportError as e:
            rep.state, rep.reason = UNAVAILABLE, f"bcc not importable: {e}"
            rep.fix = "apt-get install python3-bpfcc and use a venv made with --system-site-packages (deploy/setup.sh)"
        except Exception as e:
            rep.state, rep.reason = FAILED, f"compiling/attaching {src.name} failed: {str(e).strip() or type(e).__name__}"
            rep.fix = "see the compiler's message above; check kernel headers match tracefs formats"
            log.warning("probe %s: %s", self.name, rep.reason)
        else:
            rep.state = ATTACHED
            rep.skipped += skipped
            labels = set(self.attached_tracepoints())
            self.uprobes_attached = [u for u in self.uprobes if u.label(self.library) in labels]
            rep.tracepoints = sorted(self.attached_tracepoints())
            STATS.acquire(self.opts.paths)
            self._stats_held = True
            try:
                self.on_loaded()
            except Exception as e:
                rep.state, rep.reason = FAILED, f"setting up maps failed: {type(e).__name__}: {e}"
                self.close()
        rep.load_seconds = time.monotonic() - t0
        return rep

    def load_async(self) -> Future:
        return _COMPILER.submit(self.load)

    def on_loaded(self) -> None:
        pass

    def attached_tracepoints(self) -> list[str]:
        """What the probe is attached to: ``cat:name`` for a tracepoint, ``kind:target`` for the others."""
        return [a.label for a in (self.bpf.attachments if self.bpf is not None else ())]

    def program_fds(self) -> dict[str, int]:
        return self.bpf.program_fds() if self.bpf is not None else {}

    def stats(self) -> ProbeStats:
        st = ProbeStats()
        if self.bpf is None:
            return st
        misses = 0
        for tp, fd in self.program_fds().items():
            try:
                info = decode.parse_fdinfo(self.opts.paths.read_text(self.opts.paths.proc("self", "fdinfo", str(fd))))
            except OSError:
                continue
            prog = {k: info.get(k, 0) for k in ("run_time_ns", "run_cnt", "recursion_misses")}
            if self._programs.get(tp) == prog:
                prog = self._programs[tp]  # a program that did not run since: the history holds its counters once
            st.per_program[tp] = prog
            st.run_time_ns += prog["run_time_ns"]
            st.run_cnt += prog["run_cnt"]
            misses += prog["recursion_misses"]
        self._programs = st.per_program
        st.events, st.lost = self.events_and_lost()
        st.lost += misses
        st.timed = STATS.mode != "off"
        return st

    def percpu_totals(self, table: str, n: int) -> list[int]:
        """Per-CPU array of n u64 counters, summed over the CPUs."""
        t = self.bpf[table]
        return [int(sum(t.getvalue(t.Key(i)))) for i in range(n)]

    def close(self) -> None:
        if self.bpf is not None:
            try:
                self.bpf.cleanup()
            except Exception:
                log.debug("closing probe %s", self.name, exc_info=True)
            self.bpf = None
        if self._stats_held:
            STATS.release()
            self._stats_held = False
