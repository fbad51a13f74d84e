"""What a probe needs from the host, checked before anything is compiled.

Each check returns a :class:`Check` (ok, what was found, and the fix when
not ok); :meth:`agent.ebpf.loader.Probe.check` runs them in this order
(messages in docs/probes.md):
  * root, or CAP_BPF + CAP_PERFMON (kernel 5.8+), or CAP_SYS_ADMIN;
  * tracefs at ``paths.tracefs`` with an ``events/`` directory, mounted
    here when missing (``mount -t tracefs tracefs <dir>``, through libc's
    mount(2));
  * kernel headers for bcc: ``/lib/modules/$(uname -r)/build/include`` (or
    ``ebpf.kernel_build``), or ``/sys/kernel/kheaders.tar.xz``;
  * each required tracepoint present in tracefs (:func:`available_tracepoints`;
    optional ones are left out of the build with ``-D`` switches);
  * BTF (``/sys/kernel/btf/vmlinux``): informational only, TRACEPOINT_PROBE
    programs do not need it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from agent.hostpaths import HostPaths

log = logging.getLogger(__name__)

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
