"""The one door to the host's pseudo file systems.

Every read of /proc, /sys or tracefs goes through a :class:`HostPaths`, so
tests point the whole agent at a fixture tree (like node_exporter's
``--path.procfs`` / ``--path.sysfs``) and containers can mount the host's
trees elsewhere (``paths:`` in the configuration).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HostPaths:
    procfs: Path = Path("/proc")
    sysfs: Path = Path("/sys")
    tracefs: Path = Path("/sys/kernel/tracing")
    debugfs: Path = Path("/sys/kernel/debug")
    etcdir: Path = Path("/etc")  # configuration files (doctor): iscsi/iscsid.conf, multipath.conf
    rundir: Path = Path("/run")  # runtime state of daemons: libvirt's QEMU pid files (/run/libvirt/qemu/NAME.pid)

    @classmethod
    def from_config(cls, paths) -> "HostPaths":
        return cls(
            procfs=Path(paths.procfs),
            sysfs=Path(paths.sysfs),
            tracefs=Path(paths.tracefs),
            debugfs=Path(paths.debugfs),
            etcdir=Path(getattr(paths, "etc", "/etc")),
            rundir=Path(getattr(paths, "run", "/run")),
        )

    def proc(self, *parts: str) -> Path:
        return self.procfs.joinpath(*parts)

    def sys(self, *parts: str) -> Path:
        return self.sysfs.joinpath(*parts)

    def etc(self, *parts: str) -> Path:
        return self.etcdir.joinpath(*parts)

    def run(self, *parts: str) -> Path:
        return self.rundir.joinpath(*parts)

    def read_text(self, path: Path) -> str:
        """Read a whole pseudo file. Raises OSError (incl. FileNotFoundError)."""
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            return f.read()
