"""Storage-path log lines as events: QEMU per-VM logs, kernel and iscsid messages.

Sources (all optional; a host without them is "no data"):

* ``/var/log/libvirt/qemu/<vm>.log`` (``storage_log.qemu_logs`` globs): what
  QEMU's libiscsi driver prints (``block/iscsi.c``): ``iSCSI: NOP timeout.
  Reconnecting...``, ``iSCSI: failed to sent NOP-Out. Disabling NOP
  messages.``, ``iSCSI CheckCondition: SENSE KEY:UNIT_ATTENTION(6)
  ASCQ:BUS_RESET(0x2900)``, ``iSCSI Failure: ...`` and I/O errors. libvirt
  starts QEMU with ``-msg timestamp=on``, so lines usually start with an
  RFC 3339 time; the VM is the file's name.
* syslog-style files (``storage_log.kernel_logs``) and optionally
  ``/dev/kmsg``: the kernel initiator (``connection2:0: detected conn error
  (1020)``, ``ping timeout of 15 secs expired``, ``session3: session
  recovery timed out after 120 secs``, ``I/O error, dev sdb``) and iscsid
  (``Kernel reported iSCSI connection 2:0 error (1020 -
  ISCSI_ERR_TCP_CONN_CLOSE: ...)``, ``connection2:0 is operational after
  recovery (1 attempts)``, ``can't bind conn 3:0 to session 3``).

Read positions: per file (device, inode, generation, byte offset, and a
fingerprint of the first line) in ``storage_log.state_dir/positions.json``,
written atomically, by the agent only (``kvmscope run``; CLI commands that
collect in-process start from the saved positions and never move them). A cycle's new positions are persisted at the start of the
next cycle (and on close), i.e. after the agent's snapshot consumers (the
spool) have stored that cycle's events: a crash in between re-reads those
lines, and their ids (file identity + offset) collapse the repeat.

Rotation: ``copytruncate`` (Debian's libvirtd.qemu logrotate) is seen as a
file shorter than the saved offset; the unread tail is then read from the
rotated copy ``<file>.1`` when its first line matches. Rename-and-create is
seen as a new inode on the path; the old inode's tail is read from whichever
sibling (``<file>.*``) has that inode. A line without its newline yet is left
for the next cycle. Files that appear after the first cycle are read from
their start; files present at the very first start are read from their end
(``start_at_end``), so installing the agent does not replay old history.

Cost: one ``stat`` per file per cycle, and reads of what was appended.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from agent.errors import NoData
from agent.sources import SourceContext, register

log = logging.getLogger(__name__)

# Only the agent (`kvmscope run`) owns the read positions and sets this; CLI
# commands that collect in-process read from the saved positions but never
# move them, so a CLI run can never make the agent skip unshipped lines.
persist_positions = False


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


# --------------------------------------------------------------------------
# parsers (pure)

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


# --------------------------------------------------------------------------
# reading with durable positions


def _fingerprint(first_line: bytes) -> str:
    return hashlib.blake2b(first_line, digest_size=8).hexdigest()


def _first_line(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            line = f.readline(4096)
    except OSError:
        return None
    return line if line.endswith(b"\n") else None


def _set_aside(path: Path) -> None:
    """Keep an unusable positions file for a human, out of the way of the next save."""
    bad = path.with_name(f"{path.name}.bad-{int(time.time())}")
    try:
        os.replace(path, bad)
        log.warning("storage_log: kept the unusable %s as %s", path.name, bad.name)
    except OSError as e:
        log.warning("storage_log: cannot rename the unusable %s: %s", path, e.strerror or e)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _valid_positions(data) -> tuple[dict | None, dict]:
    """``(files, kmsg)`` from a positions file, or ``(None, {})`` when its shape is not ours.

    Entries of the wrong shape inside a good file are dropped (that file is read
    as new); a document of the wrong shape as a whole is refused.
    """
    if not isinstance(data, dict) or not isinstance(data.get("files", {}), dict):
        return None, {}
    files = {}
    for path, p in data.get("files", {}).items():
        if (isinstance(p, dict) and all(_is_count(p.get(k)) for k in ("dev", "ino", "gen", "offset"))
                and isinstance(p.get("fp"), (str, type(None)))):
            files[path] = p
        else:
            log.warning("storage_log: dropping the saved position of %s (wrong shape: %.80r)", path, p)
    kmsg = data.get("kmsg", {})
    if not (isinstance(kmsg, dict) and isinstance(kmsg.get("boot", ""), str) and isinstance(kmsg.get("seq", 0), int)):
        kmsg = {}
    return files, kmsg


class FileTailer:
    """Positions over many files; ``poll`` returns new complete lines with their (file_id, offset)."""

    def __init__(self, state_path: Path, start_at_end: bool, max_lines: int):
        self.state_path = state_path
        self.start_at_end = start_at_end
        self.max_lines = max_lines
        self.pos: dict[str, dict] = {}
        self.fresh = True
        self.kmsg: dict = {}
        try:
            data = json.loads(state_path.read_text())
        except FileNotFoundError:
            data = FileNotFoundError
        except (OSError, ValueError) as e:
            log.warning("storage_log: positions %s unreadable (%s); starting at the end of each file", state_path, e)
            _set_aside(state_path)
            data = FileNotFoundError
        if data is not FileNotFoundError:
            files, kmsg = _valid_positions(data)
            if files is None:
                log.warning("storage_log: positions %s have the wrong shape (%.80r); starting at the end of each file",
                            state_path, data)
                _set_aside(state_path)
            else:
                self.pos, self.kmsg, self.fresh = files, kmsg, False
        self._dirty = False

    def save(self) -> None:
        if not self._dirty or not persist_positions:
            return
        from agent.shipping.spool import write_atomic

        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.state_path, json.dumps({"files": self.pos, "kmsg": self.kmsg}).encode())
        self._dirty = False

    def _read_from(self, path: str, st_id: str, offset: int, limit: int) -> tuple[list[tuple[int, bytes]], int]:
        """Complete lines from ``offset``: [(offset, line)], new offset."""
        out = []
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                while len(out) < limit:
                    line = f.readline(1 << 20)
                    if not line or not line.endswith(b"\n"):
                        break
                    out.append((offset, line))
                    offset += len(line)
        except OSError as e:
            log.debug("storage_log: cannot read %s: %s", path, e)
        return out, offset

    def _old_inode_sibling(self, path: str, dev: int, ino: int) -> str | None:
        for cand in sorted(glob.glob(glob.escape(path) + ".*")):
            try:
                st = os.stat(cand)
            except OSError:
                continue
            if st.st_dev == dev and st.st_ino == ino:
                return cand
        return None

    def poll(self, paths: list[str]) -> list[tuple[str, str, int, bytes]]:
        """New lines of every file: [(path, file_id, offset, line)]."""
        out: list[tuple[str, str, int, bytes]] = []
        for path in paths:
            try:
                st = os.stat(path)
            except OSError:
                continue
            p = self.pos.get(path)
            first = _first_line(path)
            fp = _fingerprint(first) if first is not None else None
            if p is None:
                start = st.st_size if (self.fresh and self.start_at_end) else 0
                if start:
                    # just after the last complete line: never start in the middle of one
                    with open(path, "rb") as f:
                        f.seek(max(0, start - 65536))
                        chunk = f.read(start - max(0, start - 65536))
                    nl = chunk.rfind(b"\n")
                    start = start - len(chunk) + nl + 1 if nl >= 0 else start
                p = {"dev": st.st_dev, "ino": st.st_ino, "gen": 0, "offset": start, "fp": fp}
                self.pos[path] = p
                self._dirty = True
            elif (p["dev"], p["ino"]) != (st.st_dev, st.st_ino):
                # renamed away and re-created: finish the old inode where it now lives
                old = self._old_inode_sibling(path, p["dev"], p["ino"])
                if old:
                    fid = f"{p['dev']}:{p['ino']}:{p['gen']}"
                    lines, _ = self._read_from(old, fid, p["offset"], self.max_lines)
                    out.extend((old, fid, o, ln) for o, ln in lines)
                p = {"dev": st.st_dev, "ino": st.st_ino, "gen": 0, "offset": 0, "fp": fp}
                self.pos[path] = p
                self._dirty = True
            elif st.st_size < p["offset"] or (p.get("fp") and fp and fp != p["fp"]):
                # truncated in place (copytruncate) or replaced by a file reusing the inode
                rotated = path + ".1"
                r1 = _first_line(rotated)
                if st.st_size < p["offset"] and r1 is not None and p.get("fp") == _fingerprint(r1):
                    fid = f"{p['dev']}:{p['ino']}:{p['gen']}"
                    lines, _ = self._read_from(rotated, fid, p["offset"], self.max_lines)
                    out.extend((rotated, fid, o, ln) for o, ln in lines)
                p.update(gen=p["gen"] + 1, offset=0, fp=fp)
                self._dirty = True
            if p.get("fp") is None and fp is not None:
                p["fp"] = fp
                self._dirty = True
            fid = f"{p['dev']}:{p['ino']}:{p['gen']}"
            lines, new_off = self._read_from(path, fid, p["offset"], self.max_lines)
            if new_off != p["offset"]:
                p["offset"] = new_off
                self._dirty = True
            out.extend((path, fid, o, ln) for o, ln in lines)
        # forget files that are gone (their state would only grow)
        for gone in [k for k in self.pos if k not in paths and not os.path.exists(k)]:
            del self.pos[gone]
            self._dirty = True
        if self.fresh:
            self.fresh, self._dirty = False, True  # remembered, so a restart is not "fresh" either
        return out


@register("storage_log", description="storage-path log lines: QEMU per-VM logs (libiscsi), kernel and iscsid messages")
class StorageLogSource:
    def __init__(self, ctx: SourceContext):
        self.cfg = ctx.config.storage_log
        self.paths = ctx.paths
        self._tailer: FileTailer | None = None
        self._kmsg_warned = False
        self._pending: dict | None = None

    def _open(self) -> FileTailer:
        if self._tailer is None:
            self._tailer = FileTailer(Path(self.cfg.state_dir) / "positions.json", self.cfg.start_at_end, self.cfg.max_lines)
        return self._tailer

    def collect(self) -> StorageLogEvents:
        t = self._open()
        # the previous cycle's events have been consumed by now: make its positions durable
        t.save()
        first_start = t.fresh and self.cfg.start_at_end
        qemu = sorted({p for g in self.cfg.qemu_logs for p in glob.glob(g)})
        kern = [p for p in self.cfg.kernel_logs if os.path.isfile(p)]
        if not qemu and not kern and not self.cfg.kmsg:
            # files that appear from now on are new: read them from their start
            if t.fresh:
                t.fresh, t._dirty = False, True
            raise NoData("no QEMU logs match storage_log.qemu_logs and no kernel log file is present")
        now = time.time()
        year = datetime.now(timezone.utc).year
        events: list[StorageLogEvent] = []
        qset = set(qemu)
        raw = t.poll(qemu + kern)
        for path, fid, off, line in raw:
            text = line.decode("utf-8", "replace")
            ts, msg, prog = parse_line(text, default_time=now, year=year)
            c = classify(msg)
            if c is None:
                continue
            base = next((q for q in qemu if path == q or path.startswith(q + ".")), path)
            is_qemu = base in qset
            origin = "qemu" if is_qemu else ("iscsid" if prog == "iscsid" else "kernel")
            if not is_qemu and prog not in ("kernel", "iscsid", None):
                continue  # a syslog line from some other program that merely says "I/O error"
            vm = Path(base).name.removesuffix(".log") if is_qemu else None
            events.append(StorageLogEvent(time=ts, message=msg.strip(), origin=origin, path=path, offset=off,
                                          file_id=fid, vm=vm, **c))
        if self.cfg.kmsg and not kern:
            events.extend(self._kmsg(t, now, skip_existing=first_start))
        return StorageLogEvents(events=tuple(events), files=len(qemu) + len(kern), lines_read=len(raw))

    def _kmsg(self, t: FileTailer, now: float, skip_existing: bool = False) -> list[StorageLogEvent]:
        """New kernel messages since the saved sequence number of this boot (all of them after a reboot)."""
        try:
            boot = self.paths.read_text(self.paths.proc("sys", "kernel", "random", "boot_id")).strip()
        except OSError:
            boot = ""
        last = t.kmsg.get("seq", -1) if t.kmsg.get("boot") == boot else -1
        out = []
        try:
            fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            if not self._kmsg_warned:  # once: it stays so until the agent is restarted with CAP_SYSLOG
                self._kmsg_warned = True
                log.warning("storage_log: cannot read /dev/kmsg (%s): kernel iSCSI messages are not collected "
                            "(needs CAP_SYSLOG when kernel.dmesg_restrict=1; set storage_log.kmsg: false to silence)", e)
            return out
        top = last
        try:
            while True:
                try:
                    rec = os.read(fd, 8192)
                except BlockingIOError:
                    break
                except BrokenPipeError:  # overwritten while reading: go on with the next
                    continue
                if not rec:
                    break
                p = parse_kmsg(rec.decode("utf-8", "replace"))
                if p is None or p[0] <= last:
                    continue
                top = max(top, p[0])
                c = classify(p[1]) if not skip_existing else None
                if c:
                    out.append(StorageLogEvent(time=now, message=p[1].strip(), origin="kernel", path="/dev/kmsg",
                                               offset=p[0], file_id=f"kmsg:{boot}", **c))
        finally:
            os.close(fd)
        if top != last:
            t.kmsg = {"boot": boot, "seq": top}
            t._dirty = True
        return out

    def close(self) -> None:
        if self._tailer is not None:
            try:
                self._tailer.save()
            except OSError:
                log.exception("storage_log: cannot save read positions")
