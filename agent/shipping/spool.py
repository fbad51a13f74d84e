"""The durable spool: every document is written here before anything ships it.

Layout of ``spool_dir``::

    seg-0000000000000001.ndjson   append-only segments, one record per line
    seg-0000000000000002.ndjson   (the highest number is the one being written)
    state.json                    acknowledged position + counters, replaced atomically
    dead-letter.ndjson            documents the cluster refused, with the reason

A record is one line: a small JSON header ``{"i": id, "x": data stream,
"t": append time}``, a TAB, the document's JSON (compact JSON never holds a
raw TAB), so the shipper passes the document bytes to the bulk body as they
are.

Guarantees:
  * a record handed to :meth:`Spool.append` is on disk (fsync per batch by
    default) before the call returns; the collection cycle only ever appends;
  * the acknowledged position (segment, byte offset) is persisted with
    write-to-temp + fsync + rename, so after ``kill -9`` the reader resumes at
    the last acknowledged batch: records after it are shipped again and
    collapse on their deterministic ids (at-least-once + idempotent = once);
  * a torn last line (crash during a write) is skipped and counted
    (``corrupt``), never shipped half;
  * the spool is bounded: when the segments exceed ``max_bytes`` the oldest
    segment is deleted and the records in it that were not yet handed to the
    shipper are counted in ``dropped`` (persisted). Records already handed to
    the shipper stay in its memory until delivered.

Thread model: one appender (the snapshot consumer), one reader (the shipper);
a lock guards the shared positions. All I/O is plain files: no database.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from agent.fsutil import set_aside, write_atomic

log = logging.getLogger(__name__)

SEG_PREFIX = "seg-"
SEG_SUFFIX = ".ndjson"


def _seg_name(n: int) -> str:
    return f"{SEG_PREFIX}{n:016d}{SEG_SUFFIX}"


def _seg_number(name: str) -> int | None:
    if not (name.startswith(SEG_PREFIX) and name.endswith(SEG_SUFFIX)):
        return None
    core = name[len(SEG_PREFIX) : -len(SEG_SUFFIX)]
    return int(core) if core.isdigit() else None


@dataclass
class Record:
    id: str
    index: str
    line: bytes  # the document's JSON, as stored
    t: float = 0.0  # when it was appended

    def doc(self):
        try:
            return json.loads(self.line)
        except ValueError:
            return self.line.decode("utf-8", "replace")


@dataclass
class Batch:
    records: list[Record]
    end: tuple[int, int]  # (segment, offset) just after the last record
    corrupt: int = 0


_HEAD = json.JSONEncoder(separators=(",", ":"))  # json.dumps(..., separators=(",", ":"))
_BODY = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)


def _body_encoder():
    """``_BODY.encode`` without its per-call set-up: JSONEncoder.encode builds a new C encoder for every
    document; this one is built once. Documents are trees the builders make (no circular check). Used
    only where the C encoder exists and writes exactly what ``_BODY`` writes, else ``_BODY.encode``."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return _BODY.encode
    try:
        enc = make(None, str, json.encoder.encode_basestring, None, ":", ",", False, False, True)
        probe = {"a": [1, -2.5, 1e300, None, True, "é\"\n\u2028"], "b": {"c": float("inf"), "d": ()}, "e": Path("/x")}
        if "".join(enc(probe, 0)) != _BODY.encode(probe):
            return _BODY.encode
    except Exception:
        return _BODY.encode
    join = "".join
    return lambda doc: join(enc(doc, 0))


_encode_body = _body_encoder()
_ascii = json.encoder.encode_basestring_ascii  # what _HEAD writes for a str (C where available)


@dataclass
class SpoolStats:
    appended: int = 0  # since start
    dropped: int = 0  # persisted: records deleted unshipped because the spool was full
    corrupt: int = 0  # persisted: torn/unreadable lines skipped
    acked: int = 0  # since start: records acknowledged (shipped or set aside)
    write_errors: int = 0  # since start: appends that failed (disk full, read-only, I/O error)
    state_errors: int = 0  # since start: saves of state.json that failed (retried on the next ack)
    extra: dict = field(default_factory=dict)


