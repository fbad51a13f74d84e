"""Storage paths: VM disk → backend → iSCSI session → TCP connection → portal → interface.

A pure join over one snapshot's records (no I/O):

* QEMU libiscsi disk (``<disk type='network'><source protocol='iscsi'>``):
  the VM's qemu process owns the TCP socket, so the connection is the one
  whose owner pid is the VM's pid and whose remote end is one of the disk's
  portal hosts. Two iSCSI disks of one VM on one portal cannot be told apart
  from the socket alone: both sockets are listed and the link is marked
  ambiguous.
* Disk on a host block device (file or block source): the device under it
  (``host_devno`` → /sys/block name), down through device-mapper slaves
  (multipath legs) to SCSI disks; each sdX that belongs to an open-iscsi
  session gives one path per leg. The session's connection is joined to its
  TCP socket by local port + portal (the kernel's socket has no owner
  process).
* Multipath: when the device is a dm-multipath map, each leg carries the
  map's view of it (``path_state`` active/failed as the kernel uses it,
  ``checker_state`` as multipathd's checker last saw it) and the map's count
  of usable paths, so a VM disk shows which of its paths carry its I/O.
* Interface: the host interface holding the connection's source address.

Every link that cannot be made says why in ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.records.addr import fmt_endpoint
from agent.records.vms import Vm, VmDisk

if TYPE_CHECKING:
    from agent.records.snapshot import Snapshot


@dataclass(frozen=True)
class StoragePath:
    vm: str
    disk: str
    backend: str  # libiscsi | host | host-iscsi | network:<proto> | unknown
    vm_uuid: str | None = None
    pid: int | None = None
    target: str | None = None  # IQN
    lun: int | None = None
    portal: str | None = None  # ADDR:PORT
    session: int | None = None  # open-iscsi SID
    session_state: str | None = None
    host_device: str | None = None  # sdX or dm-N under a host-backed disk
    scsi_device: str | None = None  # sdX leg of a multipath device
    multipath: str | None = None  # dm name
    path_state: str | None = None  # this leg in its multipath map: active | failed (kernel dm state)
    checker_state: str | None = None  # multipathd's path checker: ready | faulty | ghost ...
    map_active_paths: int | None = None  # usable paths of the map right now
    connection: str | None = None  # SRC:SPORT->DST:DPORT
    tcp_state: str | None = None
    rtt_seconds: float | None = None
    retransmits_total: int | None = None
    interface: str | None = None
    unknown: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        from dataclasses import asdict

        d = asdict(self)
        d["unknown"] = list(self.unknown)
        return d


def _iface_for(addr: str, if_addrs: dict[str, str]) -> str | None:
    return if_addrs.get(addr)


def build_paths(snap: Snapshot, if_addrs: dict[str, str] | None = None) -> list[StoragePath]:
    """Every storage path of the snapshot's VM disks (a pure join, no I/O).

    if_addrs: host address -> interface name; default: from the snapshot's
    interfaces. Outputs read ``snap.paths`` (joined once per snapshot), not this.
    """
    if if_addrs is None:
        ni = snap.interfaces
        if_addrs = ni.address_map() if ni is not None else {}
    conns = snap.storage_connections
    sessions = snap.iscsi_sessions
    blockdevs = snap.block_devices
    have_tcp = snap.storage_tcp is not None or snap.is_nodata("storage_tcp")

    by_pid: dict = {}  # each VM's connections, in order: the libiscsi join only looks at its own qemu's
    for c in conns:
        by_pid.setdefault(c.pid, []).append(c)
    out: list[StoragePath] = []
    for vm in snap.vms:
        for disk in vm.disks:
            base = dict(vm=vm.name, disk=disk.target, vm_uuid=vm.uuid, pid=vm.pid)
            if disk.backend == "libiscsi":
                out.extend(_libiscsi_paths(base, vm, disk, by_pid.get(vm.pid, ()), have_tcp, if_addrs))
            elif disk.backend == "host":
                out.extend(_host_paths(base, disk, blockdevs, sessions, conns, if_addrs, snap.multipath,
                                       _mp_missing(snap)))
            else:
                out.append(StoragePath(backend=disk.backend, unknown=(f"backend {disk.kind!r} not followed further",), **base))
    return out


def _conn_fields(c, if_addrs) -> dict:
    info = c.info
    return dict(
        connection=c.four_tuple,
        tcp_state=c.state,
        rtt_seconds=info.rtt_us / 1e6 if info and info.rtt_us is not None else None,
        retransmits_total=info.total_retrans if info else None,
        interface=_iface_for(c.src, if_addrs),
    )


def _libiscsi_paths(base, vm: Vm, disk: VmDisk, conns, have_tcp, if_addrs) -> list[StoragePath]:
    portal = fmt_endpoint(*disk.hosts[0]) if disk.hosts else None
    common = dict(base, backend="libiscsi", target=disk.iqn, lun=disk.lun, portal=portal)
    unknown = []
    if not disk.hosts:
        return [StoragePath(unknown=("disk XML names no portal host",), **common)]
    if vm.pid is None:
        return [StoragePath(unknown=("qemu process of this VM not found",), **common)]
    if not have_tcp:
        return [StoragePath(unknown=("storage_tcp source failed: connection unknown",), **common)]
    wanted = {(h, p) for h, p in disk.hosts}
    ports = {p for _h, p in disk.hosts}
    mine = [c for c in conns if c.pid == vm.pid and ((c.dst, c.dport) in wanted)]
    if not mine:
        # a portal given by host name: match by port when unambiguous (no DNS here)
        by_port = [c for c in conns if c.pid == vm.pid and c.dport in ports]
        if len(by_port) == 1 and not any(_is_ip(h) for h, _ in disk.hosts):
            mine = by_port
    if not mine:
        return [StoragePath(unknown=(f"no TCP connection from qemu pid {vm.pid} to {portal}",), **common)]
    if len(mine) > 1:  # several sockets to this portal: ambiguous if they serve several of the VM's disks
        eps = {(c.dst, c.dport) for c in mine}
        same_portal_disks = sum(1 for d in vm.disks if d.backend == "libiscsi" and not eps.isdisjoint(d.hosts))
        if same_portal_disks > 1:
            unknown.append(
                f"{len(mine)} connections from this VM to {portal} serve {same_portal_disks} disks: "
                "which socket serves which disk is ambiguous"
            )
    return [
        StoragePath(**common, **_conn_fields(c, if_addrs), unknown=tuple(unknown))
        for c in mine
    ]


def _is_ip(h: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        return False


def _mp_missing(snap: Snapshot) -> str | None:
    """Why a multipath leg has no path_state this cycle: the multipath source failed (a slow or hung
    dmsetup/multipathd); None when it has data, found no maps or was not run (not enabled)."""
    h = snap.health.get("multipath")
    if snap.multipath is not None or h is None or h.status.value != "failed":
        return None
    return f"multipath source failed ({h.reason or 'no reason given'}): path state unknown"


def _mp_fields(mpdata, mp: str | None, leg: str) -> dict:
    """The leg's state in its multipath map (from the multipath source), when both are known."""
    m = mpdata.by_name(mp) if mpdata is not None and mp else None
    p = m.path(leg) if m is not None else None
    if p is None:
        return {}
    return dict(path_state=p.dm_state, checker_state=p.checker_state, map_active_paths=m.active_paths)


