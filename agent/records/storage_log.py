"""Records of the storage_log source: storage-path log lines as events (agent/sources/storage_log.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageLogEvent:
    time: float
    kind: str  # nop_timeout | nop_out_failed | check_condition | iscsi_failure | io_error | conn_error | ping_timeout | recovery_timeout | recovered | bind_failed | scsi_timeout | mpath_* (dm-multipath, see storage_log_parse) | iscsi_other
    message: str
    origin: str  # qemu | kernel | iscsid
    path: str
    offset: int
    file_id: str  # dev:ino:generation
    vm: str | None = None
    cid: str | None = None  # "2:0"
    sid: int | None = None
    error_code: int | None = None
    error_name: str | None = None
    sense_key: str | None = None
    ascq: str | None = None
    map: str | None = None  # dm-multipath map: name (multipathd) or MAJ:MIN (kernel)
    device: str | None = None  # a path: sdX or MAJ:MIN
    active_paths: int | None = None  # multipathd "remaining active paths: N"
    retries: int | None = None  # multipathd "Entering recovery mode: max_retries=N"


@dataclass(frozen=True)
class StorageLogEvents:
    events: tuple[StorageLogEvent, ...] = ()
    files: int = 0
    lines_read: int = 0