class Spool:
    def __init__(self, directory: str | os.PathLike, max_bytes: int, fsync: str = "batch", segment_bytes: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.fsync = fsync
        # at least 8 segments fit in the cap, so dropping one frees a bounded slice
        self.segment_bytes = segment_bytes or max(16 * 1024, min(8 * 1024 * 1024, max_bytes // 8))
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.stats = SpoolStats()
        self._state_path = self.dir / "state.json"
        st = self._load_state()
        self._ack: tuple[int, int] = (st.get("segment", 0), st.get("offset", 0))
        self.stats.dropped = st.get("dropped", 0)
        self.stats.corrupt = st.get("corrupt", 0)
        self._segs: dict[int, int] = {}  # segment -> size in bytes
        for p in self.dir.iterdir():
            n = _seg_number(p.name)
            if n is not None:
                self._segs[n] = p.stat().st_size
        # never append to a segment a previous process may have torn: start a new one
        self._cur = max(max(self._segs, default=0), self._ack[0]) + 1
        if not self._segs or self._ack[0] < min(self._segs):
            # the acknowledged segment is gone (fully shipped, dropped, or removed by hand)
            self._ack = (min(self._segs, default=self._cur), 0)
        self._read = self._ack  # handed to the reader up to here
        self._created: set[int] = set()  # segments this process created (directory entry synced)
        self._state_dirty = False  # the acknowledged position in memory is newer than state.json
        self.last_write_ok = True  # the last append (or state save) reached the disk
        self._pending = self._count_after(self._ack)

    # -- state -----------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            st = json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("spool state %s unreadable (%s): starting from the oldest segment", self._state_path, e)
            set_aside(self._state_path, "spool")
            return {}
        if not isinstance(st, dict) or not all(
            isinstance(st.get(k, 0), int) and not isinstance(st.get(k, 0), bool) and st.get(k, 0) >= 0
            for k in ("segment", "offset", "dropped", "corrupt")
        ):
            log.warning("spool state %s has the wrong shape (%.80r): starting from the oldest segment",
                        self._state_path, st)
            set_aside(self._state_path, "spool")
            return {}
        return st

    def _save_state(self) -> None:
        body = {
            "segment": self._ack[0],
            "offset": self._ack[1],
            "dropped": self.stats.dropped,
            "corrupt": self.stats.corrupt,
            "saved_at": time.time(),
        }
        try:
            write_atomic(self._state_path, json.dumps(body).encode())
        except OSError as e:
            # disk full or read-only: the position stays in memory and is saved by a later ack;
            # a crash before then only replays more (the documents collapse on their ids)
            if not self._state_dirty:
                log.warning("spool: cannot save %s (%s): will retry", self._state_path, e.strerror or e)
            self._state_dirty = True
            self.stats.state_errors += 1
            self.last_write_ok = False
            return
        self._state_dirty = False

    # -- appending -------------------------------------------------------
    def append(self, records: list[tuple[str, str, dict]]) -> int:
        """Write ``(id, data stream, document)`` records durably. Returns bytes written."""
        if not records:
            return 0
        now = round(time.time(), 3)
        # the head {"i":id,"x":stream,"t":now} as _HEAD.encode writes it, put together from its parts
        head, body, asc, tail = _HEAD.encode, _encode_body, _ascii, ',"t":' + repr(now) + "}\t"
        streams: dict[str, str] = {}
        lines = []
        for i, x, d in records:
            if type(i) is str and type(x) is str:
                xs = streams.get(x)
                if xs is None:
                    xs = streams[x] = ',"x":' + asc(x)
                lines.append(('{"i":' + asc(i) + xs + tail + body(d) + "\n").encode())
            else:
                lines.append((head({"i": i, "x": x, "t": now}) + "\t" + body(d) + "\n").encode())
        with self._cond:
            total = 0
            try:
                i = 0
                while i < len(lines):
                    # the lines that go to the current segment
                    size = self._segs.get(self._cur, 0)
                    if size > 0 and size + len(lines[i]) > self.segment_bytes:
                        self._roll()
                        size = 0
                    j = i
                    while j < len(lines) and (j == i or size + len(lines[j]) <= self.segment_bytes):
                        size += len(lines[j])
                        j += 1
                    total += self._write_segment(lines[i:j])
                    self.stats.appended += j - i
                    self._pending += j - i
                    i = j
            except OSError:
                self.stats.write_errors += 1
                self.last_write_ok = False
                raise
            finally:
                if total:
                    self._enforce_cap()
                    self._cond.notify_all()
            self.last_write_ok = not self._state_dirty
        return total

    def _write_segment(self, lines: list[bytes]) -> int:
        """Append whole lines to the current segment, all or nothing.

        The segment is opened for this call only, so no file of the spool stays
        open for writing between cycles (an administrator can remount the
        file system read-only), and a failed open or write leaves nothing
        half-done behind: the next call simply tries again.
        """
        path = self.dir / _seg_name(self._cur)
        good = self._segs.get(self._cur, 0)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            try:
                for chunk in (lines if self.fsync == "always" else [b"".join(lines)]):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
                    if self.fsync == "always":
                        os.fsync(fd)
                if self.fsync == "batch":
                    os.fsync(fd)
            except OSError:
                # take back what a partial write left, so the next record starts on a clean line;
                # if even that fails, write elsewhere: the reader never reads past the known size
                try:
                    os.ftruncate(fd, good)
                except OSError:
                    self._roll()
                raise
        finally:
            os.close(fd)
        written = sum(len(ln) for ln in lines)
        self._segs[self._cur] = good + written
        if self._cur not in self._created:
            self._created.add(self._cur)
            self._sync_dir()
        return written

    def _sync_dir(self) -> None:
        try:
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as e:
            log.debug("spool: cannot fsync %s: %s", self.dir, e)

    def _roll(self) -> None:
        """Later appends go to a new segment (nothing to open or close here: it cannot fail)."""
        if self._segs.get(self._cur, 0) > 0 or (self.dir / _seg_name(self._cur)).exists():
            self._segs.setdefault(self._cur, 0)
            self._cur += 1

    def _enforce_cap(self) -> None:
        changed = False
        while sum(self._segs.values()) > self.max_bytes and len(self._segs) > 1:
            oldest = min(self._segs)
            if oldest == self._cur:
                self._roll()
                continue
            path = self.dir / _seg_name(oldest)
            unread = 0
            if self._read[0] <= oldest:
                start = self._read[1] if self._read[0] == oldest else 0
                try:
                    with open(path, "rb") as f:
                        f.seek(start)
                        unread = f.read().count(b"\n")
                except FileNotFoundError:
                    unread = 0
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("spool full but cannot delete %s: %s", path.name, e.strerror or e)
                break
            size = self._segs.pop(oldest)
            self.stats.dropped += unread
            self._pending -= unread
            log.warning("spool full (%d bytes > %d): dropped segment %d (%d bytes, %d unshipped documents)",
                        size + sum(self._segs.values()), self.max_bytes, oldest, size, unread)
            nxt = (oldest + 1, 0)
            if self._read <= (oldest, 1 << 62):
                self._read = max(self._read, nxt)
            if self._ack <= (oldest, 1 << 62):
                self._ack = max(self._ack, nxt)
            changed = True
        if changed:
            self._save_state()

    # -- reading ---------------------------------------------------------
    def wait(self, timeout: float) -> bool:
        """Block until there is something unread, or ``timeout``. True if there is."""
        with self._cond:
            if self._has_unread():
                return True
            self._cond.wait(timeout)
            return self._has_unread()

    def _has_unread(self) -> bool:
        seg, off = self._read
        for n in sorted(self._segs):
            if n > seg and self._segs[n] > 0:
                return True
            if n == seg and self._segs[n] > off:
                return True
        return False

    def read_batch(self, max_docs: int, max_bytes: int) -> Batch | None:
        """The next unread records (complete lines only), marked as handed out."""
        with self._lock:
            records: list[Record] = []
            corrupt = 0
            size = 0
            seg, off = self._read
            for n in sorted(s for s in self._segs if s >= seg):
                if n > seg:
                    seg, off = n, 0
                path = self.dir / _seg_name(n)
                sealed = n != self._cur
                try:
                    with open(path, "rb") as f:
                        f.seek(off)
                        data = f.read(max(0, self._segs[n] - off))
                except FileNotFoundError:
                    continue
                pos = 0
                while len(records) < max_docs and size < max_bytes:
                    nl = data.find(b"\n", pos)
                    if nl < 0:
                        if sealed and pos < len(data):
                            # a torn last line from a crash: skip it, count it
                            corrupt += 1
                            log.warning("spool: skipping torn record at %s offset %d", path.name, off + pos)
                            pos = len(data)
                        break
                    raw = data[pos:nl]
                    pos = nl + 1
                    try:
                        head, tab, body = raw.partition(b"\t")
                        if not tab or not body:
                            raise ValueError("no document")
                        obj = json.loads(head)
                        rec = Record(str(obj["i"]), str(obj["x"]), body, float(obj.get("t", 0)))
                    except (ValueError, KeyError, TypeError):
                        corrupt += 1
                        log.warning("spool: unreadable record at %s offset %d", path.name, off + pos)
                        continue
                    records.append(rec)
                    size += len(raw)
                off += pos
                if len(records) >= max_docs or size >= max_bytes:
                    break
                if not sealed:
                    break
            if not records and (seg, off) == self._read and not corrupt:
                return None
            self._read = (seg, off)
            if corrupt:
                self.stats.corrupt += corrupt
                self._pending -= corrupt
            return Batch(records, (seg, off), corrupt)

    def ack(self, batch: Batch) -> None:
        """The batch is resolved (shipped or set aside): persist the position, free whole segments."""
        with self._lock:
            if batch.end > self._ack:
                self._ack = batch.end
            self.stats.acked += len(batch.records)
            self._pending -= len(batch.records)
            for n in [s for s in self._segs if s < self._ack[0] and s != self._cur]:
                try:
                    (self.dir / _seg_name(n)).unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:  # read-only for now: a later ack deletes it
                    log.debug("spool: cannot delete %s yet: %s", n, e)
                    continue
                self._segs.pop(n, None)
            self._save_state()

    def rewind(self) -> None:
        """Forget what was handed out and not acknowledged (it will be read again)."""
        with self._lock:
            self._read = max(self._ack, (min(self._segs, default=self._cur), 0))

    # -- numbers ---------------------------------------------------------
    def bytes_on_disk(self) -> int:
        with self._lock:
            return sum(self._segs.values())

    def _count_after(self, pos: tuple[int, int]) -> int:
        total = 0
        for n in sorted(self._segs):
            if n < pos[0]:
                continue
            try:
                with open(self.dir / _seg_name(n), "rb") as f:
                    f.seek(pos[1] if n == pos[0] else 0)
                    total += f.read().count(b"\n")
            except FileNotFoundError:
                pass
        return total

    def pending(self) -> int:
        """Records written and not yet acknowledged (shipped or set aside)."""
        with self._lock:
            return max(0, self._pending)

    def oldest_pending_time(self) -> float | None:
        """When the oldest unacknowledged record was appended (UNIX time), or None."""
        with self._lock:
            for n in sorted(self._segs):
                if n < self._ack[0]:
                    continue
                try:
                    with open(self.dir / _seg_name(n), "rb") as f:
                        f.seek(self._ack[1] if n == self._ack[0] else 0)
                        line = f.readline()
                except FileNotFoundError:
                    continue
                if line.endswith(b"\n"):
                    try:
                        return float(json.loads(line.partition(b"\t")[0])["t"])
                    except (ValueError, KeyError, TypeError):
                        return None
            return None

    def close(self) -> None:
        """Save the position if a disk fault kept it from being saved. Never raises."""
        with self._lock:
            if self._state_dirty:
                self._save_state()