def _host_paths(base, disk: VmDisk, blockdevs, sessions, conns, if_addrs, mpdata=None,
                mp_missing: str | None = None) -> list[StoragePath]:
    common = dict(base, backend="host")
    if disk.host_devno is None:
        return [StoragePath(unknown=(f"cannot stat {disk.source!r}: host device unknown",), **common)]
    if blockdevs is None:
        return [StoragePath(unknown=("block_devices source failed: host device unknown",), **common)]
    name = blockdevs.by_devno(disk.host_devno)
    if name is None:
        return [StoragePath(unknown=(f"no block device {disk.host_devno} in /sys/block",), **common)]
    dev = blockdevs.get(name)
    legs = list(dev.slaves) if dev and dev.slaves else [name]
    mp = dev.dm_name if dev and dev.slaves else None
    by_disk = {d.name: s for s in sessions for d in s.disks if d.name}
    out = []
    for leg in legs:
        s = by_disk.get(leg)
        if s is None:
            out.append(
                StoragePath(
                    **common,
                    host_device=name,
                    scsi_device=leg if leg != name else None,
                    multipath=mp,
                    **_mp_fields(mpdata, mp, leg),
                    unknown=(() if not sessions else (f"{leg} is not an iSCSI disk",))
                    + ((mp_missing,) if mp and mp_missing else ()),
                )
            )
            continue
        lun = next((d.lun for d in s.disks if d.name == leg), None)
        fields = dict(
            common,
            backend="host-iscsi",
            host_device=name,
            scsi_device=leg,
            multipath=mp,
            target=s.target,
            lun=lun,
            portal=s.portal,
            session=s.sid,
            session_state=s.state,
            **_mp_fields(mpdata, mp, leg),
        )
        c0 = s.connections[0] if s.connections else None
        conn = None
        if c0 and c0.local_port:
            conn = next((c for c in conns if c.sport == c0.local_port and (c0.address is None or c.dst == c0.address)), None)
        why_mp = (mp_missing,) if mp and mp_missing else ()
        if conn is None:
            out.append(StoragePath(**fields, unknown=(f"TCP connection of session {s.sid} not found (local port {c0.local_port if c0 else '?'})",) + why_mp))
        else:
            out.append(StoragePath(**fields, **_conn_fields(conn, if_addrs), unknown=why_mp))
    return out
