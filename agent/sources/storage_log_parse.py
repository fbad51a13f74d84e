"""Parsers of storage-path log lines (pure: text in, values out), for agent/sources/storage_log.py.

What each message means (:func:`classify`), a log line's time, message and
program (:func:`parse_line`: QEMU's RFC 3339 ``-msg timestamp=on`` lines and
syslog lines), and ``/dev/kmsg`` records (:func:`parse_kmsg`).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)[: ]\s*")
_SYSLOG = re.compile(r"^([A-Z][a-z]{2}\s+\d{1,2} \d{2}:\d{2}:\d{2}) (\S+) ([^:\[\s]+)(?:\[(\d+)\])?: ?")
_KTIME = re.compile(r"^\[\s*\d+\.\d+\]\s*")
_ERRNAMES = {
    1011: "ISCSI_ERR_CONN_FAILED",
    1019: "ISCSI_ERR_SCSI_EH_SESSION_RST",
    1020: "ISCSI_ERR_TCP_CONN_CLOSE",
}


def _parse_iso(text: str) -> float | None:
    t = text.replace(" ", "T", 1)
    if t.endswith("Z"):
        t = t[:-1] + "+00:00"
    m = re.fullmatch(r"(.*T\d{2}:\d{2}:\d{2})(\.\d+)?(.*)", t)
    if m and m.group(2) and len(m.group(2)) > 7:  # Python wants at most 6 fraction digits
        t = m.group(1) + m.group(2)[:7] + m.group(3)
    if re.search(r"[+-]\d{4}$", t):
        t = t[:-2] + ":" + t[-2:]
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def classify(msg: str) -> dict | None:
    """What a storage-path message means, or None for a line of no interest.

    >>> classify("iSCSI: NOP timeout. Reconnecting...")["kind"]
    'nop_timeout'
    """
    m = re.search(r"iSCSI: NOP timeout", msg)
    if m:
        return {"kind": "nop_timeout"}
    if "failed to sent NOP-Out" in msg or "failed to send NOP-Out" in msg:
        return {"kind": "nop_out_failed"}
    m = re.search(r"iSCSI CheckCondition: SENSE KEY:(\S+) ASCQ:(\S+)", msg)
    if m:
        return {"kind": "check_condition", "sense_key": m.group(1), "ascq": m.group(2)}
    if "iSCSI Failure" in msg:
        return {"kind": "iscsi_failure"}
    m = re.search(r"Kernel reported iSCSI connection (\d+):(\d+) error \((\d+)(?: - (\w+))?", msg)
    if m:
        code = int(m.group(3))
        return {"kind": "conn_error", "cid": f"{m.group(1)}:{m.group(2)}", "sid": int(m.group(1)), "error_code": code,
                "error_name": m.group(4) or _ERRNAMES.get(code)}
    m = re.search(r"connection(\d+):(\d+): detected conn error \((\d+)\)", msg)
    if m:
        code = int(m.group(3))
        return {"kind": "conn_error", "cid": f"{m.group(1)}:{m.group(2)}", "sid": int(m.group(1)), "error_code": code,
                "error_name": _ERRNAMES.get(code)}
    m = re.search(r"connection(\d+):(\d+): ping timeout", msg)
    if m:
        return {"kind": "ping_timeout", "cid": f"{m.group(1)}:{m.group(2)}", "sid": int(m.group(1))}
    m = re.search(r"connection(\d+):(\d+) is operational after recovery", msg)
    if m:
        return {"kind": "recovered", "cid": f"{m.group(1)}:{m.group(2)}", "sid": int(m.group(1))}
    m = re.search(r"session(\d+): session recovery timed out", msg)
    if m:
        return {"kind": "recovery_timeout", "sid": int(m.group(1))}
    m = re.search(r"can't bind conn (\d+):(\d+) to session (\d+)", msg)
    if m:
        return {"kind": "bind_failed", "cid": f"{m.group(1)}:{m.group(2)}", "sid": int(m.group(3))}
    if re.search(r"I/O error", msg) or re.search(r"\bEIO\b|Input/output error", msg):
        return {"kind": "io_error"}
    if re.search(r"\biSCSI\b", msg):
        return {"kind": "iscsi_other"}
    return None


def parse_line(line: str, *, default_time: float, year: int | None = None) -> tuple[float, str, str | None]:
    """Split a log line into (time, message, program). Program is from syslog lines (kernel, iscsid...)."""
    line = line.rstrip("\r\n")
    m = _ISO.match(line)
    if m:
        ts = _parse_iso(m.group(1)) or default_time
        rest = line[m.end():]
        sm = re.match(r"^(\S+) ([^:\[\s]+)(?:\[(\d+)\])?: ?", rest)
        prog = None
        if sm and sm.group(2) in ("kernel", "iscsid"):
            prog, rest = sm.group(2), rest[sm.end():]
        return ts, _KTIME.sub("", rest), prog
    m = _SYSLOG.match(line)
    if m:
        y = year or datetime.now(timezone.utc).year
        try:
            ts = datetime.strptime(f"{y} {m.group(1)}", "%Y %b %d %H:%M:%S").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            ts = default_time
        return ts, _KTIME.sub("", line[m.end():]), m.group(3)
    return default_time, line, None


def parse_kmsg(record: str) -> tuple[int, str] | None:
    """``/dev/kmsg`` record ``prio,seq,usec,flags[,...];message`` → (seq, message)."""
    head, sep, msg = record.partition(";")
    if not sep:
        return None
    parts = head.split(",")
    try:
        return int(parts[1]), msg.split("\n", 1)[0]
    except (IndexError, ValueError):
        return None
