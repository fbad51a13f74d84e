"""Records for VMs and their disks, shared by the libvirt and QMP sources."""

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


def host_devno(kind: str, source: str | None) -> str | None:
    """MAJ:MIN of the host block device a file or block disk sits on.

    A block disk is the device itself (st_rdev); a file disk sits on the
    device of its file system (st_dev). None when the path is unreadable.
    """
    import os

    if not source or kind not in ("file", "block"):
        return None
    try:
        st = os.stat(source)
    except OSError:
        return None
    dev = st.st_rdev if kind == "block" else st.st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def split_iscsi_name(name: str | None) -> tuple[str | None, int | None]:
    """libvirt iSCSI source name ``IQN/LUN`` (LUN defaults to 0)."""
    if not name:
        return None, None
    iqn, sep, lun = name.rpartition("/")
    if sep and lun.isdigit():
        return iqn, int(lun)
    return name, 0


def parse_iscsi_url(url: str) -> tuple[str | None, int | None, str | None, int | None]:
    """QEMU ``iscsi://[user[%pass]@]host[:port]/IQN/LUN`` -> (host, port, iqn, lun)."""
    from urllib.parse import urlsplit

    try:
        u = urlsplit(url)
        host, port = u.hostname, u.port or 3260
    except ValueError:
        return None, None, None, None
    iqn, lun = split_iscsi_name(u.path.lstrip("/"))
    return host, port, iqn, lun
