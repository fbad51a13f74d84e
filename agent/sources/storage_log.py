"""Storage-path log lines as events: QEMU per-VM logs, kernel and iscsid messages.

Sources (all optional; a host without them is "no data"):

* ``/var/log/libvirt/qemu/<vm>.log`` (``storage_log.qemu_logs`` globs): what
  QEMU's libiscsi driver prints (``block/iscsi.c``): ``iSCSI: NOP timeout.
  Reconnecting...``, ``iSCSI: failed to sent NOP-Out. Disabling NOP
  messages.``, ``iSCSI CheckCondition: SENSE KEY:UNIT_ATTENTION(6)
  ASCQ:BUS_RESET(0x2900)``, ``iSCSI Failure: ...`` and I/O errors. libvirt
  starts QEMU with ``-msg timestamp=on``, so lines usually start with an
  RFC 3339 time; the VM is the file's name.
* the kernel initiator (``connection2:0: detected conn error (1020)``,
  ``ping timeout of 15 secs expired``, ``session3: session recovery timed
  out after 120 secs``, ``I/O error, dev sdb``), from a source no local user
  can write to (``storage_log.kernel_source: auto``): ``/dev/kmsg`` when
  readable, else the systemd journal (``journalctl -k -o json``; only
  entries whose trusted ``_TRANSPORT`` is ``kernel``), and only when neither
  is there the ``kernel:`` lines of the syslog files (``kernel_logs``),
  which anyone can forge with ``logger -t kernel`` (a warning says so; a
  line carrying ``<PRI>`` must have facility kern).
* dm-multipath: the kernel's ``device-mapper: multipath: 253:0: Failing path
  8:16.`` / ``Reinstating path`` (from the kernel source above) and
  multipathd's ``checker failed path 8:16 in map mpatha``, ``mpatha:
  remaining active paths: 1``, ``Entering recovery mode`` (queueing with no
  path), ``sdb: reinstated`` from the syslog files (forgeable, like iscsid's).
* iscsid (``Kernel reported iSCSI connection 2:0 error (1020 -
  ISCSI_ERR_TCP_CONN_CLOSE: ...)``, ``connection2:0 is operational after
  recovery (1 attempts)``, ``can't bind conn 3:0 to session 3``) from the
  syslog files: a user-space program's lines, forgeable like any syslog line.

Times: RFC 3339 keeps its offset; classic syslog times are local time, the
year the one not more than a day ahead of now (storage_log_parse).

Bounds: a line over 1 MiB is skipped (``dropped["line_too_long"]``), at most
``max_events`` events per cycle (the rest ``dropped["event_cap"]``; their
positions move on all the same, they are never read again); kernel-tagged
syslog lines of another facility are ``dropped["untrusted_kernel_line"]``.

Read positions: per file (device, inode, generation, byte offset, and a
fingerprint of the first line) in ``storage_log.state_dir/positions.json``,
written atomically, by the agent only (``kvmscope run`` builds its sources
with ``SourceContext.owns_state``, i.e. ``persist_positions``; CLI commands
that collect in-process start from the saved positions and never move them). A cycle's new positions are persisted at the start of the
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

Cost: one ``stat`` per file per cycle, and reads of what was appended; ``/dev/kmsg``
is kept open, so a cycle reads only the records logged since the last one.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

from agent.errors import NoData
from agent.records.storage_log import StorageLogEvent, StorageLogEvents
from agent.sources import SourceContext, register
from agent.sources.storage_log_parse import classify, parse_journal_entry, parse_kmsg, parse_line, parse_syslog
from agent.sources.storage_log_tail import FileTailer

__all__ = ["StorageLogSource", "StorageLogEvent", "classify", "parse_kmsg", "parse_line", "parse_syslog",
           "parse_journal_entry", "KERN_FACILITY"]

log = logging.getLogger(__name__)

KERN_FACILITY = 0  # syslog facility "kern"
_JOURNAL_TIMEOUT = 3.0  # seconds for one journalctl run


def _kmsg_readable() -> bool:
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError:
        return False
    return True


def _journal_available() -> bool:
    """journald runs (its socket directory exists) and journalctl is installed."""
    return shutil.which("journalctl") is not None and os.path.isdir("/run/systemd/journal")


@register("storage_log", description="storage-path log lines: QEMU per-VM logs (libiscsi), kernel and iscsid messages")
class StorageLogSource:
    def __init__(self, ctx: SourceContext, persist_positions: bool | None = None):
        self.cfg = ctx.config.storage_log
        self.paths = ctx.paths
        # Only the agent (`kvmscope run`, SourceContext.owns_state) moves the saved read positions: CLI commands
        # that collect in-process start from them and never move them, so they never make the agent skip a line.
        self.persist_positions = ctx.owns_state if persist_positions is None else persist_positions
        self._tailer: FileTailer | None = None
        self._kmsg_warned = False
        # /dev/kmsg stays open across cycles: each read(2) returns the next record after the last one read, so a
        # cycle reads only what the kernel logged since (opened afresh, it starts at the ring buffer's oldest
        # record, and every cycle parsed the whole ring again just to skip it: ~1,500 records on a busy host)
        self._kmsg_fd: int | None = None
        self._files_warned = False
        self.kernel_source: str | None = None  # kmsg | journal | files, chosen at the first cycle (auto)
        self.dropped: dict[str, int] = {}

    def _open(self) -> FileTailer:
        if self._tailer is None:
            self._tailer = FileTailer(Path(self.cfg.state_dir) / "positions.json", self.cfg.start_at_end, self.cfg.max_lines)
        return self._tailer

    def _count(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n

    def _choose_kernel_source(self) -> str:
        """Where kernel messages come from: the first that no local user can write to."""
        want = self.cfg.kernel_source
        if want != "auto":
            return want
        if self.cfg.kmsg is not False and _kmsg_readable():
            return "kmsg"
        if _journal_available():
            return "journal"
        if not self._files_warned:
            self._files_warned = True
            log.warning("storage_log: neither /dev/kmsg nor the systemd journal is readable: kernel lines are taken "
                        "from syslog files, where any local user can write one (logger -t kernel)")
        return "files"

    def collect(self) -> StorageLogEvents:
        t = self._open()
        # the previous cycle's events have been consumed by now: make its positions durable
        self._save()
        first_start = t.fresh and self.cfg.start_at_end
        if self.kernel_source is None or self.cfg.kernel_source != "auto":
            self.kernel_source = self._choose_kernel_source()
        ksrc = self.kernel_source
        qemu = sorted({p for g in self.cfg.qemu_logs for p in glob.glob(g)})
        kern = [p for p in self.cfg.kernel_logs if os.path.isfile(p)]
        if not qemu and not kern and ksrc == "files":
            # files that appear from now on are new: read them from their start
            if t.fresh:
                t.fresh, t._dirty = False, True
            raise NoData("no QEMU logs match storage_log.qemu_logs and no kernel log file is present")
        now = time.time()
        events: list[StorageLogEvent] = []
        qset = set(qemu)
        long_before = t.long_lines
        raw = t.poll(qemu + kern)
        self._count("line_too_long", t.long_lines - long_before)
        for path, fid, off, line in raw:
            text = line.decode("utf-8", "replace")
            base = next((q for q in qemu if path == q or path.startswith(q + ".")), path)
            if base in qset:
                ts, msg, _prog = parse_line(text, default_time=now, now=now)
                c = classify(msg)
                if c is None:
                    continue
                events.append(StorageLogEvent(time=ts, message=msg.strip(), origin="qemu", path=path, offset=off,
                                              file_id=fid, vm=Path(base).name.removesuffix(".log"), **c))
                continue
            ts, msg, prog, facility = parse_syslog(text, default_time=now, now=now)
            if prog not in ("kernel", "iscsid", "multipathd"):
                continue  # a line of some other program (or none) that merely says "I/O error"
            c = classify(msg)
            if c is None:
                continue
            if prog == "kernel":
                if ksrc != "files":
                    continue  # the kernel's own ring (or the journal's trusted copy of it) is read instead
                if facility is not None and facility != KERN_FACILITY:
                    self._count("untrusted_kernel_line")  # a user's `logger -t kernel`: not the kernel's facility
                    continue
            events.append(StorageLogEvent(time=ts, message=msg.strip(), origin=prog, path=path, offset=off,
                                          file_id=fid, **c))
        if ksrc == "kmsg":
            events.extend(self._kmsg(t, now, skip_existing=first_start))
        elif ksrc == "journal":
            events.extend(self._journal(t, skip_existing=first_start))
        cap = self.cfg.max_events
        if len(events) > cap:
            # the positions have moved past these lines already: they are counted, never read again
            self._count("event_cap", len(events) - cap)
            events = events[:cap]
        return StorageLogEvents(events=tuple(events), files=len(qemu) + len(kern), lines_read=len(raw))

    def _boot_id(self) -> str:
        try:
            return self.paths.read_text(self.paths.proc("sys", "kernel", "random", "boot_id")).strip()
        except OSError:
            return ""

    def _kmsg(self, t: FileTailer, now: float, skip_existing: bool = False) -> list[StorageLogEvent]:
        """New kernel messages since the saved sequence number of this boot (all of them after a reboot)."""
        boot = self._boot_id()
        last = t.kmsg.get("seq", -1) if t.kmsg.get("boot") == boot else -1
        out = []
        fd = self._kmsg_fd
        if fd is None:
            try:
                fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
            except OSError as e:
                if not self._kmsg_warned:  # once: it stays so until the agent is restarted with CAP_SYSLOG
                    self._kmsg_warned = True
                    log.warning("storage_log: cannot read /dev/kmsg (%s): kernel iSCSI messages are not collected "
                                "(needs CAP_SYSLOG when kernel.dmesg_restrict=1; set storage_log.kernel_source to "
                                "journal or files to use another source)", e)
                return out
            self._kmsg_fd = fd
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
        except BaseException:
            self._close_kmsg()  # opened again (from the oldest record, the saved seq skipping what was read) next cycle
            raise
        if top != last:
            t.kmsg = {"boot": boot, "seq": top}
            t._dirty = True
        return out

    def _close_kmsg(self) -> None:
        fd, self._kmsg_fd = self._kmsg_fd, None
        if fd is not None:
            os.close(fd)

    def _journal(self, t: FileTailer, skip_existing: bool = False) -> list[StorageLogEvent]:
        """New kernel entries of the systemd journal (``journalctl -k -o json``) after the saved cursor.

        Only entries whose trusted ``_TRANSPORT`` is ``kernel`` count; a cursor from
        another boot is not "after" anything of this one, so this boot is read whole.
        At most ``max_lines`` entries and ``_JOURNAL_TIMEOUT`` seconds per cycle: the
        cursor moves to the last entry read, the rest comes next cycle (never stuck).
        """
        cursor = t.kmsg.get("cursor") if isinstance(t.kmsg.get("cursor"), str) else None
        cmd = ["journalctl", "-k", "-o", "json", "--no-pager", "-q"]
        if skip_existing:
            cmd += ["-n", "1"]  # only the newest entry's cursor: what is already there is not replayed
        elif cursor is not None:
            cmd += [f"--after-cursor={cursor}"]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError as e:
            if not self._kmsg_warned:
                self._kmsg_warned = True
                log.warning("storage_log: cannot run journalctl (%s): kernel iSCSI messages are not collected", e)
            return []
        timer = threading.Timer(_JOURNAL_TIMEOUT, proc.kill)
        timer.start()
        out = []
        last = None
        n = 0
        try:
            for raw in proc.stdout:
                e = parse_journal_entry(raw.decode("utf-8", "replace"))
                if e is None:
                    continue
                last = e["cursor"]
                n += 1
                if not skip_existing and e["transport"] == "kernel":
                    c = classify(e["message"])
                    if c:
                        out.append(StorageLogEvent(time=e["time"] or time.time(), message=e["message"].strip(),
                                                   origin="kernel", path="journal", offset=e["seqnum"],
                                                   file_id=f"journal:{e['seqnum_id']}", **c))
                if n >= self.cfg.max_lines:
                    break
        finally:
            timer.cancel()
            proc.kill()
            proc.stdout.close()
            proc.wait()
        if last is not None and last != cursor:
            t.kmsg = {"cursor": last}
            t._dirty = True
        return out

    def _save(self) -> None:
        if self.persist_positions:
            self._tailer.save()

    def close(self) -> None:
        self._close_kmsg()
        if self._tailer is not None:
            try:
                self._save()
            except OSError:
                log.exception("storage_log: cannot save read positions")
