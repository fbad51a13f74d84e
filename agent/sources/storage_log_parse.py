"""Parsers of storage-path log lines (pure: text in, values out), for agent/sources/storage_log.py.

What each message means (:func:`classify`), a log line's time, message and
program (:func:`parse_line`: QEMU's RFC 3339 ``-msg timestamp=on`` lines and
syslog lines; :func:`parse_syslog` adds the facility when the line carries a
``<PRI>``), ``/dev/kmsg`` records (:func:`parse_kmsg`) and the systemd
journal's JSON entries (:func:`parse_journal_entry`).

Times: an RFC 3339 time keeps its own offset (``Z``, ``+01:00``); a time
without one (classic syslog ``Nov 25 20:00:01``, or an ISO time without
offset) is the host's local time (``tz``; default: the process's local zone,
i.e. ``TZ`` or ``/etc/localtime``, by the C library's rules). Classic syslog
has no year: the year is the one that puts the line no more than a day after
``now`` (a ``Dec 31`` line read on Jan 1 is last year's; a ``Jan  1`` line
read at 23:59 on Dec 31 by a clock a little behind is next year's).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, tzinfo

_ISO = re.compile(r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?)[: ]\s*")
_SYSLOG = re.compile(r"^([A-Z][a-z]{2}\s+\d{1,2} \d{2}:\d{2}:\d{2}) (\S+) ([^:\[\s]+)(?:\[(\d+)\])?: ?")
_PRI = re.compile(r"^<(\d{1,3})>")
_HOST_PROG = re.compile(r"^(\S+) ([^:\[\s]+)(?:\[(\d+)\])?: ?")
_DAY = 86400.0
_KTIME = re.compile(r"^\[\s*\d+\.\d+\]\s*")
_ERRNAMES = {
    1011: "ISCSI_ERR_CONN_FAILED",
    1019: "ISCSI_ERR_SCSI_EH_SESSION_RST",
    1020: "ISCSI_ERR_TCP_CONN_CLOSE",
}


def _parse_iso(text: str, tz: tzinfo | None = None) -> float | None:
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
    return _local_ts(dt, tz)


def _local_ts(dt: datetime, tz: tzinfo | None) -> float | None:
    """Seconds since the epoch of ``dt``; without an offset of its own, ``dt`` is local time (``tz``, else the host's)."""
    if dt.tzinfo is None and tz is not None:
        dt = dt.replace(tzinfo=tz)
    try:
        return dt.timestamp()  # naive: the C library's local time rules (TZ, /etc/localtime)
    except (OverflowError, OSError, ValueError):
        return None


def _syslog_ts(stamp: str, *, now: float, tz: tzinfo | None, year: int | None) -> float | None:
    """A classic syslog time (no year, no zone): local time, in the latest year not more than a day after ``now``."""
    if year is not None:
        years = [year]
    else:
        try:
            y = datetime.fromtimestamp(now, tz).year
        except (OverflowError, OSError, ValueError):
            y = datetime.now(tz).year
        years = [y + 1, y, y - 1]
    for y in years:
        try:
            dt = datetime.strptime(f"{y} {stamp}", "%Y %b %d %H:%M:%S")
        except ValueError:  # Feb 29 of a year without one
            continue
        ts = _local_ts(dt, tz)
        if ts is not None and (year is not None or ts <= now + _DAY):
            return ts
    return None


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
    c = _classify_multipath(msg)
    if c is not None:
        return c
    m = re.search(r"\[(sd[a-z]+)\] tag#\d+ (?:timing out command|abort)", msg) or re.search(
        r"\[(sd[a-z]+)\].*\bFAILED Result: hostbyte=(DID_TIME_OUT|DID_ABORT)", msg)
    if m:
        return {"kind": "scsi_timeout", "device": m.group(1)}
    if re.search(r"I/O error", msg) or re.search(r"\bEIO\b|Input/output error", msg):
        return {"kind": "io_error"}
    if re.search(r"\biSCSI\b", msg):
        return {"kind": "iscsi_other"}
    return None


# dm-multipath: the kernel (drivers/md/dm-mpath.c, "device-mapper: multipath: <map MAJ:MIN>: ..."; the
# reinstating message since v4.6, commit ec31f3f78a04) and multipathd (multipath-tools libmultipath / multipathd)
_MPATH = (
    (re.compile(r"device-mapper: multipath: (\d+:\d+): Failing path (\d+:\d+)"), "mpath_fail_path", ("map", "device")),
    (re.compile(r"device-mapper: multipath: (\d+:\d+): Reinstating path (\d+:\d+)"), "mpath_reinstate_path",
     ("map", "device")),
    (re.compile(r"device-mapper: multipath: queue_if_no_path timeout on (\S+?),? failing queued IO"),
     "mpath_queue_timeout", ("map",)),
    (re.compile(r"checker failed path (\S+) in map (\S+)"), "mpath_checker_failed", ("device", "map")),
    (re.compile(r"^(\S+): remaining active paths: (\d+)"), "mpath_remaining_paths", ("map", "active_paths")),
    (re.compile(r"^(\S+): Entering recovery mode: max_retries=(\d+)"), "mpath_queueing", ("map", "retries")),
    (re.compile(r"^(\S+): (?:Disable queueing|queueing disabled)"), "mpath_queueing_disabled", ("map",)),
    (re.compile(r"^(\S+): Recovered to normal mode"), "mpath_recovered", ("map",)),
    (re.compile(r"^(\S+): reinstated$"), "mpath_reinstated", ("device",)),
)


def _classify_multipath(msg: str) -> dict | None:
    text = msg.strip()
    for rx, kind, names in _MPATH:
        m = rx.search(text)
        if m:
            out: dict = {"kind": kind}
            for name, v in zip(names, m.groups()):
                out[name] = int(v) if name in ("active_paths", "retries") else v
            return out
    return None


def parse_line(line: str, *, default_time: float, year: int | None = None, now: float | None = None,
               tz: tzinfo | None = None) -> tuple[float, str, str | None]:
    """Split a log line into (time, message, program). Program is from syslog lines (kernel, iscsid...).

    ``now`` (default: the clock) picks a classic syslog line's year unless ``year`` is given; ``tz`` is the
    zone of times without an offset (default: the host's local zone).
    """
    line = line.rstrip("\r\n")
    m = _ISO.match(line)
    if m:
        ts = _parse_iso(m.group(1), tz) or default_time
        rest = line[m.end():]
        sm = _HOST_PROG.match(rest)
        prog = None
        if sm and sm.group(2) in ("kernel", "iscsid", "multipathd"):
            prog, rest = sm.group(2), rest[sm.end():]
        return ts, _KTIME.sub("", rest), prog
    m = _SYSLOG.match(line)
    if m:
        ts = _syslog_ts(m.group(1), now=time.time() if now is None else now, tz=tz, year=year)
        return (default_time if ts is None else ts), _KTIME.sub("", line[m.end():]), m.group(3)
    return default_time, line, None


def parse_syslog(line: str, *, default_time: float, now: float | None = None,
                 tz: tzinfo | None = None) -> tuple[float, str, str | None, int | None]:
    """A line of a syslog file: (time, message, program, facility).

    Unlike :func:`parse_line` (which also reads QEMU's own lines), the program is
    whatever the header names (None without a syslog header), and the facility
    is known when the file's format carries the priority (``<PRI>`` first, as
    rsyslog templates with ``%PRI%`` write it), else None.
    """
    line = line.rstrip("\r\n")
    facility = None
    pm = _PRI.match(line)
    if pm:
        pri = int(pm.group(1))
        facility = pri >> 3 if pri <= 191 else None
        line = line[pm.end():]
    m = _ISO.match(line)
    if m:
        ts = _parse_iso(m.group(1), tz) or default_time
        rest = line[m.end():]
        sm = _HOST_PROG.match(rest)
        if not sm:
            return ts, _KTIME.sub("", rest), None, facility
        return ts, _KTIME.sub("", rest[sm.end():]), sm.group(2), facility
    m = _SYSLOG.match(line)
    if m:
        ts = _syslog_ts(m.group(1), now=time.time() if now is None else now, tz=tz, year=None)
        return (default_time if ts is None else ts), _KTIME.sub("", line[m.end():]), m.group(3), facility
    return default_time, line, None, facility


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


def parse_journal_entry(text: str) -> dict | None:
    """One line of ``journalctl -o json`` → {cursor, seqnum_id, seqnum, time, message, transport, boot}, or None.

    ``_TRANSPORT`` is a trusted field: journald sets it, a client cannot (``kernel``
    only for what it read from /dev/kmsg). ``MESSAGE`` is a string, or an array of
    byte values when it is not valid UTF-8. The sequence number and its id come
    from the cursor (``s=...;i=<hex>;...``): together they name the entry for good.
    """
    try:
        e = json.loads(text)
    except ValueError:
        return None
    if not isinstance(e, dict):
        return None
    cursor, msg = e.get("__CURSOR"), e.get("MESSAGE")
    if not isinstance(cursor, str):
        return None
    if isinstance(msg, list) and all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b < 256 for b in msg):
        msg = bytes(msg).decode("utf-8", "replace")
    if not isinstance(msg, str):
        return None
    fields = dict(kv.split("=", 1) for kv in cursor.split(";") if "=" in kv)
    try:
        seqnum = int(fields.get("i", ""), 16)
    except ValueError:
        return None
    rt = e.get("__REALTIME_TIMESTAMP")
    try:
        ts = int(rt) / 1e6 if isinstance(rt, (str, int)) and not isinstance(rt, bool) else None
    except ValueError:
        ts = None
    transport, boot = e.get("_TRANSPORT"), e.get("_BOOT_ID")
    return {"cursor": cursor, "seqnum_id": fields.get("s", ""), "seqnum": seqnum, "time": ts,
            "message": msg.split("\n", 1)[0], "transport": transport if isinstance(transport, str) else None,
            "boot": boot if isinstance(boot, str) else None}
