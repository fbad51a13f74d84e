"""VMs and their disks (libvirt and QMP sources), and QEMU processes.

Cumulative per-disk counters as QEMU keeps them (libvirt ``block.N.*``, QMP
``query-blockstats``); rates and latencies over an interval come from
:mod:`agent.records.rates`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DiskStats:
    """Cumulative counters since the QEMU process started (libvirt block.N.*, QMP BlockDeviceStats)."""

    rd_reqs: int = 0
    rd_bytes: int = 0
    rd_time_ns: int = 0
    wr_reqs: int = 0
    wr_bytes: int = 0
    wr_time_ns: int = 0
    fl_reqs: int = 0
    fl_time_ns: int = 0
    failed_reqs: int | None = None  # QMP only
    idle_time_ns: int | None = None  # QMP only: time since the last I/O
    histograms: dict | None = None  # op -> {"boundaries_ns": [...], "bins": [...]}, QMP opt-in


@dataclass(frozen=True)
class VmDisk:
    target: str  # vda
    kind: str  # network | file | block | volume | unknown
    protocol: str | None = None  # iscsi, rbd, nbd...
    source: str | None = None  # IQN/LUN for iscsi, path for file/block
    hosts: tuple[tuple[str, int], ...] = ()  # portals for network disks
    iqn: str | None = None
    lun: int | None = None
    cache: str | None = None
    io: str | None = None
    error_policy: str | None = None  # <driver error_policy=>: stop | report | ignore | enospace (write errors; reads too unless rerror_policy)
    host_devno: str | None = None  # MAJ:MIN of the host block device under a file/block disk
    stats: DiskStats | None = None
    rerror_policy: str | None = None  # <driver rerror_policy=>: read errors (stop | report | ignore)

    @property
    def backend(self) -> str:
        """libiscsi for QEMU's own initiator, host for anything through the host kernel."""
        if self.kind == "network" and self.protocol == "iscsi":
            return "libiscsi"
        if self.kind == "network":
            return f"network:{self.protocol}"
        if self.kind in ("file", "block"):
            return "host"
        return "unknown"


@dataclass(frozen=True)
class Vm:
    name: str
    uuid: str | None
    state: str  # running | paused | ...
    pid: int | None
    disks: tuple[VmDisk, ...] = ()
    manager: str = "libvirt"  # libvirt | qmp
    error: str | None = None  # why stats are missing for this VM


@dataclass(frozen=True)
class Vms:
    vms: tuple[Vm, ...] = ()
    failed: tuple[tuple[str, str], ...] = ()  # (vm or socket, reason) that could not be read at all


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    name: str | None  # -name guest=NAME or -name NAME
    uuid: str | None  # -uuid
    argv: tuple[str, ...]
