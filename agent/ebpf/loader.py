"""Loading the probes: requirement checks, compile once, attach, self-measure.

Every probe goes through :func:`check_requirements` and then
:meth:`Probe.load`. The outcome is a :class:`ProbeReport`: ``attached``
(with the tracepoints it is on), or ``unavailable`` with the reason and the
fix (a host without what the probe needs: normal, reported as "no data"),
or ``failed`` (compile/attach error: a bug or an unusual kernel). One
probe's outcome never affects another's.

Requirements checked, in this order (messages in docs/probes.md):
  * root, or CAP_BPF + CAP_PERFMON (kernel 5.8+), or CAP_SYS_ADMIN;
  * tracefs at ``paths.tracefs`` with an ``events/`` directory, mounted
    here when missing (``mount -t tracefs tracefs <dir>``);
  * kernel headers for bcc: ``/lib/modules/$(uname -r)/build/include`` (or
    ``ebpf.kernel_build``), or ``/sys/kernel/kheaders.tar.xz``;
  * each required tracepoint present in tracefs (optional ones are left out
    of the build with ``-D`` switches);
  * BTF (``/sys/kernel/btf/vmlinux``): informational only, TRACEPOINT_PROBE
    programs do not need it.

Compiling takes ~0.5 s of CPU per probe (LLVM): done once, on a single
background thread shared by all probes, never per cycle.

Self-measurement: BPF run-time statistics are switched on with the
``BPF_ENABLE_STATS`` command (kernel 5.8+), which holds a reference on the
kernel's stats switch for as long as the agent keeps the returned fd and
drops it on close or exit, so ``kernel.bpf_stats_enabled`` is never written
and is left exactly as found. On kernels without that command the sysctl
is set to 1 and restored to its previous value when the last probe closes.
The per-program ``run_time_ns``/``run_cnt``/``recursion_misses`` are read
from ``/proc/self/fdinfo/<prog fd>``.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from agent.ebpf import decode
from agent.hostpaths import HostPaths

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

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


@dataclass
class ProbeStats:
    """What a probe reports about itself (cumulative since it was loaded)."""

    events: int = 0  # tracepoint hits the probe handled (its own in-kernel counters)
    lost: int = 0  # events it could not account for (see each probe's docstring)
    run_time_ns: int = 0  # kernel time in the probe's programs (BPF stats)
    run_cnt: int = 0  # program runs counted while BPF stats were on
    per_program: dict[str, dict[str, int]] = field(default_factory=dict)
    timed: bool = True  # False when BPF stats could not be switched on (no CAP_SYS_ADMIN): run_* unknown

    @property
    def ns_per_event(self) -> float | None:
        return self.run_time_ns / self.run_cnt if self.run_cnt else None

    def as_dict(self) -> dict:
        return {
            "events": self.events,
            "lost": self.lost,
            "run_time_ns": self.run_time_ns,
            "run_cnt": self.run_cnt,
            "ns_per_event": None if self.ns_per_event is None else round(self.ns_per_event, 1),
            "programs": self.per_program,
        }


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

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "tracepoints": self.tracepoints,
            "skipped_tracepoints": self.skipped,
            "reason": self.reason,
            "fix": self.fix,
            "load_seconds": round(self.load_seconds, 3),
            "checks": [c.as_dict() for c in self.checks],
        }


# -- requirements --------------------------------------------------------------

def _cap_eff(paths: HostPaths) -> int:
    try:
        text = paths.read_text(paths.proc("self", "status"))
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges(paths: HostPaths, euid: int | None = None) -> Check:
    euid = os.geteuid() if euid is None else euid
    caps = _cap_eff(paths)
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        who = "root" if euid == 0 else "capabilities"
        return Check("privileges", True, f"{who}: CAP_BPF+CAP_PERFMON or CAP_SYS_ADMIN effective")
    return Check(
        "privileges",
        False,
        f"euid {euid} without CAP_BPF+CAP_PERFMON (or CAP_SYS_ADMIN)",
        "run as root, or grant CAP_BPF CAP_PERFMON CAP_SYS_RESOURCE (systemd AmbientCapabilities=, see deploy/)",
    )


def _mount(source: str, target: Path, fstype: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
    if libc.mount(source.encode(), str(target).encode(), fstype.encode(), 0, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def ensure_tracefs(paths: HostPaths, mount: bool = True) -> Check:
    """tracefs with an events/ directory at paths.tracefs; mount it if missing."""
    events = paths.tracefs / "events"
    if events.is_dir():
        return Check("tracefs", True, f"{paths.tracefs} mounted")
    fix = f"mount -t tracefs tracefs {paths.tracefs}"
    if not mount:
        return Check("tracefs", False, f"no tracefs at {paths.tracefs}", fix)
    try:
        _mount("tracefs", paths.tracefs, "tracefs")
    except OSError as e:
        return Check("tracefs", False, f"no tracefs at {paths.tracefs} and mounting it failed: {e.strerror}", fix)
    if events.is_dir():
        log.info("mounted tracefs on %s", paths.tracefs)
        return Check("tracefs", True, f"{paths.tracefs} mounted by kvmscope")
    return Check("tracefs", False, f"mounted tracefs on {paths.tracefs} but it has no events/ directory",
                 "kernel without CONFIG_EVENT_TRACING? tracepoint probes cannot run here")


def default_kernel_build() -> Path:
    return Path("/lib/modules") / platform.release() / "build"


def check_headers(paths: HostPaths, kernel_build: Path | None) -> Check:
    build = kernel_build or default_kernel_build()
    if (build / "include").is_dir():
        return Check("kernel headers", True, f"{build} (-> {os.path.realpath(build)})")
    if paths.sys("kernel", "kheaders.tar.xz").exists():
        return Check("kernel headers", True, f"{build} missing; bcc uses /sys/kernel/kheaders.tar.xz")
    return Check(
        "kernel headers",
        False,
        f"no kernel headers for bcc at {build}",
        "apt-get install linux-headers-$(uname -r), or linux-headers-amd64 linked as "
        f"{build} (deploy/setup.sh does this), or set ebpf.kernel_build",
    )


def check_btf(paths: HostPaths) -> Check:
    p = paths.sys("kernel", "btf", "vmlinux")
    if p.exists():
        return Check("btf", True, str(p))
    return Check("btf", True, f"{p} missing (not needed: tracepoint probes read tracefs formats)")


def available_tracepoints(paths: HostPaths, wanted: Iterable[str]) -> set[str]:
    """Which of ``wanted`` ("category:event") exist under tracefs events/."""
    out = set()
    for tp in wanted:
        cat, _, ev = tp.partition(":")
        if (paths.tracefs / "events" / cat / ev / "format").exists():
            out.add(tp)
    return out


# -- BPF run-time statistics -----------------------------------------------------

_SYS_bpf = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)
_BPF_ENABLE_STATS = 32
_BPF_STATS_RUN_TIME = 0


class _StatsSwitch:
    """Reference-counted holder of the kernel's BPF stats switch."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._fd: int | None = None
        self._sysctl_prev: str | None = None
        self._sysctl_path: Path | None = None
        self.mode = "off"

    def acquire(self, paths: HostPaths) -> str:
        with self._lock:
            self._users += 1
            if self._users > 1:
                return self.mode
            libc = ctypes.CDLL(None, use_errno=True)
            attr = (ctypes.c_uint8 * 16)()  # union bpf_attr { .enable_stats.type = BPF_STATS_RUN_TIME }
            fd = libc.syscall(_SYS_bpf, _BPF_ENABLE_STATS, ctypes.byref(attr), ctypes.sizeof(attr))
            if fd >= 0:
                self._fd = fd
                self.mode = "bpf_enable_stats"
                return self.mode
            err = ctypes.get_errno()
            log.debug("BPF_ENABLE_STATS failed (%s); falling back to the sysctl", errno.errorcode.get(err, err))
            path = paths.proc("sys", "kernel", "bpf_stats_enabled")
            try:
                prev = paths.read_text(path).strip()
                if prev != "1":
                    path.write_text("1\n")
                self._sysctl_prev, self._sysctl_path = prev, path
                self.mode = "sysctl"
            except OSError as e:
                log.warning("cannot enable BPF run-time stats (%s): ns per event will be unknown", e)
                self.mode = "off"
            return self.mode

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users:
                return
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            if self._sysctl_path is not None and self._sysctl_prev is not None:
                try:
                    if self._sysctl_path.read_text().strip() != self._sysctl_prev:
                        self._sysctl_path.write_text(self._sysctl_prev + "\n")
                except OSError as e:
                    log.warning("could not restore kernel.bpf_stats_enabled=%s: %s", self._sysctl_prev, e)
                self._sysctl_path = self._sysctl_prev = None
            self.mode = "off"


