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


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file, never half."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


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


@dataclass
class SpoolStats:
    appended: int = 0  # since start
    dropped: int = 0  # persisted: records deleted unshipped because the spool was full
    corrupt: int = 0  # persisted: torn/unreadable lines skipped
    acked: int = 0  # since start: records acknowledged (shipped or set aside)
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
        self._fh = None
        self._pending = self._count_after(self._ack)

    # -- state -----------------------------------------------------------
    def _load_state(self) -> dict:
        try:
            return json.loads(self._state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("spool state %s unreadable (%s): starting from the oldest segment", self._state_path, e)
            return {}

    def _save_state(self) -> None:
        body = {
            "segment": self._ack[0],
            "offset": self._ack[1],
            "dropped": self.stats.dropped,
            "corrupt": self.stats.corrupt,
            "saved_at": time.time(),
        }
        write_atomic(self._state_path, json.dumps(body).encode())

    # -- appending -------------------------------------------------------
    def append(self, records: list[tuple[str, str, dict]]) -> int:
        """Write ``(id, data stream, document)`` records durably. Returns bytes written."""
        if not records:
            return 0
        now = round(time.time(), 3)
        lines = [
            json.dumps({"i": i, "x": x, "t": now}, separators=(",", ":")).encode()
            + b"\t"
            + json.dumps(d, separators=(",", ":"), ensure_ascii=False, default=str).encode()
            + b"\n"
            for i, x, d in records
        ]
        with self._cond:
            total = 0
            for ln in lines:
                if self._fh is None or self._segs.get(self._cur, 0) + len(ln) > self.segment_bytes and self._segs.get(self._cur, 0) > 0:
                    self._roll()
                self._fh.write(ln)
                self._segs[self._cur] = self._segs.get(self._cur, 0) + len(ln)
                total += len(ln)
                if self.fsync == "always":
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
            self._fh.flush()
            if self.fsync == "batch":
                os.fsync(self._fh.fileno())
            self.stats.appended += len(lines)
            self._pending += len(lines)
            self._enforce_cap()
            self._cond.notify_all()
        return total

    def _roll(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            if self.fsync != "never":
                os.fsync(self._fh.fileno())
            self._fh.close()
            self._cur += 1
        path = self.dir / _seg_name(self._cur)
        self._fh = open(path, "ab")
        self._segs.setdefault(self._cur, 0)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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
        with self._lock:
            if self._fh is not None:
                self._fh.flush()
                if self.fsync != "never":
                    os.fsync(self._fh.fileno())
                self._fh.close()
                self._fh = None
