"""Kernel (open-iscsi) iSCSI sessions, their connections and SCSI disks (source: iscsi_kernel)."""

from __future__ import annotations

from dataclasses import dataclass

from agent.records.addr import fmt_portal


@dataclass(frozen=True)
class IscsiConnection:
    cid: str  # "<SID>:<CID>"
    address: str | None
    port: int | None
    persistent_address: str | None
    persistent_port: int | None
    local_port: int | None
    state: str | None  # up | down | failed | bound (newer kernels)
    ping_tmo: int | None
    recv_tmo: int | None


@dataclass(frozen=True)
class ScsiDisk:
    hctl: str  # H:C:T:L
    lun: int
    name: str | None  # sdX
    devno: str | None  # MAJ:MIN
    state: str | None  # running | offline | blocked ...
    holders: tuple[str, ...] = ()  # dm-N
    holder_names: tuple[str, ...] = ()  # dm names (e.g. mpatha)
    ioerr_cnt: int | None = None  # commands completed with an error (sysfs device/ioerr_cnt)
    iotmo_cnt: int | None = None  # commands that timed out (sysfs device/iotmo_cnt)


@dataclass(frozen=True)
class IscsiSession:
    sid: int
    target: str | None
    tpgt: int | None
    state: str | None  # LOGGED_IN | FAILED | FREE
    recovery_tmo: int | None  # seconds; None when "off" or unreadable
    iface: str | None
    initiator: str | None
    host: str | None  # hostN
    netdev: str | None
    host_ipaddress: str | None
    connections: tuple[IscsiConnection, ...] = ()
    disks: tuple[ScsiDisk, ...] = ()
    stats: dict[str, int] | None = None  # unwrapped totals
    stats_error: str | None = None

    @property
    def portal(self) -> str | None:
        c = self.connections[0] if self.connections else None
        if c is None:
            return None
        return fmt_portal(c.persistent_address or c.address, c.persistent_port or c.port)


@dataclass(frozen=True)
class IscsiSessions:
    sessions: tuple[IscsiSession, ...] = ()
    vanished: tuple[int, ...] = ()  # SIDs listed but gone while reading (logout race)
    iscsiadm: str | None = None  # why per-session counters are missing, if they are
