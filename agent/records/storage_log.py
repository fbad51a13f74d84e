"""Records of the storage_log source: storage-path log lines as events (agent/sources/storage_log.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StorageLogEvent:
    time: float
    kind: str  # nop_timeout | nop_out_failed | check_condition | iscsi_failure | io_error | conn_error | ping_timeout | recovery_timeout | recovered | bind_failed | iscsi_other
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


@dataclass(frozen=True)
class StorageLogEvents:
    events: tuple[StorageLogEvent, ...] = ()
    files: int = 0
    lines_read: int = 0
