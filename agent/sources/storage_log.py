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
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from agent.errors import NoData
from agent.records.storage_log import StorageLogEvent, StorageLogEvents
from agent.sources import SourceContext, register
from agent.sources.storage_log_parse import classify, parse_kmsg, parse_line
from agent.sources.storage_log_tail import FileTailer

log = logging.getLogger(__name__)

# Only the agent (`kvmscope run`) owns the read positions and sets this; CLI
# commands that collect in-process read from the saved positions but never
# move them, so a CLI run can never make the agent skip unshipped lines.
persist_positions = False


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
        self._save()
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

    def _save(self) -> None:
        if persist_positions:
            self._tailer.save()

    def close(self) -> None:
        if self._tailer is not None:
            try:
                self._save()
            except OSError:
                log.exception("storage_log: cannot save read positions")
