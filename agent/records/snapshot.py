"""The snapshot: everything one collection cycle saw, with each source's health.

A :class:`Snapshot` holds the cycle's time, host identity, each source's
health and the records the sources returned (keyed by source name in
``data``, the form recordings store). Outputs read the records through the
typed accessors below, never by source name: ``snap.vms`` (libvirt and QMP
together), ``snap.iscsi_sessions``, ``snap.storage_connections``,
``snap.host_tcp``, ``snap.block_devices``, ``snap.multipath``, ``snap.interfaces``, the eBPF
data, ``snap.paths``: the storage paths joined once per snapshot, and
``snap.vm_disk_latency``: every VM disk's latency histograms.
Outputs register against an accessor by reference (``@renderer(Snapshot.host_tcp)``,
see :mod:`agent.marks`); :func:`accessor_name` checks that it is one.
Snapshots are immutable once built and safe to share across threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

from agent.records.block import BlockDevices
from agent.records.disk_latency import VmDiskLatencies, build_disk_latency
from agent.records.ebpf import BlockIoData, LibiscsiData, TcpLifecycleData, TcpRetransData
from agent.records.iscsi import IscsiSession, IscsiSessions
from agent.records.multipath import Multipath, MultipathMap
from agent.records.net import NetIfaces
from agent.records.paths import StoragePath, build_paths
from agent.records.storage_log import StorageLogEvents
from agent.records.tcp import HostTcpCounters, StorageConnection, StorageConnections
from agent.records.vms import Vm, VmDisk, Vms

# the registered names of the sources whose records the accessors return
VM_SOURCES = ("libvirt", "qmp")  # in this order: libvirt's VMs first


class Status(str, Enum):
    OK = "ok"
    NODATA = "nodata"  # a normal host without this thing: not a failure
    FAILED = "failed"


@dataclass(frozen=True)
class SourceHealth:
    name: str
    status: Status
    duration_seconds: float
    reason: str = ""
    # samples or tracked objects the source left out since the agent started, by reason
    # (invalid_value, evicted, expired): the source's own cumulative ``dropped`` counters
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def success(self) -> bool:
        """node_exporter semantics: only a failure is unsuccessful."""
        return self.status is not Status.FAILED

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status.value,
            "duration_seconds": round(self.duration_seconds, 6),
            "reason": self.reason,
        } | ({"dropped": dict(self.dropped)} if self.dropped else {})


@dataclass(frozen=True)
class Snapshot:
    seq: int
    timestamp: float  # UNIX seconds at the start of the cycle
    host: str
    duration_seconds: float
    data: dict[str, Any] = field(default_factory=dict)  # source name -> its records
    health: dict[str, SourceHealth] = field(default_factory=dict)

    def get(self, source: str, default: Any = None) -> Any:
        """One source's records by name: for the records layer and generic per-source loops only."""
        return self.data.get(source, default)

    def is_nodata(self, source: str) -> bool:
        h = self.health.get(source)
        return h is not None and h.status is Status.NODATA

    # -- VMs (libvirt + QMP)

    @property
    def vm_sets(self) -> tuple[tuple[str, Vms], ...]:
        """(source, Vms) of each VM source that delivered, libvirt first."""
        return tuple((s, self.data[s]) for s in VM_SOURCES if self.data.get(s) is not None)

    @cached_property
    def vms(self) -> tuple[Vm, ...]:
        """Every VM of the host: libvirt's, then stand-alone QEMU's (QMP)."""
        return tuple(vm for _s, d in self.vm_sets for vm in d.vms)

    @cached_property
    def vm_disks(self) -> dict[tuple[str, str], tuple[Vm, VmDisk]]:
        """(vm name, disk target) -> (Vm, VmDisk), over :attr:`vms`."""
        return {(vm.name, d.target): (vm, d) for vm in self.vms for d in vm.disks}

    @cached_property
    def vm_by_pid(self) -> dict[int, str]:
        """qemu pid -> VM name."""
        return {vm.pid: vm.name for vm in self.vms if vm.pid}

    # -- iSCSI, TCP, block, network

    @property
    def iscsi(self) -> IscsiSessions | None:
        return self.data.get("iscsi_kernel")

    @property
    def iscsi_sessions(self) -> tuple[IscsiSession, ...]:
        d = self.iscsi
        return d.sessions if d is not None else ()

    @property
    def storage_tcp(self) -> StorageConnections | None:
        return self.data.get("storage_tcp")

    @property
    def storage_connections(self) -> tuple[StorageConnection, ...]:
        d = self.storage_tcp
        return d.connections if d is not None else ()

    @property
    def host_tcp(self) -> HostTcpCounters | None:
        return self.data.get("host_tcp")

    @property
    def block_devices(self) -> BlockDevices | None:
        return self.data.get("block_devices")

    @property
    def interfaces(self) -> NetIfaces | None:
        return self.data.get("net_ifaces")

    @property
    def multipath(self) -> Multipath | None:
        return self.data.get("multipath")

    @property
    def multipath_maps(self) -> tuple[MultipathMap, ...]:
        d = self.multipath
        return d.maps if d is not None else ()

    @property
    def storage_log(self) -> StorageLogEvents | None:
        return self.data.get("storage_log")

    # -- eBPF

    @property
    def block_io(self) -> BlockIoData | None:
        return self.data.get("ebpf_block_io")

    @property
    def tcp_retrans(self) -> TcpRetransData | None:
        return self.data.get("ebpf_tcp_retrans")

    @property
    def tcp_lifecycle(self) -> TcpLifecycleData | None:
        return self.data.get("ebpf_tcp_lifecycle")

    @property
    def libiscsi(self) -> LibiscsiData | None:
        return self.data.get("ebpf_libiscsi")

    # -- the join

    @cached_property
    def paths(self) -> tuple[StoragePath, ...]:
        """The storage paths (VM disk -> session -> connection -> interface), joined once per snapshot."""
        return tuple(build_paths(self))

    @cached_property
    def vm_disk_latency(self) -> VmDiskLatencies:
        """Every VM disk's latency histograms (libiscsi uprobes, block tracepoints per QEMU process, QMP),
        with the disks that have none and the probe histograms no disk claims, each with the reason."""
        return build_disk_latency(self)


def accessor_name(accessor) -> str:
    """The attribute name of a :class:`Snapshot` accessor given by reference (``Snapshot.vms`` -> "vms");
    TypeError for anything else, so a mark names an accessor that exists."""
    name = getattr(accessor, "attrname", None) or getattr(getattr(accessor, "fget", None), "__name__", None)
    if not isinstance(accessor, (property, cached_property)) or name is None or vars(Snapshot).get(name) is not accessor:
        raise TypeError(f"{accessor!r} is not an accessor of Snapshot (e.g. Snapshot.vms)")
    return name