STATS = _StatsSwitch()

# bcc is imported lazily (after tracefs is mounted: bcc picks its tracefs
# directory at import time) and compiles under one lock, on one thread.
_COMPILER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bcc-compile")
_BCC_LOCK = threading.Lock()


def import_bcc():
    import bcc  # noqa: F401  (python3-bpfcc, through --system-site-packages)

    return bcc


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


class Probe:
    """One probes/<name>.bpf.c program set. Subclasses define the names,
    the tracepoints, extra cflags and :meth:`read`."""

    name = ""
    source_file = ""
    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    description = ""

    def __init__(self, opts: LoadOptions | None = None):
        self.opts = opts or LoadOptions()
        self.bpf: Any = None
        self.report = ProbeReport(self.name, LOADING)
        self._stats_held = False

    # subclasses ----------------------------------------------------------
    def extra_cflags(self, present: set[str]) -> list[str]:
        return []

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
        try:
            with _BCC_LOCK:
                bcc = import_bcc()
                self.bpf = bcc.BPF(text=text.encode(), cflags=self.cflags(present))
        except ImportError as e:
            rep.state, rep.reason = UNAVAILABLE, f"bcc not importable: {e}"
            rep.fix = "apt-get install python3-bpfcc and use a venv made with --system-site-packages (deploy/setup.sh)"
        except Exception as e:
            rep.state, rep.reason = FAILED, f"compiling/attaching {src.name} failed: {str(e).strip() or type(e).__name__}"
            rep.fix = "see the compiler output in the agent log; check kernel headers match tracefs formats"
        else:
            rep.state = ATTACHED
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
        out = []
        for fn in (self.bpf.funcs if self.bpf is not None else {}):
            name = fn.decode() if isinstance(fn, bytes) else fn
            if name.startswith("tracepoint__"):
                cat, _, ev = name[len("tracepoint__"):].partition("__")
                out.append(f"{cat}:{ev}")
        return out

    def program_fds(self) -> dict[str, int]:
        out = {}
        for fn, f in (self.bpf.funcs.items() if self.bpf is not None else ()):
            name = fn.decode() if isinstance(fn, bytes) else fn
            if name.startswith("tracepoint__"):
                cat, _, ev = name[len("tracepoint__"):].partition("__")
                out[f"{cat}:{ev}"] = f.fd
        return out

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
            st.per_program[tp] = prog
            st.run_time_ns += prog["run_time_ns"]
            st.run_cnt += prog["run_cnt"]
            misses += prog["recursion_misses"]
        st.events, st.lost = self.events_and_lost()
        st.lost += misses
        st.timed = STATS.mode != "off"
        return st

    def percpu_totals(self, table: str, n: int) -> list[int]:
        """Per-CPU array of n u64 counters, summed over the CPUs."""
        t = self.bpf[table.encode()]
        return [int(sum(t.getvalue(t.Key(i)))) for i in range(n)]

    def percpu_struct_totals(self, table: str, n: int, field: str = "t") -> list[int]:
        """Per-CPU array of one struct whose ``field`` is an array of n u64
        counters (one lookup per event in the kernel), summed over the CPUs."""
        t = self.bpf[table.encode()]
        out = [0] * n
        for v in t.getvalue(t.Key(0)):
            arr = getattr(v, field)
            for i in range(n):
                out[i] += int(arr[i])
        return out

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
